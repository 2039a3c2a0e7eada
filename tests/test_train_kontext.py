"""Training Flux.1 Kontext from paired data (and Fill from masks) on the tiny models.

Pairs follow ai-toolkit's convention: ``data.control_path`` holds a control image with each target's
file stem; captions sit next to the targets.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

import diffusion_lora as dl
from diffusion_lora.models.invoke import run_pipeline

COLOURS = ("red", "blue", "green")


def make_pairs(root: Path, n: int = 3, size: int = 64) -> tuple[Path, Path]:
    """Targets (coloured circles, caption = the edit) and controls (the same circles in grey)."""
    targets, controls = root / "targets", root / "controls"
    targets.mkdir(parents=True)
    controls.mkdir(parents=True)
    for i in range(n):
        box = (6 + 3 * i, 8, size - 8, size - 6 - 2 * i)
        for folder, fill in ((targets, COLOURS[i % 3]), (controls, "grey")):
            image = Image.new("RGB", (size, size), "white")
            ImageDraw.Draw(image).ellipse(box, fill=fill)
            image.save(folder / f"img{i}.png")
        (targets / f"img{i}.txt").write_text(f"make the circle {COLOURS[i % 3]}", encoding="utf-8")
    # another extension than its target: pairing is by file stem
    Image.open(controls / "img0.png").save(controls / "img0.jpg")
    (controls / "img0.png").unlink()
    return targets, controls


def config(targets: Path, controls: Path | None, out: Path, model: str = "tiny-flux-kontext", **sections) -> dict:
    data = {"path": str(targets), "resolution": 64, "min_bucket": 64, "max_bucket": 64, "bucket_step": 32}
    if controls is not None:
        data["control_path"] = str(controls)
    cfg = {
        "model": {"name": model},
        "data": data,
        "lora": {"rank": 8},
        "train": {"steps": 10, "learning_rate": 3e-3, "batch_size": 1, "guidance": 2.5},
        "output": {"dir": str(out), "name": "edit"},
        "log": {"tensorboard": False},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


@pytest.fixture
def pairs(tmp_path) -> tuple[Path, Path]:
    return make_pairs(tmp_path / "data")


def _edit(pipe, control: Path) -> torch.Tensor:
    with torch.no_grad():
        return run_pipeline(pipe, "make the circle red", images={"image": Image.open(control).convert("RGB")},
                            num_inference_steps=2, height=64, width=64, guidance_scale=2.5, output_type="latent",
                            generator=torch.Generator().manual_seed(0)).images


def test_kontext_learns_from_pairs_and_the_lora_changes_the_edit(tmp_path):
    targets, controls = make_pairs(tmp_path / "data", n=1)
    # The same seed draws the same noise and timesteps at every step: a run whose learning rate is ~0 has
    # the losses of the untrained model on exactly those draws, so the difference is what was learned.
    train = {"steps": 30, "learning_rate": 1e-2}
    result = dl.train(config(targets, controls, tmp_path / "out", train=train), progress=False)
    still = dl.train(config(targets, controls, tmp_path / "still", train={**train, "learning_rate": 1e-12}),
                     progress=False)
    learned, untrained = sum(result.losses[-10:]), sum(still.losses[-10:])
    assert learned < 0.9 * untrained, (learned, untrained)
    pipe = dl.load_pipeline("tiny-flux-kontext")
    pipe.set_progress_bar_config(disable=True)
    base = _edit(pipe, controls / "img0.jpg")
    dl.load_lora(pipe, result.adapter)
    assert not torch.allclose(_edit(pipe, controls / "img0.jpg"), base)


def test_kontext_resume_is_bit_identical(pairs, tmp_path):
    targets, controls = pairs
    straight = dl.train(config(targets, controls, tmp_path / "a", checkpoint={"every": 5}), progress=False)
    cfg = config(targets, controls, tmp_path / "b", checkpoint={"every": 5})
    first = dl.train(cfg, progress=False, max_steps_this_run=5)
    assert first.adapter is None
    resumed = dl.train(cfg, progress=False, resume=True)
    a, b = load_file(str(straight.adapter)), load_file(str(resumed.adapter))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.losses[5:] == resumed.losses


def test_the_control_image_is_trained_on_and_its_cache_entry_follows_its_pixels(pairs, tmp_path):
    targets, controls = pairs
    cfg = config(targets, controls, tmp_path / "d", train={"steps": 4}, cache={"latents": "disk"})
    before = dl.train(cfg, progress=False)
    entries = set((tmp_path / "d" / "cache" / "latents").glob("*.safetensors"))
    image = Image.open(controls / "img1.png").convert("RGB")
    ImageDraw.Draw(image).rectangle((0, 0, 30, 30), fill="black")
    image.save(controls / "img1.png")
    after = dl.train(cfg, progress=False)
    assert after.losses != before.losses  # the reference tokens are part of the prediction
    assert set((tmp_path / "d" / "cache" / "latents").glob("*.safetensors")) > entries


def test_a_target_without_its_control_is_named(pairs, tmp_path):
    targets, controls = pairs
    (controls / "img2.png").unlink()
    with pytest.raises(dl.DatasetError, match=r"img2\.png: no control image"):
        dl.train(config(targets, controls, tmp_path / "out"), progress=False)
    # allowed: it trains as text-to-image beside the paired ones
    result = dl.train(config(targets, controls, tmp_path / "ok", data={"allow_unpaired": True},
                             train={"steps": 3}), progress=False)
    assert result.adapter.is_file()


def test_a_control_symlink_leading_outside_the_folder_is_refused(pairs, tmp_path):
    targets, controls = pairs
    outside = tmp_path / "secret.png"
    Image.new("RGB", (64, 64)).save(outside)
    (controls / "img2.png").unlink()
    os.symlink(outside, controls / "img2.png")
    with pytest.raises(dl.DatasetError, match="outside data.control_path"):
        dl.train(config(targets, controls, tmp_path / "out"), progress=False)


@pytest.mark.parametrize(("model", "data", "message"), [
    ("tiny-flux-kontext", {}, "data.control_path: Flux.1 Kontext trains from paired images"),
    ("tiny-flux", {"control_path": "{controls}"}, "takes no control images"),
    ("tiny-flux-kontext", {"control_path": "{controls}", "mask_path": "{controls}"}, "takes no masks"),
    ("tiny-flux-kontext", {"control_path": "{controls}", "control_dir": "{controls}"}, "both are set"),
])
def test_paired_settings_that_do_not_fit_the_model_are_config_errors(pairs, tmp_path, model, data, message):
    targets, controls = pairs
    cfg = config(targets, None, tmp_path / "out", model=model,
                 data={k: v.format(controls=controls) for k, v in data.items()})
    with pytest.raises(dl.ConfigError, match=message):
        dl.train(cfg, progress=False)


def test_sample_prompts_carry_the_image_to_edit(pairs, tmp_path):
    targets, controls = pairs
    cfg = config(targets, controls, tmp_path / "out", train={"steps": 2},
                 sample={"every": 2, "prompts": [f"make the circle red --image {controls / 'img1.png'}"],
                         "steps": 2})
    result = dl.train(cfg, progress=False)
    assert list((tmp_path / "out" / "samples").glob("*.png"))
    bad = config(targets, controls, tmp_path / "bad", sample={"every": 2, "prompts": ["make the circle red"]})
    with pytest.raises(dl.ConfigError, match="sample.prompts.*needs --image"):
        dl.train(bad, progress=False)
    assert result.adapter.is_file()


@pytest.mark.parametrize("with_masks", [False, True])
def test_fill_trains_with_random_or_given_masks(pairs, tmp_path, with_masks):
    targets, _ = pairs
    data = {}
    if with_masks:
        masks = tmp_path / "masks"
        masks.mkdir()
        for i in range(3):
            mask = Image.new("L", (64, 64), 0)
            ImageDraw.Draw(mask).rectangle((16, 16, 47, 47), fill=255)
            mask.save(masks / f"img{i}.png")
        data["mask_path"] = str(masks)
    cfg = config(targets, None, tmp_path / "out", model="tiny-flux-fill", data=data, train={"steps": 4},
                 checkpoint={"every": 2})
    straight = dl.train(cfg, progress=False)
    assert all(torch.isfinite(torch.tensor(straight.losses)))
    # random masks come from the step's generator: a resumed run draws the same ones
    cfg2 = config(targets, None, tmp_path / "out2", model="tiny-flux-fill", data=data, train={"steps": 4},
                  checkpoint={"every": 2})
    dl.train(cfg2, progress=False, max_steps_this_run=2)
    resumed = dl.train(cfg2, progress=False, resume=True)
    assert straight.losses[2:] == resumed.losses


def test_sample_config_smoke_test_runs_on_the_tiny_model(tmp_path, monkeypatch):
    import subprocess
    import sys

    from diffusion_lora.cli import main

    samples = Path(__file__).resolve().parents[1] / "samples"
    monkeypatch.chdir(tmp_path)
    subprocess.run([sys.executable, str(samples / "make_paired_dataset.py"), "--size", "64", "--count", "3"],
                   check=True, capture_output=True, timeout=120)
    code = main(["train", str(samples / "train_flux_kontext.toml"), "--model", "tiny-flux-kontext", "--steps", "2",
                 "--resolution", "64", "--set", "model.dtype=float32", "--set", "train.mixed_precision=no",
                 "--set", "optimizer.name=adamw", "--set", "data.min_bucket=32", "--set", "data.max_bucket=128",
                 "--set", "data.bucket_step=16", "--set", "scheduler.warmup_steps=1", "--set", "sample.every=0",
                 "--set", "sample.width=64", "--set", "sample.height=64", "--set", "sample.steps=2",
                 "--set", "checkpoint.every=0", "--set", "log.tensorboard=false"])
    assert code == 0
    adapter = tmp_path / "out" / "flux_kontext" / "recolour.safetensors"
    from diffusion_lora.formats.safetensors_io import read_metadata

    meta = read_metadata(adapter)
    assert meta["modelspec.architecture"] == "flux-1-kontext-dev/lora"


def test_control_trains_from_pairs_and_needs_every_pair(pairs, tmp_path):
    targets, controls = pairs
    result = dl.train(config(targets, controls, tmp_path / "out", model="tiny-flux-control", train={"steps": 3}),
                      progress=False)
    pipe = dl.load_pipeline("tiny-flux-control")
    pipe.set_progress_bar_config(disable=True)
    control = {"control_image": Image.open(controls / "img1.png").convert("RGB")}

    def generate():
        with torch.no_grad():
            return run_pipeline(pipe, "make the circle red", images=control, num_inference_steps=2, height=64,
                                width=64, output_type="latent", generator=torch.Generator().manual_seed(0)).images

    base = generate()
    dl.load_lora(pipe, result.adapter)
    assert not torch.allclose(generate(), base)
    with pytest.raises(dl.ConfigError, match="data.allow_unpaired: Flux.1 Control"):
        dl.train(config(targets, controls, tmp_path / "x", model="tiny-flux-control",
                        data={"allow_unpaired": True}), progress=False)


def test_control_and_mask_follow_their_targets_crop_and_flip(tmp_path):
    """A control image identical to its target (of another size: it is resized first) comes out equal to the
    target after the random crop and flip, sample after sample; so does a mask."""
    from diffusion_lora.training.dataset import BucketedDataset
    from diffusion_lora.training.pairs import pair_images
    from diffusion_lora.training.scan import scan_images

    targets, controls, masks = tmp_path / "t", tmp_path / "c", tmp_path / "m"
    for folder in (targets, controls, masks):
        folder.mkdir()
    image = Image.new("RGB", (96, 64), "white")
    ImageDraw.Draw(image).rectangle((10, 5, 60, 40), fill="red")
    image.save(targets / "a.png")
    image.resize((192, 128), Image.Resampling.NEAREST).save(controls / "a.png")
    image.convert("L").point(lambda v: 255 if v < 200 else 0).save(masks / "a.png")
    items = scan_images(targets)
    items = pair_images(items, targets, controls, role="control", setting="data.control_path")
    items = pair_images(items, targets, masks, role="mask", setting="data.mask_path")
    dataset = BucketedDataset(items, resolution=64, bucket_step=16, min_bucket=32, max_bucket=64,
                              center_crop=False, flip=True)
    flips = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        sample = dataset[0]
        target, control, mask = sample["pixel_values"], sample["control_values"], sample["mask_values"]
        assert control.shape == target.shape and mask.shape == (1, *target.shape[1:])
        assert (control - target).abs().mean() < 0.05  # resampling differs a little at the edges
        red = (target[0] > 0.5) & (target[1] < 0)
        assert red.any() and ((mask[0] > 0.5) != red).float().mean() < 0.03  # edges resample differently
        flips.add(bool(red[:, :8].any()))
    assert flips == {True, False}  # both orientations were drawn
