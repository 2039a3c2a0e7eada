"""Flux.2 LoRA files from the wild (kohya/musubi-tuner, ComfyUI/ai-toolkit, fal) on dev and Klein.

Oracles: golden key lists of real names (tests/fixtures/flux2_keys_*.txt) resolved against the meta-device
references of the published Flux.2 dev and Klein 4B; plain diffusers' ``Flux2LoraLoaderMixin`` (its own
kohya, ComfyUI and fal converters) loading the same file on the tiny models; exact write-back of files
read from each spelling.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import diffusion_lora as dl
from diffusion_lora.formats.flux2_names import bfl2_table
from diffusion_lora.formats.flux_names import flux_index
from diffusion_lora.models.reference import reference_keys
from diffusion_lora.tools.convert import convert_file

from .helpers import assert_golden_names, assert_near, run, trained_adapter

FIXTURES = Path(__file__).parent / "fixtures"
KINDS = ("tiny-flux2", "tiny-flux2-klein")
RANK = 4


@pytest.mark.parametrize(("variant", "fixture"), [("flux2", "flux2_keys_dev.txt"),
                                                  ("flux2-klein", "flux2_keys_klein4b.txt")])
def test_golden_names_resolve_on_the_published_models(variant, fixture):
    keys = reference_keys("flux2", variant)
    dims = keys.flux_dims
    index = flux_index(dims, keys.module_paths["transformer"], bfl2_table(dims))
    assert_golden_names(index, FIXTURES / fixture, at_least=40)


def test_every_linear_layer_of_the_published_models_has_a_bfl_name():
    for variant in ("flux2", "flux2-klein", "flux2-klein-9b"):
        keys = reference_keys("flux2", variant)
        named = {path for targets in bfl2_table(keys.flux_dims).values() for path, _ in targets}
        paths = set(keys.module_paths["transformer"])
        assert paths <= named, variant
        # Klein has no guidance embedding: those names are left out of its index (flux_index checks)
        guidance = {f"time_guidance_embed.guidance_embedder.linear_{i}" for i in (1, 2)}
        assert named - paths == (set() if variant == "flux2" else guidance), variant


def _shapes(transformer: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) of every BFL layer of the tiny model, from its diffusers layers (qkv: q, k, v stacked)."""
    lin = {n: tuple(m.weight.shape) for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    shapes: dict[str, tuple[int, int]] = {}
    for i in range(len(transformer.transformer_blocks)):
        p = f"transformer_blocks.{i}."
        d = lin[p + "attn.to_q"]
        shapes[f"double_blocks.{i}.img_attn.qkv"] = (3 * d[0], d[1])
        shapes[f"double_blocks.{i}.txt_attn.qkv"] = (3 * d[0], lin[p + "attn.add_q_proj"][1])
        shapes[f"double_blocks.{i}.img_attn.proj"] = lin[p + "attn.to_out.0"]
        shapes[f"double_blocks.{i}.txt_attn.proj"] = lin[p + "attn.to_add_out"]
        for bfl, path in (("img_mlp", "ff"), ("txt_mlp", "ff_context")):
            shapes[f"double_blocks.{i}.{bfl}.0"] = lin[f"{p}{path}.linear_in"]
            shapes[f"double_blocks.{i}.{bfl}.2"] = lin[f"{p}{path}.linear_out"]
    for i in range(len(transformer.single_transformer_blocks)):
        shapes[f"single_blocks.{i}.linear1"] = lin[f"single_transformer_blocks.{i}.attn.to_qkv_mlp_proj"]
        shapes[f"single_blocks.{i}.linear2"] = lin[f"single_transformer_blocks.{i}.attn.to_out"]
    shapes["img_in"] = lin["x_embedder"]
    shapes["txt_in"] = lin["context_embedder"]
    shapes["time_in.in_layer"] = lin["time_guidance_embed.timestep_embedder.linear_1"]
    shapes["time_in.out_layer"] = lin["time_guidance_embed.timestep_embedder.linear_2"]
    shapes["final_layer.linear"] = lin["proj_out"]
    return shapes


def _modulation_shapes(transformer: torch.nn.Module) -> dict[str, tuple[int, int]]:
    lin = dict(transformer.named_modules())
    out = {f"{n}.lin": tuple(lin[f"{n}.linear"].weight.shape)
           for n in ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation")}
    if "time_guidance_embed.guidance_embedder.linear_1" in lin:
        for bfl, i in (("in_layer", 1), ("out_layer", 2)):
            out[f"guidance_in.{bfl}"] = tuple(lin[f"time_guidance_embed.guidance_embedder.linear_{i}"].weight.shape)
    return out


def _bfl_file(shapes, style: str, seed: int) -> dict[str, torch.Tensor]:
    """A random LoRA on every layer of ``shapes`` in one file spelling; kohya files carry alpha ≠ rank."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for bfl, (out_f, in_f) in shapes.items():
        down = torch.randn(RANK, in_f, generator=g) * 0.2
        up = torch.randn(out_f, RANK, generator=g) * 0.2
        if style == "kohya":
            name = "lora_unet_" + bfl.replace(".", "_")
            tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                        f"{name}.alpha": torch.tensor(float(1 + len(tensors) % 3))}
        else:
            prefix = {"comfyui": "diffusion_model.", "fal": "base_model.model."}[style]
            tensors |= {f"{prefix}{bfl}.lora_A.weight": down, f"{prefix}{bfl}.lora_B.weight": up}
    return tensors


def _ours_and_diffusers(make_pipe, kind, tensors, tmp_path):
    path = tmp_path / "wild.safetensors"
    save_file(tensors, str(path))
    ours = make_pipe(kind)
    base = run(ours)
    dl.load_lora(ours, path)
    theirs = make_pipe(kind)
    theirs.load_lora_weights({k: v.clone() for k, v in tensors.items()}, adapter_name="wild")
    return base, run(ours), run(theirs)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("style", ["kohya", "comfyui", "fal"])
def test_wild_file_loads_as_plain_diffusers_loads_it(make_pipe, tmp_path, kind, style):
    """kohya: the layers diffusers' kohya-Flux.2 converter knows (it drops modulation and guidance keys);
    ComfyUI/fal: lora_A/B without alpha (diffusers refuses any alpha), every layer but the final adaLN
    (diffusers' LoRA converter does not swap its halves; its checkpoint converter does, as we do)."""
    transformer = make_pipe(kind).transformer
    shapes = _shapes(transformer)
    if style != "kohya":
        shapes |= _modulation_shapes(transformer)
    tensors = _bfl_file(shapes, style, seed=len(style))
    base, ours, theirs = _ours_and_diffusers(make_pipe, kind, tensors, tmp_path)
    assert (ours - base).abs().max() > 1e-2 * base.abs().max()  # the file does something
    assert_near(ours, theirs, rel=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_comfyui_lora_down_up_spelling_equals_lora_a_b(make_pipe, tmp_path, kind):
    """diffusers takes a diffusion_model.* lora_down/up file for kohya and loads nothing from it; we read it
    as the same ComfyUI LoRA as its lora_A/B spelling."""
    shapes = _shapes(make_pipe(kind).transformer) | _modulation_shapes(make_pipe(kind).transformer)
    ab = _bfl_file(shapes, "comfyui", seed=5)
    downup = {k.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up."): v for k, v in ab.items()}
    outs = []
    for i, tensors in enumerate((ab, downup)):
        save_file(tensors, str(tmp_path / f"{i}.safetensors"))
        pipe = make_pipe(kind)
        dl.load_lora(pipe, tmp_path / f"{i}.safetensors")
        outs.append(run(pipe))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("style", ["kohya", "comfyui"])
def test_wild_file_is_written_back_exactly(make_pipe, tmp_path, kind, style):
    """Read a file with every BFL layer (fused qkv, single-block linear1/2, modulation, final adaLN) and
    save it in its own format: the same keys and the same tensors, bit for bit."""
    transformer = make_pipe(kind).transformer
    inner = transformer.transformer_blocks[0].attn.inner_dim
    shapes = _shapes(transformer) | _modulation_shapes(transformer)
    shapes["final_layer.adaLN_modulation.1"] = (2 * inner, inner)
    tensors = _bfl_file(shapes, "kohya", seed=9)
    if style == "comfyui":
        tensors = {"diffusion_model." + _dotted(k, shapes): v for k, v in tensors.items()}
    save_file(tensors, str(tmp_path / "in.safetensors"))
    pipe = make_pipe(kind)
    dl.load_lora(pipe, tmp_path / "in.safetensors", name="w")
    written = load_file(str(dl.save_lora(pipe, "w", tmp_path / "out.safetensors", format=style)))
    assert written.keys() == tensors.keys()
    for key, value in tensors.items():
        assert torch.equal(written[key], value), key


def _dotted(kohya_key: str, shapes) -> str:
    name, _, suffix = kohya_key.partition(".")
    flat = {"lora_unet_" + bfl.replace(".", "_"): bfl for bfl in shapes}
    return f"{flat[name]}.{suffix}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
def test_our_adapter_round_trips_in_bfl_names(make_pipe, tmp_path, kind, fmt):
    pipe = make_pipe(kind)
    trained_adapter(pipe, "f", seed=80, rank=4, alpha=3, targets="all-linear")
    expected = run(pipe)
    path = dl.save_lora(pipe, "f", tmp_path / "f.safetensors", format=fmt)
    keys = set(load_file(str(path)))
    sep, prefix = ("_", "lora_unet_") if fmt == "kohya" else (".", "diffusion_model.")
    assert f"{prefix}double_blocks{sep}0{sep}img_attn{sep}qkv.lora_down.weight" in keys
    assert f"{prefix}single_blocks{sep}1{sep}linear1.lora_up.weight" in keys
    assert f"{prefix}single_stream_modulation{sep}lin.alpha" in keys
    assert not any("to_q" in k or "to_qkv_mlp_proj" in k for k in keys)
    fresh = make_pipe(kind)
    dl.load_lora(fresh, path)
    assert_near(run(fresh), expected, rel=1e-5)


@pytest.mark.parametrize(("variant", "architecture"), [("flux2", "Flux.2-dev/lora"),
                                                        ("flux2-klein", "Flux.2-klein-4b/lora")])
def test_convert_resolves_real_sizes_against_the_published_model(tmp_path, variant, architecture):
    """A musubi-tuner-style file of real Flux.2 dev / Klein 4B sizes (rank 1, a few layers) converts to
    diffusers names split by the published model's inner size, and back to the same kohya file."""
    keys = reference_keys("flux2", variant)
    dims = keys.flux_dims
    shapes = {n: tuple(s[:2]) for n, s in keys.module_shapes["transformer"].items()}
    d = dims.inner_dim
    layers = {
        "double_blocks.1.img_attn.qkv": (3 * d, d),
        f"double_blocks.{dims.num_double_blocks - 1}.txt_mlp.2": shapes["transformer_blocks.0.ff_context.linear_out"],
        f"single_blocks.{dims.num_single_blocks - 1}.linear1": shapes[
            "single_transformer_blocks.0.attn.to_qkv_mlp_proj"
        ],
        "single_stream_modulation.lin": shapes["single_stream_modulation.linear"],
    }
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for bfl, (out_f, in_f) in layers.items():
        name = "lora_unet_" + bfl.replace(".", "_")
        tensors |= {f"{name}.lora_down.weight": torch.randn(1, in_f, generator=g),
                    f"{name}.lora_up.weight": torch.randn(out_f, 1, generator=g), f"{name}.alpha": torch.tensor(0.5)}
    src = tmp_path / "musubi.safetensors"
    save_file(tensors, str(src), metadata={"modelspec.architecture": architecture,
                                           "ss_network_module": "networks.lora_flux_2"})
    # no family given: the ModelSpec architecture says Flux.2 (the BFL names alone would say Flux.1)
    out = convert_file(src, tmp_path / "diffusers.safetensors", "diffusers")
    converted = load_file(str(out))
    q = converted["transformer.transformer_blocks.1.attn.to_q.lora_B.weight"]
    assert q.shape == (d, 1)
    torch.testing.assert_close(q, tensors["lora_unet_double_blocks_1_img_attn_qkv.lora_up.weight"][:d], rtol=0, atol=0)
    back_path = convert_file(out, tmp_path / "back.safetensors", "kohya")
    with safe_open(str(back_path), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == architecture
    back = load_file(str(back_path))
    assert back.keys() == tensors.keys()
    for key, value in tensors.items():
        assert torch.equal(back[key], value), key


@pytest.mark.parametrize(("src", "dst"), [("tiny-flux", "tiny-flux2"), ("tiny-flux2", "tiny-flux")])
@pytest.mark.parametrize("fmt", ["kohya", "comfyui", "diffusers"])
def test_flux1_and_flux2_files_do_not_load_into_each_other(make_pipe, tmp_path, src, dst, fmt):
    """Both spell their layers with the same BFL block names; the fused layers' sizes tell them apart
    (Flux.1's linear1 is q, k, v and a 4× MLP; Flux.2's q, k, v and a 3× SwiGLU gate and up)."""
    pipe = make_pipe(src)
    trained_adapter(pipe, "f", seed=1, rank=4)
    path = dl.save_lora(pipe, "f", tmp_path / "f.safetensors", format=fmt)
    other = make_pipe(dst)
    before = run(other)
    with pytest.raises(dl.DiffusionLoraError, match="linear1|to_qkv_mlp_proj|flux1 adapter|flux2 adapter"):
        dl.load_lora(other, path)
    assert torch.equal(run(other), before) and dl.list_loras(other) == []


@pytest.mark.parametrize("kind", KINDS)
def test_every_bfl_layer_splits_as_diffusers_converts_the_checkpoint(make_pipe, kind):
    """Oracle for the whole table, final adaLN swap and shared modulation included: the ΔW a BFL-named
    LoRA gives each diffusers module equals what diffusers' own checkpoint converter
    (``convert_flux2_transformer_checkpoint_to_diffusers``) makes of the BFL layer's ΔW."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    from diffusion_lora.adapters import pipeline_keys
    from diffusion_lora.formats.codec import decode

    pipe = make_pipe(kind)
    transformer = pipe.transformer
    inner = transformer.transformer_blocks[0].attn.inner_dim
    shapes = _shapes(transformer) | _modulation_shapes(transformer)
    shapes["final_layer.adaLN_modulation.1"] = (2 * inner, inner)
    tensors = _bfl_file(shapes, "kohya", seed=21)
    decoded = decode(tensors, {}, pipeline_keys(pipe))
    assert decoded.unresolved == []
    bfl_deltas = {}
    for bfl in shapes:
        name = "lora_unet_" + bfl.replace(".", "_")
        scale = float(tensors[f"{name}.alpha"]) / RANK
        bfl_deltas[f"{bfl}.weight"] = scale * tensors[f"{name}.lora_up.weight"] @ tensors[f"{name}.lora_down.weight"]
    expected = convert_flux2_transformer_checkpoint_to_diffusers(dict(bfl_deltas))
    ours = {f"{key.removeprefix('transformer.')}.weight": m.scale(False) * m.up @ m.down
            for key, m in decoded.data.modules.items()}
    assert ours.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-6, atol=1e-7, msg=key)
