"""`diffusion-lora generate` end to end on the tiny model, and A1111 prompt tags."""

from __future__ import annotations

import inspect
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import diffusion_lora as dl
from diffusion_lora.cli import main, split_weighted
from diffusion_lora.generate import LoraTag, parse_lora_tags

from .helpers import SIZE, cli_image_args, trained_adapter


@pytest.fixture(scope="module")
def style_file(tmp_path_factory):

    pipe = dl.build_tiny_pipeline("tiny-sd15")
    trained_adapter(pipe, "style", seed=40, rank=4, alpha=2, text_encoder=True)
    return dl.save_lora(pipe, "style", tmp_path_factory.mktemp("loras") / "style.safetensors")


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def _generate(out, *extra):
    args = ["generate", "--model", "tiny-sd15", "--prompt", "a red circle", "--steps", "2",
            "--height", "32", "--width", "32", "--seed", "7", "--out", str(out), *extra]
    assert main(args) == 0
    return sorted(out.glob("*.png"))


def test_generate_writes_pngs_with_parameters(tmp_path, style_file, capsys):
    files = _generate(tmp_path / "a", "--lora", f"{style_file}:0.8", "--num-images", "2")
    assert [f.name for f in files] == ["00000-7.png", "00001-8.png"]
    printed = capsys.readouterr().out.split()
    assert printed == [str(f) for f in files]
    image = Image.open(files[0])
    assert image.size == (32, 32)
    params = image.text["parameters"]
    assert params.startswith("a red circle <lora:style:0.8>")
    assert "Steps: 2" in params and "Seed: 7" in params and "Size: 32x32" in params
    from diffusion_lora.formats.hashes import addnet_hash

    assert f'Lora hashes: "style: {addnet_hash(style_file)[:12]}"' in params  # computed, not the stored claim
    assert "Seed: 8" in Image.open(files[1]).text["parameters"]


def test_same_seed_same_pixels_and_lora_changes_them(tmp_path, style_file):
    base1 = _generate(tmp_path / "b1")
    base2 = _generate(tmp_path / "b2")
    assert np.array_equal(_pixels(base1[0]), _pixels(base2[0]))
    styled = _generate(tmp_path / "s", "--lora", str(style_file))
    assert not np.array_equal(_pixels(styled[0]), _pixels(base1[0]))
    fused = _generate(tmp_path / "f", "--lora", str(style_file), "--fuse")
    diff = np.abs(_pixels(fused[0]).astype(int) - _pixels(styled[0]).astype(int))
    assert diff.max() <= 2  # fused equals unfused up to float rounding


def test_prompt_tags_load_and_weigh_adapters(tmp_path, style_file):
    via_flag = _generate(tmp_path / "flag", "--lora", f"{style_file}:0.5")
    args = ["generate", "--model", "tiny-sd15", "--prompt", "a red circle <lora:style:0.5>", "--steps", "2",
            "--height", "32", "--width", "32", "--seed", "7", "--out", str(tmp_path / "tag"),
            "--lora-dir", str(style_file.parent)]
    assert main(args) == 0
    via_tag = sorted((tmp_path / "tag").glob("*.png"))
    assert np.array_equal(_pixels(via_tag[0]), _pixels(via_flag[0]))


def test_cli_reports_errors_cleanly(tmp_path, capsys):
    code = main(["generate", "--model", "tiny-sd15", "--prompt", "x", "--lora", str(tmp_path / "missing.safetensors"),
                 "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.safetensors" in err


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "diffusion_lora.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("diffusion-lora ")


def test_parse_lora_tags():
    prompt, tags = parse_lora_tags("a cat <lora:style:0.7>, in a hat <lora:path/to/char>")
    assert prompt == "a cat, in a hat"
    assert tags == [LoraTag("style", 0.7), LoraTag("path/to/char", 1.0)]
    with pytest.raises(dl.ConfigError, match="not a number"):
        parse_lora_tags("<lora:x:abc>")


def test_split_weighted():
    assert split_weighted("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert split_weighted("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert split_weighted("C:/x.safetensors") == ("C:/x.safetensors", 1.0)


def test_sample_script_runs(tmp_path):
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "samples" / "stack_adapters.py"
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "samples" / "stacked.png").is_file()
    assert "name='char'" in result.stdout


def test_generate_every_family(tmp_path, tiny_kind):
    kind = tiny_kind
    size = str(SIZE.get(dl.families.tiny_models()[kind][1].tiny.pipeline, 32))
    args = ["generate", "--model", kind, "--prompt", "a blue star", "--steps", "2", "--height", size,
            "--width", size, "--guidance", "3.5", "--out", str(tmp_path / "out"),
            *cli_image_args(dl.load_pipeline(kind), tmp_path, int(size))]  # Kontext, Fill, Control inputs
    assert main(args) == 0
    (png,) = (tmp_path / "out").glob("*.png")
    image = Image.open(png)
    assert image.size == (int(size), int(size))
    assert f"Model: {kind}" in image.text["parameters"]
    # a guidance-distilled model's guidance_scale is written as Forge does, with the true CFG scale (1)
    pipe = dl.load_pipeline(kind)
    # (Flux.1: true_cfg_scale beside it; Flux.2 dev: a guidance embedding and no true CFG; Klein: true CFG only)
    distilled = "true_cfg_scale" in inspect.signature(pipe.__call__).parameters or bool(
        getattr(getattr(pipe, "transformer", None), "config", {}).get("guidance_embeds")
    )
    cfg = "CFG scale: 1, Distilled CFG Scale: 3.5," if distilled else "CFG scale: 3.5,"
    # A1111's name of the model's own scheduler (diffusers docs' table)
    sampler = {"DDIMScheduler": "DDIM", "EulerDiscreteScheduler": "Euler",
               "FlowMatchEulerDiscreteScheduler": "Euler"}[type(pipe.scheduler).__name__]
    assert f"Sampler: {sampler}, {cfg} Seed: 0," in image.text["parameters"]
