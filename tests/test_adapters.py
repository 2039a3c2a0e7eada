"""The adapter engine on every tiny family: save/load identity, diffusers interop, weights, fuse."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffusion_lora as dl
from diffusion_lora.adapters.state import state_of
from diffusion_lora.formats.safetensors_io import read_metadata

from .conftest import ALL_TINY
from .helpers import assert_near, assert_same_state, model_state, run, trained_adapter


def test_add_lora_trains_only_lora(pipe):
    dl.add_lora(pipe, "style", rank=4, text_encoder=True)
    trainable = [
        (c, n) for c, comp in pipe.components.items() if isinstance(comp, torch.nn.Module)
        for n, p in comp.named_parameters() if p.requires_grad
    ]
    assert trainable
    assert all("lora_" in n for _, n in trainable)
    family = state_of(pipe).family  # text_encoder=True: the family's LoRA-able text encoders (none for Chroma)
    assert {c for c, _ in trainable} == {family.denoiser, *family.lora_text_encoders}


def test_fresh_adapter_is_identity(pipe):
    base = run(pipe)
    dl.add_lora(pipe, "style", rank=4)
    assert torch.equal(run(pipe), base)  # lora_B starts at zero


def test_save_load_identical_output(pipe, make_pipe, tiny_kind, tmp_path):
    trained_adapter(pipe, "style", seed=1, rank=4, alpha=2.5, text_encoder=True)
    expected = run(pipe)
    path = dl.save_lora(pipe, "style", tmp_path / "style.safetensors", trigger_words=["zxq"])
    fresh = make_pipe(tiny_kind)
    base = run(fresh)
    assert dl.load_lora(fresh, path) == "style"
    out = run(fresh)
    assert not torch.equal(out, base)
    assert torch.equal(out, expected)
    meta = read_metadata(path)
    assert meta["diffusion_lora.family"] == state_of(pipe).family.name
    assert float(meta["diffusion_lora.alpha"]) == 2.5 and meta["diffusion_lora.rank"] == "4"
    assert json.loads(meta["diffusion_lora.trigger_words"]) == ["zxq"]
    assert json.loads(meta["lora_adapter_metadata"])[f"{state_of(pipe).family.denoiser}.lora_alpha"] == 2.5


def test_our_file_loads_in_plain_diffusers(pipe, make_pipe, tiny_kind, tmp_path):
    trained_adapter(pipe, "style", seed=2, rank=4, alpha=8, text_encoder=True)
    expected = run(pipe)
    path = dl.save_lora(pipe, "style", tmp_path / "style.safetensors")
    plain = make_pipe(tiny_kind)
    plain.load_lora_weights(str(path), adapter_name="style")
    torch.testing.assert_close(run(plain), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", [{"use_dora": True}, {"use_rslora": True}])
def test_dora_and_rslora_round_trip(make_pipe, tmp_path, variant):
    pipe = make_pipe("tiny-sd15")
    trained_adapter(pipe, "v", seed=3, rank=4, alpha=3, **variant)
    expected = run(pipe)
    path = dl.save_lora(pipe, "v", tmp_path / "v.safetensors")
    fresh = make_pipe("tiny-sd15")
    dl.load_lora(fresh, path)
    assert torch.equal(run(fresh), expected)
    plain = make_pipe("tiny-sd15")
    plain.load_lora_weights(str(path), adapter_name="v")
    torch.testing.assert_close(run(plain), expected, rtol=0, atol=1e-6)


def test_weight_zero_is_exactly_base(pipe, tmp_path):
    base = run(pipe)
    trained_adapter(pipe, "style", seed=4, rank=4, text_encoder=True)
    dl.set_weights(pipe, {"style": 0.0})
    assert torch.equal(run(pipe), base)
    dl.set_weights(pipe, {"style": 1.0})
    assert not torch.equal(run(pipe), base)
    dl.disable(pipe)
    assert torch.equal(run(pipe), base)
    dl.enable(pipe, "style")
    assert not torch.equal(run(pipe), base)


def test_weight_scales_delta_linearly(make_pipe):
    """Denoiser output is affine in one adapter's weight when a single layer is adapted."""
    pipe = make_pipe("tiny-sd15")
    path = next(p for p, m in pipe.unet.named_modules() if p.endswith("attn2.to_v"))
    trained_adapter(pipe, "one", seed=5, rank=2, targets=[path])
    layer = pipe.unet.get_submodule(path)
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        outs = {}
        for w in (0.0, 0.5, 1.0):
            dl.set_weights(pipe, {"one": w})
            outs[w] = layer(x)
    torch.testing.assert_close(outs[0.5] - outs[0.0], 0.5 * (outs[1.0] - outs[0.0]), rtol=1e-5, atol=1e-6)


# How far fused may be from stacked, relative to max|stacked| after two denoising steps. Fusing rounds
# W + s·B·A to the dtype once per layer, where the stacked forward rounds W·x and s·B·(A·x) apart: about one
# unit of the dtype's precision (eps = 2⁻¹⁰ for float16, 2⁻⁷ for bfloat16) per layer, grown by the layers and
# the sampler to 3-4 eps measured on every tiny family. 8 eps leaves twice that; float32 keeps assert_near's
# 5e-4. A fuse that doubled or dropped the delta is off by the adapters' whole effect, 0.1-1 of the scale,
# far above even bfloat16's 8 eps = 0.0625.
FUSE_REL = {
    torch.float32: 5e-4,
    torch.float16: 8 * torch.finfo(torch.float16).eps,
    torch.bfloat16: 8 * torch.finfo(torch.bfloat16).eps,
}
# Every tiny family in every dtype; float16 convolutions are ~10x slower on CPUs, which makes the SDXL case slow.
FUSE_CASES = [
    pytest.param(kind, dtype, id=f"{kind}-{str(dtype).removeprefix('torch.')}",
                 marks=[pytest.mark.slow] if (kind, dtype) == ("tiny-sdxl", torch.float16) else [])
    for kind in ALL_TINY for dtype in FUSE_REL
]


@pytest.mark.parametrize(("tiny_kind", "dtype"), FUSE_CASES)
def test_stacked_adapters_equal_their_fused_result(pipe, dtype):
    pipe.to(dtype)
    trained_adapter(pipe, "a", seed=6, rank=4, text_encoder=True)
    trained_adapter(pipe, "b", seed=7, rank=2, alpha=1)
    dl.set_weights(pipe, {"a": 0.7, "b": -0.4})
    stacked = run(pipe)
    assert stacked.dtype == dtype
    dl.fuse(pipe)
    assert_near(run(pipe), stacked, rel=FUSE_REL[dtype])
    dl.unfuse(pipe)
    assert torch.equal(run(pipe), stacked)


def test_loading_keeps_other_adapters_active(make_pipe, tmp_path):
    pipe = make_pipe("tiny-sd15")
    trained_adapter(pipe, "a", seed=8, rank=4)
    path = dl.save_lora(pipe, "a", tmp_path / "a.safetensors")
    trained_adapter(pipe, "b", seed=9, rank=4)
    both = run(pipe)
    fresh = make_pipe("tiny-sd15")
    trained_adapter(fresh, "b", seed=9, rank=4)
    dl.load_lora(fresh, path)  # diffusers would deactivate "b" here
    assert torch.equal(run(fresh), both)
    assert [(i.name, i.enabled) for i in dl.list_loras(fresh)] == [("b", True), ("a", True)]


def test_fuse_unfuse_bit_exact(pipe):
    trained_adapter(pipe, "a", seed=10, rank=4, text_encoder=True, use_dora=state_of(pipe).family.name == "sd1")
    trained_adapter(pipe, "b", seed=11, rank=8)
    dl.set_weights(pipe, {"a": 1.3, "b": 0.6})
    unfused = run(pipe)
    before = model_state(pipe)
    assert dl.fuse(pipe) > 0
    assert any(not torch.equal(before[k], v) for k, v in model_state(pipe).items())
    assert_near(run(pipe), unfused)
    dl.set_weights(pipe, {"a": 0.5})  # re-fuses at the new weight
    dl.unfuse(pipe)
    assert_same_state(model_state(pipe), before)
    dl.set_weights(pipe, {"a": 1.3, "b": 0.6})
    assert torch.equal(run(pipe), unfused)


def _restricted_file(src, dst, keep):
    tensors = load_file(str(src))
    meta = read_metadata(src)
    save_file({k: v for k, v in tensors.items() if keep(k)}, str(dst), metadata=meta)
    return dst


@pytest.mark.parametrize(
    ("kind", "blocks", "prefix"),
    [row for row in [
        ("tiny-sd15", {"default": 0.0, "up.1": 1.0}, "unet.up_blocks.1."),
        ("tiny-sd15", {"default": 0.0, "mid": 1.0}, "unet.mid_block."),
        ("tiny-sdxl", {"default": 0.0, "down": 1.0}, "unet.down_blocks."),
        ("tiny-sd3", {"default": 0.0, "blocks.1-1": 1.0}, "transformer.transformer_blocks.1."),
        ("tiny-flux", {"default": 0.0, "single.0-1": 1.0}, "transformer.single_transformer_blocks."),
        ("tiny-flux", {"default": 0.0, "blocks.0": 1.0}, "transformer.transformer_blocks.0."),
        ("tiny-flux2", {"default": 0.0, "single.0-1": 1.0}, "transformer.single_transformer_blocks."),
        ("tiny-flux2-klein", {"default": 0.0, "blocks.1": 1.0}, "transformer.transformer_blocks.1."),
        ("tiny-flux3", {"default": 0.0, "image.1": 1.0}, "transformer.mode_blocks.image.1."),
        ("tiny-flux3", {"default": 0.0, "txt.0-1": 1.0}, "transformer.txt_mode_blocks."),
        ("tiny-flux3", {"default": 0.0, "single.1": 1.0}, "transformer.single_transformer_blocks.1."),
    ] if row[0] in ALL_TINY],
)
def test_per_block_weights_affect_only_named_blocks(make_pipe, tmp_path, kind, blocks, prefix):
    pipe = make_pipe(kind)
    trained_adapter(pipe, "s", seed=12, rank=4)
    full = dl.save_lora(pipe, "s", tmp_path / "full.safetensors")
    dl.set_weights(pipe, {"s": blocks})
    per_block = run(pipe)
    only = make_pipe(kind)
    dl.load_lora(only, _restricted_file(full, tmp_path / "only.safetensors", lambda k: k.startswith(prefix)))
    assert torch.equal(per_block, run(only))
    assert not torch.equal(per_block, run(make_pipe(kind)))


def test_unknown_block_key_is_an_error(make_pipe):
    pipe = make_pipe("tiny-sd15")
    trained_adapter(pipe, "s", seed=13, rank=4)
    before = run(pipe)
    for bad in ({"dwon": 0.5}, {"up.9": 1.0}, {"blocks.0-1": 1.0}, {"mid.0": 1.0}, {"up": "x"}):
        with pytest.raises(dl.ConfigError) as err:
            dl.set_weights(pipe, {"s": bad})
        assert repr(next(iter(bad))) in str(err.value)
    assert torch.equal(run(pipe), before)


def test_hotswap_replaces_weights_in_place(make_pipe, tmp_path):
    src = make_pipe("tiny-sd15")
    trained_adapter(src, "x", seed=14, rank=4, alpha=2)
    a = dl.save_lora(src, "x", tmp_path / "a.safetensors")
    dl.remove_lora(src, "x")
    trained_adapter(src, "x", seed=15, rank=4, alpha=6)
    b = dl.save_lora(src, "x", tmp_path / "b.safetensors")
    expected_b = run(src)
    pipe = make_pipe("tiny-sd15")
    dl.load_lora(pipe, a, name="x", weight=1.0)
    layer_ids = {id(s.layer) for s in state_of(pipe).sites()}
    dl.hotswap(pipe, "x", b)
    assert {id(s.layer) for s in state_of(pipe).sites()} == layer_ids
    assert torch.equal(run(pipe), expected_b)
    dl.remove_lora(src, "x")
    trained_adapter(src, "x", seed=16, rank=8)
    c = dl.save_lora(src, "x", tmp_path / "c.safetensors")
    with pytest.raises(dl.AdapterStateError, match="rank 8"):
        dl.hotswap(pipe, "x", c)
    assert torch.equal(run(pipe), expected_b)


def test_remove_restores_plain_model(pipe):
    base = run(pipe)
    before = model_state(pipe)
    types_before = {n: type(m) for n, m in pipe.components[state_of(pipe).family.denoiser].named_modules()}
    trained_adapter(pipe, "a", seed=17, rank=4, text_encoder=True)
    trained_adapter(pipe, "b", seed=18, rank=4)
    dl.remove_lora(pipe, "a")
    assert [i.name for i in dl.list_loras(pipe)] == ["b"]
    dl.remove_lora(pipe, "b")
    assert dl.list_loras(pipe) == []
    assert pipe.get_list_adapters() == {}
    types_after = {n: type(m) for n, m in pipe.components[state_of(pipe).family.denoiser].named_modules()}
    assert types_after == types_before
    assert_same_state(model_state(pipe), before)
    assert torch.equal(run(pipe), base)


def test_diffusers_api_sees_our_adapters(make_pipe):
    pipe = make_pipe("tiny-sd15")
    trained_adapter(pipe, "a", seed=19, rank=4, text_encoder=True)
    trained_adapter(pipe, "b", seed=20, rank=4)
    assert pipe.get_list_adapters() == {"unet": ["a", "b"], "text_encoder": ["a"]}
    dl.set_weights(pipe, {"a": 0.3, "b": 0.9})
    ours = run(pipe)
    pipe.set_adapters(["a", "b"], adapter_weights=[0.3, 0.9])
    torch.testing.assert_close(run(pipe), ours, rtol=0, atol=1e-6)


def test_list_loras_reports(make_pipe, tmp_path):
    pipe = make_pipe("tiny-sd15")
    trained_adapter(pipe, "a", seed=21, rank=4, alpha=2)
    path = dl.save_lora(pipe, "a", tmp_path / "a.safetensors")
    fresh = make_pipe("tiny-sd15")
    dl.load_lora(fresh, path, name="style", weight={"default": 0.5, "up": 1.0})
    (info,) = dl.list_loras(fresh)
    assert (info.name, info.rank, info.alpha, info.enabled) == ("style", 4, 2.0, True)
    assert info.weight == {"default": 0.5, "up": 1.0}
    assert info.file == str(path)
    assert info.modules == dl.list_loras(pipe)[0].modules


def test_names_are_checked(make_pipe):
    pipe = make_pipe("tiny-sd15")
    dl.add_lora(pipe, "a", rank=2)
    with pytest.raises(dl.AdapterStateError, match="already loaded"):
        dl.add_lora(pipe, "a", rank=2)
    with pytest.raises(dl.AdapterNotFoundError, match="'nope'"):
        dl.set_weights(pipe, {"nope": 1.0})
    with pytest.raises(dl.ConfigError):
        dl.add_lora(pipe, "bad.name")
    with pytest.raises(dl.ConfigError, match="preset"):
        dl.add_lora(pipe, "c", targets="attn-typo")
    for clash in ("double", "float", "cuda", "keys"):  # torch module methods: PEFT cannot key adapters by them
        with pytest.raises(dl.ConfigError, match=f"'{clash}'.*another name"):
            dl.add_lora(pipe, clash, rank=2)
    assert dl.list_loras(pipe)[0].name == "a" and len(dl.list_loras(pipe)) == 1


def test_a_file_named_like_a_module_method_needs_another_name(make_pipe, tmp_path):
    src = make_pipe("tiny-sd15")
    trained_adapter(src, "s", seed=3, rank=2)
    path = dl.save_lora(src, "s", tmp_path / "double.safetensors")
    pipe = make_pipe("tiny-sd15")
    before = run(pipe)
    with pytest.raises(dl.ConfigError, match="'double'.*another name"):
        dl.load_lora(pipe, path)
    assert dl.list_loras(pipe) == [] and torch.equal(run(pipe), before)
    dl.load_lora(pipe, path, name="double_lora")
    assert torch.equal(run(pipe), run(src))



def test_detect_family_rejects_other_pipelines():
    class NotAPipeline:
        pass

    with pytest.raises(dl.UnsupportedModelError):
        dl.detect_family(NotAPipeline())
