"""LoRA files of the Flux.1 variants in the wild: fal's Kontext trainer, musubi-tuner's Kontext files, BFL's
Control LoRAs, and a Flux.1-dev LoRA of x_embedder loaded on Fill.

diffusers' fal-Kontext and kohya converters are the oracle; they are hard-coded to the real model's sizes,
so the files are built at real size from the golden key lists (rank 1, so they stay small) and read
against the meta-device reference of FLUX.1 Kontext [dev]. A module's ΔW is compared through a random
probe (ΔW @ x), which needs no [out, in] matrix.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxKontextPipeline
from safetensors.torch import save_file

import diffusion_lora as dl
from diffusion_lora.formats.codec import decode
from diffusion_lora.models.reference import reference_keys

from .helpers import input_images, model_state, run

FIXTURES = Path(__file__).parent / "fixtures"
INNER, MLP = 3072, 12288
# (in, out) of every BFL layer of FLUX.1 [dev], from its published config (24 heads x 128, mlp ratio 4)
SHAPES = {
    "img_mod.lin": (INNER, 6 * INNER), "txt_mod.lin": (INNER, 6 * INNER), "modulation.lin": (INNER, 3 * INNER),
    "img_attn.qkv": (INNER, 3 * INNER), "txt_attn.qkv": (INNER, 3 * INNER),
    "img_attn.proj": (INNER, INNER), "txt_attn.proj": (INNER, INNER),
    "img_mlp.0": (INNER, MLP), "txt_mlp.0": (INNER, MLP), "img_mlp.2": (MLP, INNER), "txt_mlp.2": (MLP, INNER),
    "linear1": (INNER, 3 * INNER + MLP), "linear2": (INNER + MLP, INNER), "final_layer.linear": (INNER, 64),
}


def golden(name: str) -> list[str]:
    return [line for line in (FIXTURES / name).read_text().splitlines() if line and not line.startswith("#")]


def shape_of(module: str) -> tuple[int, int]:
    dotted = module.replace("_", ".")  # kohya names flatten the dots
    return next(shape for suffix, shape in SHAPES.items() if dotted.endswith(suffix.replace("_", ".")))


def tensors_for(keys: list[str], module_of, down_key: str, up_key: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    out = {}
    for key in keys:
        module = module_of(key)
        fan_in, fan_out = shape_of(module)
        if key.endswith(down_key):
            out[key] = torch.randn(1, fan_in, generator=g)
        elif key.endswith(up_key):
            out[key] = torch.randn(fan_out, 1, generator=g)
        else:  # alpha
            out[key] = torch.tensor(0.5)
    return out


@pytest.fixture(scope="module")
def kontext_keys():
    return reference_keys("flux1", "flux1-kontext")


def probe_deltas(pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> dict[str, torch.Tensor]:
    """module -> scale · up @ (down @ x) for a fixed probe x of the module's input width."""
    out = {}
    for module, (down, up, scale) in pairs.items():
        x = torch.randn(down.shape[1], 2, generator=torch.Generator().manual_seed(down.shape[1]))
        out[module] = scale * (up.double() @ (down.double() @ x.double()))
    return out


def diffusers_deltas(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    converted = FluxKontextPipeline.lora_state_dict(dict(state_dict))
    pairs = {}
    for key, down in converted.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            pairs[module] = (down, converted[module + ".lora_B.weight"], 1.0)  # alpha baked in / none
    return probe_deltas(pairs)


def our_deltas(state_dict, keys) -> dict[str, torch.Tensor]:
    decoded = decode(state_dict, {}, keys, source="file")
    assert decoded.unresolved == []
    return probe_deltas({k: (m.down, m.up, m.alpha / m.rank) for k, m in decoded.data.modules.items()})


def assert_same_deltas(ours, theirs):
    assert ours.keys() == theirs.keys()
    for module in ours:
        torch.testing.assert_close(ours[module], theirs[module], rtol=1e-6, atol=1e-9, msg=module)


def test_fal_kontext_file_reads_as_diffusers_converts_it(kontext_keys):
    keys = golden("flux_kontext_keys_fal.txt")
    sd = tensors_for(keys, lambda k: k.rsplit(".", 2)[0], ".lora_A.weight", ".lora_B.weight")
    assert_same_deltas(our_deltas(sd, kontext_keys), diffusers_deltas(sd))


def test_musubi_kontext_file_reads_as_diffusers_converts_it(kontext_keys):
    keys = golden("flux_kontext_keys_musubi.txt")
    sd = tensors_for(keys, lambda k: k.split(".")[0], ".lora_down.weight", ".lora_up.weight")
    ours = our_deltas(sd, kontext_keys)
    assert_same_deltas(ours, diffusers_deltas(sd))
    # musubi leaves out the modulation layers: no norm*.linear module is adapted
    assert not [m for m in ours if ".norm" in m]


def test_fal_file_on_the_tiny_kontext_model_names_the_files_keys_it_cannot_place(tmp_path):
    pipe = dl.build_tiny_pipeline("tiny-flux-kontext")
    before = model_state(pipe)
    sd = {"base_model.model.double_blocks.5.img_attn.proj.lora_A.weight": torch.zeros(1, 32),
          "base_model.model.double_blocks.5.img_attn.proj.lora_B.weight": torch.zeros(32, 1)}
    path = tmp_path / "fal.safetensors"
    save_file(sd, path)
    with pytest.raises(dl.KeyMappingError, match=r"base_model\.model\.double_blocks\.5"):
        dl.load_lora(pipe, path)
    assert model_state(pipe).keys() == before.keys()


def test_bfl_control_lora_is_refused_with_what_loads_it(tmp_path):
    keys = golden("flux_control_keys_bfl.txt")
    path = tmp_path / "depth.safetensors"
    save_file({k: torch.zeros(1, 1) if "lora" in k else torch.ones(4) for k in keys}, path)
    pipe = dl.build_tiny_pipeline("tiny-flux")
    before = run(pipe)
    with pytest.raises(dl.FormatError, match=r"Control LoRA.*FluxControlPipeline.*load_lora_weights"):
        dl.load_lora(pipe, path)
    assert dl.list_loras(pipe) == []
    assert torch.equal(run(pipe), before)


def test_dev_lora_of_x_embedder_loads_on_fill_as_diffusers_pads_it(tmp_path):
    dev = dl.build_tiny_pipeline("tiny-flux")
    dl.add_lora(dev, "style", rank=4, targets="all-linear")
    from .helpers import randomize

    randomize(dev, "style", seed=5, std=0.2)
    path = dl.save_lora(dev, "style", tmp_path / "style.safetensors")

    ours = dl.build_tiny_pipeline("tiny-flux-fill")
    theirs = dl.build_tiny_pipeline("tiny-flux-fill")
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
    base = run(ours)
    dl.load_lora(ours, path)
    theirs.load_lora_weights(str(path), adapter_name="style")
    assert theirs.transformer.x_embedder.in_features == 144  # not widened: the module was wider already
    out = run(ours)
    assert not torch.allclose(out, base)
    torch.testing.assert_close(out, run(theirs), rtol=0, atol=1e-5)
    assert set(input_images(ours)) == {"image", "mask_image"}


def test_fal_and_musubi_files_point_to_flux1():
    from diffusion_lora.formats.file_family import family_of

    for fixture in ("flux_kontext_keys_fal.txt", "flux_kontext_keys_musubi.txt"):
        assert "flux1" in family_of({}, golden(fixture)).names, fixture
