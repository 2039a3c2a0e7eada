"""SD3 / SD3.5 LoRA names (kohya sd-scripts and ComfyUI MMDiT names ↔ diffusers), checked against oracles
that are not the module under test.

diffusers has no converter for kohya/ComfyUI SD3 LoRA files: ``pipe.load_lora_weights`` silently loads
nothing from them (asserted below, so that no test takes "diffusers did not raise" for agreement). The
oracles are therefore:

* golden key lists of SD3.5 Large and Medium (``tests/fixtures/sd35_*_keys.txt``): the names sd-scripts'
  own ``LoRANetwork`` creates, with the diffusers targets of ComfyUI's ``mmdit_to_diffusers`` rules;
* diffusers' single-file checkpoint converter (``convert_sd3_transformer_checkpoint_to_diffusers``) applied
  to a checkpoint made of an MMDiT-named file's ΔW = alpha/rank · up @ down: it splits qkv and swaps the
  pre-only adaLN halves the way the real SD3/SD3.5 checkpoints are loaded;
* the output of a tiny-sd35 pipeline whose weights have those ΔW added, against our loaded adapter.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file

import diffusion_lora as dl
from diffusion_lora.adapters import pipeline_keys
from diffusion_lora.formats.codec import decode, encode
from diffusion_lora.formats.file_variant import variant_of_names
from diffusion_lora.formats.mmdit_names import mmdit_index, mmdit_table
from diffusion_lora.formats.safetensors_io import read_metadata
from diffusion_lora.models.reference import reference_keys
from diffusion_lora.tools.convert import convert_file

from .helpers import assert_near, run, trained_adapter

FIXTURES = Path(__file__).parent / "fixtures"
VARIANTS = {"large": "sd35-large", "medium": "sd35-medium"}
TINY = "tiny-sd35"


def golden(which: str) -> list[tuple[str, tuple[int, int] | None, list[tuple[str, slice | None]]]]:
    """(file module name, MMDiT layer size or None, [(diffusers path, rows or None = all)]) per fixture line."""
    out = []
    for line in (FIXTURES / f"sd35_{which}_keys.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, size, *targets = line.split()
        parsed = []
        for t in targets:
            m = re.fullmatch(r"(.+)\[(\d+):(\d+)\]", t)
            parsed.append((m.group(1), slice(int(m.group(2)), int(m.group(3)))) if m else (t, None))
        shape = tuple(int(x) for x in size.split("x")) if size != "-" else None
        out.append((name, shape, parsed))
    return out


# --- golden names on the real published layouts (meta device) --------------------------------------------


@pytest.mark.parametrize("which", ["large", "medium"])
def test_golden_names_resolve_to_their_targets_on_the_real_layout(which):
    keys = reference_keys("sd3", VARIANTS[which])
    shapes = keys.module_shapes["transformer"]
    index = mmdit_index(shapes)
    lines = golden(which)
    for name, size, targets in lines:
        flat = name.replace("diffusion_model.", "lora_unet_").replace(".", "_")  # ComfyUI's dotted spelling
        got = index[flat]
        if len(targets) == 1 and targets[0][1] is None:
            assert [(p, s.start, s.stop) for p, s in got] == [(targets[0][0], None, None)], name
        else:
            assert [(p, s.start, s.stop) for p, s in got] == [(p, s.start, s.stop) for p, s in targets], name
        if size is not None:  # the MMDiT layer's size is its diffusers modules' rows stacked
            paths = list(dict.fromkeys(p for p, _ in targets))
            assert sum(shapes[p][0] for p in paths) == size[0] and shapes[paths[0]][1] == size[1], name
    # complete: the names we write are exactly sd-scripts' (emb_dims on: every Linear and x_embedder)
    kohya = {n for n, _, _ in lines if n.startswith("lora_unet_")}
    assert {"lora_unet_" + n.replace(".", "_") for n in mmdit_table(shapes)} == kohya


def _real_size_file(keys, names: list[str], rank: int = 1) -> dict[str, torch.Tensor]:
    """A rank-1 LoRA on MMDiT layers ``names`` of the real layout, up rows numbered so that each diffusers
    module's received rows can be told apart."""
    shapes = keys.module_shapes["transformer"]
    index = mmdit_index(shapes)
    tensors = {}
    for name in names:
        paths = dict.fromkeys(p for p, _ in index[name])
        out_rows, in_features = sum(shapes[p][0] for p in paths), shapes[next(iter(paths))][1]
        tensors[f"{name}.lora_down.weight"] = torch.ones(rank, in_features)
        tensors[f"{name}.lora_up.weight"] = torch.arange(out_rows, dtype=torch.float32).reshape(-1, 1).repeat(1, rank)
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    return tensors


@pytest.mark.parametrize("which", ["large", "medium"])
def test_sd35_names_convert_without_a_model_against_their_own_layout(which, tmp_path):
    """Large blocks 24-37 and Medium attn2 exist only in their variant's layout: convert must pick it from
    the names, split qkv by its rows, and write the variant's metadata."""
    keys = reference_keys("sd3", VARIANTS[which])
    name = "lora_unet_joint_blocks_" + ("37_x_block_attn_qkv" if which == "large" else "12_x_block_attn2_qkv")
    extra = ["lora_unet_joint_blocks_37_context_block_adaLN_modulation_1"] if which == "large" else []
    src = tmp_path / "src.safetensors"
    save_file(_real_size_file(keys, [name, *extra]), str(src))  # no metadata: the names must tell
    with pytest.raises(dl.DiffusionLoraError):  # SD3 medium's layout has neither
        convert_file(src, tmp_path / "x.safetensors", "diffusers", keys=reference_keys("sd3"))
    out = convert_file(src, tmp_path / "out.safetensors", "diffusers")
    got = load_file(str(out))
    inner = 2432 if which == "large" else 1536
    block = "37.attn" if which == "large" else "12.attn2"
    for k, part in enumerate(("to_q", "to_k", "to_v")):
        up = got[f"transformer.transformer_blocks.{block}.{part}.lora_B.weight"]
        assert torch.equal(up[:, 0], torch.arange(k * inner, (k + 1) * inner, dtype=torch.float32))
    if which == "large":  # (shift, scale) -> (scale, shift)
        up = got["transformer.transformer_blocks.37.norm1_context.linear.lora_B.weight"][:, 0]
        assert torch.equal(up, torch.cat([torch.arange(inner, 2 * inner), torch.arange(0, inner)]).float())
    meta = read_metadata(out)
    assert meta["modelspec.architecture"] == f"stable-diffusion-3-5-{which}/lora"
    assert meta["ss_base_model_version"] == f"5-{which}"
    # and back to kohya: the original names, the fused rows in their original order
    back = load_file(str(convert_file(out, tmp_path / "back.safetensors", "kohya")))
    original = _real_size_file(keys, [name])[f"{name}.lora_up.weight"]
    assert torch.equal(back[f"{name}.lora_up.weight"], original)


def test_variant_evidence_in_names():
    sd3 = dl.FAMILIES["sd3"]
    assert variant_of_names(sd3, ["lora_unet_joint_blocks_3_x_block_attn2_qkv"]).name == "sd35-medium"
    assert variant_of_names(sd3, ["diffusion_model.joint_blocks.30.x_block.mlp.fc1"]).name == "sd35-large"
    assert variant_of_names(sd3, ["transformer.transformer_blocks.2.attn2.to_q"]).name == "sd35-medium"
    assert variant_of_names(sd3, ["lora_unet_joint_blocks_23_x_block_attn_qkv"]) is None  # any of the three
    both = ["lora_unet_joint_blocks_30_x_block_attn_qkv", "lora_unet_joint_blocks_3_x_block_attn2_qkv"]
    assert variant_of_names(sd3, both) is None  # contradictory: no layout has both
    assert dl.families.family_of_kohya_version("medium").name == "sd3"  # sd-scripts' SD3 medium
    assert dl.families.family_of_kohya_version("5-large").name == "sd3"


# --- tensor oracle on tiny-sd35: diffusers' single-file converter ------------------------------------------


def _tiny_mmdit_layers(pipe) -> dict[str, tuple[int, int]]:
    """(out, in) of every MMDiT Linear layer of the tiny SD3.5 transformer, from its config (the layer kinds
    of a dual block, a plain block and the last block as in the SD3.5 Medium golden list)."""
    c = pipe.transformer.config
    inner, n = c.num_attention_heads * c.attention_head_dim, c.num_layers
    medium = {name for name, _, _ in golden("medium") if name.startswith("lora_unet_joint_blocks_")}
    kinds = {  # tiny block -> the Medium block of the same kind: 0 dual, 13 plain, 23 last (context pre-only)
        i: 0 if i in c.dual_attention_layers else (23 if i == n - 1 else 13) for i in range(n)
    }
    sizes = {"attn_qkv": (3 * inner, inner), "attn_proj": (inner, inner), "attn2_qkv": (3 * inner, inner),
             "attn2_proj": (inner, inner), "mlp_fc1": (4 * inner, inner), "mlp_fc2": (inner, 4 * inner)}
    layers = {}
    for i, like in kinds.items():
        for name in sorted(medium):
            m = re.fullmatch(rf"lora_unet_joint_blocks_{like}_(x|context)_block_(.+)", name)
            if not m:
                continue
            rest = m.group(2)
            if rest == "adaLN_modulation_1":
                last_context, dual_x = m.group(1) == "context" and i == n - 1, m.group(1) == "x" and like == 0
                size = ((2 if last_context else 9 if dual_x else 6) * inner, inner)
            else:
                size = sizes[rest]
            dotted = "adaLN_modulation.1" if rest == "adaLN_modulation_1" else rest.replace("_", ".", 1)
            layers[f"joint_blocks.{i}.{m.group(1)}_block.{dotted}"] = size
    layers["context_embedder"] = (inner, c.joint_attention_dim)
    layers["t_embedder.mlp.0"], layers["t_embedder.mlp.2"] = (inner, 256), (inner, inner)
    layers["y_embedder.mlp.0"], layers["y_embedder.mlp.2"] = (inner, c.pooled_projection_dim), (inner, inner)
    layers["final_layer.linear"] = (c.patch_size**2 * c.out_channels, inner)
    layers["final_layer.adaLN_modulation.1"] = (2 * inner, inner)
    return layers


def _mmdit_file(layers: dict[str, tuple[int, int]], seed: int = 0):
    """A random kohya MMDiT-named file over ``layers`` (ranks 1-3, alpha ≠ rank) and each layer's ΔW."""
    g = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for j, (layer, (out, inp)) in enumerate(sorted(layers.items())):
        rank, alpha = 1 + j % 3, 0.5 + j % 4
        down, up = torch.randn(rank, inp, generator=g) * 0.3, torch.randn(out, rank, generator=g) * 0.3
        name = "lora_unet_" + layer.replace(".", "_")
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
        deltas[layer] = alpha / rank * (up @ down)
    return tensors, deltas


def _converter_deltas(pipe, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers module path -> ΔW, by diffusers' SD3 single-file converter run on a checkpoint of the ΔW
    (zero biases, norms and embeddings: only the weights' mapping is looked at)."""
    c, t = pipe.transformer.config, pipe.transformer
    inner = c.num_attention_heads * c.attention_head_dim
    ckpt = {f"{k}.weight": d.clone() for k, d in deltas.items()}
    for k, d in deltas.items():
        ckpt[f"{k}.bias"] = torch.zeros(d.shape[0])
    for i in range(c.num_layers):
        for block, attns in (("x_block", ("attn", "attn2") if i in c.dual_attention_layers else ("attn",)),
                             ("context_block", ("attn",))):
            for attn in attns:
                for norm in ("ln_q", "ln_k"):
                    ckpt[f"joint_blocks.{i}.{block}.{attn}.{norm}.weight"] = torch.zeros(c.attention_head_dim)
    ckpt["pos_embed"] = torch.zeros(1, c.pos_embed_max_size**2, inner)
    ckpt["x_embedder.proj.weight"] = torch.zeros_like(t.pos_embed.proj.weight)
    ckpt["x_embedder.proj.bias"] = torch.zeros(inner)
    converted = convert_sd3_transformer_checkpoint_to_diffusers(ckpt)
    return {k[: -len(".weight")]: v for k, v in converted.items() if k.endswith(".weight") and v.dim() == 2}


@pytest.fixture(scope="module")
def tiny_file():
    pipe = dl.build_tiny_pipeline(TINY)
    pipe.set_progress_bar_config(disable=True)
    layers = _tiny_mmdit_layers(pipe)
    tensors, deltas = _mmdit_file(layers)
    return pipe, tensors, _converter_deltas(pipe, deltas)


@pytest.mark.parametrize("spelling", ["kohya", "comfyui-lora-a-b", "comfyui-down-up"])
def test_mmdit_file_gives_each_module_the_converters_delta(tiny_file, spelling):
    pipe, tensors, expected = tiny_file
    if spelling != "kohya":
        a_b = spelling == "comfyui-lora-a-b"
        tensors = {_comfy(k, a_b): v for k, v in tensors.items()}
    decoded = decode(tensors, {}, pipeline_keys(pipe))
    assert decoded.unresolved == [] and decoded.format == ("kohya" if spelling == "kohya" else "comfyui")
    got = {k.removeprefix("transformer."): m.scale() * (m.up @ m.down) for k, m in decoded.data.modules.items()}
    assert got.keys() == expected.keys()
    assert any(".attn2." in k for k in got) and "norm_out.linear" in got
    for path, delta in expected.items():
        torch.testing.assert_close(got[path], delta, rtol=1e-6, atol=1e-7, msg=path)


def _comfy(key: str, a_b: bool) -> str:
    name, _, role = key.partition(".")
    dotted = "diffusion_model." + _dotted(name.removeprefix("lora_unet_"))
    if a_b:
        role = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(role, role)
    return f"{dotted}.{role}"


def _dotted(flat: str) -> str:
    for a, b in (("t_embedder_mlp_", "t_embedder.mlp."), ("y_embedder_mlp_", "y_embedder.mlp."),
                 ("final_layer_", "final_layer."), ("_x_block_", ".x_block."), ("_context_block_", ".context_block."),
                 ("joint_blocks_", "joint_blocks."), ("attn2_", "attn2."), ("attn_", "attn."), ("mlp_", "mlp."),
                 ("adaLN_modulation_1", "adaLN_modulation.1")):
        flat = flat.replace(a, b)
    return flat


def test_loaded_mmdit_file_equals_the_converted_deltas_merged_into_the_weights(tiny_file, make_pipe, tmp_path):
    pipe, tensors, expected = tiny_file
    path = tmp_path / "k.safetensors"
    save_file(tensors, str(path))
    ours = make_pipe(TINY)
    dl.load_lora(ours, path)
    merged = make_pipe(TINY)
    with torch.no_grad():
        for p, delta in expected.items():
            merged.transformer.get_submodule(p).weight += delta
    assert_near(run(ours), run(merged), rel=1e-5)
    # plain diffusers has no kohya SD3 converter: it loads nothing and says nothing (no oracle there)
    plain = make_pipe(TINY)
    plain.load_lora_weights(str(path))
    assert getattr(plain.transformer, "peft_config", None) is None
    assert torch.equal(run(plain), run(make_pipe(TINY)))


# --- writing back --------------------------------------------------------------------------------------------


def test_fused_file_written_back_exactly_with_its_shared_down(tiny_file, tmp_path):
    pipe, tensors, _ = tiny_file
    keys = pipeline_keys(pipe)
    data = decode(tensors, {}, keys).data
    for fmt in ("kohya", "comfyui"):
        written, meta = encode(keys, data, fmt)
        if fmt == "kohya":  # shared down kept: the same tensors, rank unchanged
            assert written.keys() == tensors.keys()
            for k, v in tensors.items():
                assert torch.equal(written[k], v.to(written[k].dtype)), k
            assert meta["ss_network_module"] == "networks.lora_sd3"
        again = decode(written, {}, keys).data
        assert again.modules.keys() == data.modules.keys()
        for k, m in data.modules.items():
            assert torch.equal(again.modules[k].down, m.down) and torch.equal(again.modules[k].up, m.up), k


def test_separately_trained_qkv_is_written_block_diagonal_and_keeps_every_delta(make_pipe, tmp_path):
    pipe = make_pipe(TINY)
    trained_adapter(pipe, "s", seed=5, rank=2, alpha=3, targets="all-linear", text_encoder=True)
    expected = run(pipe)
    path = dl.save_lora(pipe, "s", tmp_path / "s.safetensors", format="kohya")
    tensors = load_file(str(path))
    qkv = "lora_unet_joint_blocks_0_x_block_attn2_qkv"
    down, up = tensors[f"{qkv}.lora_down.weight"], tensors[f"{qkv}.lora_up.weight"]
    assert down.shape == (6, 32) and up.shape == (96, 6)  # three rank-2 downs stacked, up block-diagonal
    assert float(tensors[f"{qkv}.alpha"]) == pytest.approx(3 / 2 * 6)  # the parts' scale at rank 6
    assert torch.count_nonzero(up[:32, 2:]) == 0 and torch.count_nonzero(up[32:64, :2]) == 0
    assert "lora_unet_joint_blocks_2_context_block_attn_proj.lora_down.weight" not in tensors  # pre-only
    assert any(k.startswith("lora_te1_text_model_") for k in tensors)
    data = dl.adapter_data(pipe, "s")
    read = decode(tensors, {}, pipeline_keys(pipe)).data
    assert read.modules.keys() == data.modules.keys()
    for k, m in data.modules.items():
        r = read.modules[k]
        torch.testing.assert_close(r.scale() * (r.up @ r.down.flatten(1)), m.scale() * (m.up @ m.down.flatten(1)))
    fresh = make_pipe(TINY)
    dl.load_lora(fresh, path)
    assert_near(run(fresh), expected, rel=1e-5)


def test_old_flat_diffusers_and_onetrainer_names_still_load(make_pipe, tmp_path):
    """kohya files diffusion_lora wrote before (lora_unet_<flat diffusers path>) and OneTrainer's
    lora_transformer_<flat diffusers path> are the same modules."""
    pipe = make_pipe(TINY)
    trained_adapter(pipe, "s", seed=9, rank=2, alpha=1)
    expected = run(pipe)
    data = dl.adapter_data(pipe, "s")
    old = {}
    for key, m in data.modules.items():
        flat = key.removeprefix("transformer.").replace(".", "_")
        old |= {f"lora_unet_{flat}.lora_down.weight": m.down, f"lora_unet_{flat}.lora_up.weight": m.up,
                f"lora_unet_{flat}.alpha": torch.tensor(m.alpha)}
    for prefix in ("lora_unet_", "lora_transformer_"):
        path = tmp_path / f"{prefix}.safetensors"
        save_file({k.replace("lora_unet_", prefix, 1): v for k, v in old.items()}, str(path))
        fresh = make_pipe(TINY)
        dl.load_lora(fresh, path)
        assert_near(run(fresh), expected, rel=1e-5)
    # both spellings of one module in one file: ambiguous
    key = next(k for k in old if "attn_to_q.lora_down" in k)
    mmdit_like = dict(old)
    mmdit_like[key.replace("lora_unet_", "lora_transformer_")] = old[key]
    with pytest.raises(dl.FormatError, match="twice"):
        decode(mmdit_like, {}, pipeline_keys(pipe))


def test_attn_preset_reaches_attn2_and_plain_diffusers_reproduces_our_file(make_pipe, tmp_path):
    pipe = make_pipe(TINY)
    trained_adapter(pipe, "s", seed=4, rank=2, alpha=2)  # default targets: the attn preset
    attn2 = [k for k in dl.adapter_data(pipe, "s").modules if ".attn2." in k]
    assert sorted(p.rsplit(".", 1)[-1] for p in attn2 if ".to_out." not in p) == ["to_k", "to_q", "to_v"]
    assert "transformer.transformer_blocks.0.attn2.to_out.0" in attn2
    expected = run(pipe)
    path = dl.save_lora(pipe, "s", tmp_path / "s.safetensors")
    plain = make_pipe(TINY)
    plain.load_lora_weights(str(path))
    assert_near(run(plain), expected, rel=1e-5)


@pytest.mark.parametrize(("kind", "version", "architecture"), [
    ("tiny-sd35", "5-medium", "stable-diffusion-3-5-medium/lora"),
    ("tiny-sd3", "sd3", "stable-diffusion-3-medium/lora"),
])
def test_metadata_names_the_variant(make_pipe, tmp_path, kind, version, architecture):
    pipe = make_pipe(kind)
    trained_adapter(pipe, "s", seed=1, rank=2)
    for fmt in ("kohya", "diffusers"):
        meta = read_metadata(dl.save_lora(pipe, "s", tmp_path / f"{fmt}.safetensors", format=fmt))
        assert meta["ss_base_model_version"] == version and meta["modelspec.architecture"] == architecture


# --- bad input ------------------------------------------------------------------------------------------------


def test_fused_layer_of_another_size_is_refused_by_name(tiny_file):
    pipe, tensors, _ = tiny_file
    bad = dict(tensors)
    key = "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"
    bad[key] = torch.zeros(3 * 2432, bad[key].shape[1])  # SD3.5 Large's rows on the tiny model
    with pytest.raises(dl.FormatError, match=r"joint_blocks_0_x_block_attn_qkv.*96 output rows.*another SD3 size"):
        decode(bad, {}, pipeline_keys(pipe))


def test_layers_the_model_lacks_are_refused_and_the_pipeline_is_untouched(tiny_file, make_pipe, tmp_path):
    """An SD3.5 Medium file (attn2) on SD3 (no attn2): the attn2 keys are named, nothing is loaded."""
    _, tensors, _ = tiny_file
    path = tmp_path / "medium.safetensors"
    save_file({k: v for k, v in tensors.items() if "_joint_blocks_0_x_block_attn" in k}, str(path))  # attn, attn2
    sd3 = make_pipe("tiny-sd3")
    before = run(sd3)
    with pytest.raises(dl.KeyMappingError, match="attn2"):
        dl.load_lora(sd3, path)
    assert dl.list_loras(sd3) == [] and torch.equal(run(sd3), before)


@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
@pytest.mark.parametrize("variant", [{"use_dora": True}, {"use_rslora": True}], ids=["dora", "rslora"])
def test_dora_and_rslora_round_trip_through_mmdit_names(make_pipe, tmp_path, fmt, variant):
    pipe = make_pipe(TINY)
    trained_adapter(pipe, "s", seed=7, rank=2, alpha=3, targets="attn-ff", text_encoder=True, **variant)
    expected = run(pipe)
    path = dl.save_lora(pipe, "s", tmp_path / "s.safetensors", format=fmt)
    tensors = load_file(str(path))
    assert any("joint_blocks" in k and "attn2" in k and "qkv" in k for k in tensors)
    if "use_dora" in variant:  # one magnitude per output row of the fused layer
        assert tensors[_name(fmt, "joint_blocks.0.x_block.attn.qkv") + ".dora_scale"].shape == (96, 1)
    fresh = make_pipe(TINY)
    dl.load_lora(fresh, path)
    assert_near(run(fresh), expected, rel=1e-5)


def _name(fmt: str, mmdit: str) -> str:
    return "diffusion_model." + mmdit if fmt == "comfyui" else "lora_unet_" + mmdit.replace(".", "_")
