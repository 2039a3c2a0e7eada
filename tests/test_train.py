"""The trainer end to end on tiny models: learning, resume bit-identity, caches, outputs, processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

import diffusion_lora as dl
from diffusion_lora.formats.safetensors_io import read_metadata

from . import helpers

COLOURS = ("red", "blue", "green", "orange")


def make_dataset(root: Path, n: int = 6, size: tuple[int, int] = (64, 64)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = Image.new("RGB", size, "white")
        colour = COLOURS[i % len(COLOURS)]
        ImageDraw.Draw(image).ellipse((8 + i, 8, size[0] - 10, size[1] - 8 - i), fill=colour)
        image.save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"a {colour} circle, white background", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


def config(data_dir: Path, out: Path, model: str = "tiny-sd15", **sections) -> dict:
    cfg = {
        "model": {"name": model},
        "data": {"path": str(data_dir), "resolution": 64, "min_bucket": 64, "max_bucket": 128, "bucket_step": 32},
        "lora": {"rank": 4},
        "train": {"steps": 20, "learning_rate": 1e-3, "batch_size": 2},
        "output": {"dir": str(out), "name": "style"},
        "log": {"tensorboard": False},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


@pytest.mark.parametrize("kind", ["tiny-sd15", "tiny-sd35"])
def test_resume_is_bit_identical(dataset, tmp_path, kind):
    straight = dl.train(config(dataset, tmp_path / "a", model=kind, checkpoint={"every": 5}), progress=False)
    cfg_b = config(dataset, tmp_path / "b", model=kind, checkpoint={"every": 5})
    first = dl.train(cfg_b, progress=False, max_steps_this_run=10)
    assert first.adapter is None and first.checkpoint.name == "checkpoint-00000010"
    resumed = dl.train(cfg_b, progress=False, resume=True)
    a, b = adapter_tensors(straight.adapter), adapter_tensors(resumed.adapter)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight.losses[10:] == resumed.losses


def test_cache_on_off_same_loss_and_stale_cache_rebuilt(tmp_path):
    data = make_dataset(tmp_path / "data", n=4)
    memory = dl.train(config(data, tmp_path / "m", train={"steps": 6}), progress=False)
    off = dl.train(config(data, tmp_path / "o", train={"steps": 6}, cache={"latents": "off", "text": "off"}),
                progress=False)
    disk_cfg = config(data, tmp_path / "d", train={"steps": 6}, cache={"latents": "disk", "text": "disk"})
    disk = dl.train(disk_cfg, progress=False)
    assert memory.losses == off.losses == disk.losses
    entries = sorted((tmp_path / "d" / "cache" / "latents").glob("*.safetensors"))
    assert entries
    # change one image's pixels: its old entry must not be used, a new one is built
    image = Image.open(data / "img0.png").convert("RGB")
    ImageDraw.Draw(image).rectangle((0, 0, 20, 20), fill="black")
    image.save(data / "img0.png")
    changed = dl.train(disk_cfg, progress=False)
    assert len(list((tmp_path / "d" / "cache" / "latents").glob("*.safetensors"))) > len(entries)
    assert changed.losses != disk.losses


def test_loss_falls_when_overfitting_one_image(tmp_path):
    data = make_dataset(tmp_path / "one", n=1)
    result = dl.train(config(data, tmp_path / "out", train={"steps": 60, "batch_size": 1, "learning_rate": 5e-3},
                             lora={"rank": 8}), progress=False)
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)


def test_every_family_trains_and_loads(dataset, tmp_path, tiny_kind):
    kind = tiny_kind
    size = 64
    result = dl.train(config(dataset, tmp_path / "out", model=kind, train={"steps": 3, "batch_size": 1},
                          data={"resolution": size}), progress=False)
    pipe = dl.load_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    base = helpers.run(pipe, "a red circle")
    dl.load_lora(pipe, result.adapter)
    assert not torch.equal(base, helpers.run(pipe, "a red circle"))
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_outputs_metadata_card_samples_and_generate(dataset, tmp_path):
    cfg = config(dataset, tmp_path / "out", data={"trigger_word": "zxq"}, lora={"text_encoder": True},
                 train={"steps": 4}, sample={"every": 2, "prompts": ["zxq a red circle", "zxq a blue circle"],
                                              "seeds": [0, 1], "steps": 2},
                 output={"save_format": "kohya"})
    result = dl.train(cfg, progress=False)
    meta = read_metadata(result.adapter)
    assert meta["ss_steps"] == "4" and meta["ss_num_train_images"] == "6"
    assert json.loads(meta["ss_tag_frequency"]) == {dataset.name: {"white background": 6, "a red circle": 2,
                                                                  "a blue circle": 2, "a green circle": 1,
                                                                  "a orange circle": 1}}
    assert json.loads(meta["diffusion_lora.train_config"])["train"]["steps"] == 4
    assert meta["modelspec.trigger_phrase"] == "zxq"
    out = tmp_path / "out"
    assert (out / "config.toml").is_file() and (out / "README.md").is_file()
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step_000002.png", "step_000004.png"]
    assert Image.open(out / "samples" / "step_000004.png").size == (128, 2 * (64 + 14))
    assert "samples/step_000004.png" in (out / "README.md").read_text()
    from diffusion_lora.cli import main

    assert main(["generate", "--model", "tiny-sd15", "--lora", str(result.adapter), "--prompt", "zxq a circle",
                 "--steps", "2", "--height", "64", "--width", "64", "--out", str(tmp_path / "gen")]) == 0
    assert len(list((tmp_path / "gen").glob("*.png"))) == 1


def test_bad_images_reported_before_training(tmp_path):
    data = make_dataset(tmp_path / "data", n=3)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.new("RGB", (1, 1)).save(data / "dot.png")
    out = tmp_path / "out"
    with pytest.raises(dl.DatasetError) as err:
        dl.train(config(data, out), progress=False)
    assert "broken.png" in str(err.value) and "dot.png" in str(err.value)
    assert not (out / "style.safetensors").exists()
    result = dl.train(config(data, out, data={"skip_bad_images": True}, train={"steps": 2}), progress=False)
    assert result.adapter.is_file()


def test_two_process_accelerate_launch(dataset, tmp_path):
    """`accelerate launch` with 2 CPU processes: completes, and both ranks end with identical weights."""
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "diffusion_lora.cli",
           "train", "--model", "tiny-sd15", "--data", str(dataset), "--out", str(out), "--steps", "6",
           "--resolution", "64", "--batch-size", "1", "--set", "data.min_bucket=64", "--set", "data.max_bucket=128",
           "--set", "data.bucket_step=32", "--set", "log.tensorboard=false"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    digests = json.loads((out / "logs" / "ranks.json").read_text())
    assert len(digests) == 2 and digests[0] == digests[1]
    assert (out / "lora.safetensors").is_file()
    single = dl.train(config(dataset, tmp_path / "single", train={"steps": 6, "batch_size": 1},
                          output={"name": "lora"}), progress=False)
    assert not torch.equal(load_file(str(single.adapter))["unet.down_blocks.0.attentions.0.transformer_blocks.0"
                                                          ".attn1.to_q.lora_B.weight"],
                           load_file(str(out / "lora.safetensors"))["unet.down_blocks.0.attentions.0"
                                                                    ".transformer_blocks.0.attn1.to_q.lora_B.weight"])


def test_prior_preservation_generates_class_images(dataset, tmp_path):
    cfg = config(dataset, tmp_path / "out", train={"steps": 3},
                 prior={"num_images": 2, "class_prompt": "a circle", "class_dir": str(tmp_path / "class")})
    result = dl.train(cfg, progress=False)
    assert sorted(p.name for p in (tmp_path / "class").glob("*.png")) == ["class_00000.png", "class_00001.png"]
    assert (tmp_path / "class" / "class_00000.txt").read_text() == "a circle"
    assert read_metadata(result.adapter)["ss_num_train_images"] == "8"
    again = dl.train(cfg, progress=False)  # class images exist now: none generated, same result
    assert len(list((tmp_path / "class").glob("*.png"))) == 2
    assert again.losses == result.losses


def test_accumulation_and_checkpointing_match_plain_steps(dataset, tmp_path):
    """Batch 2 ≡ batch 1 × 2 accumulation in expectation; gradient checkpointing changes no numbers."""
    plain = dl.train(config(dataset, tmp_path / "p", train={"steps": 4}), progress=False)
    ckpt = dl.train(config(dataset, tmp_path / "c", train={"steps": 4, "gradient_checkpointing": True}),
                 progress=False)
    a, b = adapter_tensors(plain.adapter), adapter_tensors(ckpt.adapter)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    accumulated = dl.train(config(dataset, tmp_path / "g", train={"steps": 4, "batch_size": 1,
                                                                  "gradient_accumulation": 2}), progress=False)
    assert len(accumulated.losses) == 4 and all(torch.isfinite(torch.tensor(accumulated.losses)))


def test_bf16_mixed_precision_on_cpu(dataset, tmp_path):
    result = dl.train(config(dataset, tmp_path / "out", train={"steps": 2, "mixed_precision": "bf16"}), progress=False)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert all(t.dtype == torch.float32 for t in adapter_tensors(result.adapter).values())
