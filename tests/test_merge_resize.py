"""merge (concat, svd) and resize: exactness, energy retained, dynamic rank rules, files."""

from __future__ import annotations

import json

import pytest
import torch

import diffusion_lora as dl
from diffusion_lora.formats.adapter_data import AdapterData, ModuleLora
from diffusion_lora.tools.merge import merge_concat, merge_svd
from diffusion_lora.tools.resize import resize
from diffusion_lora.tools.svd import DynamicRule

LIN, CONV, ONLY_A = "unet.lin", "unet.conv", "unet.only_a"


def lora(out: int, inp: int, rank: int, alpha: float, seed: int, kernel: int | None = None) -> ModuleLora:
    g = torch.Generator().manual_seed(seed)
    if kernel is None:
        down, up = torch.randn(rank, inp, generator=g), torch.randn(out, rank, generator=g)
    else:
        down = torch.randn(rank, inp, kernel, kernel, generator=g)
        up = torch.randn(out, rank, 1, 1, generator=g)
    return ModuleLora(down=down, up=up, alpha=alpha)


def delta(m: ModuleLora, scale: float) -> torch.Tensor:
    """scale · up @ down as a float64 matrix [out, in·k·k] (the independent reference computation)."""
    return scale * (m.up.double().reshape(m.up.shape[0], -1) @ m.down.double().reshape(m.rank, -1))


def pair() -> list[tuple[AdapterData, float]]:
    a = AdapterData({LIN: lora(12, 10, 4, 2.0, 1), CONV: lora(6, 5, 3, 3.0, 2, kernel=3),
                     ONLY_A: lora(7, 9, 2, 1.0, 3)})
    b = AdapterData({LIN: lora(12, 10, 2, 8.0, 4), CONV: lora(6, 5, 5, 5.0, 5, kernel=3)}, use_rslora=True)
    return [(a, 0.7), (b, -0.5)]


def expected_deltas(inputs) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for data, w in inputs:
        for k, m in data.modules.items():
            out[k] = out.get(k, 0) + delta(m, w * m.scale(data.use_rslora))
    return out


def test_concat_is_exact_and_keeps_partial_modules():
    inputs = pair()
    merged = merge_concat(inputs)
    assert set(merged.modules) == {LIN, CONV, ONLY_A}
    assert merged.modules[LIN].rank == 6 and merged.modules[CONV].rank == 8 and merged.modules[ONLY_A].rank == 2
    assert merged.modules[CONV].down.shape == (8, 5, 3, 3) and merged.modules[CONV].up.shape == (6, 8, 1, 1)
    for k, want in expected_deltas(inputs).items():
        m = merged.modules[k]
        torch.testing.assert_close(delta(m, m.scale()), want, rtol=0, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("method", ["concat", "svd"])
def test_dora_is_refused(method):
    a, b = pair()
    a[0].modules[LIN].magnitude = torch.ones(12)
    with pytest.raises(dl.ConfigError, match="DoRA"):
        merge_concat([a, b]) if method == "concat" else merge_svd([a, b], rank=4)
    with pytest.raises(dl.ConfigError, match="DoRA"):
        resize(a[0], rank=2)


def test_concat_and_svd_both_sum_bias_deltas():
    """Bias deltas add: Σ wᵢ·scaleᵢ·biasᵢ (a: 0.7 · 2/4 · 1; b: -0.5 · 8/√2 · 2, rsLoRA), at scale 1."""
    a, b = pair()
    a[0].modules[LIN].bias = torch.ones(12)
    b[0].modules[LIN].bias = torch.full((12,), 2.0)
    want = torch.full((12,), 0.7 * 0.5 - 0.5 * (8.0 / 2**0.5) * 2.0)
    for merged in (merge_concat([a, b]), merge_svd([a, b], rank=100)[0]):
        m = merged.modules[LIN]
        assert m.scale() == 1.0
        torch.testing.assert_close(m.bias, want)
        assert merged.modules[CONV].bias is None


def test_svd_at_full_rank_equals_concat():
    inputs = pair()
    concat = merge_concat(inputs)
    merged, energy = merge_svd(inputs, rank=1000)
    assert merged.modules[LIN].rank == 10 and merged.modules[CONV].rank == 6  # clamped to min(out, in·k·k)
    assert merged.modules[CONV].down.shape == (6, 5, 3, 3)
    for k, m in merged.modules.items():
        want = delta(concat.modules[k], 1.0)
        torch.testing.assert_close(delta(m, m.scale()), want, rtol=0, atol=1e-5 * float(want.abs().max()))
        assert energy[k] == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_svd_at_lower_rank_keeps_the_reported_energy(rank):
    inputs = pair()
    merged, energy = merge_svd(inputs, rank=rank)
    for k, want in expected_deltas(inputs).items():
        s = torch.linalg.svdvals(want)
        r = min(rank, s.numel())
        assert merged.modules[k].rank == r
        assert energy[k] == pytest.approx(float((s[:r] ** 2).sum() / (s**2).sum()), rel=1e-9)
        m = merged.modules[k]
        err = float(((delta(m, m.scale()) - want) ** 2).sum() / (want**2).sum())
        assert err == pytest.approx(1 - energy[k], abs=1e-5)  # Eckart–Young: the rest is exactly the error


def test_resize_of_known_rank_is_lossless_and_lower_ranks_keep_reported_energy():
    data = AdapterData({LIN: lora(12, 10, 3, 1.5, 7), CONV: lora(6, 5, 3, 6.0, 8, kernel=3)}, use_rslora=True)
    want = {k: delta(m, m.scale(True)) for k, m in data.modules.items()}
    same, energy = resize(data, rank=3)
    for k, m in same.modules.items():
        assert m.rank == 3 and m.scale() == 1.0 and energy[k] == pytest.approx(1.0, abs=1e-9)
        torch.testing.assert_close(delta(m, 1.0), want[k], rtol=0, atol=1e-5 * float(want[k].abs().max()))
    assert not same.use_rslora
    for rank in (1, 2):
        small, energy = resize(data, rank=rank)
        for k, m in small.modules.items():
            s = torch.linalg.svdvals(want[k])
            assert m.rank == rank
            assert energy[k] == pytest.approx(float((s[:rank] ** 2).sum() / (s**2).sum()), rel=1e-9)
            err = float(((delta(m, 1.0) - want[k]) ** 2).sum() / (want[k] ** 2).sum())
            assert err == pytest.approx(1 - energy[k], abs=1e-5)


def known_spectrum(sigmas: list[float]) -> ModuleLora:
    """A module whose delta (scale 1) has exactly the singular values ``sigmas``."""
    g = torch.Generator().manual_seed(11)
    u, _ = torch.linalg.qr(torch.randn(16, len(sigmas), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(12, len(sigmas), generator=g, dtype=torch.float64))
    s = torch.tensor(sigmas, dtype=torch.float64)
    return ModuleLora(down=(v.T * s[:, None]).float(), up=u.float(), alpha=float(len(sigmas)))


# σ = 8, 4, 2, 1: σ²-cumulative 64, 80, 84, 85 (of 85); σ-cumulative 8, 12, 14, 15 (of 15)
@pytest.mark.parametrize(
    "rule, rank",
    [("sv_ratio:1", 1), ("sv_ratio:3", 2), ("sv_ratio:4", 3), ("sv_ratio:100", 4),
     ("sv_fro:0.85", 1), ("sv_fro:0.9", 2), ("sv_fro:0.99", 3), ("sv_fro:1", 4),
     ("sv_cumulative:0.5", 1), ("sv_cumulative:0.8", 2), ("sv_cumulative:0.9", 3), ("sv_cumulative:0.95", 4)],
)  # fmt: skip
def test_dynamic_rules_pick_the_hand_computed_rank(rule, rank):
    data = AdapterData({LIN: known_spectrum([8.0, 4.0, 2.0, 1.0])})
    out, energy = resize(data, dynamic=rule)
    assert out.modules[LIN].rank == rank
    assert energy[LIN] == pytest.approx([64, 80, 84, 85][rank - 1] / 85, rel=1e-6)
    assert resize(data, dynamic=rule, rank=1)[0].modules[LIN].rank == 1  # rank caps a dynamic rule
    merged, _ = merge_svd([(data, 1.0)], dynamic=rule)
    assert merged.modules[LIN].rank == rank


@pytest.mark.parametrize(
    "text", ["sv_ratio", "sv_ratio:", "sv_ratio:x", "sv_ratio:0.5", "sv_fro:0", "sv_fro:1.5",
             "sv_cumulative:-1", "sv_cumulative:nan", "fro:0.9", ""],
)  # fmt: skip
def test_bad_dynamic_strings_are_config_errors(text):
    with pytest.raises(dl.ConfigError):
        DynamicRule.parse(text)
    with pytest.raises(dl.ConfigError):
        merge_svd(pair(), dynamic=text)


@pytest.mark.parametrize("kwargs", [{}, {"rank": 0}, {"rank": 2.5}, {"rank": True}])
def test_bad_rank_arguments_are_config_errors(kwargs):
    with pytest.raises(dl.ConfigError):
        resize(pair()[0][0], **kwargs)


# --- files ------------------------------------------------------------------------------------

Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
K = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
C = "unet.down_blocks.0.resnets.0.conv1"


def sd1_file(path, seed: int, fmt: str, family: str = "sd1", only: tuple[str, ...] = (Q, K, C)):
    from diffusion_lora.formats.codec import encode
    from diffusion_lora.formats.safetensors_io import write_adapter_file
    from diffusion_lora.models.reference import reference_keys

    keys = reference_keys("sd1")
    modules = {}
    for i, key in enumerate(only):
        shape = keys.module_shapes["unet"][key.removeprefix("unet.")]
        kernel = shape[2] if len(shape) == 4 else None
        modules[key] = lora(shape[0], shape[1], 2 + i, 1.0 + i, seed + i, kernel=kernel)
    data = AdapterData(modules)
    tensors, metadata = encode(keys, data, fmt)
    write_adapter_file(path, tensors, {**metadata, "diffusion_lora.family": family})
    return data


def read_back(path):
    from diffusion_lora.formats.adapter_files import read_adapter
    from diffusion_lora.models.reference import reference_keys

    read = read_adapter(path, reference_keys("sd1"))
    assert not read.unresolved
    return read


def test_merge_files_svd_writes_the_merged_delta_with_provenance(tmp_path):
    from diffusion_lora.formats.hashes import file_sha256
    from diffusion_lora.tools.merge import merge_files

    a = sd1_file(tmp_path / "a.safetensors", 20, "kohya")
    b = sd1_file(tmp_path / "b.safetensors", 30, "diffusers", only=(Q, C))
    out = tmp_path / "m.safetensors"
    report = merge_files([(tmp_path / "a.safetensors", 0.6), (tmp_path / "b.safetensors", 1.5)], out,
                         method="svd", rank=64)  # fmt: skip
    read = read_back(out)
    assert read.format == "diffusers" and set(read.data.modules) == {Q, K, C}
    assert report.ranks == {Q: 64, K: 64, C: 64} and report.modules == 3  # rank is kept, not trimmed
    assert report.total_energy == pytest.approx(1.0, abs=1e-9)
    want = expected_deltas([(a, 0.6), (b, 1.5)])
    for k, m in read.data.modules.items():
        torch.testing.assert_close(delta(m, m.scale()), want[k], rtol=0, atol=1e-5 * float(want[k].abs().max()))
    meta = read.data.metadata
    provenance = json.loads(meta["diffusion_lora.merge"])
    assert provenance["method"] == "svd" and provenance["rank"] == 64
    assert provenance["inputs"] == [
        {"file": "a.safetensors", "sha256": file_sha256(tmp_path / "a.safetensors"), "weight": 0.6},
        {"file": "b.safetensors", "sha256": file_sha256(tmp_path / "b.safetensors"), "weight": 1.5},
    ]
    assert meta["ss_network_dim"] == "64" and meta["ss_network_alpha"] == "64.0"
    assert meta["diffusion_lora.family"] == "sd1"
    assert "sshs_model_hash" in meta


def test_merge_files_concat_to_kohya(tmp_path):
    from diffusion_lora.tools.merge import merge_files

    a = sd1_file(tmp_path / "a.safetensors", 20, "comfyui", only=(Q,))
    b = sd1_file(tmp_path / "b.safetensors", 30, "diffusers", only=(Q,))
    out = tmp_path / "m.safetensors"
    report = merge_files([(tmp_path / "a.safetensors", 1.0), (tmp_path / "b.safetensors", 0.5)], out, to="kohya")
    read = read_back(out)
    assert read.format == "kohya" and report.ranks == {Q: 4}
    assert read.data.metadata["ss_network_dim"] == "4" and read.data.metadata["ss_network_alpha"] == "4.0"
    m, want = read.data.modules[Q], expected_deltas([(a, 1.0), (b, 0.5)])[Q]
    torch.testing.assert_close(delta(m, m.scale()), want, rtol=0, atol=1e-6 * float(want.abs().max()))


def test_failed_merge_writes_nothing(tmp_path):
    from diffusion_lora.tools.merge import merge_files

    sd1_file(tmp_path / "a.safetensors", 20, "diffusers")
    sd1_file(tmp_path / "x.safetensors", 30, "diffusers", family="sdxl")
    out = tmp_path / "m.safetensors"
    with pytest.raises(dl.KeyMappingError, match="x.safetensors"):
        merge_files([(tmp_path / "a.safetensors", 1.0), (tmp_path / "x.safetensors", 1.0)], out)
    with pytest.raises(dl.ConfigError):
        merge_files([(tmp_path / "a.safetensors", 1.0)], out, method="concat", rank=4)
    with pytest.raises(dl.ConfigError):
        merge_files([(tmp_path / "a.safetensors", 1.0)], out, method="svd", dynamic="sv_fro:2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "x.safetensors"]


def test_resize_file_keeps_the_format_and_reports_energy(tmp_path):
    from diffusion_lora.tools.resize import resize_file

    data = sd1_file(tmp_path / "a.safetensors", 40, "kohya")
    out = tmp_path / "r.safetensors"
    report = resize_file(tmp_path / "a.safetensors", out, rank=2)
    read = read_back(out)
    assert read.format == "kohya" and report.ranks == {Q: 2, K: 2, C: 2}
    assert json.loads(read.data.metadata["diffusion_lora.resize"])["rank"] == 2
    for k, m in read.data.modules.items():
        want = delta(data.modules[k], data.modules[k].scale())
        s = torch.linalg.svdvals(want)
        assert report.energy[k] == pytest.approx(float((s[:2] ** 2).sum() / (s**2).sum()), rel=1e-6)
        if k == Q:  # rank 2 already: lossless
            torch.testing.assert_close(delta(m, m.scale()), want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_concat_merge_equals_stacked_loading_in_a_pipeline(make_pipe, tmp_path):
    import diffusion_lora as dl
    from diffusion_lora.adapters.keys import model_keys_of
    from diffusion_lora.adapters.state import state_of
    from diffusion_lora.tools.merge import merge_files

    from .helpers import assert_near, run, trained_adapter

    src = make_pipe("tiny-sd15")
    trained_adapter(src, "a", seed=1, rank=4, alpha=2)
    trained_adapter(src, "b", seed=2, rank=2, alpha=4, use_rslora=True)
    pa = dl.save_lora(src, "a", tmp_path / "a.safetensors")
    pb = dl.save_lora(src, "b", tmp_path / "b.safetensors")
    stacked = make_pipe("tiny-sd15")
    dl.load_lora(stacked, pa, weight=0.7)
    dl.load_lora(stacked, pb, weight=0.5)
    out = tmp_path / "ab.safetensors"
    merge_files([(pa, 0.7), (pb, 0.5)], out, keys=model_keys_of(state_of(stacked)))
    merged = make_pipe("tiny-sd15")
    dl.load_lora(merged, out, weight=1.0)
    expected = run(stacked)
    assert not torch.equal(expected, run(make_pipe("tiny-sd15")))  # the adapters do change the output
    assert_near(run(merged), expected)


def test_lycoris_file_resizes_and_merges_through_its_exact_delta(tmp_path):
    """A LoHa file (rank-2 Hadamard factors, so ΔW has rank ≤ 4) resized to rank 4 is lossless."""
    from safetensors.torch import load_file as _load
    from safetensors.torch import save_file as _save

    from diffusion_lora.formats.lycoris import lycoris_deltas
    from diffusion_lora.tools.merge import merge_files as _merge
    from diffusion_lora.tools.resize import resize_file as _resize

    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    g = torch.Generator().manual_seed(90)
    loha = {f"{name}.hada_w1_a": torch.randn(320, 2, generator=g) * 0.1,
            f"{name}.hada_w1_b": torch.randn(2, 320, generator=g) * 0.1,
            f"{name}.hada_w2_a": torch.randn(320, 2, generator=g) * 0.1,
            f"{name}.hada_w2_b": torch.randn(2, 320, generator=g) * 0.1, f"{name}.alpha": torch.tensor(1.0)}
    _save(loha, str(tmp_path / "loha.safetensors"), metadata={"ss_base_model_version": "sd_v1"})
    expected = lycoris_deltas(loha)[name].weight
    report = _resize(tmp_path / "loha.safetensors", tmp_path / "r.safetensors", rank=4, to="kohya")
    assert report.total_energy == pytest.approx(1.0, abs=1e-6)
    out = _load(str(tmp_path / "r.safetensors"))
    delta = out[f"{name}.alpha"] / 4 * out[f"{name}.lora_up.weight"] @ out[f"{name}.lora_down.weight"]
    torch.testing.assert_close(delta, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    merged = _merge([(tmp_path / "loha.safetensors", 0.5)], tmp_path / "m.safetensors", method="svd", rank=4)
    assert merged.total_energy == pytest.approx(1.0, abs=1e-6)
