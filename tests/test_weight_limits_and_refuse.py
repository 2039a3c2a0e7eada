"""Absurd weights are refused by name, and a change whose re-fuse fails is undone bit for bit."""

from __future__ import annotations

import pytest
import torch

import diffusion_lora as dl
from diffusion_lora.adapters.state import state_of
from diffusion_lora.cli import main

from .helpers import model_state, run, trained_adapter

_FIRST_ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.mark.parametrize(
    ("weight", "words"),
    [
        (10**400, "integer of about 401 digits"),
        (-(10**400), "integer of about 401 digits"),
        (10**5000, "integer of about 5001 digits"),
        (1e30, "1e+30"),
        (-100.5, "-100.5"),
        (float("nan"), "finite"),
        (float("-inf"), "finite"),
        ({"default": 1.0, "up.1": 1e30}, "'up.1'"),
        ({"default": float("nan")}, "'default'"),
    ],
    ids=["huge-int", "huge-negative-int", "int-past-str-limit", "1e30", "past-bound", "nan", "-inf", "block-1e30",
         "block-nan"],
)
def test_absurd_weights_are_one_config_error_naming_the_adapter(make_pipe, weight, words):
    pipe = make_pipe("tiny-sd15")
    trained_adapter(pipe, "style", seed=1, rank=4)
    before = run(pipe)
    with pytest.raises(dl.ConfigError) as err:
        dl.set_weights(pipe, {"style": weight})
    assert "'style'" in str(err.value) and words in str(err.value)
    assert torch.equal(run(pipe), before)


def test_weights_up_to_the_bound_are_accepted(make_pipe):
    pipe = make_pipe("tiny-sd15")
    trained_adapter(pipe, "style", seed=1, rank=4)
    dl.set_weights(pipe, {"style": {"default": -100, "up.1": 100.0}})
    assert dl.list_loras(pipe)[0].weight == {"default": -100.0, "up.1": 100.0}


def test_cli_generate_and_merge_refuse_a_huge_weight(make_pipe, tmp_path, capsys):
    pipe = make_pipe("tiny-sd15")
    trained_adapter(pipe, "style", seed=1, rank=4)
    lora = dl.save_lora(pipe, "style", tmp_path / "style.safetensors")
    out = tmp_path / "imgs"
    code = main(["generate", "--model", "tiny-sd15", "--lora", f"{lora}:1e30", "--prompt", "x", "--steps", "1",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "'style'" in err and "1e+30" in err and "[-100, 100]" in err
    assert not out.exists() or not list(out.iterdir())
    merged = tmp_path / "m.safetensors"
    assert main(["merge", f"{lora}:1e30", "-o", str(merged), "--model", "tiny-sd15"]) == 2
    err = capsys.readouterr().err
    assert str(lora) in err and "1e+30" in err and not merged.exists()


def _planted(pipe, name: str, value: float) -> None:
    """Adapter ``name`` whose only non-zero delta is ``value`` at [0, 0] of the first attention query."""
    dl.add_lora(pipe, name, rank=1)
    with torch.no_grad():
        for site in state_of(pipe).sites():
            if site.path == _FIRST_ATTN and name in site.layer.lora_A:
                site.layer.lora_A[name].weight.zero_()[0, 0] = 1.0
                site.layer.lora_B[name].weight.zero_()[0, 0] = value


def test_set_weights_whose_refuse_overflows_is_undone_bit_for_bit(make_pipe):
    pipe = make_pipe("tiny-sd15")
    trained_adapter(pipe, "a", seed=2, rank=4)
    _planted(pipe, "big", 1e37)  # finite at weight ≤ 1, beyond float32 at weight 100
    dl.set_weights(pipe, {"a": 1.0, "big": 0.0})
    dl.fuse(pipe)
    fused_weights, fused_out = model_state(pipe), run(pipe)
    for change in ({"a": 1.0, "big": 100.0}, {"big": 100.0}):
        with pytest.raises(dl.AdapterStateError) as err:
            dl.set_weights(pipe, change)
        assert "undone" in str(err.value)
        assert state_of(pipe).fused is not None
        after = model_state(pipe)
        assert all(torch.equal(after[k], v) for k, v in fused_weights.items())
        assert torch.equal(run(pipe), fused_out)
        assert {i.name: (i.weight, i.enabled) for i in dl.list_loras(pipe)} == {"a": (1.0, True), "big": (0.0, True)}
    dl.set_weights(pipe, {"a": 0.5, "big": 0.0})  # a change that fits still re-fuses
    assert state_of(pipe).fused is not None and not torch.equal(run(pipe), fused_out)


def test_load_lora_whose_refuse_overflows_is_undone_bit_for_bit(make_pipe, tmp_path):
    donor = make_pipe("tiny-sd15").to(torch.float16)
    _planted(donor, "big", 1000.0)  # fits float16 (max 65504) at weight 1, not at weight 100
    path = dl.save_lora(donor, "big", tmp_path / "big.safetensors")
    pipe = make_pipe("tiny-sd15").to(torch.float16)
    trained_adapter(pipe, "a", seed=3, rank=4)
    dl.fuse(pipe)
    fused_weights = model_state(pipe)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).half()
    context = torch.randn(1, 5, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))

    def forward():
        with torch.no_grad():
            return pipe.unet(latents, 10, encoder_hidden_states=context.half()).sample

    fused_out = forward()
    with pytest.raises(dl.DiffusionLoraError):
        dl.load_lora(pipe, path, weight=100.0)
    assert state_of(pipe).fused is not None
    assert [i.name for i in dl.list_loras(pipe)] == ["a"]
    after = model_state(pipe)
    assert after.keys() == fused_weights.keys()
    assert all(torch.equal(after[k], v) for k, v in fused_weights.items())
    assert torch.equal(forward(), fused_out)
    dl.load_lora(pipe, path, weight=1.0)  # the same file at a weight that fits loads and re-fuses
    assert state_of(pipe).fused is not None and len(dl.list_loras(pipe)) == 2


def test_remove_lora_whose_refuse_overflows_is_undone_bit_for_bit(make_pipe):
    """Fused in name order, a_neg keeps p + q finite; without it their sum overflows float32."""
    pipe = make_pipe("tiny-sd15")
    _planted(pipe, "a_neg", -3e38)
    _planted(pipe, "p", 2e38)
    _planted(pipe, "q", 2e38)
    dl.fuse(pipe)
    fused_weights = model_state(pipe)
    with pytest.raises(dl.AdapterStateError) as err:
        dl.remove_lora(pipe, "a_neg")
    assert "undone" in str(err.value) and state_of(pipe).fused is not None
    after = model_state(pipe)
    assert after.keys() == fused_weights.keys() and all(torch.equal(after[k], v) for k, v in fused_weights.items())
    assert [(i.name, i.enabled) for i in dl.list_loras(pipe)] == [("a_neg", True), ("p", True), ("q", True)]
    dl.remove_lora(pipe, "q")  # a removal that fits re-fuses the rest
    assert [i.name for i in dl.list_loras(pipe)] == ["a_neg", "p"] and state_of(pipe).fused is not None


def test_hotswap_whose_refuse_overflows_is_undone_bit_for_bit(make_pipe, tmp_path):
    """A hot-swap into a fused adapter whose new values overflow float16 when fused puts the old ones back."""
    files = {}
    for value in (1.0, 1000.0):  # at weight 100: 100 fits float16, 100000 does not
        donor = make_pipe("tiny-sd15").to(torch.float16)
        _planted(donor, "big", value)
        files[value] = dl.save_lora(donor, "big", tmp_path / f"big-{value:g}.safetensors")
    pipe = make_pipe("tiny-sd15").to(torch.float16)
    dl.load_lora(pipe, files[1.0], name="big", weight=100.0)
    dl.fuse(pipe)
    fused_weights = model_state(pipe)
    with pytest.raises(dl.DiffusionLoraError):
        dl.hotswap(pipe, "big", files[1000.0])
    assert state_of(pipe).fused is not None
    after = model_state(pipe)
    assert after.keys() == fused_weights.keys()
    assert all(torch.equal(after[k], v) for k, v in fused_weights.items())
    assert dl.list_loras(pipe)[0].file == str(files[1.0])
    dl.unfuse(pipe)
    dl.set_weights(pipe, {"big": 1.0})
    dl.hotswap(pipe, "big", files[1000.0])  # at a weight that fits, the same swap goes through
    assert dl.list_loras(pipe)[0].file == str(files[1000.0])
