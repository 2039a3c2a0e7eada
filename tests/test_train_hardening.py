"""`train` as a new user and a hostile folder meet it: defaults, symlinks, FIFOs, inflating inputs,
diverging runs and damaged checkpoints (issue 12)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

import diffusion_lora as dl
from diffusion_lora.cli import main
from diffusion_lora.formats.safetensors_io import read_metadata
from diffusion_lora.training.checkpoint import STATE, latest_checkpoint
from diffusion_lora.training.dataset import BucketedDataset, bucket_batches
from diffusion_lora.training.epochs import Permutation
from diffusion_lora.training.images import image_size, load_image, validate_images
from diffusion_lora.training.scan import MAX_CAPTION_BYTES, ImageItem, scan_images

ROOT = Path(__file__).resolve().parent.parent


def make_images(root: Path, n: int = 2, size: int = 32) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = Image.new("RGB", (size, size), "white")
        ImageDraw.Draw(image).ellipse((2 + i, 2, size - 3, size - 3 - i), fill=("red", "blue")[i % 2])
        image.save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"a {('red', 'blue')[i % 2]} circle", encoding="utf-8")
    return root


def tiny(data_dir: Path, out: Path, **sections) -> dict:
    cfg = {"model": {"name": "tiny-sd15"}, "data": {"path": str(data_dir)}, "lora": {"rank": 4},
           "train": {"steps": 2, "learning_rate": 1e-3}, "output": {"dir": str(out), "name": "style"},
           "log": {"tensorboard": False}}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real command line in a child process (a hang is a timeout, not a stuck test run)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "diffusion_lora.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------ 1. defaults a new user hits


def test_train_without_model_uses_the_embedded_model_at_its_native_size(tmp_path):
    data = make_images(tmp_path / "data", size=64)
    out = tmp_path / "out"
    assert main(["train", "--data", str(data), "--out", str(out), "--steps", "1", "--rank", "4"]) == 0
    saved = dl.load_config(out / "config.toml")
    assert saved.model.name == "shapes-sd15"
    assert saved.data.resolution == 64  # shapes-sd15: sample size 16 × VAE factor 4, not a fixed 512
    meta = read_metadata(out / "lora.safetensors")
    assert meta["ss_resolution"] == "(64, 64)" and meta["modelspec.resolution"] == "64x64"
    assert json.loads(meta["diffusion_lora.train_config"])["data"]["resolution"] == 64
    assert "resolution 64" in (out / "README.md").read_text()


def test_python_api_and_a_toml_without_model_name_behave_like_the_cli(tmp_path):
    data = make_images(tmp_path / "data")
    toml = tmp_path / "run.toml"
    toml.write_text(f'[data]\npath = "{data}"\n[output]\ndir = "{tmp_path / "out"}"\n', encoding="utf-8")
    assert dl.load_config(toml).model.name == "shapes-sd15"
    result = dl.train({"model": {"name": "tiny-sd15"}, "data": {"path": str(data)},
                    "output": {"dir": str(tmp_path / "api")}, "train": {"steps": 1}, "lora": {"rank": 4},
                    "log": {"tensorboard": False}}, progress=False)
    assert dl.load_config(tmp_path / "api" / "config.toml").data.resolution == 32  # tiny-sd15's native size
    assert read_metadata(result.adapter)["ss_resolution"] == "(32, 32)"


@pytest.mark.parametrize("resolution", [64, 128])
def test_small_resolutions_train_with_the_bucket_limits_following(tmp_path, resolution):
    data = make_images(tmp_path / "data", size=resolution)
    out = tmp_path / "out"
    assert main(["train", "--model", "tiny-sd15", "--data", str(data), "--out", str(out), "--steps", "1",
                 "--rank", "4", "--resolution", str(resolution), "--set", "log.tensorboard=false"]) == 0
    saved = dl.load_config(out / "config.toml").data
    assert (saved.resolution, saved.min_bucket) == (resolution, resolution)


# ------------------------------------------------------------------ 4.1 outputs never follow symlinks


def test_outputs_replace_planted_symlinks_and_never_write_through_them(tmp_path):
    data = make_images(tmp_path / "data")
    out = tmp_path / "out"
    (out / "samples").mkdir(parents=True)
    victims = {}
    for name in ("README.md", "samples/step_000002.png", "config.toml"):
        victim = tmp_path / f"victim-{name.replace('/', '_')}"
        victim.write_text("precious", encoding="utf-8")
        (out / name).symlink_to(victim)
        victims[name] = victim
    dl.train(tiny(data, out, sample={"every": 2, "prompts": ["a circle"], "steps": 1}), progress=False)
    for name, victim in victims.items():
        assert victim.read_text(encoding="utf-8") == "precious", name
        assert not (out / name).is_symlink() and (out / name).stat().st_size > 8, name
    assert Image.open(out / "samples" / "step_000002.png").size[0] == 32


def test_a_symlinked_metrics_log_or_logs_folder_is_refused_before_training(tmp_path):
    data = make_images(tmp_path / "data")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious", encoding="utf-8")
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(dl.DiffusionLoraError, match=r"metrics\.jsonl: is a symlink"):
        dl.train(tiny(data, out), progress=False)
    out2 = tmp_path / "out2"
    out2.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (out2 / "logs").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(dl.DiffusionLoraError, match=r"logs: is a symlink"):
        dl.train(tiny(data, out2), progress=False)
    assert victim.read_text(encoding="utf-8") == "precious"
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_a_symlinked_checkpoints_folder_is_refused(tmp_path):
    from diffusion_lora.training.checkpoint import save_checkpoint

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "checkpoints").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(dl.DiffusionLoraError, match=r"checkpoints: is a symlink"):
        save_checkpoint(tmp_path / "checkpoints", 1, {"step": 1}, keep=2)
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_rank_digests_are_written_atomically_past_a_planted_link(tmp_path):
    from types import SimpleNamespace

    from accelerate import Accelerator

    from diffusion_lora.training.parallel import check_ranks_agree

    victim = tmp_path / "victim.txt"
    victim.write_text("precious", encoding="utf-8")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "ranks.json").symlink_to(victim)
    run = SimpleNamespace(named=[("a", torch.nn.Parameter(torch.ones(3)))], acc=Accelerator(cpu=True),
                          is_main=True, out=tmp_path)
    check_ranks_agree(run)
    assert victim.read_text(encoding="utf-8") == "precious"
    assert len(json.loads((tmp_path / "logs" / "ranks.json").read_text())) == 1


# ------------------------------------------------------------------ 5.1 a FIFO in the dataset


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_named_like_an_image_or_caption_is_reported_not_waited_on(tmp_path):
    data = make_images(tmp_path / "data")
    os.mkfifo(data / "x.png")
    os.unlink(data / "img1.txt")
    os.mkfifo(data / "img1.txt")
    done = cli("train", "--model", "tiny-sd15", "--data", str(data), "--out", str(tmp_path / "out"), "--steps", "1",
               "--set", "log.tensorboard=false", timeout=240)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert f"{data / 'x.png'}: not a regular file" in done.stderr
    assert f"caption file {data / 'img1.txt'}: not a regular file" in done.stderr
    good, problems = validate_images(scan_images(data), min_side=8, skip_bad=True)
    assert [i.path.name for i in good] == ["img0.png"] and len(problems) == 2
    with pytest.raises(dl.DatasetError, match="not a regular file"):
        load_image(data / "x.png")  # opened directly (a file swapped for a FIFO after the scan)


# ------------------------------------------------------------------ 5.2 inputs that inflate


def test_a_huge_kohya_repeat_count_is_refused_and_large_ones_cost_no_memory(tmp_path):
    make_images(tmp_path / "data" / "50000000_x", n=1)
    with pytest.raises(dl.DatasetError, match=r"50000000_x: folder repeat count 50000000 is over the limit of 10000"):
        validate_images(scan_images(tmp_path / "data"), min_side=8, skip_bad=False)
    image = make_images(tmp_path / "many", n=1) / "img0.png"
    items = [ImageItem(image, "c", 10_000, "f") for _ in range(50)]  # 500,000 samples an epoch
    dataset = BucketedDataset(items, resolution=32, min_bucket=32, max_bucket=32, bucket_step=32)
    tracemalloc.start()
    batches = bucket_batches(dataset, 4, seed=0, epoch=0)
    first = [batches[i] for i in range(100)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(batches) == 125_000 and all(len(b) == 4 for b in first)
    assert peak < 1_000_000, peak  # a list of the epoch's sample indices alone is ~18 MB
    assert len({i for b in first for i in b}) == 400  # distinct samples


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 100, 1000])
def test_the_per_index_shuffle_is_a_permutation_chosen_by_the_key(n):
    values = [Permutation(n, key=7)(i) for i in range(n)]
    assert sorted(values) == list(range(n))
    if n >= 16:
        assert values != list(range(n))
        assert values != [Permutation(n, key=8)(i) for i in range(n)]


def _png_header_only(width: int, height: int, bit_depth: int, colour_type: int) -> bytes:
    """A PNG whose header claims ``width × height``; its pixel data is a stub (never decoded)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decoded_bytes_are_bounded_from_the_header_not_just_pixels(tmp_path):
    bomb = tmp_path / "gray16.png"
    bomb.write_bytes(_png_header_only(13000, 13000, 16, 0))  # under the pixel limit; 338 MB decoded
    for call in (lambda: image_size(bomb), lambda: load_image(bomb)):
        with pytest.raises(dl.DatasetError, match=r"decodes to 338,000,000 bytes, over the limit"):
            call()
    [problem] = validate_images([ImageItem(bomb, "", 1, "f")], min_side=8, skip_bad=True)[1]
    assert "decodes to" in problem
    fine = tmp_path / "rgb8.png"
    fine.write_bytes(_png_header_only(9000, 9000, 8, 2))  # 243 MB of 8-bit RGB: within the bound
    assert image_size(fine) == (9000, 9000)


def test_sixteen_bit_gray_converts_in_bands_bit_identically(tmp_path):
    from diffusion_lora.training.images import _gray_to_uint8

    def reference(values: np.ndarray) -> np.ndarray:  # the whole-image float64 formula
        is_float = values.dtype.kind == "f"
        v = values.astype(np.float64)
        if is_float and v.size and v.max() <= 1.0:
            v = v * 255.0
        elif v.size and v.max() > 255:
            v = np.clip(v, 0, 65535) / 257.0
        return np.clip(np.rint(v), 0, 255).astype(np.uint8)

    rng = np.random.default_rng(0)
    cases = [rng.integers(0, 65536, (700, 3001)).astype(np.uint16), rng.integers(-5, 200, (40, 30)).astype(np.int32),
             rng.random((600, 2000), dtype=np.float32), (rng.random((9, 9)) * 300).astype(np.float32)]
    for values in cases:
        assert np.array_equal(_gray_to_uint8(values), reference(values))
    tracemalloc.start()
    _gray_to_uint8(cases[0])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * cases[0].size, peak  # the whole-image formula needs ~24 bytes a pixel


# ------------------------------------------------------------------ 5.9 captions and metadata sizes


def test_an_oversized_caption_is_a_dataset_error_before_training(tmp_path):
    data = make_images(tmp_path / "data")
    (data / "img1.txt").write_bytes(b"tag, " * (MAX_CAPTION_BYTES // 5 + 1))
    with pytest.raises(dl.DatasetError, match=rf"caption file {(data / 'img1.txt')}: caption file is over the limit"):
        dl.train(tiny(data, tmp_path / "out"), progress=False)
    assert not (tmp_path / "out" / "style.safetensors").exists()
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "img0.png", "text": "x" * (MAX_CAPTION_BYTES + 1)}))
    (data / "img1.txt").write_text("ok", encoding="utf-8")
    os.unlink(data / "img0.txt")
    with pytest.raises(dl.DatasetError, match=r"metadata.jsonl: line 1: the text is over the limit"):
        validate_images(scan_images(data), min_side=8, skip_bad=False)


def test_training_metadata_is_sized_up_front(tmp_path):
    from diffusion_lora.training.preflight import training_metadata as _training_metadata

    image = make_images(tmp_path / "data", n=1) / "img0.png"
    cfg = dl.load_config(tiny(tmp_path / "data", tmp_path / "out"))
    from diffusion_lora.training.config import resolve_sizes

    cfg = resolve_sizes(cfg, 32)
    items = [ImageItem(image, ", ".join(f"t{i}_{j}" for j in range(6000)), 1, "f") for i in range(100)]
    meta = _training_metadata(cfg, items)  # 600,000 distinct tags: trimmed to the most frequent
    assert len(meta["ss_tag_frequency"]) <= 4 * 2**20 and json.loads(meta["ss_tag_frequency"])["f"]
    huge = dl.load_config(tiny(tmp_path / "data", tmp_path / "out", data={"instance_prompt": "x" * 40_000_000}))
    with pytest.raises(dl.ConfigError, match=r"training metadata would be .* bytes \(diffusion_lora.train_config"):
        _training_metadata(resolve_sizes(huge, 32), items[:1])


# ------------------------------------------------------------------ 5.6 non-finite training


def test_a_diverging_run_stops_with_an_error_and_saves_nothing_non_finite(tmp_path):
    data = make_images(tmp_path / "data")
    out = tmp_path / "out"
    cfg = tiny(data, out, train={"steps": 6, "learning_rate": 1e6}, checkpoint={"every": 1, "keep": 10})
    message = r"step 2 has a non-finite loss or gradient.*lower train.learning_rate"
    with pytest.raises(dl.DiffusionLoraError, match=message):
        dl.train(cfg, progress=False)
    assert not (out / "style.safetensors").exists()
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-00000001"]  # the step before the divergence
    state = torch.load(checkpoints[0] / STATE, weights_only=True)
    assert all(bool(torch.isfinite(t).all()) for t in state["params"].values())
    done = cli("train", "--model", "tiny-sd15", "--data", str(data), "--out", str(tmp_path / "cli"), "--steps", "3",
               "--lr", "1e6", "--set", "log.tensorboard=false")
    assert done.returncode == 2 and "non-finite" in done.stderr and "Traceback" not in done.stderr
    assert not list((tmp_path / "cli").glob("*.safetensors"))


def test_non_finite_steps_can_be_skipped_and_counted_up_to_a_limit(tmp_path):
    data = make_images(tmp_path / "data")
    cfg = tiny(data, tmp_path / "out", train={"steps": 6, "learning_rate": 1e6, "max_nonfinite_steps": 2})
    with pytest.raises(dl.DiffusionLoraError, match=r"3 such step\(s\), more than train.max_nonfinite_steps = 2"):
        dl.train(cfg, progress=False)
    log = [json.loads(line) for line in (tmp_path / "out" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert log == [] or all(r["loss"] is None or np.isfinite(r["loss"]) for r in log)


# ------------------------------------------------------------------ 5.8 one-line errors, not tracebacks


def test_bad_output_settings_are_one_line_errors(tmp_path, capsys):
    """In process (main() returns instead of raising): a traceback would be an exception out of main."""
    data = make_images(tmp_path / "data")
    a_file = tmp_path / "file"
    a_file.write_text("x", encoding="utf-8")
    for args, expected in [
        (["--out", str(a_file)], "error: output.dir: "),
        (["--out", str(a_file / "sub")], "error: output.dir: "),
        (["--out", str(tmp_path / "o"), "--set", "output.name=" + "n" * 300], "error: output.name: is 300 bytes"),
        (["--out", str(tmp_path / "o"), "--set", f"cache.dir={a_file}", "--set", "cache.latents=disk"],
         "error: cache.dir: "),
        (["--out", str(tmp_path / "o"), "--set", f"cache.dir={tmp_path / ('c' * 300)}", "--set", "cache.latents=disk"],
         "error: cache.dir: "),
        (["--out", str(tmp_path / "o"), "--set", f"prior.class_dir={a_file}", "--set", "prior.num_images=1",
          "--set", "prior.class_prompt=a"], "error: prior.class_dir: "),
        (["--out", str(tmp_path / "o"), "--data", str(tmp_path / ("d" * 300))], "error: data.path: "),
    ]:
        code = main(["train", "--model", "tiny-sd15", "--data", str(data), "--steps", "1", *args])
        err = capsys.readouterr().err
        assert code == 2, err[-2000:]
        assert err.startswith(expected) and err.count("\n") == 1, err[-2000:]
    assert a_file.read_text(encoding="utf-8") == "x"


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    data = make_images(root / "data")
    cfg = tiny(data, root / "out", train={"steps": 4}, checkpoint={"every": 2})
    dl.train(cfg, progress=False, max_steps_this_run=2)
    return cfg, root / "out" / "checkpoints" / "checkpoint-00000002"


def _damage(edit):
    def apply(state: dict) -> dict:
        edit(state)
        return state
    return apply


DAMAGES = {
    "wrong-shape parameter": (_damage(lambda s: s["params"].update(
        {k: torch.zeros(3, 3) for k in list(s["params"])[:1]})), "has shape [3, 3]"),
    "missing optimizer": (_damage(lambda s: s.pop("optimizer")), "lacks optimizer"),
    "step as text": (_damage(lambda s: s.update(step="2")), "step is '2'"),
    "params a list": (_damage(lambda s: s.update(params=[1, 2])), "params is a list"),
    "optimizer state shape": (_damage(lambda s: s["optimizer"]["state"][0].update(exp_avg=torch.zeros(1))),
                              "optimizer state exp_avg of parameter 0 has shape [1]"),
    "NaN parameter": (_damage(lambda s: next(iter(s["params"].values())).fill_(float("nan"))), "holds NaN or Inf"),
    "not a dict": (lambda s: [s], "holds a list"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_resume_validates_the_checkpoint_first_and_changes_nothing(checkpointed, damage, tmp_path):
    import shutil

    cfg, ckpt = checkpointed
    out = tmp_path / "out"
    shutil.copytree(Path(cfg["output"]["dir"]), out)
    state_path = out / "checkpoints" / ckpt.name / STATE
    edit, message = DAMAGES[damage]
    torch.save(edit(torch.load(state_path, weights_only=True)), state_path)
    before = {p: digest(p) for p in out.rglob("*") if p.is_file()}
    with pytest.raises(dl.DiffusionLoraError, match=re.escape(message)) as info:
        dl.train({**cfg, "output": {**cfg["output"], "dir": str(out)}}, progress=False, resume=True)
    assert str(state_path) in str(info.value) and "\n" not in str(info.value)
    assert {p: digest(p) for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("pointer", ["../../../etc", "/etc", "checkpoint-00000002/../../x", "checkpoint-1"])
def test_a_latest_pointer_may_not_lead_outside_the_run(tmp_path, pointer):
    root = tmp_path / "checkpoints"
    (root / "checkpoint-00000002").mkdir(parents=True)
    torch.save({"step": 2}, root / "checkpoint-00000002" / STATE)
    (root / "latest").write_text(pointer, encoding="utf-8")
    with pytest.raises(dl.DiffusionLoraError, match=r"latest: does not name a checkpoint folder of this run"):
        latest_checkpoint(root)


def test_a_latest_pointer_that_is_a_folder_or_a_link_is_refused(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "latest").mkdir(parents=True)
    with pytest.raises(dl.DiffusionLoraError, match=r"latest: is not a regular file"):
        latest_checkpoint(root)
    (root / "latest").rmdir()
    (tmp_path / "target").write_text("checkpoint-00000002", encoding="utf-8")
    (root / "latest").symlink_to(tmp_path / "target")
    with pytest.raises(dl.DiffusionLoraError, match=r"latest: cannot be read as a checkpoint pointer"):
        latest_checkpoint(root)


def test_a_symlinked_checkpoint_folder_is_never_used(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    torch.save({"step": 9}, elsewhere / STATE)
    (root / "checkpoint-00000009").symlink_to(elsewhere)
    assert latest_checkpoint(root) is None
    (root / "latest").write_text("checkpoint-00000009", encoding="utf-8")
    with pytest.raises(dl.DiffusionLoraError, match="is a symlink"):
        latest_checkpoint(root)


def test_resumed_adapter_is_finite_and_loads(checkpointed, tmp_path):
    import shutil

    cfg, _ = checkpointed
    out = tmp_path / "out"
    shutil.copytree(Path(cfg["output"]["dir"]), out)
    result = dl.train({**cfg, "output": {**cfg["output"], "dir": str(out)}}, progress=False, resume=True)
    assert all(bool(torch.isfinite(t).all()) for t in load_file(str(result.adapter)).values())
