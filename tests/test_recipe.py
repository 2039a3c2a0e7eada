"""The training recipe a config leaves unset comes from the denoiser's size and the number of images."""

from __future__ import annotations

import pytest

from diffusion_lora.errors import ConfigError
from diffusion_lora.training.config import load_config
from diffusion_lora.training.recipe import (
    auto_batch_size,
    auto_learning_rate,
    auto_steps,
    auto_targets,
    resolve_recipe,
)


@pytest.mark.parametrize(("parameters", "lr"), [
    (859_520_964, 1e-4),  # SD 1.5's UNet: the usual LoRA rate
    (11_901_408_320, 1e-4),  # Flux.1's transformer
    (500_000_000, 1e-4),
    (125_000_000, 2e-4),  # a quarter of the size: twice the rate
    (1_489_028, 1.8e-3),  # shapes-sd15's UNet: sqrt(500 M / 1.49 M) = 18.3 times
    (100_000, 2e-3),  # capped
])
def test_learning_rate_grows_as_one_over_the_square_root_of_size_below_500m(parameters, lr):
    assert auto_learning_rate(parameters) == pytest.approx(lr)


def test_batch_size_is_one_for_real_models_and_up_to_eight_for_small_ones():
    assert auto_batch_size(859_520_964, 20) == 1
    assert auto_batch_size(1_489_028, 20) == 8
    assert auto_batch_size(1_489_028, 5) == 5  # never more than the images


@pytest.mark.parametrize(("images", "batch", "steps"), [(20, 1, 4000), (20, 8, 500), (3, 8, 100), (50, 1, 4000),
                                                         (7, 3, 467), (10, 8, 250)])
def test_steps_see_each_image_two_hundred_times_within_bounds(images, batch, steps):
    assert auto_steps(images, batch) == steps


def test_targets_follow_the_denoiser_kind():
    assert auto_targets("unet") == "attn-ff" and auto_targets("transformer") == "attn"


def _cfg(**train):
    return load_config({"model": {"name": "tiny-sd15"}, "data": {"path": "x"}, "output": {"dir": "y"},
                        "train": train})


def test_resolution_fills_only_what_the_config_leaves_unset():
    auto = resolve_recipe(_cfg(), parameters=1_489_028, images=20, denoiser="unet")
    assert (auto.train.learning_rate, auto.train.batch_size, auto.train.steps, auto.lora.targets) == \
        (1.8e-3, 8, 500, "attn-ff")
    given = resolve_recipe(_cfg(learning_rate=3e-4, batch_size=2, steps=7), parameters=1_489_028, images=20,
                           denoiser="transformer")
    assert (given.train.learning_rate, given.train.batch_size, given.train.steps, given.lora.targets) == \
        (3e-4, 2, 7, "attn")
    # a batch size the config gives decides the automatic step count
    assert resolve_recipe(_cfg(batch_size=4), parameters=10**9, images=20, denoiser="unet").train.steps == 1000


def test_a_warmup_longer_than_the_chosen_steps_names_both():
    cfg = load_config({"model": {"name": "tiny-sd15"}, "data": {"path": "x"}, "output": {"dir": "y"},
                       "scheduler": {"name": "constant_with_warmup", "warmup_steps": 600}})
    with pytest.raises(ConfigError, match=r"scheduler.warmup_steps: 600 must be smaller than train.steps \(500, "
                                          r"chosen for 20 images\)"):
        resolve_recipe(cfg, parameters=1_489_028, images=20, denoiser="unet")


def test_the_plain_command_trains_with_the_recipe_and_records_it(tmp_path, capsys):
    """Only --model, --data and --out: the resolved config beside the adapter holds what the recipe chose
    for the tiny UNet (1.5 M parameters) and 3 images (batch 3, each image seen 200 times: 200 steps;
    targets attn-ff)."""
    import tomllib

    from diffusion_lora.cli import main
    from diffusion_lora.models.tiny import build_tiny_pipeline

    from .test_train import make_dataset

    data = make_dataset(tmp_path / "data", n=3)
    parameters = sum(p.numel() for p in build_tiny_pipeline("tiny-sd15").unet.parameters())
    assert main(["train", "--model", "tiny-sd15", "--data", str(data), "--out", str(tmp_path / "out")]) == 0
    assert "recipe from the model and the data" in capsys.readouterr().err
    cfg = tomllib.loads((tmp_path / "out" / "config.toml").read_text())
    assert cfg["train"]["learning_rate"] == auto_learning_rate(parameters) == 1.8e-3  # a 1.5 M-parameter UNet
    assert (cfg["train"]["batch_size"], cfg["train"]["steps"], cfg["lora"]["targets"]) == (3, 200, "attn-ff")
    import json

    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "logs" / "metrics.jsonl").read_text().splitlines()
             if line.strip() and "loss" in line]
    assert steps[-1] == 200


def test_the_cli_help_states_the_recipe_constants(capsys):
    from diffusion_lora.cli import main
    from diffusion_lora.training.recipe import EPOCHS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert f"each image seen {EPOCHS} times" in " ".join(capsys.readouterr().out.split())
