"""LyCORIS files read as exact deltas, checked against the ``lycoris`` package's own layers.

The oracle is the forward of a real LyCORIS-wrapped layer: ``layer(x) - base(x)`` must equal
``op(x, ΔW)`` with our ΔW, for every algorithm × layer type × option that changes the math.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lycoris.kohya import create_network
from lycoris.modules.full import FullModule
from lycoris.modules.locon import LoConModule
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from safetensors.torch import load_file
from torch import nn

import diffusion_lora as dl
from diffusion_lora.formats.kohya import is_kohya, kohya_index
from diffusion_lora.formats.lycoris import (
    DeltaKind,
    ModuleDelta,
    delta_as_lora,
    fit_shape,
    is_lycoris,
    lycoris_deltas,
)

NAME = "lora_unet_down_blocks_0_attentions_0_proj_in"
REL = 1e-5


def _layer(kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "conv":
        return nn.Conv2d(16, 24, 3, padding=1)
    return nn.Linear(32, 24, bias=kind != "linear-nobias")


def _input(layer: nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if isinstance(layer, nn.Conv2d):
        return torch.randn(2, layer.in_channels, 5, 5, generator=g)
    return torch.randn(3, layer.in_features, generator=g)


def _op(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, weight, bias)


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float = REL) -> float:
    """Assert |a - e| ≤ rel · max|e| and return the relative max difference."""
    actual, expected = actual.detach(), expected.detach()
    scale = float(expected.abs().max())
    diff = float((actual - expected).abs().max()) / scale
    assert diff <= rel, f"relative max difference {diff:.3g} > {rel}"
    return diff


def _randomize(module: nn.Module, seed: int) -> None:
    """LyCORIS layers start as a zero delta; give every factor random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(p * (1 + 0.2 * noise.abs()) if name == "dora_scale" else 0.5 * noise)


@dataclass
class Oracle:
    layer: nn.Module
    weight: torch.Tensor  # the layer's weight before wrapping (algo="full" takes it off the layer)
    module: Any  # the LyCORIS module wrapping ``layer``
    x: torch.Tensor
    base: torch.Tensor  # layer(x) before wrapping
    adapted: torch.Tensor  # layer(x) through LyCORIS
    file: dict[str, torch.Tensor]  # what LyCORIS saves for it, under kohya name NAME


def _oracle(cls: type, layer_kind: str, seed: int = 0, **kwargs: Any) -> Oracle:
    layer = _layer(layer_kind, seed)
    x = _input(layer, seed + 1)
    with torch.no_grad():
        base = layer(x)
        weight = layer.weight.detach().clone()
        module = cls(NAME, layer, 1.0, **kwargs)
        _randomize(module, seed + 2)
        module.apply_to()
        adapted = layer(x)
    file = {f"{NAME}.{k}": v.detach().clone() for k, v in module.state_dict().items()}
    return Oracle(layer, weight, module, x, base, adapted, file)


def _expected_out(o: Oracle, delta: ModuleDelta) -> tuple[torch.Tensor, torch.Tensor]:
    """(LyCORIS' output, ours) — with DoRA the whole output, else the delta's contribution."""
    if delta.magnitude is None:
        return o.adapted - o.base, _op(o.layer, o.x, delta.weight, delta.bias)
    v = o.weight + delta.weight
    norm = v.reshape(v.shape[0], -1).norm(dim=1) + torch.finfo(v.dtype).eps
    merged = v * (delta.magnitude / norm).reshape(-1, *[1] * (v.dim() - 1))
    return o.adapted, _op(o.layer, o.x, merged, o.layer.bias)


# (id, LyCORIS class, layer, constructor kwargs, suffixes the file must have so the case hits its branch)
CASES = [
    ("loha-linear", LohaModule, "linear", {"lora_dim": 4, "alpha": 2}, {"hada_w1_a", "alpha"}),
    ("loha-conv", LohaModule, "conv", {"lora_dim": 4, "alpha": 8}, {"hada_w2_b"}),
    ("loha-conv-tucker", LohaModule, "conv", {"lora_dim": 3, "alpha": 2, "use_tucker": True}, {"hada_t1", "hada_t2"}),
    ("loha-rslora", LohaModule, "linear", {"lora_dim": 4, "alpha": 2, "rs_lora": True}, {"alpha"}),
    ("loha-scalar", LohaModule, "linear", {"lora_dim": 4, "alpha": 3, "use_scalar": True}, {"hada_w1_a"}),
    ("loha-dora", LohaModule, "linear", {"lora_dim": 4, "alpha": 2, "weight_decompose": True}, {"dora_scale"}),
    ("loha-dora-conv", LohaModule, "conv", {"lora_dim": 2, "alpha": 1, "weight_decompose": True}, {"dora_scale"}),
    ("lokr-linear", LokrModule, "linear", {"lora_dim": 2, "alpha": 4}, {"lokr_w1", "lokr_w2_a"}),
    (
        "lokr-both",
        LokrModule,
        "linear",
        {"lora_dim": 1, "alpha": 3, "decompose_both": True},
        {"lokr_w1_a", "lokr_w2_a"},
    ),
    ("lokr-whole", LokrModule, "linear", {"lora_dim": 8, "alpha": 5}, {"lokr_w1", "lokr_w2"}),
    (
        "lokr-full-matrix",
        LokrModule,
        "linear",
        {"lora_dim": 2, "alpha": 3, "full_matrix": True},
        {"lokr_w1", "lokr_w2"},
    ),
    ("lokr-factor", LokrModule, "linear", {"lora_dim": 2, "alpha": 3, "factor": 2}, {"lokr_w2_b"}),
    (
        "lokr-unbalanced",
        LokrModule,
        "linear",
        {"lora_dim": 1, "alpha": 3, "unbalanced_factorization": True},
        {"lokr_w2_a"},
    ),
    ("lokr-scalar", LokrModule, "linear", {"lora_dim": 2, "alpha": 3, "use_scalar": True}, {"lokr_w1"}),
    ("lokr-dora", LokrModule, "linear", {"lora_dim": 2, "alpha": 4, "weight_decompose": True}, {"dora_scale"}),
    ("lokr-conv", LokrModule, "conv", {"lora_dim": 2, "alpha": 3}, {"lokr_w2_b"}),
    ("lokr-conv-both", LokrModule, "conv", {"lora_dim": 1, "alpha": 3, "decompose_both": True}, {"lokr_w1_a"}),
    ("lokr-conv-tucker", LokrModule, "conv", {"lora_dim": 2, "alpha": 3, "use_tucker": True}, {"lokr_t2"}),
    ("lokr-conv-whole", LokrModule, "conv", {"lora_dim": 8, "alpha": 3}, {"lokr_w2"}),
    ("full-linear", FullModule, "linear", {}, {"diff", "diff_b"}),
    ("full-conv", FullModule, "conv", {}, {"diff", "diff_b"}),
    ("full-nobias", FullModule, "linear-nobias", {}, {"diff"}),
    ("lora-linear", LoConModule, "linear", {"lora_dim": 4, "alpha": 2}, {"lora_down.weight"}),
    ("lora-conv-tucker", LoConModule, "conv", {"lora_dim": 3, "alpha": 5, "use_tucker": True}, {"lora_mid.weight"}),
    ("lora-dora", LoConModule, "linear", {"lora_dim": 4, "alpha": 2, "weight_decompose": True}, {"dora_scale"}),
]


@pytest.mark.parametrize(("cls", "layer_kind", "kwargs", "suffixes"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_delta_matches_lycoris_forward(cls: type, layer_kind: str, kwargs: dict, suffixes: set[str]) -> None:
    o = _oracle(cls, layer_kind, **kwargs)
    assert suffixes <= {k.partition(".")[2] for k in o.file}, sorted(o.file)
    assert is_lycoris(o.file) == (cls is not LoConModule)
    delta = fit_shape(lycoris_deltas(o.file)[NAME], o.weight.shape, NAME)
    kinds = {
        LohaModule: DeltaKind.LOHA,
        LokrModule: DeltaKind.LOKR,
        FullModule: DeltaKind.FULL,
        LoConModule: DeltaKind.LORA,
    }
    assert delta.kind is kinds[cls] and delta.kind == kinds[cls].value
    assert delta.weight.dtype == torch.float32 and delta.weight.abs().max() > 1e-3
    assert (delta.bias is not None) == ("diff_b" in suffixes)
    assert (delta.magnitude is not None) == ("dora_scale" in suffixes)
    _close(*_expected_out(o, delta))


def _scaled(file: dict[str, torch.Tensor], alpha: float | None) -> torch.Tensor:
    edited = {k: v for k, v in file.items() if not k.endswith(".alpha")}
    if alpha is not None:
        edited[f"{NAME}.alpha"] = torch.tensor(alpha)
    return lycoris_deltas(edited)[NAME].weight


@pytest.mark.parametrize(
    ("cls", "kwargs", "rank"),
    [(LohaModule, {"lora_dim": 4, "alpha": 2}, 4), (LokrModule, {"lora_dim": 2, "alpha": 4}, 2)],
    ids=["loha", "lokr"],
)
def test_scale_is_alpha_over_rank(cls: type, kwargs: dict, rank: int) -> None:
    o = _oracle(cls, "linear", **kwargs)
    unit = _scaled(o.file, rank)
    torch.testing.assert_close(_scaled(o.file, 3 * rank), 3 * unit)
    torch.testing.assert_close(_scaled(o.file, kwargs["alpha"]), unit * kwargs["alpha"] / rank)
    assert torch.equal(_scaled(o.file, None), unit)  # absent alpha: alpha = rank
    assert torch.equal(_scaled(o.file, 0.0), unit)  # LyCORIS and kohya read alpha 0 as rank


@pytest.mark.parametrize("kwargs", [{"lora_dim": 8, "alpha": 5}, {"lora_dim": 2, "alpha": 3, "full_matrix": True}])
def test_lokr_without_decomposition_ignores_alpha(kwargs: dict) -> None:
    o = _oracle(LokrModule, "linear", **kwargs)
    assert float(o.file[f"{NAME}.alpha"]) != 1.0
    expected, _ = _expected_out(o, lycoris_deltas(o.file)[NAME])
    for alpha in (1.0, 7.0, None):
        delta = lycoris_deltas({**{k: v for k, v in o.file.items() if "alpha" not in k}, **_alpha_key(alpha)})[NAME]
        _close(_op(o.layer, o.x, delta.weight), expected)


def _alpha_key(alpha: float | None) -> dict[str, torch.Tensor]:
    return {} if alpha is None else {f"{NAME}.alpha": torch.tensor(alpha)}


@pytest.mark.parametrize("cls", [LohaModule, LokrModule])
def test_scalar_key_is_multiplied_in(cls: type) -> None:
    """A file holding the raw factors plus ``scalar`` (LyCORIS folds it in before saving)."""
    o = _oracle(cls, "linear", lora_dim=2, alpha=3, use_scalar=True)
    with torch.no_grad():
        o.module.scalar.fill_(0.37)
        adapted = o.layer(o.x)
    raw = {f"{NAME}.{k}": v.detach().clone() for k, v in o.module.named_parameters() if k != "scalar"}
    raw[f"{NAME}.alpha"] = o.module.alpha.clone()
    raw[f"{NAME}.scalar"] = torch.tensor(0.37)
    delta = lycoris_deltas(raw)[NAME]
    _close(_op(o.layer, o.x, delta.weight), adapted - o.base)
    without = lycoris_deltas({k: v for k, v in raw.items() if not k.endswith(".scalar")})[NAME]
    torch.testing.assert_close(delta.weight, 0.37 * without.weight)


def test_mixed_file_with_kohya_lora_modules() -> None:
    loha = _oracle(LohaModule, "linear", lora_dim=4, alpha=2)
    lora = _oracle(LoConModule, "linear", seed=5, lora_dim=4, alpha=2)
    other = NAME.replace("proj_in", "proj_out")
    file = {**loha.file, **{k.replace(NAME, other): v for k, v in lora.file.items()}}
    assert is_lycoris(file) and not is_kohya(file)
    deltas = lycoris_deltas(file)
    assert {n: d.kind for n, d in deltas.items()} == {NAME: "loha", other: "lora"}
    _close(_op(lora.layer, lora.x, deltas[other].weight), lora.adapted - lora.base)


# --- the package's own save path, on a real tiny UNet and text encoder --------------------------------------


PRESET = """
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
"""


@pytest.mark.parametrize(
    "network_args",
    [{"algo": "loha", "use_tucker": True}, {"algo": "lokr", "decompose_both": True}, {"algo": "full"}],
    ids=["loha-tucker", "lokr", "full"],
)
def test_lycoris_kohya_network_file(tmp_path: Path, network_args: dict) -> None:
    pipe = dl.build_tiny_pipeline("tiny-sd15")
    # LyCORIS 4.1.3's built-in "full" preset names SD's time_embedding twice (as a TimestepEmbedding
    # block and by name) and then refuses its own duplicate; this is that preset without the block.
    preset = tmp_path / "preset.toml"
    preset.write_text(PRESET)
    torch.manual_seed(0)
    network = create_network(
        1.0, 4, 2, None, pipe.text_encoder, pipe.unet, conv_dim=4, conv_alpha=1, preset=str(preset), **network_args
    )
    network.apply_to(pipe.text_encoder, pipe.unet, apply_text_encoder=True, apply_unet=True)
    for i, lora in enumerate(network.loras):
        _randomize(lora, i)
    path = tmp_path / "lyco.safetensors"
    network.save_weights(str(path), torch.float32, {})
    tensors = load_file(str(path))
    assert is_lycoris(tensors) and not is_kohya(tensors)

    deltas = lycoris_deltas(tensors)
    assert deltas.keys() == {lora.lora_name for lora in network.loras}
    paths = {
        c: [n for n, m in getattr(pipe, c).named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        for c in ("unet", "text_encoder")
    }
    index = kohya_index(dl.FAMILIES["sd1"].kohya_prefixes, paths)
    worst = 0.0
    for i, lora in enumerate(network.loras):
        target = index.resolve(lora.lora_name)
        assert target is not None, lora.lora_name
        layer = pipe.unet if target[0] == "unet" else pipe.text_encoder
        layer = layer.get_submodule(target[1])
        assert layer is lora.org_module[0]
        x = _input(layer, i)
        delta = fit_shape(deltas[lora.lora_name], lora.shape, lora.lora_name)
        with torch.no_grad():
            if isinstance(lora, FullModule):  # apply_to took the weight off the layer; rebuild the base output
                base = _op(layer, x, lora.org_weight, None if lora.org_bias is None else lora.org_bias[0])
            else:
                base = lora.org_forward(x)
            worst = max(worst, _close(layer(x) - base, _op(layer, x, delta.weight, delta.bias)))
    assert len(network.loras) > 50 and worst < REL


# --- the exact LoRA form -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("out", "fan_in"), [(24, 16), (12, 32), (8, 8)])
def test_delta_as_lora_linear_is_bit_exact(out: int, fan_in: int) -> None:
    weight = torch.randn(out, fan_in, generator=torch.Generator().manual_seed(out))
    magnitude = torch.rand(out) + 0.5
    lora = delta_as_lora(ModuleDelta(weight=weight, magnitude=magnitude, kind=DeltaKind.LOHA))
    assert lora.rank == min(out, fan_in) and lora.alpha == lora.rank and lora.scale() == 1.0
    assert lora.down.shape == (lora.rank, fan_in) and lora.up.shape == (out, lora.rank)
    assert torch.equal(lora.up @ lora.down, weight)
    assert lora.magnitude is magnitude
    rs = delta_as_lora(ModuleDelta(weight=weight, kind=DeltaKind.LOKR), use_rslora=True)
    assert rs.scale(use_rslora=True) == pytest.approx(1.0)


@pytest.mark.parametrize(("out", "channels"), [(24, 16), (24, 2), (18, 2)], ids=["rank-out", "im2col", "square"])
def test_delta_as_lora_conv_is_exact(out: int, channels: int) -> None:
    g = torch.Generator().manual_seed(out + channels)
    weight = torch.randn(out, channels, 3, 3, generator=g)
    x = torch.randn(2, channels, 6, 6, generator=g)
    lora = delta_as_lora(ModuleDelta(weight=weight, kind=DeltaKind.LOHA))
    assert lora.rank == min(out, channels * 9)
    assert lora.down.shape == (lora.rank, channels, 3, 3) and lora.up.shape == (out, lora.rank, 1, 1)
    assert torch.equal((lora.up.flatten(1) @ lora.down.flatten(1)).reshape(weight.shape), weight)
    _close(F.conv2d(F.conv2d(x, lora.down, padding=1), lora.up), F.conv2d(x, weight, padding=1), rel=1e-6)


def test_lycoris_conv_through_lora_form_matches_forward() -> None:
    o = _oracle(LohaModule, "conv", lora_dim=3, alpha=2)
    lora = delta_as_lora(fit_shape(lycoris_deltas(o.file)[NAME], o.weight.shape))
    _close(F.conv2d(F.conv2d(o.x, lora.down, padding=1), lora.up), o.adapted - o.base)


def test_delta_as_lora_keeps_a_bias_delta() -> None:
    delta = lycoris_deltas(_oracle(FullModule, "linear").file)[NAME]
    lora = delta_as_lora(delta)
    assert lora.scale() == 1.0 and torch.equal(lora.bias, delta.bias)


def test_fit_shape_refuses_another_layer() -> None:
    delta = lycoris_deltas(_oracle(LohaModule, "conv", lora_dim=2, alpha=1).file)[NAME]
    assert delta.weight.shape == (24, 16 * 9)  # flattened until the model's kernel size is known
    assert fit_shape(delta, (24, 16, 3, 3)).weight.shape == (24, 16, 3, 3)
    with pytest.raises(dl.KeyMappingError, match=NAME):
        fit_shape(delta, (24, 16, 1, 1), NAME)


# --- detection and bad files ---------------------------------------------------------------------------------


def test_is_lycoris_looks_at_every_key() -> None:
    loha = _oracle(LohaModule, "linear", lora_dim=2, alpha=1).file
    lora_only = _oracle(LoConModule, "linear", lora_dim=2, alpha=1).file
    assert is_lycoris(loha)
    assert is_lycoris({f"lycoris_{NAME[10:]}.diff": torch.zeros(1)})
    assert not is_lycoris(lora_only)  # plain kohya LoRA: not a LyCORIS file
    assert not is_lycoris([])
    assert not is_lycoris([*loha, f"{NAME}.oft_blocks"])  # OFT is another algorithm
    assert not is_lycoris([*loha, "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"])
    assert not is_lycoris(["down_blocks_0.hada_w1_a"])  # no prefix


def _loha_file() -> dict[str, torch.Tensor]:
    return _oracle(LohaModule, "linear", lora_dim=4, alpha=2).file


def _lokr_file(**kwargs: Any) -> dict[str, torch.Tensor]:
    return _oracle(LokrModule, "linear", **{"lora_dim": 1, "alpha": 3, "decompose_both": True, **kwargs}).file


def _without(file: dict[str, torch.Tensor], suffix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in file.items() if k != f"{NAME}.{suffix}"}


def _with(file: dict[str, torch.Tensor], suffix: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    return {**file, f"{NAME}.{suffix}": tensor}


BAD = [
    ("missing-part", lambda: _without(_loha_file(), "hada_w2_b"), r"has no hada_w2_b"),
    ("half-tucker", lambda: _with(_loha_file(), "hada_t1", torch.zeros(4, 4, 3, 3)), r"hada_t1 but no hada_t2"),
    (
        "no-multiply",
        lambda: _with(_loha_file(), "hada_w1_b", torch.zeros(3, 32)),
        r"hada_w1_a @ hada_w1_b do not multiply",
    ),
    (
        "halves-differ",
        lambda: _with(_with(_loha_file(), "hada_w2_b", torch.zeros(4, 31)), "hada_w2_a", torch.zeros(24, 4)),
        r"halves differ",
    ),
    ("mixed-algos", lambda: _with(_loha_file(), "lokr_w1", torch.zeros(4, 4)), r"mixes loha and lokr"),
    ("only-alpha", lambda: {f"{NAME}.alpha": torch.tensor(1.0)}, r"has only alpha"),
    ("alpha-vector", lambda: _with(_loha_file(), "alpha", torch.ones(2)), r"alpha has shape \[2\]"),
    ("alpha-negative", lambda: _with(_loha_file(), "alpha", torch.tensor(-1.0)), r"alpha is -1"),
    ("alpha-nan", lambda: _with(_loha_file(), "alpha", torch.tensor(float("nan"))), r"alpha is nan"),
    ("old-dora", lambda: _with(_loha_file(), "dora_scale", torch.ones(1, 32)), r"wd_on_output=False"),
    (
        "lokr-no-w1",
        lambda: _without(_without(_lokr_file(), "lokr_w1_a"), "lokr_w1_b"),
        r"neither lokr_w1 nor lokr_w1_a/lokr_w1_b",
    ),
    ("lokr-w1-twice", lambda: _with(_lokr_file(), "lokr_w1", torch.zeros(4, 4)), r"both lokr_w1 and lokr_w1_a"),
    ("lokr-half-pair", lambda: _without(_lokr_file(), "lokr_w2_b"), r"has no lokr_w2_b"),
    (
        "lokr-ranks",
        lambda: _with(_with(_lokr_file(), "lokr_w2_a", torch.zeros(6, 2)), "lokr_w2_b", torch.zeros(2, 8)),
        r"rank 1 but lokr_w2 rank 2",
    ),
    ("lokr-t1", lambda: _with(_lokr_file(), "lokr_t1", torch.zeros(1, 1, 3, 3)), r"lokr_t1"),
    ("lokr-bad-tucker", lambda: _with(_lokr_file(), "lokr_t2", torch.zeros(2, 2, 3, 3)), r"Tucker factors do not fit"),
    (
        "full-bias",
        lambda: {f"{NAME}.diff": torch.zeros(4, 3), f"{NAME}.diff_b": torch.zeros(3)},
        r"diff_b has shape \[3\]",
    ),
    (
        "full-alpha",
        lambda: {f"{NAME}.diff": torch.zeros(4, 3), f"{NAME}.alpha": torch.tensor(1.0)},
        r"alpha does not belong to a full",
    ),
    (
        "lora-up",
        lambda: {f"{NAME}.lora_down.weight": torch.zeros(4, 8), f"{NAME}.lora_up.weight": torch.zeros(8, 3)},
        r"lora_up \[8, 3\] does not fit",
    ),
    ("other-format", lambda: {**_loha_file(), f"{NAME}.oft_blocks": torch.zeros(2)}, r"oft_blocks.*not a LyCORIS key"),
]


@pytest.mark.parametrize(("make", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_files_name_the_module_and_the_fault(make: Any, message: str) -> None:
    with pytest.raises(dl.FormatError, match=message) as err:
        lycoris_deltas(make())
    assert NAME in str(err.value)


def test_half_float_file_gives_float32_delta() -> None:
    o = _oracle(LokrModule, "linear", lora_dim=2, alpha=4)
    half = {k: v.half() for k, v in o.file.items()}
    delta = lycoris_deltas(half)[NAME]
    assert delta.weight.dtype == torch.float32
    exact = lycoris_deltas({k: v.float() for k, v in half.items()})[NAME]
    assert torch.equal(delta.weight, exact.weight)
    assert math.isclose(
        float(delta.weight.abs().max()), float(lycoris_deltas(o.file)[NAME].weight.abs().max()), rel_tol=1e-2
    )
