"""The adapter engine on quantized bases (bitsandbytes nf4, torchao int8/fp8, GGUF): loading, stacking, weights,
hot-swap and removal against the same adapters on the dequantized base; bit-exact unfuse; refusals."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import diffusion_lora as dl
from diffusion_lora.adapters import plain_modules
from diffusion_lora.adapters.quantized import QuantKind, dequantized_weight, quant_kind
from diffusion_lora.adapters.state import state_of
from diffusion_lora.adapters.weights import block_layout
from diffusion_lora.families import detect_family
from diffusion_lora.models.quantize import quantize_denoiser

from .conftest import ALL_TINY
from .gguf_files import write_gguf
from .helpers import run, trained_adapter

pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")
pytestmark = pytest.mark.filterwarnings("ignore")

# LoRA on a quantized base vs the same LoRA on a float base holding the dequantized weights. One layer against our
# own float64 math (W the library's dequantized weight): float32 rounding, ≤ LAYER_REL of the output's largest value.
# Through a whole denoiser: bitsandbytes dequantizes then multiplies (bit-identical to the float layer), torchao's
# int8/float8 kernels apply the row scale after the matmul, a different rounding that random tiny UNets amplify
# (measured up to 1.5e-4 on tiny-sdxl int8, ≤ 2e-7 with nf4) — the bound helpers.assert_near uses for float32
# rounding through a network, 5e-4. A wrong dequantization or a lost LoRA term is off by 1e-2 to 1.
LAYER_REL = 1e-5
DEQUANT_REL = 5e-4


def _denoiser_name(pipe) -> str:
    return state_of(pipe).family.denoiser


def _capture_inputs(pipe) -> tuple[tuple, dict]:
    """The arguments of the denoiser's first call in a two-step generation (the text encoders are not
    quantized, so they are the same for every base)."""
    seen: list = []

    def hook(module, args, kwargs):
        if not seen:
            seen.append(copy.deepcopy((args, kwargs)))

    handle = getattr(pipe, _denoiser_name(pipe)).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run(pipe)
    finally:
        handle.remove()
    args, kwargs = seen[0]
    sample = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
    batch = sample.shape[0]
    if batch > 1:  # one prompt's half of a classifier-free-guidance batch: half the cost, same layers

        def last(value):
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch:
                return value[-1:]
            return {k: last(v) for k, v in value.items()} if isinstance(value, dict) else value

        args, kwargs = tuple(last(a) for a in args), {k: last(v) for k, v in kwargs.items()}
    return args, {**kwargs, "return_dict": False}


class Tiny:
    """Per tiny model, built once: the denoiser's inputs and adapter files made on the float base."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache: dict[str, dict] = {}

    def __call__(self, kind: str) -> dict:
        if kind not in self.cache:
            pipe = _fresh(kind)
            inputs = _capture_inputs(pipe)
            folder = self.root / kind
            folder.mkdir()
            files = {}
            for name, seed, fmt, kw in (("a", 1, "kohya", {"rank": 4}), ("b", 2, "diffusers", {"rank": 2, "alpha": 1}),
                                        ("c", 3, "kohya", {"rank": 4, "alpha": 8})):
                trained_adapter(pipe, name, seed=seed, **kw)
                files[name] = dl.save_lora(pipe, name, folder / f"{name}.safetensors", format=fmt)
                dl.remove_lora(pipe, name)
            self.cache[kind] = {"inputs": inputs, "files": files}
        return self.cache[kind]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    return Tiny(tmp_path_factory.mktemp("quantized-adapters"))


def _fresh(kind: str):
    pipe = dl.build_tiny_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _quantized(kind: str, mode: str):
    pipe = _fresh(kind)
    assert quantize_denoiser(pipe, mode) > 0
    return pipe


def _dequantized_twin(kind: str, quantized) -> object:
    """A float pipeline of ``kind`` whose quantized layers hold ``quantized``'s dequantized weights (through the
    library's own dequantize), with plain torch Linears: the reference for every output on the quantized base."""
    ref = _fresh(kind)
    name = _denoiser_name(ref)
    target = getattr(ref, name)
    count = 0
    with torch.no_grad():
        for path, module in plain_modules(getattr(quantized, name)):
            if quant_kind(module) is not None:
                plain = target.get_submodule(path)
                assert type(plain) is torch.nn.Linear
                plain.weight.copy_(dequantized_weight(module))
                if module.bias is not None:
                    plain.bias.copy_(module.bias)
                count += 1
    assert count > 0
    return ref


def _forward(pipe, inputs) -> torch.Tensor:
    args, kwargs = inputs
    with torch.no_grad():
        return getattr(pipe, _denoiser_name(pipe))(*args, **kwargs)[0]


def _near(actual: torch.Tensor, expected: torch.Tensor, rel: float = DEQUANT_REL) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * float(expected.abs().max()))


def _quant_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """Every stored tensor of a quantized weight: packed bytes and block scales (nf4, nested ones too),
    torchao's qdata and scale, GGUF's block bytes."""
    w = module.weight
    kind = quant_kind(module)
    if kind is QuantKind.NF4:
        qs = w.quant_state
        out = [w.data, qs.absmax, qs.code]
        if qs.nested:
            out += [qs.state2.absmax, qs.state2.code, qs.offset]
        return out
    if kind is QuantKind.TORCHAO:
        return [getattr(w, n) for n in w.tensor_data_names]
    return [w.as_tensor()]


def _snapshot(pipe) -> dict[str, tuple]:
    """Per quantized layer of the denoiser: the weight object, copies of its stored tensors, the bias copy."""
    out = {}
    for path, module in plain_modules(getattr(pipe, _denoiser_name(pipe))):
        if quant_kind(module) is not None:
            bias = None if module.bias is None else module.bias.detach().clone()
            out[path] = (module.weight, [t.detach().clone() for t in _quant_tensors(module)], bias)
    return out


def _assert_snapshot(pipe, snap: dict[str, tuple], same_objects: bool = True) -> None:
    now = dict(plain_modules(getattr(pipe, _denoiser_name(pipe))))
    for path, (weight, tensors, bias) in snap.items():
        module = now[path]
        assert module.weight is weight or not same_objects, path
        assert all(torch.equal(a, b) for a, b in zip(_quant_tensors(module), tensors, strict=True)), path
        assert (bias is None) == (module.bias is None) and (bias is None or torch.equal(module.bias, bias)), path


def _assert_layer_math(pipe, weights: dict[str, float]) -> None:
    """One adapted quantized layer computes W·x + b + Σ weight·scale·up·(down·x) with W the library's dequantized
    weight, to float32 rounding (≤ 1e-5 of the output's largest value)."""
    site = next(s for s in state_of(pipe).sites()
                if all(n in s.layer.lora_A for n in weights) and quant_kind(s.layer.get_base_layer()) is not None)
    layer, base = site.layer, site.layer.get_base_layer()
    assert quant_kind(base) is not None
    x = torch.randn(5, base.in_features, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.linear(x.double(), dequantized_weight(base).double(),
                                          None if base.bias is None else base.bias.double())
    for name, weight in weights.items():
        down, up = layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double()
        scale = layer.lora_alpha[name] / layer.r[name]
        expected = expected + weight * scale * (x.double() @ down.T) @ up.T
    with torch.no_grad():
        _near(layer(x).double(), expected, LAYER_REL)


def _block_weight(pipe) -> dict[str, float]:
    """A per-block weight that keeps only the first block of the denoiser's first indexed block group."""
    group = next(g for g, n in block_layout(state_of(pipe)).items() if n)
    return {"default": 0.0, f"{group}.0": 1.0}


QUANT_CASES = [pytest.param(kind, mode, id=f"{kind}-{mode}") for mode in ("nf4", "int8") for kind in ALL_TINY]
QUANT_CASES += [pytest.param(kind, "fp8", id=f"{kind}-fp8") for kind in ("tiny-flux", "tiny-sd15")]


@pytest.mark.parametrize(("kind", "mode"), QUANT_CASES)
def test_adapters_on_a_quantized_base_match_the_dequantized_base(tiny, kind, mode):
    """Two files (kohya and diffusers formats) load, stack, take weights and per-block weights and hot-swap on the
    quantized base exactly as on a float base holding its dequantized weights; removing them gives back the
    quantized base object for object and bit for bit."""
    made = tiny(kind)
    inputs, files = made["inputs"], made["files"]
    pipe = _quantized(kind, mode)
    ref = _dequantized_twin(kind, pipe)
    base, snap = _forward(pipe, inputs), _snapshot(pipe)
    types = {p: type(m) for p, m in getattr(pipe, _denoiser_name(pipe)).named_modules()}
    for p in (pipe, ref):
        dl.load_lora(p, files["a"], name="a", weight=0.8)
        dl.load_lora(p, files["b"], name="b", weight=-0.5)
    _assert_layer_math(pipe, {"a": 0.8, "b": -0.5})
    outputs = []
    for weights in (None, {"a": 0.3, "b": 1.2}, {"a": _block_weight(pipe), "b": 0.0}):
        for p in (pipe, ref):
            if weights is not None:
                dl.set_weights(p, weights)
        outputs.append(_forward(pipe, inputs))
        _near(outputs[-1], _forward(ref, inputs))
    assert not any(torch.equal(out, base) for out in outputs)  # the adapters, and the one kept block, act
    for p in (pipe, ref):
        dl.set_weights(p, {"a": 1.0, "b": 0.7})
        dl.hotswap(p, "a", files["c"])
    swapped = _forward(pipe, inputs)
    _near(swapped, _forward(ref, inputs))
    dl.disable(pipe)
    assert torch.equal(_forward(pipe, inputs), base)
    dl.enable(pipe)
    assert torch.equal(_forward(pipe, inputs), swapped)
    dl.remove_lora(pipe, "a")
    dl.remove_lora(pipe, "b")
    assert {p: type(m) for p, m in getattr(pipe, _denoiser_name(pipe)).named_modules()} == types
    _assert_snapshot(pipe, snap)
    assert torch.equal(_forward(pipe, inputs), base)


def _requantized(module: torch.nn.Module, target: torch.Tensor) -> torch.Tensor:
    """``target`` quantized the way ``module``'s weight is, by the library itself, and dequantized again."""
    kind = quant_kind(module)
    if kind is QuantKind.NF4:
        import bitsandbytes as bnb

        old = module.weight
        new = bnb.nn.Params4bit(target.clone(), requires_grad=False, quant_type=old.quant_type,
                                compress_statistics=old.compress_statistics, blocksize=old.blocksize).to("cpu")
        return bnb.functional.dequantize_4bit(new.data, new.quant_state)
    from torchao.quantization import quantize_

    from diffusion_lora.compat import torchao as compat_torchao

    linear = torch.nn.Linear(target.shape[1], target.shape[0], bias=False)
    linear.weight = torch.nn.Parameter(target.clone(), requires_grad=False)
    quantize_(linear, compat_torchao.config_factory(compat_torchao.mode_of(module.weight))())
    return linear.weight.dequantize()


@pytest.mark.parametrize("mode", ["nf4", "int8", "fp8"])
def test_100_fuse_unfuse_cycles_are_bit_exact_and_fuse_requantizes_w_plus_delta(mode):
    """Unfuse gives back the very quantized weight objects, unchanged, after 100 cycles; a fuse holds the library's
    own single quantization of W + ΣΔW (the re-quantization error of the sum: bench/bench_quantized.py)."""
    pipe = _quantized("tiny-flux", mode)
    trained_adapter(pipe, "a", seed=4, rank=4, targets=["to_q", "to_k"])  # few layers: 100 cycles stay fast
    trained_adapter(pipe, "b", seed=5, rank=2, alpha=1, targets=["to_q"])
    dl.set_weights(pipe, {"a": 0.8, "b": -0.5})
    snap, unfused = _snapshot(pipe), run(pipe)
    for _ in range(100):
        assert dl.fuse(pipe) > 0
        assert dl.unfuse(pipe) > 0
    _assert_snapshot(pipe, snap)
    assert torch.equal(run(pipe), unfused)
    originals = {s.path: dequantized_weight(s.layer.get_base_layer()) for s in state_of(pipe).sites()}
    dl.fuse(pipe)
    worst = 0.0
    for site in state_of(pipe).sites():
        layer, base = site.layer, site.layer.get_base_layer()
        target = originals[site.path].clone()
        for name, weight in (("a", 0.8), ("b", -0.5)):
            if name in layer.lora_A:
                scale = weight * layer.lora_alpha[name] / layer.r[name]
                target += scale * (layer.lora_B[name].weight @ layer.lora_A[name].weight)
        fused = dequantized_weight(base)
        # one quantization of W + ΣΔW by the library itself (float rounding of the sum may move a value that sits
        # on a rounding boundary one code: allowed for 0.1% of them)
        assert (fused != _requantized(base, target)).float().mean() <= 1e-3, site.path
        worst = max(worst, float((fused - target).norm() / target.norm()))
    assert worst > 0
    assert not torch.equal(run(pipe), unfused)
    dl.unfuse(pipe)
    _assert_snapshot(pipe, snap)
    assert torch.equal(run(pipe), unfused)


@pytest.mark.parametrize("mode", ["nf4", "int8", "fp8"])
def test_a_fuse_failing_halfway_restores_every_quantized_layer(tiny, mode):
    """A NaN in a middle layer's adapter: the fuse is refused and the layers already fused get their original
    quantized weights back (same objects, same bytes)."""
    pipe = _quantized("tiny-flux", mode)
    dl.load_lora(pipe, tiny("tiny-flux")["files"]["a"], name="a")
    sites = state_of(pipe).sites()
    snap, before = _snapshot(pipe), run(pipe)
    with torch.no_grad():
        sites[len(sites) // 2].layer.lora_B["a"].weight[0, 0] = float("nan")
    with pytest.raises(dl.AdapterStateError, match="non-finite"):
        dl.fuse(pipe)
    assert state_of(pipe).fused is None
    _assert_snapshot(pipe, snap)
    with torch.no_grad():
        sites[len(sites) // 2].layer.lora_B["a"].weight[0, 0] = 0.0
    assert torch.equal(run(pipe), run(pipe)) and run(pipe).isfinite().all()
    dl.remove_lora(pipe, "a")
    _assert_snapshot(pipe, snap)
    assert not torch.equal(before, run(pipe))  # (before carried the adapter)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_changes_while_fused_on_a_quantized_base(tiny, tmp_path, mode):
    """Load, save, hot-swap and remove while fused re-fuse from the original quantized weights: the result is what
    fusing the same adapters into a fresh base gives, bit for bit, and unfuse still gives back the base."""
    kind = "tiny-flux"
    files = tiny(kind)["files"]
    pipe = _quantized(kind, mode)
    snap, base = _snapshot(pipe), run(pipe)
    dl.load_lora(pipe, files["a"], name="a")
    dl.fuse(pipe)
    dl.load_lora(pipe, files["b"], name="b", weight=0.5)
    assert state_of(pipe).fused is not None
    saved = dl.save_lora(pipe, "a", tmp_path / "a.safetensors", format="kohya")
    original, again = load_file(str(files["a"])), load_file(str(saved))
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
    dl.hotswap(pipe, "a", files["c"])
    swapped = run(pipe)
    fresh = _quantized(kind, mode)
    dl.load_lora(fresh, files["c"], name="a")
    dl.load_lora(fresh, files["b"], name="b", weight=0.5)
    dl.fuse(fresh)
    assert torch.equal(swapped, run(fresh))
    dl.remove_lora(pipe, "b")
    assert state_of(pipe).fused is not None
    dl.unfuse(pipe)
    dl.remove_lora(pipe, "a")
    _assert_snapshot(pipe, snap)
    assert torch.equal(run(pipe), base)


def _gguf(kind: str, qtype: str, folder: Path):
    """A tiny pipeline whose denoiser was written as a GGUF file (diffusers' key names, 2-D weights whose rows
    split into the type's blocks quantized, the rest float32) with the ``gguf`` package and loaded back through
    diffusers' ``from_single_file(..., quantization_config=GGUFQuantizationConfig)``: GGUFLinear layers."""
    pytest.importorskip("gguf")
    from diffusers import GGUFQuantizationConfig

    pipe = _fresh(kind)
    name = detect_family(pipe).denoiser  # (not state_of: its component list would keep the float denoiser)
    model = getattr(pipe, name)
    model.save_config(folder)
    write_gguf(model, folder / "denoiser.gguf", qtype)
    loaded = type(model).from_single_file(str(folder / "denoiser.gguf"), config=str(folder),
                                          quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
                                          torch_dtype=torch.float32)
    setattr(pipe, name, loaded)
    return pipe


def _dora_file(kind: str, folder: Path) -> Path:
    pipe = _fresh(kind)
    trained_adapter(pipe, "d", seed=6, rank=4, use_dora=True, targets=["to_q", "to_v"])
    return dl.save_lora(pipe, "d", folder / "dora.safetensors")


@pytest.mark.parametrize(("kind", "qtype"), [("tiny-flux", "Q8_0"), ("tiny-flux", "Q4_0"), ("tiny-sd15", "Q8_0")])
def test_adapters_on_a_gguf_base_and_fuse_refused(tiny, tmp_path, kind, qtype):
    made = tiny(kind)
    inputs, files = made["inputs"], made["files"]
    pipe = _gguf(kind, qtype, tmp_path)
    assert any(quant_kind(m) is QuantKind.GGUF for m in getattr(pipe, _denoiser_name(pipe)).modules())
    ref = _dequantized_twin(kind, pipe)
    base, snap = _forward(pipe, inputs), _snapshot(pipe)
    for p in (pipe, ref):
        dl.load_lora(p, files["a"], name="a", weight=0.8)
        dl.load_lora(p, files["b"], name="b", weight=-0.5)
    _assert_layer_math(pipe, {"a": 0.8, "b": -0.5})
    stacked = _forward(pipe, inputs)
    _near(stacked, _forward(ref, inputs))
    with pytest.raises(dl.AdapterStateError, match=r"GGUF.*run unfused") as err:
        dl.fuse(pipe)
    assert any(s.path in str(err.value) for s in state_of(pipe).sites())
    assert state_of(pipe).fused is None
    _assert_snapshot(pipe, snap)
    assert torch.equal(_forward(pipe, inputs), stacked)
    # DoRA needs the base weight's norms, which PEFT cannot take from GGUF bytes: refused by name, nothing changed
    with pytest.raises(dl.UnsupportedModelError, match="GGUF"):
        dl.add_lora(pipe, "d", rank=4, use_dora=True)
    if kind == "tiny-flux":
        with pytest.raises(dl.UnsupportedModelError, match="DoRA.*GGUF"):
            dl.load_lora(pipe, _dora_file(kind, tmp_path), name="d")
    assert [i.name for i in dl.list_loras(pipe)] == ["a", "b"]
    assert torch.equal(_forward(pipe, inputs), stacked)
    dl.remove_lora(pipe, "a")
    dl.remove_lora(pipe, "b")
    _assert_snapshot(pipe, snap)
    assert torch.equal(_forward(pipe, inputs), base)


@pytest.mark.parametrize("mode", ["nf4", "int8", "fp8"])
def test_dora_on_a_quantized_base(tiny, tmp_path, mode):
    """PEFT's bitsandbytes and torchao layers take DoRA (norms of the dequantized weight): same output as on the
    dequantized base; fuse and unfuse work and unfuse is bit-exact."""
    kind = "tiny-flux"
    inputs = tiny(kind)["inputs"]
    pipe = _quantized(kind, mode)
    ref = _dequantized_twin(kind, pipe)
    snap, base = _snapshot(pipe), _forward(pipe, inputs)
    path = _dora_file(kind, tmp_path)
    for p in (pipe, ref):
        dl.load_lora(p, path, name="d", weight=0.9)
    unfused = _forward(pipe, inputs)
    _near(unfused, _forward(ref, inputs))
    dl.fuse(pipe)
    assert not torch.equal(_forward(pipe, inputs), unfused)
    dl.unfuse(pipe)
    assert torch.equal(_forward(pipe, inputs), unfused)
    dl.remove_lora(pipe, "d")
    # (PEFT's DoRA layer re-assigns a bitsandbytes weight as weight.to(its device) while it takes the norms: a new
    # Params4bit object around the same bytes and scales)
    _assert_snapshot(pipe, snap, same_objects=mode != "nf4")
    assert torch.equal(_forward(pipe, inputs), base)


def test_extract_reads_quantized_layers_as_their_float_weights(tiny):
    """extract on quantized pipelines factors the difference of the weights the layers compute with: the same
    LoRA as extract on float pipelines holding the dequantized weights."""
    from diffusion_lora.tools.extract import extract_lora

    kind = "tiny-flux"
    base, tuned = _quantized(kind, "nf4"), _quantized(kind, "nf4")
    dl.load_lora(tuned, tiny(kind)["files"]["a"], name="a")
    dl.fuse(tuned)  # the tuned model: W + ΔW re-quantized
    got, _ = extract_lora(base, tuned, rank=4)
    expected, _ = extract_lora(_dequantized_twin(kind, base), _dequantized_twin(kind, tuned), rank=4)
    assert got.modules.keys() == expected.modules.keys() and got.modules
    for key, m in expected.modules.items():
        assert torch.equal(got.modules[key].up, m.up) and torch.equal(got.modules[key].down, m.down), key


def test_plain_state_dict_of_a_quantized_model_and_bake_refuses_it(tiny):
    """plain_state_dict sees through the LoRA wrappers to the quantized tensors (what an equally quantized model
    loads); bake, which writes a full-precision model, refuses a quantized one by name instead of failing on
    unexpected keys."""
    from diffusion_lora.tools.bake import _plain_copy

    pipe = _quantized("tiny-flux", "nf4")
    before = {k: v.clone() for k, v in dl.adapters.plain_state_dict(pipe.transformer).items()}
    dl.load_lora(pipe, tiny("tiny-flux")["files"]["a"], name="a")
    after = dl.adapters.plain_state_dict(pipe.transformer)
    assert after.keys() == before.keys() and any(k.endswith("weight.absmax") for k in after)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    dl.fuse(pipe)
    with pytest.raises(dl.ConfigError, match=r"quantized weights \(transformer: nf4\).*bake needs the full-precision"):
        _plain_copy("tiny-flux", pipe)


@pytest.mark.parametrize(("algo", "mode"), [("full", "nf4"), ("full", "int8")])
def test_lycoris_files_on_a_quantized_base(tiny, tmp_path, algo, mode):
    """A full-delta LyCORIS file with bias deltas (made by the lycoris-lora package; LoHa and LoKr become the same
    exact LoRA form in formats/lycoris.py) loads on an nf4 base as on the dequantized one; fusing adds the bias
    change at its scale, and unfuse restores everything. PEFT's torchao layer has no LoRA bias: a bias delta there
    is refused by name."""
    lycoris = pytest.importorskip("lycoris.kohya")
    kind = "tiny-sd15"
    inputs = tiny(kind)["inputs"]
    donor = _fresh(kind)
    preset = tmp_path / "preset.toml"
    preset.write_text('enable_conv = false\nunet_target_module = ["Transformer2DModel"]\nunet_target_name = []\n')
    torch.manual_seed(0)
    network = lycoris.create_network(1.0, 4, 3, None, donor.text_encoder, donor.unet, preset=str(preset), algo=algo)
    network.apply_to(donor.text_encoder, donor.unet, apply_text_encoder=False, apply_unet=True)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    path = tmp_path / "lyco.safetensors"
    network.save_weights(str(path), torch.float32, {})
    pipe = _quantized(kind, mode)
    ref = _dequantized_twin(kind, pipe)
    snap, base = _snapshot(pipe), _forward(pipe, inputs)
    if algo == "full" and mode == "int8":
        with pytest.raises(dl.UnsupportedModelError, match=r"bias delta.*torchao-quantized \(int8\)"):
            dl.load_lora(pipe, path, name="l")
        assert dl.list_loras(pipe) == []
        _assert_snapshot(pipe, snap)
        return
    for p in (pipe, ref):
        dl.load_lora(p, path, name="l", weight=0.7)
    unfused = _forward(pipe, inputs)
    assert not torch.equal(unfused, base)
    _near(unfused, _forward(ref, inputs))
    for p in (pipe, ref):
        dl.fuse(p)
    fused_biases = 0
    for site, ref_site in zip(state_of(pipe).sites(), state_of(ref).sites(), strict=True):
        bias, ref_bias = site.layer.get_base_layer().bias, ref_site.layer.get_base_layer().bias
        if bias is not None and quant_kind(site.layer.get_base_layer()) is not None:
            torch.testing.assert_close(bias, ref_bias, rtol=0, atol=1e-6)  # PEFT's float merge of the bias
            fused_biases += not torch.equal(bias, snap[site.path][2])
    assert (fused_biases > 0) == (algo == "full")
    dl.unfuse(pipe)
    assert torch.equal(_forward(pipe, inputs), unfused)
    dl.remove_lora(pipe, "l")
    _assert_snapshot(pipe, snap)
    assert torch.equal(_forward(pipe, inputs), base)


def test_load_checks_the_values_against_the_compute_dtype_of_a_quantized_layer(tmp_path):
    """An nf4 layer's weight is bytes; what the adapter's numbers must fit is the layer's compute dtype: a product
    of 9e4 (beyond float16's 65504) is refused on an nf4 base computing in float16 and loads on one in float32."""
    donor = _fresh("tiny-flux")
    path = "transformer_blocks.0.attn.to_q"
    dl.add_lora(donor, "big", rank=1, alpha=1e-3, targets=[path])
    layer = donor.transformer.get_submodule(path)
    with torch.no_grad():
        layer.lora_A["big"].weight.zero_()[0, 0] = 300.0
        layer.lora_B["big"].weight.zero_()[0, 0] = 300.0
    file = dl.save_lora(donor, "big", tmp_path / "big.safetensors")
    half = _fresh("tiny-flux")
    quantize_denoiser(half, "nf4", compute_dtype=torch.float16)
    with pytest.raises(dl.FormatError, match=r"torch\.float16"):
        dl.load_lora(half, file)
    assert dl.list_loras(half) == []
    assert dl.load_lora(_quantized("tiny-flux", "nf4"), file) == "big"
