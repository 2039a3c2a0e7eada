"""Chroma LoRA files: kohya/sd-scripts (``lora_unet_`` + flat BFL names, alpha), ComfyUI (``diffusion_model.`` +
dotted BFL names, ``lora_A/B`` or ``lora_down/up``, alpha), ai-toolkit (``diffusion_model.``, ``lora_A/B``, no
alpha) and diffusers, on tiny-chroma and on Chroma1-HD's layout.

Expected values never come from the code under test: the reference split below is written the way diffusers'
single-file converter splits a Chroma checkpoint (``convert_chroma_transformer_checkpoint_to_diffusers``:
``chunk(3)`` for qkv, ``split((inner, inner, inner, mlp))`` for linear1, ``in_layer``/``out_layer`` →
``linear_1``/``linear_2``) from ΔW = alpha/rank · up @ down, with the sizes read from the model's own layers.
diffusers' kohya-Flux converter is the oracle where it works on a tiny model: the double blocks (it splits
single blocks' linear1 with Flux.1's hard-coded 3072 and refuses approximator keys).
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffusion_lora as dl
from diffusion_lora.cli import main
from diffusion_lora.formats.flux_names import FluxDims, flux_index
from diffusion_lora.formats.flux_tensors import parse_flux, write_flux_kohya
from diffusion_lora.formats.kohya import flatten
from diffusion_lora.formats.safetensors_io import read_metadata
from diffusion_lora.models.reference import reference_keys

from .helpers import assert_golden_names, assert_near, run, trained_adapter

FIXTURES = Path(__file__).parent / "fixtures"
TOL = {"rtol": 1e-6, "atol": 1e-6}

_DOUBLE_PLAIN = {
    "img_attn.proj": "attn.to_out.0",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_attn.proj": "attn.to_add_out",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_QKV = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_LINEAR1 = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "final_layer.linear": "proj_out",
    "distilled_guidance_layer.in_proj": "distilled_guidance_layer.in_proj",
    "distilled_guidance_layer.out_proj": "distilled_guidance_layer.out_proj",
}
_APPROXIMATOR_LAYER = {"in_layer": "linear_1", "out_layer": "linear_2"}
# Flux.1 layers Chroma does not have
_FLUX_ONLY = ("double_blocks.0.img_mod.lin", "single_blocks.0.modulation.lin", "final_layer.adaLN_modulation.1",
              "time_in.in_layer", "vector_in.out_layer", "guidance_in.in_layer")


def reference_split(bfl: str, delta: torch.Tensor, inner: int) -> dict[str, torch.Tensor]:
    """The diffusers modules' ΔW from a BFL layer's ΔW, as diffusers splits a Chroma checkpoint's weights."""
    if bfl in _TOP:
        return {_TOP[bfl]: delta}
    kind, i, rest = bfl.split(".", 2)
    if kind == "distilled_guidance_layer":  # "distilled_guidance_layer.layers.N.in_layer"
        i, rest = rest.split(".")
        return {f"distilled_guidance_layer.layers.{i}.{_APPROXIMATOR_LAYER[rest]}": delta}
    if kind == "double_blocks":
        prefix = f"transformer_blocks.{i}."
        if rest in _QKV:
            return {prefix + p: d for p, d in zip(_QKV[rest], torch.chunk(delta, 3, dim=0))}
        return {prefix + _DOUBLE_PLAIN[rest]: delta}
    prefix = f"single_transformer_blocks.{i}."
    if rest == "linear1":
        mlp = delta.shape[0] - 3 * inner
        return {prefix + p: d for p, d in zip(_LINEAR1, torch.split(delta, [inner, inner, inner, mlp], dim=0))}
    return {prefix + "proj_out": delta}  # linear2


def bfl_layers(shapes: dict[str, tuple[int, int]], config) -> dict[str, tuple[int, int]]:  # noqa: ANN001
    """(out, in) of every BFL Linear layer of a Chroma model, from its diffusers layers' shapes."""
    layers = {bfl: shapes[path] for bfl, path in _TOP.items()}
    for i in range(config["approximator_layers"]):
        for bfl, name in _APPROXIMATOR_LAYER.items():
            layers[f"distilled_guidance_layer.layers.{i}.{bfl}"] = shapes[f"distilled_guidance_layer.layers.{i}.{name}"]
    for i in range(config["num_layers"]):
        p = f"transformer_blocks.{i}."
        for rest, path in _DOUBLE_PLAIN.items():
            layers[f"double_blocks.{i}.{rest}"] = shapes[p + path]
        for rest, paths in _QKV.items():
            layers[f"double_blocks.{i}.{rest}"] = (sum(shapes[p + q][0] for q in paths), shapes[p + paths[0]][1])
    for i in range(config["num_single_layers"]):
        p = f"single_transformer_blocks.{i}."
        layers[f"single_blocks.{i}.linear2"] = shapes[p + "proj_out"]
        layers[f"single_blocks.{i}.linear1"] = (sum(shapes[p + q][0] for q in _LINEAR1), shapes[p + "attn.to_q"][1])
    return layers


# spelling -> (name prefix, dotted?, down suffix, up suffix, writes alpha?)
SPELLINGS = {
    "kohya": ("lora_unet_", False, "lora_down.weight", "lora_up.weight", True),
    "comfyui": ("diffusion_model.", True, "lora_A.weight", "lora_B.weight", True),
    "comfyui-down-up": ("diffusion_model.", True, "lora_down.weight", "lora_up.weight", True),
    "ai-toolkit": ("diffusion_model.", True, "lora_A.weight", "lora_B.weight", False),
}


def bfl_file(layers: dict[str, tuple[int, int]], spelling: str, seed: int = 0):
    """A random BFL-named LoRA file (ranks 2–4, alpha ≠ rank where the spelling has alpha) and each layer's ΔW."""
    prefix, dotted, down_key, up_key, with_alpha = SPELLINGS[spelling]
    g = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for j, (bfl, (out, inp)) in enumerate(sorted(layers.items())):
        rank = 2 + j % 3
        down, up = torch.randn(rank, inp, generator=g) * 0.2, torch.randn(out, rank, generator=g) * 0.2
        alpha = rank * 0.75 + 0.5 if with_alpha else float(rank)
        name = prefix + (bfl if dotted else flatten(bfl))
        tensors[f"{name}.{down_key}"], tensors[f"{name}.{up_key}"] = down, up
        if with_alpha:
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
        deltas[bfl] = alpha / rank * up @ down
    return tensors, deltas


def delta(m) -> torch.Tensor:  # noqa: ANN001
    return m.scale(False) * m.up @ m.down


@pytest.fixture(scope="module")
def chroma() -> SimpleNamespace:
    pipe = dl.build_tiny_pipeline("tiny-chroma")
    layers = {p: m for p, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    shapes = {p: tuple(m.weight.shape) for p, m in layers.items()}
    dims = FluxDims.from_config(pipe.transformer.config, module_shapes=shapes)
    bfl = bfl_layers(shapes, pipe.transformer.config)
    return SimpleNamespace(pipe=pipe, paths=list(layers), shapes=shapes, dims=dims, bfl=bfl)


@pytest.fixture(scope="module")
def hd():
    """Chroma1-HD's real module layout, on the meta device (no weights)."""
    return reference_keys("chroma")


def transformer_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img, txt = 16, 8
    mask = torch.ones(1, txt + img)
    mask[0, 5:txt] = 0  # padded text tokens are masked, as ChromaPipeline does
    return {
        "hidden_states": torch.randn(1, img, 64, generator=g),
        "encoder_hidden_states": torch.randn(1, txt, 96, generator=g),
        "timestep": torch.tensor([0.6]),
        "img_ids": torch.randn(img, 3, generator=g),
        "txt_ids": torch.zeros(txt, 3),
        "attention_mask": mask,
    }


def with_deltas(model: torch.nn.Module, deltas: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = copy.deepcopy(model)
    with torch.no_grad():
        for path, d in deltas.items():
            model.get_submodule(path).weight += d
    return model


def forward(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**transformer_inputs()).sample


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * float(expected.abs().max()))


def test_dims_come_from_the_config_and_layers(chroma, hd) -> None:
    assert chroma.dims == FluxDims(2, 2, 32, 128, num_approximator_layers=2)
    assert hd.flux_dims == FluxDims(19, 38, 3072, 12288, num_approximator_layers=5)


def test_every_linear_layer_has_a_bfl_name_and_flux_only_names_do_not_resolve(chroma, hd) -> None:
    for dims, shapes in ((chroma.dims, chroma.shapes), (hd.flux_dims, dict(hd.module_shapes["transformer"]))):
        config = {"num_layers": dims.num_double_blocks, "num_single_layers": dims.num_single_blocks,
                  "approximator_layers": dims.num_approximator_layers}
        layers = bfl_layers({p: s[:2] for p, s in shapes.items()}, config)
        index = flux_index(dims, list(shapes))
        covered = set()
        for bfl in layers:
            for name in ("lora_unet_" + flatten(bfl), "diffusion_model." + bfl):
                targets = index.resolve(name)
                assert targets is not None, name
                covered |= {path for path, _ in targets}
        assert covered == set(shapes)  # every Linear of Chroma is reached by a BFL name
        for bfl in _FLUX_ONLY:
            assert index.resolve("lora_unet_" + flatten(bfl)) is None, bfl
            assert index.resolve("diffusion_model." + bfl) is None, bfl


def test_golden_chroma1_hd_names(hd) -> None:
    index = flux_index(hd.flux_dims, hd.module_paths["transformer"])
    assert_golden_names(index, FIXTURES / "chroma_keys_hd.txt", at_least=50)


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_every_spelling_splits_into_the_reference_row_blocks(chroma, spelling) -> None:
    tensors, deltas = bfl_file(chroma.bfl, spelling)
    data, unresolved = parse_flux(tensors, {}, chroma.dims, module_paths=chroma.paths)
    assert unresolved == []
    expected = {}
    for bfl, d in deltas.items():
        expected.update(reference_split(bfl, d, chroma.dims.inner_dim))
    assert set(data.modules) == {f"transformer.{p}" for p in expected} == {f"transformer.{p}" for p in chroma.paths}
    for path, d in expected.items():
        torch.testing.assert_close(delta(data.modules[f"transformer.{path}"]), d, **TOL)


@pytest.mark.parametrize("spelling", ["kohya", "comfyui"])
def test_written_files_read_back_exactly(chroma, spelling) -> None:
    """parse → write → parse: a kohya or ComfyUI file is written as the kohya file of the same tensors (shared
    downs kept, so the same names and ranks), and every module's ΔW is unchanged."""
    tensors, _ = bfl_file(chroma.bfl, spelling, seed=3)
    kohya, _ = bfl_file(chroma.bfl, "kohya", seed=3)  # the same tensors under kohya's names
    data, _ = parse_flux(tensors, {}, chroma.dims, module_paths=chroma.paths)
    written, metadata = write_flux_kohya(data, chroma.dims)
    assert written.keys() == kohya.keys()
    for key, t in kohya.items():
        if key.endswith(".alpha"):
            torch.testing.assert_close(written[key], t)
        else:
            assert torch.equal(written[key], t), key
    again, unresolved = parse_flux(written, {}, chroma.dims, module_paths=chroma.paths)
    assert unresolved == [] and again.modules.keys() == data.modules.keys()
    for key, m in data.modules.items():
        torch.testing.assert_close(delta(again.modules[key]), delta(m), **TOL)


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_loaded_file_changes_the_transformer_by_the_reference_deltas(chroma, tmp_path, spelling) -> None:
    tensors, deltas = bfl_file(chroma.bfl, spelling, seed=11)
    expected = {}
    for bfl, d in deltas.items():
        expected.update(reference_split(bfl, d, chroma.dims.inner_dim))
    path = tmp_path / f"{spelling}.safetensors"
    save_file(tensors, str(path))
    pipe = dl.build_tiny_pipeline("tiny-chroma")
    base = forward(pipe.transformer)
    dl.load_lora(pipe, path)
    loaded = forward(pipe.transformer)
    assert (loaded - base).abs().max() > 1e-3 * base.abs().max()  # the adapter does something
    assert_rel(loaded, forward(with_deltas(chroma.pipe.transformer, expected)))


def double_block_layers(chroma) -> dict[str, tuple[int, int]]:  # noqa: ANN001
    return {b: s for b, s in chroma.bfl.items() if b.startswith("double_blocks.")}


@pytest.mark.parametrize("spelling", ["kohya", "comfyui-down-up"])
def test_plain_diffusers_agrees_on_double_blocks(chroma, tmp_path, spelling) -> None:
    """diffusers' own kohya-Flux converter (which ChromaPipeline's Flux mixin uses) as the oracle."""
    tensors, _ = bfl_file(double_block_layers(chroma), spelling, seed=13)
    theirs = dl.build_tiny_pipeline("tiny-chroma")
    theirs.load_lora_weights({k: v.clone() for k, v in tensors.items()}, adapter_name="oracle")
    path = tmp_path / "f.safetensors"
    save_file(tensors, str(path))
    ours = dl.build_tiny_pipeline("tiny-chroma")
    dl.load_lora(ours, path)
    assert_rel(forward(ours.transformer), forward(theirs.transformer))


def test_ai_toolkit_file_loads_what_diffusers_loads_from_the_same_tensors(chroma, tmp_path) -> None:
    """diffusers 0.42 loads nothing from ``diffusion_model.`` + ``lora_A/B`` Chroma names; the same tensors
    spelled ``lora_down/up`` (no alpha: scale 1 in both) are what it does load — the oracle for our reading."""
    tensors, _ = bfl_file(double_block_layers(chroma), "ai-toolkit", seed=17)
    down_up = {k.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up."): v for k, v in tensors.items()}
    theirs = dl.build_tiny_pipeline("tiny-chroma")
    theirs.load_lora_weights({k: v.clone() for k, v in down_up.items()}, adapter_name="oracle")
    path = tmp_path / "aitk.safetensors"
    save_file(tensors, str(path))
    ours = dl.build_tiny_pipeline("tiny-chroma")
    dl.load_lora(ours, path)
    assert_rel(forward(ours.transformer), forward(theirs.transformer))


@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
def test_saved_files_use_bfl_names_and_reload(tmp_path, fmt) -> None:
    pipe = dl.build_tiny_pipeline("tiny-chroma")
    pipe.set_progress_bar_config(disable=True)
    trained_adapter(pipe, "c", seed=90, rank=4, alpha=3, targets="all-linear")
    expected = run(pipe)
    path = dl.save_lora(pipe, "c", tmp_path / "c.safetensors", format=fmt)
    keys = set(load_file(str(path)))
    prefix, sep = ("lora_unet_", "_") if fmt == "kohya" else ("diffusion_model.", ".")
    for name in ("double_blocks.0.img_attn.qkv", "single_blocks.1.linear1", "final_layer.linear", "img_in",
                 "distilled_guidance_layer.layers.1.out_layer"):
        assert f"{prefix}{name.replace('.', sep)}.lora_down.weight" in keys, name
    names = [k.removeprefix(prefix) for k in keys]
    assert not any(w in n for n in names for w in ("to_q", "linear_1", "_mod", "modulation", "time_in"))
    assert read_metadata(path)["ss_base_model_version"] == "chroma"
    fresh = dl.build_tiny_pipeline("tiny-chroma")
    fresh.set_progress_bar_config(disable=True)
    dl.load_lora(fresh, path)
    assert_near(run(fresh), expected, rel=1e-4)  # fused qkv rounds differently; CFG (5.0) amplifies it


def test_our_kohya_double_blocks_in_plain_diffusers(tmp_path) -> None:
    """Our written kohya file, double-block keys only (what diffusers' converter handles on a tiny model), loaded
    by plain diffusers gives the same transformer as ours."""
    pipe = dl.build_tiny_pipeline("tiny-chroma")
    trained_adapter(pipe, "c", seed=91, rank=4, alpha=2, targets="attn-ff")
    written = load_file(str(dl.save_lora(pipe, "c", tmp_path / "c.safetensors", format="kohya")))
    double = {k: v for k, v in written.items() if k.startswith("lora_unet_double_blocks_")}
    assert len(double) == 2 * 8 * 3  # 2 blocks × 8 layers × (down, up, alpha)
    save_file(double, str(tmp_path / "blocks.safetensors"))
    ours = dl.build_tiny_pipeline("tiny-chroma")
    dl.load_lora(ours, tmp_path / "blocks.safetensors")
    theirs = dl.build_tiny_pipeline("tiny-chroma")
    theirs.load_lora_weights({k: v.clone() for k, v in double.items()}, adapter_name="oracle")
    assert_rel(forward(ours.transformer), forward(theirs.transformer))
    assert (forward(ours.transformer) - forward(dl.build_tiny_pipeline("tiny-chroma").transformer)).abs().max() > 0


def test_convert_real_size_chroma_file_without_a_model(hd, tmp_path) -> None:
    """An ai-toolkit Chroma1-HD file (no metadata: the approximator names say Chroma) converts through the meta
    reference to kohya and diffusers; linear1 is split by Chroma1-HD's sizes and the tensors come back unchanged."""
    bfl = ["double_blocks.3.img_attn.qkv", "single_blocks.30.linear1", "single_blocks.30.linear2",
           "distilled_guidance_layer.layers.2.in_layer", "distilled_guidance_layer.out_proj", "txt_in"]
    shapes = {p: s[:2] for p, s in hd.module_shapes["transformer"].items()}
    config = {"num_layers": 19, "num_single_layers": 38, "approximator_layers": 5}
    layers = {b: s for b, s in bfl_layers(shapes, config).items() if b in bfl}
    tensors, deltas = bfl_file(layers, "ai-toolkit", seed=23)
    src = tmp_path / "aitk.safetensors"
    save_file(tensors, str(src))
    assert main(["convert", str(src), str(tmp_path / "k.safetensors"), "--to", "kohya"]) == 0
    assert main(["convert", str(tmp_path / "k.safetensors"), str(tmp_path / "d.safetensors"), "--to", "diffusers"]) == 0
    kohya = load_file(str(tmp_path / "k.safetensors"))
    assert {k.rsplit(".", 2)[0] for k in kohya if k.endswith("lora_down.weight")} == {
        "lora_unet_" + flatten(b) for b in bfl
    }
    for key, t in tensors.items():  # same tensors under kohya names (alpha = rank written out)
        name, _, suffix = key.partition(".lora_")
        flat = "lora_unet_" + flatten(name.removeprefix("diffusion_model."))
        assert torch.equal(kohya[f"{flat}.lora_{'down' if suffix.startswith('A') else 'up'}.weight"], t)
    diffusers_file = load_file(str(tmp_path / "d.safetensors"))
    expected = {}
    for b, d in deltas.items():
        expected.update(reference_split(b, d, 3072))
    got = {}
    for key in diffusers_file:
        if key.endswith("lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            got[module.removeprefix("transformer.")] = diffusers_file[module + ".lora_B.weight"] @ diffusers_file[key]
    assert got.keys() == expected.keys()
    for path, d in expected.items():
        torch.testing.assert_close(got[path], d, rtol=1e-5, atol=1e-5)



def test_flux1_and_chroma_files_in_the_other_pipeline_say_which_family(tmp_path) -> None:
    """A Flux.1 LoRA with modulation layers, and a Chroma LoRA with approximator layers, name their family when
    loaded into the other one; the pipeline is left as it was."""
    flux = dl.build_tiny_pipeline("tiny-flux")
    trained_adapter(flux, "f", seed=92, rank=2, targets="all-linear")
    chroma = dl.build_tiny_pipeline("tiny-chroma")
    trained_adapter(chroma, "c", seed=93, rank=2, targets="all-linear")
    for fmt in ("kohya", "comfyui", "diffusers"):
        flux_file = dl.save_lora(flux, "f", tmp_path / f"f-{fmt}.safetensors", format=fmt)
        chroma_file = dl.save_lora(chroma, "c", tmp_path / f"c-{fmt}.safetensors", format=fmt)
        for src, dst, family in ((flux_file, "tiny-chroma", "flux1"), (chroma_file, "tiny-flux", "chroma")):
            pipe = dl.build_tiny_pipeline(dst)
            before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
            with pytest.raises(dl.FamilyMismatchError, match=f"look like a {family} adapter"):
                dl.load_lora(pipe, src)
            after = pipe.transformer.state_dict()
            assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_which_family_a_chroma_file_is_for(tmp_path) -> None:
    """Block names alone are Flux.1's as much as Chroma's: tools ask, unless the metadata or the approximator say."""
    from diffusion_lora.errors import ConfigError
    from diffusion_lora.formats.adapter_files import header_of
    from diffusion_lora.tools.files import file_family

    blocks = {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"}
    cases = [(blocks, {}, None), (blocks, {"ss_base_model_version": "chroma"}, "chroma"),
             (blocks | {"lora_unet_distilled_guidance_layer_in_proj"}, {}, "chroma"),
             (blocks | {"lora_unet_double_blocks_0_img_mod_lin"}, {}, "flux1")]
    for i, (names, metadata, expected) in enumerate(cases):
        tensors = {}
        for name in names:
            tensors |= {f"{name}.lora_down.weight": torch.ones(1, 2), f"{name}.lora_up.weight": torch.ones(2, 1)}
        path = tmp_path / f"{i}.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        if expected is None:
            with pytest.raises(ConfigError, match="candidates: chroma, flux1"):
                file_family(path, *header_of(path))
        else:
            assert file_family(path, *header_of(path)) == expected
