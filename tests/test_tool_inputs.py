"""What the tools read: FIFOs and devices are refused before hashing, bake takes what load_lora takes,
and a PEFT file keeps its lora_alpha."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading

import pytest
import torch

import diffusion_lora as dl
from diffusion_lora.adapters.layers import plain_state_dict
from diffusion_lora.cli import main
from diffusion_lora.formats import hashes
from diffusion_lora.tools.bake import bake

from .helpers import peft_folder

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")


def _finishes(fn, seconds: float = 10.0):
    """fn()'s exception (or None), failing the test if fn has not returned within ``seconds``."""
    box: list = []

    def target():
        try:
            fn()
            box.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "still running: it hangs on this input"
    return box[0]


@needs_fifo
@pytest.mark.parametrize("fn", [hashes.file_sha256, hashes.autov2_hash, hashes.addnet_hash, hashes.legacy_hash])
@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_hashes_refuse_fifos_and_devices_without_reading(tmp_path, fn, kind):
    path = tmp_path / "x.safetensors"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path = "/dev/zero"
        if not os.path.exists(path):
            pytest.skip("no /dev/zero")
    error = _finishes(lambda: fn(path))
    assert isinstance(error, dl.FormatError) and "not a regular file" in str(error) and str(path) in str(error)


@needs_fifo
def test_bake_refuses_a_fifo_lora_before_hashing_or_loading(tmp_path, capsys):
    fifo = tmp_path / "style.safetensors"
    os.mkfifo(fifo)
    out = tmp_path / "baked"
    codes: list[int] = []
    argv = ["bake", "--model", "tiny-sd15", "--lora", str(fifo), "--out", str(out)]
    assert _finishes(lambda: codes.append(main(argv))) is None
    assert codes == [2]
    assert "not a regular file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["style.safetensors"]


def _fused_unet(pipe, path, **kwargs):
    dl.load_lora(pipe, path, **kwargs)
    dl.fuse(pipe)
    return plain_state_dict(pipe.unet)


def _baked_unet(out):
    return dl.load_pipeline(out).unet.state_dict()


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bake_takes_a_peft_folder_and_its_file_alone_keeps_lora_alpha(make_pipe, tmp_path, caplog):
    _, folder = peft_folder(make_pipe("tiny-sd15"), tmp_path)
    expected = _fused_unet(make_pipe("tiny-sd15"), folder)  # load_lora reads alpha 6 from the config
    for i, given in enumerate([folder, folder / "adapter_model.safetensors"]):
        out = tmp_path / f"baked{i}"
        report = bake("tiny-sd15", [(str(given), 1.0)], str(out))
        assert report.layers_fused > 0 and _equal(_baked_unet(out), expected)
        (entry,) = json.loads((out / "bake_info.json").read_text())["loras"]
        assert entry["sha256"] == hashes.file_sha256(folder / "adapter_model.safetensors")
    # Without its config the file's alpha is unknown: loaded at alpha = rank, and the log says so.
    bare = tmp_path / "bare.safetensors"
    shutil.copy(folder / "adapter_model.safetensors", bare)
    with caplog.at_level(logging.WARNING, logger="diffusion_lora"):
        at_rank = _fused_unet(make_pipe("tiny-sd15"), bare)
    assert "adapter_config.json" in caplog.text and "lora_alpha" in caplog.text and str(bare) in caplog.text
    assert not _equal(at_rank, expected)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffusion_lora"):
        _fused_unet(make_pipe("tiny-sd15"), folder / "adapter_model.safetensors")
    assert "lora_alpha" not in caplog.text


@needs_fifo
def test_extract_refuses_a_fifo_checkpoint_without_hanging(tmp_path):
    from diffusion_lora.tools.extract import extract_file

    fifo = tmp_path / "tuned.safetensors"
    os.mkfifo(fifo)
    error = _finishes(lambda: extract_file("tiny-sd15", fifo, tmp_path / "x.safetensors", rank=2))
    assert isinstance(error, dl.DiffusionLoraError) and str(fifo) in str(error)


# --- 1.4: a LoRA made on a built-in or local model is checked against that model ---------------------


def _lora_on(pipe, path):
    from .helpers import run, trained_adapter

    pipe.set_progress_bar_config(disable=True)
    trained_adapter(pipe, "s", seed=5, rank=4, alpha=2)
    return dl.save_lora(pipe, "s", path, format="kohya"), run(pipe)


def _output_with(model, lora):
    from .helpers import run

    pipe = dl.load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    dl.load_lora(pipe, lora)
    return run(pipe)


@pytest.mark.parametrize("model", ["shapes-sd15", "tiny-sd15", "folder"])
def test_tools_use_the_built_in_or_local_base_a_file_records(tmp_path, model):
    from safetensors.torch import load_file, save_file

    from diffusion_lora.formats.safetensors_io import read_metadata

    if model == "folder":
        dl.build_tiny_pipeline("tiny-sd15", seed=3).save_pretrained(tmp_path / "my-model")
        model = str(tmp_path / "my-model")
    lora, expected = _lora_on(dl.load_pipeline(model), tmp_path / "s.safetensors")
    if model == "shapes-sd15":  # recorded by an install elsewhere: the name still resolves
        meta = read_metadata(lora)
        meta["diffusion_lora.base_model"] = "/elsewhere/site-packages/diffusion_lora/assets/shapes-sd15"
        save_file(load_file(str(lora)), str(lora), metadata=meta)
    outs = {tool: tmp_path / f"{tool}.safetensors" for tool in ("convert", "merge", "resize")}
    assert main(["convert", str(lora), str(outs["convert"]), "--to", "diffusers"]) == 0
    assert main(["merge", f"{lora}:1", "-o", str(outs["merge"]), "--to", "comfyui"]) == 0
    assert main(["resize", str(lora), "-o", str(outs["resize"]), "--rank", "4"]) == 0
    again = tmp_path / "merged-then-resized.safetensors"  # the merge records the base it was made on
    assert main(["resize", str(outs["merge"]), "-o", str(again), "--rank", "4"]) == 0
    for tool, out in {**outs, "merge+resize": again}.items():
        got = _output_with(model, out)
        assert float((got - expected).abs().max()) <= 1e-4 * float(expected.abs().max()), tool


def test_an_unresolvable_recorded_base_is_named_with_what_to_pass(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from diffusion_lora.formats.safetensors_io import read_metadata

    lora, expected = _lora_on(dl.build_tiny_pipeline("tiny-sd15"), tmp_path / "s.safetensors")
    meta = read_metadata(lora)
    meta["diffusion_lora.base_model"] = "someone/sd15-\x1b]0;finetune"
    save_file(load_file(str(lora)), str(lora), metadata=meta)
    out = tmp_path / "r.safetensors"
    for argv in (["resize", str(lora), "-o", str(out), "--rank", "4"],
                 ["convert", str(lora), str(out), "--to", "comfyui"], ["merge", str(lora), "-o", str(out)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert '"someone/sd15-\\u001b]0;finetune" (diffusion_lora.base_model)' in err and "pass --model" in err
        assert "\x1b" not in err and not out.exists()
    assert main(["resize", str(lora), "-o", str(out), "--rank", "4", "--model", "tiny-sd15"]) == 0
    torch.testing.assert_close(_output_with("tiny-sd15", out), expected, rtol=0, atol=1e-5)


def test_recorded_bases_reads_ours_the_train_config_and_kohyas():
    from diffusion_lora.tools.base_keys import recorded_bases, resolve_base

    meta = {"ss_sd_model_name": "v1-5-pruned.safetensors", "diffusion_lora.base_model": "/gone/model",
            "diffusion_lora.train_config": json.dumps({"model": {"name": "tiny-sd15"}})}
    assert [v for _, v in recorded_bases(meta)] == ["/gone/model", "tiny-sd15", "v1-5-pruned.safetensors"]
    assert [resolve_base(v) for _, v in recorded_bases(meta)] == [None, "tiny-sd15", None]
    assert recorded_bases({"diffusion_lora.train_config": "not json"}) == []


def test_an_extracted_file_records_its_base_so_the_tools_resolve_it(tmp_path):
    from diffusion_lora.adapters.layers import plain_modules

    tuned = dl.build_tiny_pipeline("tiny-sd15")
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for path, module in plain_modules(tuned.unet):
            if path.endswith("attn1.to_q"):
                module.weight += 0.05 * torch.randn(module.weight.shape, generator=g)
    tuned.save_pretrained(tmp_path / "tuned")
    lora = tmp_path / "x.safetensors"
    assert main(["extract", "--base", "tiny-sd15", "--tuned", str(tmp_path / "tuned"), "--rank", "4",
                 "-o", str(lora)]) == 0
    assert main(["resize", str(lora), "-o", str(tmp_path / "r.safetensors"), "--rank", "2"]) == 0
