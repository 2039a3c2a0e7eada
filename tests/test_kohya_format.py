"""The kohya LoRA format: detection, the key index on real models, parse/write, and plain diffusers as oracle.

Oracles: a kohya file we write must load in plain ``pipe.load_lora_weights`` and reproduce the
adapter's output; where diffusers cannot load a variant (it drops ``dora_scale``) the reference is the
math itself, applied to a copy of the model's weights: W += alpha/rank · up @ down (then LyCORIS' DoRA
rescale W ← dora_scale · W / ‖W‖_row).
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import diffusion_lora as dl
from diffusion_lora.formats.adapter_data import AdapterData, ModuleLora
from diffusion_lora.formats.kohya import (
    KohyaIndex,
    is_kohya,
    kohya_index,
    parse_kohya,
    write_kohya,
)
from diffusion_lora.formats.peft_format import write_peft
from diffusion_lora.formats.sgm_blocks import UNetLayout, sgm_path

from .helpers import assert_near, run, trained_adapter

FIXTURES = Path(__file__).parent / "fixtures"
REL = 1e-5
FAMILY = {"tiny-sd15": "sd1", "tiny-sdxl": "sdxl"}

# Real model sizes, built on the meta device (module names only, no weights).
SD15_UNET = {
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "sample_size": 64,
}
SDXL_UNET = {
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,
    "attention_head_dim": (5, 10, 20),
    "addition_embed_type": "text_time",
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "use_linear_projection": True,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
}
CLIP_L = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
}
CLIP_G = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}


def layer_paths(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def index_of(components: dict[str, torch.nn.Module], family: str) -> KohyaIndex:
    paths = {c: layer_paths(m) for c, m in components.items()}
    return kohya_index(dl.FAMILIES[family].kohya_prefixes, paths, UNetLayout.from_config(components["unet"].config))


def fresh(kind: str) -> Any:
    pipe = dl.build_tiny_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipe_index(pipe: Any, kind: str) -> KohyaIndex:
    family = FAMILY[kind]
    return index_of({c: getattr(pipe, c) for c in dl.FAMILIES[family].kohya_prefixes if hasattr(pipe, c)}, family)


def save(tmp_path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str], name: str = "k") -> str:
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return str(path)


def merged_reference(kind: str, tensors: dict[str, torch.Tensor], index: KohyaIndex) -> Any:
    """A fresh pipeline with the kohya file's deltas added into its weights, straight from the raw tensors."""
    pipe = fresh(kind)
    with torch.no_grad():
        for key, down in tensors.items():
            if not key.endswith(".lora_down.weight"):
                continue
            name = key.split(".")[0]
            up, rank = tensors[f"{name}.lora_up.weight"], down.shape[0]
            alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else rank
            component, path = index.resolve(name)
            weight = getattr(pipe, component).get_submodule(path).weight
            v = weight + alpha / rank * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
            if f"{name}.dora_scale" in tensors:  # LyCORIS wd_on_output: per output row
                norm = v.flatten(1).norm(dim=1).reshape(-1, *[1] * (v.dim() - 1))
                v = tensors[f"{name}.dora_scale"] * v / norm
            weight.copy_(v)
    return pipe


@pytest.fixture(scope="module")
def trained():
    """Per tiny kind: kohya index of the fresh model, a trained adapter's data and the outputs."""
    cache: dict[str, SimpleNamespace] = {}

    def get(kind: str) -> SimpleNamespace:
        if kind not in cache:
            pipe = fresh(kind)
            index, base = pipe_index(pipe, kind), run(pipe)
            trained_adapter(pipe, "style", seed=3, rank=4, alpha=2, text_encoder=True)
            cache[kind] = SimpleNamespace(
                index=index, data=dl.adapter_data(pipe, "style"), expected=run(pipe), base=base
            )
        return cache[kind]

    return get


CASES = [("tiny-sd15", False), ("tiny-sdxl", False), ("tiny-sdxl", True)]
CASE_IDS = ["sd15", "sdxl-diffusers-names", "sdxl-sgm-names"]


@pytest.mark.parametrize(("kind", "sgm"), CASES, ids=CASE_IDS)
def test_write_then_parse_is_identity(trained, kind, sgm, tmp_path):
    t = trained(kind)
    tensors, meta = write_kohya(t.data, t.index, sgm=sgm)
    assert is_kohya(tensors)
    assert meta == {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "2.0"}
    te = [k for k in tensors if k.startswith("lora_te")]
    assert te and all(re.match(r"lora_te\d?_text_model_", k) for k in te)
    unet = [k for k in tensors if k.startswith("lora_unet_")]
    assert all(("_input_blocks_" in k or "_middle_block_" in k or "_output_blocks_" in k) == sgm for k in unet)
    alpha = next(v for k, v in tensors.items() if k.endswith(".alpha"))
    assert alpha.shape == () and alpha.dtype == torch.float32 and float(alpha) == 2.0
    data, unresolved = parse_kohya(load_file(save(tmp_path, tensors, meta)), meta, t.index)
    assert unresolved == [] and data.format == "kohya"
    assert data.modules.keys() == t.data.modules.keys()
    for key, m in t.data.modules.items():
        got = data.modules[key]
        assert torch.equal(got.down, m.down) and torch.equal(got.up, m.up), key
        assert got.alpha == m.alpha == 2.0 and got.magnitude is None


@pytest.mark.parametrize(("kind", "sgm"), CASES, ids=CASE_IDS)
def test_plain_diffusers_loads_our_file(trained, kind, sgm, tmp_path):
    t = trained(kind)
    path = save(tmp_path, *write_kohya(t.data, t.index, sgm=sgm))
    plain = fresh(kind)
    plain.load_lora_weights(path)
    for component in ("text_encoder", "text_encoder_2"):  # diffusers must not have skipped the encoders
        if hasattr(plain, component):
            assert any("lora_A" in n for n, _ in getattr(plain, component).named_modules()), component
    out = run(plain)
    assert not torch.equal(out, t.base)
    assert_near(out, t.expected, rel=REL)


def mixed(data: AdapterData, alphas: tuple[float, ...]) -> AdapterData:
    """``data`` with ranks 1-4 and the given alphas, cycled over its modules."""
    modules = {}
    for i, (key, m) in enumerate(sorted(data.modules.items())):
        rank = 1 + i % 4
        modules[key] = ModuleLora(m.down[:rank].clone(), m.up[:, :rank].clone(), alpha=alphas[i % len(alphas)])
    return AdapterData(modules)


def test_mixed_ranks_alpha_not_rank(trained, tmp_path):
    t = trained("tiny-sdxl")
    data = mixed(t.data, (3.0,))
    tensors, meta = write_kohya(data, t.index, sgm=True)
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == "3.0"
    path = save(tmp_path, tensors, meta)
    parsed, _ = parse_kohya(load_file(path), meta, t.index)
    for key, m in data.modules.items():
        assert parsed.modules[key].rank == m.rank and parsed.modules[key].scale() == pytest.approx(3.0 / m.rank)
    expected = run(merged_reference("tiny-sdxl", load_file(path), t.index))
    plain = fresh("tiny-sdxl")
    plain.load_lora_weights(path)
    assert_near(run(plain), expected, rel=REL)


def test_alpha_per_module(trained, tmp_path):
    t = trained("tiny-sdxl")
    data = mixed(t.data, (0.5, 3.0, 7.0))
    tensors, meta = write_kohya(data, t.index, sgm=True)
    assert meta["ss_network_dim"] == meta["ss_network_alpha"] == "Dynamic"
    path = save(tmp_path, tensors, meta)
    parsed, _ = parse_kohya(load_file(path), meta, t.index)
    for key, m in data.modules.items():
        assert parsed.modules[key].scale() == pytest.approx(m.alpha / m.rank)
    expected = run(merged_reference("tiny-sdxl", load_file(path), t.index))
    # diffusers 0.42 cannot load this: it builds alpha_pattern from old processor names
    # ("attn1.processor.to_q_lora…") that match no module, so PEFT ignores them and every module gets
    # one alpha. The oracle is the reference math, checked against our parse loaded through PEFT.
    peft_file = save(tmp_path, *write_peft(parsed), name="peft")
    ours = fresh("tiny-sdxl")
    dl.load_lora(ours, peft_file)
    assert_near(run(ours), expected, rel=REL)


def test_missing_alpha_means_scale_one(trained, tmp_path):
    t = trained("tiny-sd15")
    tensors, meta = write_kohya(t.data, t.index)
    tensors = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
    parsed, _ = parse_kohya(tensors, meta, t.index)
    assert all(m.alpha == m.rank == 4 for m in parsed.modules.values())
    path = save(tmp_path, tensors, meta)
    plain = fresh("tiny-sd15")
    plain.load_lora_weights(path)
    assert_near(run(plain), run(merged_reference("tiny-sd15", tensors, t.index)), rel=REL)


@pytest.mark.parametrize("kind", ["tiny-sd15", "tiny-sdxl"])
def test_both_clip_spellings_load(trained, kind, tmp_path):
    t = trained(kind)
    tensors, meta = write_kohya(t.data, t.index)
    short = {re.sub(r"^(lora_te\d?)_text_model_", r"\1_", k): v for k, v in tensors.items()}
    assert short.keys() != tensors.keys()
    long_data, long_unresolved = parse_kohya(tensors, meta, t.index)
    short_data, short_unresolved = parse_kohya(short, meta, t.index)
    assert long_unresolved == short_unresolved == []
    assert long_data.modules.keys() == short_data.modules.keys() == t.data.modules.keys()
    assert all(torch.equal(short_data.modules[k].up, m.up) for k, m in long_data.modules.items())
    plain = fresh(kind)
    if kind == "tiny-sd15":  # diffusers reads the spelling without text_model_ too
        plain.load_lora_weights(save(tmp_path, short, meta))
    else:
        # …but not for CLIPTextModelWithProjection (lora_te2_encoder_…): diffusers 0.42 finds no rank
        # for text_encoder_2 and fails with IndexError. Load our parse through PEFT instead.
        dl.load_lora(plain, save(tmp_path, *write_peft(short_data), name="peft"))
    assert_near(run(plain), t.expected, rel=REL)
    both = {**tensors, **{k: v for k, v in short.items() if k.startswith("lora_te")}}
    with pytest.raises(dl.FormatError, match="both adapt"):
        parse_kohya(both, meta, t.index)


def test_unresolved_keys_are_reported(trained):
    t = trained("tiny-sd15")
    tensors, meta = write_kohya(t.data, t.index)
    stray = "lora_unet_down_blocks_9_attentions_0_transformer_blocks_0_attn1_to_q"
    extra = {
        f"{stray}.lora_down.weight": torch.zeros(4, 8),
        f"{stray}.lora_up.weight": torch.zeros(8, 4),
        f"{stray}.alpha": torch.tensor(4.0),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
    }
    data, unresolved = parse_kohya({**tensors, **extra}, meta, t.index)
    assert unresolved == sorted(extra)
    assert data.modules.keys() == t.data.modules.keys()
    with pytest.raises(dl.KeyMappingError, match=r"4 kohya keys match no module") as err:
        parse_kohya({**tensors, **extra}, meta, t.index, strict=True, source="x.safetensors")
    assert "down_blocks_9" in str(err.value) and str(err.value).startswith("x.safetensors: ")


def conv_modules(pipe: Any, paths: list[str], seed: int) -> dict[str, ModuleLora]:
    """Random LoCon modules (rank 3, alpha 1.5) for UNet conv/linear layers ``paths``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path in paths:
        w = pipe.unet.get_submodule(path).weight
        down_shape = (3, *w.shape[1:])
        up_shape = (w.shape[0], 3, 1, 1) if w.dim() == 4 else (w.shape[0], 3)
        out[f"unet.{path}"] = ModuleLora(
            down=torch.randn(down_shape, generator=g) * 0.2, up=torch.randn(up_shape, generator=g) * 0.2, alpha=1.5
        )
    return out


LOCON = [
    "down_blocks.0.resnets.0.conv1",
    "down_blocks.0.resnets.1.time_emb_proj",
    "down_blocks.0.downsamplers.0.conv",
    "down_blocks.1.resnets.0.conv_shortcut",
    "down_blocks.0.attentions.0.proj_in",
    "mid_block.resnets.1.conv2",
    "up_blocks.0.resnets.2.conv_shortcut",
    "up_blocks.0.upsamplers.0.conv",
    "up_blocks.1.attentions.2.proj_out",
]


@pytest.mark.parametrize(("kind", "sgm"), [("tiny-sd15", False), ("tiny-sdxl", True)], ids=["sd15", "sdxl-sgm"])
def test_locon_conv_layers_match_diffusers(trained, kind, sgm, tmp_path):
    t = trained(kind)
    base = fresh(kind)
    data = AdapterData({**t.data.modules, **conv_modules(base, LOCON, seed=7)})
    tensors, meta = write_kohya(data, t.index, sgm=sgm)
    path = save(tmp_path, tensors, meta)
    parsed, unresolved = parse_kohya(load_file(path), meta, t.index)
    assert unresolved == [] and all(torch.equal(parsed.modules[k].down, m.down) for k, m in data.modules.items())
    expected = run(merged_reference(kind, load_file(path), t.index))
    base.load_lora_weights(path)
    assert_near(run(base), expected, rel=REL)


def test_dora_scale_matches_peft_dora(tmp_path):
    pipe = fresh("tiny-sd15")
    index = pipe_index(pipe, "tiny-sd15")
    trained_adapter(pipe, "d", seed=5, rank=4, alpha=2, use_dora=True, text_encoder=True)
    expected, data = run(pipe), dl.adapter_data(pipe, "d")
    tensors, meta = write_kohya(data, index)
    for key, m in data.modules.items():
        component, _, path = key.partition(".")
        scale = tensors[f"{index.name_of(component, path)}.dora_scale"]
        assert scale.shape == (m.up.shape[0], 1) and torch.equal(scale.flatten(), m.magnitude)
    path = save(tmp_path, tensors, meta)
    parsed, _ = parse_kohya(load_file(path), meta, index)
    assert all(torch.equal(parsed.modules[k].magnitude, m.magnitude) for k, m in data.modules.items())
    # diffusers drops dora_scale keys ("not compatible in Diffusers"), so the reference is LyCORIS' math.
    assert_near(run(merged_reference("tiny-sd15", load_file(path), index)), expected, rel=REL)


def tiny_index(*paths: str) -> KohyaIndex:
    return kohya_index({"unet": "lora_unet"}, {"unet": list(paths)})


def test_input_axis_dora_scale_is_refused():
    tensors = {
        "lora_unet_x.lora_down.weight": torch.randn(4, 8),
        "lora_unet_x.lora_up.weight": torch.randn(6, 4),
        "lora_unet_x.dora_scale": torch.rand(1, 8),
    }
    with pytest.raises(dl.FormatError, match="wd_on_output"):
        parse_kohya(tensors, {}, tiny_index("x"))


def test_tucker_locon_folds_exactly():
    g = torch.Generator().manual_seed(0)
    down, mid, up = (torch.randn(s, generator=g) for s in ((3, 6, 1, 1), (3, 3, 3, 3), (5, 3, 1, 1)))
    x = torch.randn(2, 6, 7, 7, generator=g)
    tucker = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up)
    tensors = {
        "lora_unet_c.lora_down.weight": down,
        "lora_unet_c.lora_mid.weight": mid,
        "lora_unet_c.lora_up.weight": up,
        "lora_unet_c.alpha": torch.tensor(3.0),
    }
    assert is_kohya(tensors)
    m = parse_kohya(tensors, {}, tiny_index("c"))[0].modules["unet.c"]
    assert m.down.shape == (3, 6, 3, 3) and m.alpha == 3.0
    torch.testing.assert_close(F.conv2d(F.conv2d(x, m.down, padding=1), m.up), tucker, rtol=1e-5, atol=1e-5)


def test_rslora_alpha_is_converted():
    data = AdapterData({"unet.x": ModuleLora(torch.randn(4, 8), torch.randn(6, 4), alpha=2.0)}, use_rslora=True)
    tensors, meta = write_kohya(data, tiny_index("x"))
    assert float(tensors["lora_unet_x.alpha"]) == 4.0 and meta["ss_network_alpha"] == "4.0"
    assert parse_kohya(tensors, {}, tiny_index("x"))[0].modules["unet.x"].scale() == data.modules["unet.x"].scale(True)


def test_bad_files_are_format_errors():
    ok = {"lora_unet_x.lora_down.weight": torch.randn(4, 8), "lora_unet_x.lora_up.weight": torch.randn(6, 4)}
    index = tiny_index("x")
    for broken, match in [
        ({"lora_unet_x.lora_down.weight": ok["lora_unet_x.lora_down.weight"]}, "no lora_up"),
        ({**ok, "lora_unet_x.alpha": torch.tensor(-1.0)}, "non-negative"),
        ({**ok, "lora_unet_x.alpha": torch.tensor(float("nan"))}, "non-negative"),
        ({**ok, "lora_unet_x.alpha": torch.ones(2)}, "single number"),
        ({**ok, "lora_unet_x.hada_w1_a": torch.ones(2)}, "not a kohya LoRA key"),
        ({**ok, "lora_unet_x.lora_up.weight": torch.randn(6, 3)}, "does not fit"),
    ]:
        with pytest.raises(dl.FormatError, match=match):
            parse_kohya(broken, {}, index)


def test_writing_errors_name_the_module():
    data = AdapterData({"unet.y": ModuleLora(torch.randn(4, 8), torch.randn(6, 4), alpha=4.0)})
    with pytest.raises(dl.KeyMappingError, match="unet.y"):
        write_kohya(data, tiny_index("x"))
    with pytest.raises(dl.KeyMappingError, match="unet_layout"):
        write_kohya(data, tiny_index("y"), sgm=True)


def test_is_kohya_looks_at_every_key():
    keys = ["lora_unet_a.lora_down.weight", "lora_unet_a.lora_up.weight", "lora_unet_a.alpha", "lora_te_b.dora_scale"]
    assert is_kohya(keys)
    assert not is_kohya(keys + ["unet.a.lora_A.weight"])
    assert not is_kohya(keys + ["lora_unet_c.hada_w1_a"])
    assert not is_kohya(["lora_unet_a.alpha"]) and not is_kohya([])
    assert not is_kohya(["unet.a.lora_A.weight", "unet.a.lora_B.weight"])


def test_names_that_flatten_alike_are_refused():
    with pytest.raises(dl.KeyMappingError, match="two modules"):
        tiny_index("a.b_c", "a_b.c")


@pytest.fixture(scope="module")
def real_indexes() -> dict[str, Any]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        sd15 = {"unet": UNet2DConditionModel(**SD15_UNET), "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L))}
        sdxl = {
            "unet": UNet2DConditionModel(**SDXL_UNET),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)),
        }
    return {"sd1": index_of(sd15, "sd1"), "sdxl": index_of(sdxl, "sdxl"), "sdxl_unet_paths": layer_paths(sdxl["unet"])}


def golden(name: str) -> list[tuple[str, str, str]]:
    lines = (FIXTURES / name).read_text().splitlines()
    pairs = [line.split() for line in lines if line.strip() and not line.startswith("#")]
    return [(kohya, *target.split(".", 1)) for kohya, target in pairs]


@pytest.mark.parametrize(("family", "fixture"), [("sd1", "kohya_keys_sd15.txt"), ("sdxl", "kohya_keys_sdxl.txt")])
def test_golden_names_resolve_on_real_models(real_indexes, family, fixture):
    index = real_indexes[family]
    rows = golden(fixture)
    assert len(rows) > 20
    for name, component, path in rows:
        assert index.resolve(name) == (component, path), name
        assert name in (index.name_of(component, path), index.name_of(component, path, sgm=True)), name
    # every UNet layer has an SGM name, and kohya_index checked that no two collide
    assert len(index.sgm_names) == sum(1 for c, _ in index.names if c == "unet")


def test_sgm_names_agree_with_diffusers_converter(real_indexes):
    # diffusers' private SGM→diffusers block renamer, as an independent oracle on all 794 SDXL UNet layers.
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    index = real_indexes["sdxl"]
    outside = ("conv_in", "conv_out", "time_embedding.", "add_embedding.")  # diffusers maps these elsewhere
    sgm = {
        f"{index.sgm_names[('unet', p)]}.lora_down.weight": p
        for p in real_indexes["sdxl_unet_paths"]
        if not p.startswith(outside)
    }
    renamed = _maybe_map_sgm_blocks_to_diffusers(dict(sgm), SimpleNamespace(layers_per_block=2))
    spelled = {
        "input_blocks": "down_blocks",
        "middle_block": "mid_block",
        "output_blocks": "up_blocks",
        "in_layers_2": "conv1",
        "emb_layers_1": "time_emb_proj",
        "out_layers_3": "conv2",
        "skip_connection": "conv_shortcut",
    }
    assert len(renamed) == len(sgm) > 700
    for key, path in renamed.items():
        name = re.sub(r"_op$", "_conv", key.split(".")[0])
        for old, new in spelled.items():
            name = name.replace(old, new)
        assert name == index.name_of("unet", path), path


def test_unet_layout_from_config():
    layout = UNetLayout.from_config(SDXL_UNET)
    assert layout == UNetLayout(2, (False, True, True), (True, True, False), mid_attention=True)
    with pytest.raises(dl.UnsupportedModelError, match="layers_per_block"):
        UNetLayout.from_config({**SDXL_UNET, "layers_per_block": (1, 2, 2)})


def test_sgm_paths_of_the_sd15_ldm_layout():
    # SD 1.x's original LDM UNet, as in its checkpoints: up block 0 has no attention, so its upsampler
    # is output_blocks.2.1, not .2.2; the last down/up blocks have no down/upsampler.
    layout = UNetLayout.from_config(
        SD15_UNET
        | {
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        }
    )
    expected = {
        "down_blocks.0.attentions.0.proj_in": "input_blocks.1.1.proj_in",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.3.resnets.1.conv2": "input_blocks.11.0.out_layers.3",
        "down_blocks.3.downsamplers.0.conv": None,
        "mid_block.attentions.0.proj_out": "middle_block.1.proj_out",
        "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k":
            "output_blocks.11.1.transformer_blocks.0.attn2.to_k",
        "up_blocks.3.upsamplers.0.conv": None,
        "up_blocks.0.attentions.0.proj_in": None,
        "conv_norm_out": None,
    }
    assert {p: sgm_path(p, layout) for p in expected} == expected
    no_mid_attention = UNetLayout(1, (False,), (False,), mid_attention=False)
    assert sgm_path("mid_block.resnets.0.conv1", no_mid_attention) == "middle_block.0.in_layers.2"
