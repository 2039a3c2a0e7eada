"""Flux.1 LoRA names (BFL ↔ diffusers) on the real tiny Flux transformer, checked against independent math.

The reference split below is written the way diffusers' single-file converter splits a BFL checkpoint
(``convert_flux_transformer_checkpoint_to_diffusers``: ``chunk(3)`` for qkv, ``split`` for linear1,
``swap_scale_shift`` for the final adaLN), not from the module under test. A fused LoRA's ΔW is
alpha/rank · up @ down; each diffusers module must receive exactly its row block of it.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import diffusion_lora as dl
from diffusion_lora.formats.adapter_data import AdapterData, ModuleLora
from diffusion_lora.formats.flux_names import (
    FluxDims,
    bfl_table,
    bfl_targets,
    flux_index,
)
from diffusion_lora.formats.flux_tensors import parse_flux, write_flux_kohya
from diffusion_lora.formats.kohya import flatten
from diffusion_lora.formats.peft_format import write_peft

from .helpers import assert_golden_names

FIXTURES = Path(__file__).parent / "fixtures"
DEV_CONFIG = {"num_layers": 19, "num_single_layers": 38, "num_attention_heads": 24, "attention_head_dim": 128}
TOL = {"rtol": 1e-6, "atol": 1e-6}

_DOUBLE_PLAIN = {
    "img_attn.proj": "attn.to_out.0",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "img_mod.lin": "norm1.linear",
    "txt_attn.proj": "attn.to_add_out",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
    "txt_mod.lin": "norm1_context.linear",
}
_QKV = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE_PLAIN = {"linear2": "proj_out", "modulation.lin": "norm.linear"}
_LINEAR1 = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}


def reference_split(bfl: str, delta: torch.Tensor, mlp: int) -> dict[str, torch.Tensor]:
    """The diffusers modules' ΔW from a BFL layer's ΔW, as diffusers splits the checkpoint's weights."""
    if bfl == "final_layer.adaLN_modulation.1":
        shift, scale = delta.chunk(2, dim=0)
        return {"norm_out.linear": torch.cat([scale, shift])}
    if bfl in _TOP:
        return {_TOP[bfl]: delta}
    kind, i, rest = bfl.split(".", 2)
    if kind == "double_blocks":
        prefix = f"transformer_blocks.{i}."
        if rest in _QKV:
            return {prefix + p: d for p, d in zip(_QKV[rest], torch.chunk(delta, 3, dim=0))}
        return {prefix + _DOUBLE_PLAIN[rest]: delta}
    prefix = f"single_transformer_blocks.{i}."
    if rest == "linear1":
        inner = (delta.shape[0] - mlp) // 3
        return {prefix + p: d for p, d in zip(_LINEAR1, torch.split(delta, [inner, inner, inner, mlp], dim=0))}
    return {prefix + _SINGLE_PLAIN[rest]: delta}


def bfl_layers(shapes: dict[str, tuple[int, int]], n_double: int, n_single: int) -> dict[str, tuple[int, int]]:
    """(out, in) of every BFL Linear layer of the model, from the diffusers layers' shapes."""
    layers = {bfl: shapes[path] for bfl, path in _TOP.items() if path in shapes}
    layers["final_layer.adaLN_modulation.1"] = shapes["norm_out.linear"]
    for i in range(n_double):
        p = f"transformer_blocks.{i}."
        for rest, path in _DOUBLE_PLAIN.items():
            layers[f"double_blocks.{i}.{rest}"] = shapes[p + path]
        for rest, paths in _QKV.items():
            layers[f"double_blocks.{i}.{rest}"] = (sum(shapes[p + q][0] for q in paths), shapes[p + paths[0]][1])
    for i in range(n_single):
        p = f"single_transformer_blocks.{i}."
        for rest, path in _SINGLE_PLAIN.items():
            layers[f"single_blocks.{i}.{rest}"] = shapes[p + path]
        layers[f"single_blocks.{i}.linear1"] = (sum(shapes[p + q][0] for q in _LINEAR1), shapes[p + "attn.to_q"][1])
    return layers


def random_lora(out: int, inp: int, rank: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rank, inp, generator=g) * 0.2, torch.randn(out, rank, generator=g) * 0.2


def bfl_file(layers: dict[str, tuple[int, int]], spelling: str, seed: int = 0, alpha_for: set[str] | None = None):
    """A random BFL-named LoRA file (ranks 2–4, alpha ≠ rank) and each BFL layer's ΔW."""
    g = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for j, (bfl, (out, inp)) in enumerate(sorted(layers.items())):
        rank = 2 + j % 3
        down, up = random_lora(out, inp, rank, g)
        has_alpha = alpha_for is None or bfl in alpha_for
        alpha = rank * 0.75 + 0.5 if has_alpha else float(rank)
        if spelling == "kohya":
            name, d, u = "lora_unet_" + flatten(bfl), "lora_down.weight", "lora_up.weight"
        else:
            name = "diffusion_model." + bfl
            d, u = (
                ("lora_A.weight", "lora_B.weight") if spelling == "comfyui" else ("lora_down.weight", "lora_up.weight")
            )
        tensors[f"{name}.{d}"], tensors[f"{name}.{u}"] = down, up
        if has_alpha:
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
        deltas[bfl] = alpha / rank * up @ down
    return tensors, deltas


def delta(m: ModuleLora, use_rslora: bool = False) -> torch.Tensor:
    return m.scale(use_rslora) * m.up @ m.down


def assert_same_deltas(a: AdapterData, b: AdapterData) -> None:
    assert a.modules.keys() == b.modules.keys()
    for key in a.modules:
        torch.testing.assert_close(delta(a.modules[key], a.use_rslora), delta(b.modules[key], b.use_rslora), **TOL)


@pytest.fixture(scope="module")
def flux() -> SimpleNamespace:
    pipe = dl.build_tiny_pipeline("tiny-flux")
    layers = {p: m for p, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    shapes = {p: tuple(m.weight.shape) for p, m in layers.items()}
    dims = FluxDims.from_config(pipe.transformer.config, module_shapes=shapes)
    bfl = bfl_layers(shapes, dims.num_double_blocks, dims.num_single_blocks)
    return SimpleNamespace(pipe=pipe, paths=list(layers), shapes=shapes, dims=dims, bfl=bfl)


@pytest.fixture(scope="module")
def dev_paths() -> list[str]:
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**DEV_CONFIG, guidance_embeds=True)
    return [p for p, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def test_dims_from_config(flux) -> None:
    assert flux.dims == FluxDims(2, 2, 32, 128)
    assert FluxDims.from_config(flux.pipe.transformer.config) == flux.dims  # mlp from diffusers' ratio 4
    assert FluxDims.from_config(DEV_CONFIG) == FluxDims(19, 38, 3072, 12288)
    odd_mlp = {**flux.shapes, "single_transformer_blocks.0.proj_mlp": (96, 32)}
    assert FluxDims.from_config(flux.pipe.transformer.config, module_shapes=odd_mlp).mlp_hidden_dim == 96
    with pytest.raises(dl.ConfigError, match="num_single_layers"):
        FluxDims.from_config({k: v for k, v in DEV_CONFIG.items() if k != "num_single_layers"})
    with pytest.raises(dl.ConfigError, match="inner_dim"):
        FluxDims.from_config(DEV_CONFIG, module_shapes=flux.shapes)
    with pytest.raises(dl.ConfigError, match="inner_dim"):
        FluxDims(2, 2, 0, 128)


def test_table_covers_every_linear_layer(flux, dev_paths) -> None:
    for dims, paths in ((flux.dims, flux.paths), (FluxDims.from_config(DEV_CONFIG), dev_paths)):
        targets = {path for t in bfl_table(dims).values() for path, _ in t}
        assert targets == set(paths)
    assert len(bfl_table(flux.dims)) == len(flux.bfl)
    assert bfl_targets("double_blocks.1.img_attn.qkv", flux.dims) == [
        ("transformer_blocks.1.attn.to_q", slice(0, 32)),
        ("transformer_blocks.1.attn.to_k", slice(32, 64)),
        ("transformer_blocks.1.attn.to_v", slice(64, 96)),
    ]
    assert bfl_targets("double_blocks.2.img_attn.qkv", flux.dims) is None
    assert bfl_targets("single_blocks.0.linear1", flux.dims)[-1] == (
        "single_transformer_blocks.0.proj_mlp",
        slice(96, 224),
    )


@pytest.mark.parametrize("spelling", ["kohya", "comfyui", "comfyui-down-up"])
def test_fused_file_splits_into_exact_row_blocks(flux, spelling) -> None:
    no_alpha = {"double_blocks.0.img_attn.qkv", "img_in"}  # absent alpha means alpha = rank
    tensors, deltas = bfl_file(flux.bfl, spelling, alpha_for=set(flux.bfl) - no_alpha)
    data, unresolved = parse_flux(tensors, {"ss_network_dim": "4"}, flux.dims, module_paths=flux.paths)
    assert unresolved == []
    assert data.metadata == {"ss_network_dim": "4"}
    expected = {}
    for bfl, d in deltas.items():
        expected.update(reference_split(bfl, d, flux.dims.mlp_hidden_dim))
    assert set(data.modules) == {f"transformer.{p}" for p in expected} == {f"transformer.{p}" for p in flux.paths}
    for path, d in expected.items():
        m = data.modules[f"transformer.{path}"]
        assert m.up.shape[0] == flux.shapes[path][0] and m.down.shape[1] == flux.shapes[path][1]
        torch.testing.assert_close(delta(m), d, **TOL)
    q, k = (
        data.modules["transformer.transformer_blocks.0.attn.to_q"],
        data.modules["transformer.transformer_blocks.0.attn.to_k"],
    )
    assert q.alpha == q.rank and q.down.data_ptr() != k.down.data_ptr()  # shared down is cloned


def test_onetrainer_spelling(flux) -> None:
    g = torch.Generator().manual_seed(1)
    tensors, expected = {}, {}
    for j, path in enumerate(flux.paths):
        rank, (out, inp) = 1 + j % 4, flux.shapes[path]
        down, up = random_lora(out, inp, rank, g)
        name = "lora_transformer_" + flatten(path)
        tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(3.0)}
        expected[f"transformer.{path}"] = 3.0 / rank * up @ down
    data, unresolved = parse_flux(tensors, {}, flux.dims, module_paths=flux.paths)
    assert unresolved == [] and data.modules.keys() == expected.keys()
    for key, d in expected.items():
        torch.testing.assert_close(delta(data.modules[key]), d, **TOL)


def test_unknown_keys_are_returned_not_dropped(flux) -> None:
    tensors, _ = bfl_file(flux.bfl, "kohya")
    baseline, _ = parse_flux(tensors, {}, flux.dims, module_paths=flux.paths)
    extra = {
        "lora_unet_double_blocks_2_img_attn_qkv.lora_down.weight": torch.zeros(2, 32),  # block 2 of a 2-block model
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 32),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(1.0),
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": torch.zeros(2, 32),
        "diffusion_model.double_blocks.0.img_attn.norm.key_norm.diff": torch.zeros(16),
        "diffusion_model.double_blocks.0.img_attn.qkv.diff_b": torch.zeros(96),
        "lora_unet_single_blocks_0_linear1.lora_mid.weight": torch.zeros(2, 2),
    }
    data, unresolved = parse_flux({**tensors, **extra}, {}, flux.dims, module_paths=flux.paths)
    assert unresolved == sorted(extra)
    assert_same_deltas(data, baseline)
    with pytest.raises(dl.KeyMappingError, match="7 kohya keys"):
        parse_flux({**tensors, **extra}, {}, flux.dims, module_paths=flux.paths, strict=True)
    # A model without guidance embeds (Flux.1-schnell) has no guidance_in.
    schnell = [p for p in flux.paths if "guidance_embedder" not in p]
    data, unresolved = parse_flux(tensors, {}, flux.dims, module_paths=schnell)
    assert unresolved == sorted(k for k in tensors if k.startswith("lora_unet_guidance_in"))
    assert len(unresolved) == 6 and not any("guidance" in k for k in data.modules)


def test_bad_files_are_refused(flux) -> None:
    tensors, _ = bfl_file(flux.bfl, "kohya")
    rank = tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0]
    dev_qkv = {**tensors, "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(9216, rank)}
    with pytest.raises(dl.FormatError, match="another Flux size"):
        parse_flux(dev_qkv, {}, flux.dims, module_paths=flux.paths)
    no_up = {k: v for k, v in tensors.items() if k != "lora_unet_img_in.lora_up.weight"}
    with pytest.raises(dl.FormatError, match="lora_unet_img_in has no up"):
        parse_flux(no_up, {}, flux.dims, module_paths=flux.paths)
    twice = {
        **tensors,
        "lora_transformer_x_embedder.lora_down.weight": torch.zeros(2, 64),
        "lora_transformer_x_embedder.lora_up.weight": torch.zeros(32, 2),
    }
    with pytest.raises(dl.FormatError, match="both adapt transformer.x_embedder"):
        parse_flux(twice, {}, flux.dims, module_paths=flux.paths)
    comfy, _ = bfl_file(flux.bfl, "comfyui")
    both = {**comfy, "diffusion_model.img_in.lora_down.weight": comfy["diffusion_model.img_in.lora_A.weight"]}
    with pytest.raises(dl.FormatError, match="both the down of diffusion_model.img_in"):
        parse_flux(both, {}, flux.dims, module_paths=flux.paths)
    bad_alpha = {**tensors, "lora_unet_img_in.alpha": torch.tensor(-1.0)}
    with pytest.raises(dl.FormatError, match="alpha"):
        parse_flux(bad_alpha, {}, flux.dims, module_paths=flux.paths)


def test_golden_dev_names(dev_paths) -> None:
    dims = FluxDims.from_config(DEV_CONFIG)
    index = flux_index(dims, dev_paths)
    assert_golden_names(index, FIXTURES / "flux_keys_dev.txt", at_least=30)


def test_round_trip_of_fused_file(flux) -> None:
    tensors, _ = bfl_file(flux.bfl, "kohya", seed=3)
    data, _ = parse_flux(tensors, {}, flux.dims, module_paths=flux.paths)
    written, metadata = write_flux_kohya(data, flux.dims)
    assert written.keys() == tensors.keys()  # same names, shared downs kept: same ranks
    for key, t in tensors.items():
        assert written[key].shape == t.shape, key
        if key.endswith("lora_down.weight"):
            assert torch.equal(written[key], t), key
    assert metadata["ss_network_module"] == "networks.lora_flux" and metadata["ss_network_dim"] == "Dynamic"
    again, unresolved = parse_flux(written, {}, flux.dims, module_paths=flux.paths)
    assert unresolved == []
    assert_same_deltas(again, data)


def independent_adapter(flux, use_rslora: bool = False) -> AdapterData:
    """Separate LoRAs of different ranks and alphas on q, k, v, and only on to_q + proj_mlp of one single block."""
    g = torch.Generator().manual_seed(5)
    skip = {f"single_transformer_blocks.0.attn.{p}" for p in ("to_k", "to_v")} | {"norm_out.linear"}
    modules = {}
    for j, path in enumerate(p for p in flux.paths if p not in skip):
        rank, (out, inp) = 1 + j % 4, flux.shapes[path]
        down, up = random_lora(out, inp, rank, g)
        modules[f"transformer.{path}"] = ModuleLora(down=down, up=up, alpha=0.5 + j % 5)
    return AdapterData(modules=modules, use_rslora=use_rslora)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_write_fuses_independent_loras_exactly(flux, use_rslora) -> None:
    data = independent_adapter(flux, use_rslora)
    written, _ = write_flux_kohya(data, flux.dims)
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    ranks = [data.modules[f"transformer.transformer_blocks.0.attn.to_{c}"].rank for c in "qkv"]
    assert written[f"{qkv}.lora_down.weight"].shape[0] == sum(ranks)  # concatenated downs, block-diagonal up
    again, unresolved = parse_flux(written, {}, flux.dims, module_paths=flux.paths)
    assert unresolved == []
    assert not again.use_rslora
    for key, m in again.modules.items():
        if key in data.modules:
            torch.testing.assert_close(delta(m), delta(data.modules[key], use_rslora), **TOL)
        else:  # rows of a fused layer no part covered
            assert key.startswith("transformer.single_transformer_blocks.0.attn.")
            assert torch.count_nonzero(delta(m)) == 0
    assert set(data.modules) <= set(again.modules)
    assert "transformer.norm_out.linear" not in again.modules


def test_write_refuses_modules_without_a_bfl_name(flux) -> None:
    data = independent_adapter(flux)
    data.modules["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"] = ModuleLora(
        down=torch.zeros(2, 32), up=torch.zeros(32, 2), alpha=2.0
    )
    with pytest.raises(dl.KeyMappingError,
                       match=re.escape("text_encoder.text_model.encoder.layers.0.self_attn.q_proj")):
        write_flux_kohya(data, flux.dims)


def test_dora_scale_splits_and_fuses_back(flux) -> None:
    tensors, _ = bfl_file(flux.bfl, "kohya", seed=7)
    g = torch.Generator().manual_seed(8)
    for name in ("lora_unet_single_blocks_1_linear1", "lora_unet_final_layer_adaLN_modulation_1"):
        rows = tensors[f"{name}.lora_up.weight"].shape[0]
        tensors[f"{name}.dora_scale"] = 1 + torch.rand(rows, 1, generator=g)
    data, _ = parse_flux(tensors, {}, flux.dims, module_paths=flux.paths)
    scale = tensors["lora_unet_single_blocks_1_linear1.dora_scale"].reshape(-1)
    assert torch.equal(data.modules["transformer.single_transformer_blocks.1.proj_mlp"].magnitude, scale[96:])
    shift, scale_half = tensors["lora_unet_final_layer_adaLN_modulation_1.dora_scale"].reshape(-1).chunk(2)
    assert torch.equal(data.modules["transformer.norm_out.linear"].magnitude, torch.cat([scale_half, shift]))
    written, _ = write_flux_kohya(data, flux.dims)
    for name in ("lora_unet_single_blocks_1_linear1", "lora_unet_final_layer_adaLN_modulation_1"):
        assert torch.equal(written[f"{name}.dora_scale"], tensors[f"{name}.dora_scale"])
    del data.modules["transformer.single_transformer_blocks.1.attn.to_k"]
    with pytest.raises(dl.FormatError, match="DoRA on only some"):
        write_flux_kohya(data, flux.dims)


def flux_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img, txt = 16, 8
    return {
        "hidden_states": torch.randn(1, img, 64, generator=g),
        "encoder_hidden_states": torch.randn(1, txt, 96, generator=g),
        "pooled_projections": torch.randn(1, 32, generator=g),
        "timestep": torch.tensor([0.6]),
        "img_ids": torch.randn(img, 3, generator=g),
        "txt_ids": torch.zeros(txt, 3),
        "guidance": torch.tensor([3.5]),
    }


def with_deltas(model: torch.nn.Module, deltas: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = copy.deepcopy(model)
    with torch.no_grad():
        for path, d in deltas.items():
            model.get_submodule(path).weight += d
    return model


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * float(expected.abs().max()))


def test_end_to_end_forward_matches_diffusers_format_load(flux, tmp_path) -> None:
    # Without final_layer.linear (top-level proj_out): write_peft's alpha_pattern entry "proj_out" is not
    # anchored, so PEFT also applies it to single_transformer_blocks.N.proj_out (a peft_format issue).
    layers = {b: s for b, s in flux.bfl.items() if b != "final_layer.linear"}
    tensors, _ = bfl_file(layers, "kohya", seed=11)
    data, _ = parse_flux(tensors, {}, flux.dims, module_paths=flux.paths)
    reference = with_deltas(flux.pipe.transformer, {k.partition(".")[2]: delta(m) for k, m in data.modules.items()})
    peft_tensors, meta = write_peft(data)
    path = tmp_path / "flux_lora.safetensors"
    save_file({k: v.contiguous() for k, v in peft_tensors.items()}, str(path), metadata=meta)
    pipe = dl.build_tiny_pipeline("tiny-flux")
    with torch.no_grad():
        base = pipe.transformer(**flux_inputs()).sample
        dl.load_lora(pipe, path)
        loaded = pipe.transformer(**flux_inputs()).sample
        expected = reference(**flux_inputs()).sample
    assert (loaded - base).abs().max() > 1e-3 * base.abs().max()  # the adapter does something
    assert_rel(loaded, expected)


def test_diffusers_kohya_loader_agrees_where_it_can(flux) -> None:
    """diffusers' own kohya-Flux converter as oracle, on the layers it handles at any size: it hard-codes
    3072/12288 for linear1, ignores final_layer's alpha, and drops img_in/txt_in/time_in/vector_in/
    guidance_in (it keys them without ``transformer.``), so the file has the blocks' other layers only."""
    layers = {b: s for b, s in flux.bfl.items() if "_blocks." in b and not b.endswith(".linear1")}
    tensors, deltas = bfl_file(layers, "kohya", seed=13)
    expected = {}
    for bfl, d in deltas.items():
        expected.update(reference_split(bfl, d, flux.dims.mlp_hidden_dim))
    data, _ = parse_flux(tensors, {}, flux.dims, module_paths=flux.paths)
    assert data.modules.keys() == {f"transformer.{p}" for p in expected}
    reference = with_deltas(flux.pipe.transformer, {k.partition(".")[2]: delta(m) for k, m in data.modules.items()})
    pipe = dl.build_tiny_pipeline("tiny-flux")
    pipe.load_lora_weights({k: v.clone() for k, v in tensors.items()}, adapter_name="kohya")
    with torch.no_grad():
        assert_rel(pipe.transformer(**flux_inputs()).sample, reference(**flux_inputs()).sample)
