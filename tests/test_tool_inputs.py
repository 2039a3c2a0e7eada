"""What the tools read: FIFOs and devices are refused before hashing, bake takes what load_lora takes,
and a PEFT file keeps its lora_alpha."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import threading

import pytest
import torch
from peft import LoraConfig, get_peft_model

import diffusion_lora as dl
from diffusion_lora.cli import main
from diffusion_lora.formats import hashes
from diffusion_lora.tools.bake import bake, plain_state_dict

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
    assert _finishes(lambda: codes.append(main(["bake", "--model", "tiny-sd15", "--lora", str(fifo), "--out", str(out)]))) is None
    assert codes == [2]
    assert "not a regular file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["style.safetensors"]


def _peft_folder(pipe, root):
    """A PEFT save_pretrained folder (adapter_config.json + adapter_model.safetensors), r=4, lora_alpha=6."""
    unet = copy.deepcopy(pipe.unet)
    peft_model = get_peft_model(unet, LoraConfig(r=4, lora_alpha=6, target_modules=["to_q", "to_v"]))
    g = torch.Generator().manual_seed(51)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    peft_model.save_pretrained(root / "peft")
    return root / "peft"


def _fused_unet(pipe, path, **kwargs):
    dl.load_lora(pipe, path, **kwargs)
    dl.fuse(pipe)
    return plain_state_dict(pipe.unet)


def _baked_unet(out):
    return dl.load_pipeline(out).unet.state_dict()


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bake_takes_a_peft_folder_and_its_file_alone_keeps_lora_alpha(make_pipe, tmp_path, caplog):
    folder = _peft_folder(make_pipe("tiny-sd15"), tmp_path)
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
