"""Offloading (``load_pipeline(offload=)``, ``dl.enable_offload``, ``generate --offload``): refused without
an accelerator, and diffusers' group offload hooks (run CPU → CPU here) coexist with the adapter engine:
every adapter operation gives the same output as on a pipeline without offloading."""

from __future__ import annotations

import pytest
import torch

import diffusion_lora as dl
from diffusion_lora.cli import main
from diffusion_lora.compat.diffusers import group_offload_enabled
from diffusion_lora.models.offload import Offload, _accelerator, apply_offload, parse_offload

from .helpers import run, trained_adapter

CPU = torch.device("cpu")
no_accelerator = pytest.mark.skipif(_accelerator() is not None, reason="this machine has an accelerator")


@no_accelerator
@pytest.mark.parametrize("mode", ["model", "sequential", "group"])
def test_offload_without_accelerator_is_a_config_error_before_loading(mode, tmp_path):
    with pytest.raises(dl.ConfigError, match=f"^offload = {mode} needs a GPU .*on the CPU everything is in memory"):
        dl.load_pipeline(tmp_path / "not-loaded", offload=mode)  # refused before the (missing) model is read
    pipe = dl.build_tiny_pipeline("tiny-sd15")
    with pytest.raises(dl.ConfigError, match=f"^offload = {mode} needs a GPU"):
        dl.enable_offload(pipe, mode)
    assert not any(group_offload_enabled(m) for m in pipe.components.values() if isinstance(m, torch.nn.Module))
    assert not hasattr(pipe.unet, "_hf_hook")


def test_offload_onto_the_cpu_is_refused_everywhere(tmp_path):
    with pytest.raises(dl.ConfigError, match="^offload = group needs a GPU"):
        dl.load_pipeline("tiny-sd15", offload="group", device="cpu")


@pytest.mark.parametrize(("value", "message"), [
    ("disk", "offload: disk offload is not offered: with LoRA adapters"),
    ("fast", "offload: 'fast' is not an offload mode; expected one of model, sequential, group (or none)"),
])
def test_offload_values(value, message):
    assert parse_offload(None) is parse_offload("none") is None
    assert parse_offload(" Group ") is Offload.GROUP
    with pytest.raises(dl.ConfigError) as info:
        parse_offload(value)
    assert str(info.value).startswith(message)


@no_accelerator
def test_cli_offload_without_gpu_exits_2_before_loading(tmp_path, capsys):
    code = main(["generate", "--model", str(tmp_path / "not-loaded"), "--prompt", "x", "--offload", "model",
                 "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --offload = model needs a GPU") and err.count("\n") == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    pipe = dl.build_tiny_pipeline("tiny-sd15")
    out = []
    for seed in (1, 2):
        name = trained_adapter(pipe, f"s{seed}", seed=seed, rank=4, text_encoder=True)
        out.append(dl.save_lora(pipe, name, folder / f"s{seed}.safetensors"))
        dl.remove_lora(pipe, name)
    return out


def _offloaded() -> object:
    pipe = dl.build_tiny_pipeline("tiny-sd15")
    apply_offload(pipe, Offload.GROUP, CPU)
    assert group_offload_enabled(pipe.unet) and group_offload_enabled(pipe.text_encoder)
    return pipe


def test_group_offload_hooks_and_adapters_give_the_no_offload_output(files):
    plain, offloaded = dl.build_tiny_pipeline("tiny-sd15"), _offloaded()
    steps = [
        ("nothing", lambda p: None),
        ("load_lora", lambda p: dl.load_lora(p, files[0], name="a")),
        ("load_lora 2", lambda p: dl.load_lora(p, files[1], name="b", weight=0.5)),
        ("set_weights", lambda p: dl.set_weights(p, {"a": 0.7, "b": {"default": 0.3, "text_encoder": 1.0}})),
        ("fuse", dl.fuse),
        ("hotswap fused", lambda p: dl.hotswap(p, "a", files[1])),
        ("unfuse", dl.unfuse),
        ("remove_lora", lambda p: (dl.remove_lora(p, "a"), dl.remove_lora(p, "b"))),
    ]
    for p in (plain, offloaded):
        p.set_progress_bar_config(disable=True)
    seen = []
    for label, change in steps:
        change(plain)
        change(offloaded)
        assert group_offload_enabled(offloaded.unet), label
        expected = run(plain)
        seen.append(expected)
        assert torch.equal(run(offloaded), expected), label
    assert not torch.equal(seen[1], seen[0]) and not torch.equal(seen[2], seen[1])  # the adapters do act
    assert torch.equal(seen[-1], seen[0])


def test_group_offload_reapplied_after_layers_change(files):
    """A change of layers re-applies the hooks (as diffusers' own LoRA loader does), so hooks built with
    CUDA streams hold the new layers' tensors; a weight change does not."""
    from diffusers.hooks.group_offloading import _get_top_level_group_offload_hook

    pipe = _offloaded()
    before = _get_top_level_group_offload_hook(pipe.unet)
    dl.load_lora(pipe, files[0], name="a")
    loaded = _get_top_level_group_offload_hook(pipe.unet)
    assert loaded is not None and loaded is not before
    dl.set_weights(pipe, {"a": 0.5})
    assert _get_top_level_group_offload_hook(pipe.unet) is loaded
    dl.remove_lora(pipe, "a")
    assert _get_top_level_group_offload_hook(pipe.unet) not in (None, loaded)


def test_lora_gradients_through_group_offload_equal_no_offload():
    grads = []
    for offload in (False, True):
        pipe = dl.build_tiny_pipeline("tiny-sd15")
        if offload:
            apply_offload(pipe, Offload.GROUP, CPU)
        trained_adapter(pipe, "t", seed=3, rank=4)
        unet = pipe.unet
        unet.enable_gradient_checkpointing()
        unet.train()
        g = torch.Generator().manual_seed(0)
        size = unet.config.sample_size
        latents = torch.randn(2, unet.config.in_channels, size, size, generator=g)
        context = torch.randn(2, 8, unet.config.cross_attention_dim, generator=g)
        unet(latents, 10, context).sample.pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_sequential_offload_refuses_layer_changes_but_sets_weights(files):
    pipe = dl.build_tiny_pipeline("tiny-sd15")
    dl.load_lora(pipe, files[0], name="a")
    pipe.enable_sequential_cpu_offload(device="cpu")  # diffusers accepts an explicit CPU device
    for change in (lambda: dl.load_lora(pipe, files[1], name="b"), lambda: dl.add_lora(pipe, "c", rank=4),
                   lambda: dl.remove_lora(pipe, "a"), lambda: dl.fuse(pipe), lambda: dl.hotswap(pipe, "a", files[1])):
        with pytest.raises(dl.AdapterStateError, match="meta device .*sequential CPU offload"):
            change()
    assert [i.name for i in dl.list_loras(pipe)] == ["a"]
    dl.set_weights(pipe, {"a": 0.5})
    assert dl.list_loras(pipe)[0].weight == 0.5


def test_fuse_on_a_quantized_base_under_group_offload(files):
    """Fusing a quantized layer swaps its weight object (unfuse puts the original back); the group offload hooks are
    re-applied to hold the current objects, and every output equals the same steps without offloading."""
    from diffusers.hooks.group_offloading import _get_top_level_group_offload_hook

    plain = dl.build_tiny_pipeline("tiny-sd15")
    offloaded = dl.build_tiny_pipeline("tiny-sd15")
    for p in (plain, offloaded):
        dl.models.quantize.quantize_denoiser(p, "nf4")
        dl.load_lora(p, files[0], name="a")
        p.set_progress_bar_config(disable=True)
    apply_offload(offloaded, Offload.GROUP, CPU)
    unfused = run(plain)
    assert torch.equal(run(offloaded), unfused)
    hook = _get_top_level_group_offload_hook(offloaded.unet)
    dl.fuse(plain)
    dl.fuse(offloaded)
    fused_hook = _get_top_level_group_offload_hook(offloaded.unet)
    assert fused_hook not in (None, hook)
    assert torch.equal(run(offloaded), run(plain))
    dl.unfuse(plain)
    dl.unfuse(offloaded)
    assert _get_top_level_group_offload_hook(offloaded.unet) not in (None, fused_hook)
    assert torch.equal(run(offloaded), unfused)
