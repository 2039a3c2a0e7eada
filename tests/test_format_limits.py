"""Small inputs that must not cost huge memory or time, and settings that must be what they say
(issue 12, items 5.2, 5.5): adapter_config.json size, alpha_pattern size, boolean settings."""

from __future__ import annotations

import json
import tracemalloc

import pytest
from safetensors.torch import load_file, save_file

import diffusion_lora as dl
from diffusion_lora.adapters.state import state_of
from diffusion_lora.formats.adapter_files import MAX_CONFIG_BYTES, resolve_adapter_path
from diffusion_lora.formats.peft_format import LORA_ADAPTER_METADATA_KEY, MAX_PATTERN_ENTRIES
from diffusion_lora.formats.safetensors_io import read_metadata

from .helpers import trained_adapter


@pytest.fixture
def sd15_file(make_pipe, tmp_path):
    """A diffusers-format file of a rank-2, alpha-2 UNet adapter on tiny-sd15, and its tensors/metadata."""
    pipe = make_pipe("tiny-sd15")
    trained_adapter(pipe, "s", seed=3, rank=2, alpha=2)
    path = dl.save_lora(pipe, "s", tmp_path / "s.safetensors")
    return path, load_file(str(path)), read_metadata(path)


def _with_config(tmp_path, tensors, metadata, **fields) -> str:
    flat = json.loads(metadata[LORA_ADAPTER_METADATA_KEY])
    flat.update(fields)
    path = tmp_path / "edited.safetensors"
    save_file(tensors, str(path), metadata={**metadata, LORA_ADAPTER_METADATA_KEY: json.dumps(flat)})
    return path


def _scalings(pipe, name: str) -> dict[str, float]:
    sites = [site for site in state_of(pipe).sites() if name in site.layer.lora_A]
    return {f"{site.component}.{site.path}": site.layer.scaling[name] for site in sites}


def test_huge_adapter_config_is_refused_without_reading_it(sd15_file, tmp_path):
    """A 64 MiB adapter_config.json (sparse: no disk used) was read whole; now its size is checked first."""
    path, tensors, _ = sd15_file
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    with open(folder / "adapter_config.json", "wb") as f:
        f.truncate(64 * 2**20)
    tracemalloc.start()
    try:
        with pytest.raises(dl.FormatError, match="adapter_config.json") as info:
            resolve_adapter_path(folder)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert f"{MAX_CONFIG_BYTES:,}" in str(info.value)
    assert peak < 2**20, f"{peak:,} bytes allocated to refuse the config"


def test_alpha_pattern_with_absurd_entry_count_is_refused(make_pipe, sd15_file, tmp_path):
    _, tensors, metadata = sd15_file
    patterns = {f"^unet\\.nothing_{i}": 3.0 for i in range(MAX_PATTERN_ENTRIES + 1)}
    path = _with_config(tmp_path, tensors, metadata, **{"unet.alpha_pattern": patterns})
    pipe = make_pipe("tiny-sd15")
    with pytest.raises(dl.FormatError, match=r"'unet\.alpha_pattern' has 20,001 entries"):
        dl.load_lora(pipe, path)
    assert dl.list_loras(pipe) == []


def test_alpha_pattern_lookup_keeps_peft_first_match_rule(make_pipe, sd15_file, tmp_path):
    """Many entries, and two that name the same module: the first in the file wins (PEFT's rule)."""
    _, tensors, metadata = sd15_file
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    patterns = {f"nothing_{i}": 9.0 for i in range(5000)}
    patterns.update({"attn1.to_q": 6.0, q: 8.0, "^" + "down_blocks\\.1\\.attentions\\.0\\.transformer_blocks"
                     "\\.0\\.attn2\\.to_k": 1.0})
    path = _with_config(tmp_path, tensors, metadata, **{"unet.alpha_pattern": patterns})
    pipe = make_pipe("tiny-sd15")
    dl.load_lora(pipe, path, name="p")
    scalings = _scalings(pipe, "p")
    assert scalings[f"unet.{q}"] == 6.0 / 2  # "attn1.to_q" comes first and names it too
    assert scalings["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"] == 1.0 / 2
    assert scalings["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"] == 2.0 / 2


@pytest.mark.parametrize("value", ["false", 0, None, "true"])
def test_use_rslora_must_be_a_json_boolean_in_metadata(make_pipe, sd15_file, tmp_path, value):
    _, tensors, metadata = sd15_file
    path = _with_config(tmp_path, tensors, metadata, **{"unet.use_rslora": value})
    with pytest.raises(dl.FormatError, match=r"edited\.safetensors.*'unet\.use_rslora'.*JSON boolean"):
        dl.load_lora(make_pipe("tiny-sd15"), path)


def test_use_rslora_must_be_a_json_boolean_in_adapter_config(make_pipe, sd15_file, tmp_path):
    _, tensors, _ = sd15_file
    folder = tmp_path / "peft"
    folder.mkdir()
    bare = {k.removeprefix("unet."): v for k, v in tensors.items()}
    save_file(bare, str(folder / "adapter_model.safetensors"))
    config = {"r": 2, "lora_alpha": 2, "use_rslora": "false", "target_modules": ["to_q"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(dl.FormatError, match=r"adapter_config\.json key 'use_rslora' is 'false'"):
        dl.load_lora(make_pipe("tiny-sd15"), folder)
    config["use_rslora"] = False
    (folder / "adapter_config.json").write_text(json.dumps(config))
    pipe = make_pipe("tiny-sd15")
    dl.load_lora(pipe, folder, name="p")
    assert set(_scalings(pipe, "p").values()) == {1.0}  # alpha 2 / rank 2, not 2 / √2
