"""A failed load_lora raises our error and leaves the pipeline exactly as it was."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffusion_lora as dl
from diffusion_lora.adapters.state import state_of
from diffusion_lora.formats.safetensors_io import read_metadata

from .helpers import assert_same_state, model_state, run, trained_adapter


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A valid SD1.5 adapter, an SDXL adapter, and their tensors for building broken variants."""

    root = tmp_path_factory.mktemp("adapters")
    sd15 = dl.build_tiny_pipeline("tiny-sd15")
    trained_adapter(sd15, "good", seed=30, rank=4, text_encoder=True)
    good = dl.save_lora(sd15, "good", root / "good.safetensors")
    sdxl = dl.build_tiny_pipeline("tiny-sdxl")
    trained_adapter(sdxl, "xl", seed=31, rank=4, text_encoder=True)
    xl = dl.save_lora(sdxl, "xl", root / "xl.safetensors")
    return root, good, xl


def _variant(root, good, name, change, change_meta=None):
    tensors = load_file(str(good))
    meta = read_metadata(good)
    change(tensors)
    if change_meta is not None:
        change_meta(meta)
    path = root / f"{name}.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


def _first_key(tensors, part):
    return next(k for k in sorted(tensors) if part in k)


def _make_bad(root, good, xl, case):
    if case == "missing":
        return root / "nope.safetensors", dl.FormatError, "no such file"
    if case == "not-safetensors":
        p = root / "notes.safetensors"
        p.write_text("this is a text file, not weights\n" * 10)
        return p, dl.FormatError, "notes.safetensors"
    if case == "pickle":
        p = root / "old.ckpt"
        torch.save({"x": torch.zeros(2)}, p)
        return p, dl.UnsafeFileError, "pickle"
    if case == "other-family":
        return xl, dl.FamilyMismatchError, "sdxl"
    if case == "shape":
        def change(t):
            k = _first_key(t, "lora_A")
            t[k] = torch.randn(4, t[k].shape[1] + 3)
        return _variant(root, good, "shape", change), dl.KeyMappingError, "lora_A"
    if case == "nan":
        def change(t):
            k = _first_key(t, "lora_B")
            t[k] = t[k].clone()
            t[k][0, 0] = float("nan")
        return _variant(root, good, "nan", change), dl.FormatError, "NaN"
    if case == "inf":
        def change(t):
            k = _first_key(t, "lora_A")
            t[k] = t[k].clone()
            t[k][-1, -1] = float("inf")
        return _variant(root, good, "inf", change), dl.FormatError, "Inf"
    if case == "huge":  # finite, but an exponent bit flipped: the update dwarfs the layer
        def change(t):
            k = _first_key(t, "lora_B")
            t[k] = t[k] * 1e8
        return _variant(root, good, "huge", change), dl.FormatError, "times the size"
    if case == "incomplete":
        def change(t):
            del t[_first_key(t, "lora_B")]
        return _variant(root, good, "incomplete", change), dl.FormatError, "lora_B"
    if case == "rank-absurd":
        def change(t):
            ka = _first_key(t, "lora_A")
            kb = ka.replace("lora_A", "lora_B")
            t[ka] = torch.randn(500, t[ka].shape[1])
            t[kb] = torch.randn(t[kb].shape[0], 500)
        return _variant(root, good, "rank", change), dl.KeyMappingError, "rank 500"
    if case.startswith("meta-"):
        key = "lora_adapter_metadata"
        values = {
            "meta-deep-json": "[" * 200_000 + "]" * 200_000,  # RecursionError in Python's json
            "meta-huge-int": '{"unet.r": 4, "unet.lora_alpha": 1' + "0" * 5000 + "}",  # ValueError in json
            "meta-alpha-overflow": '{"unet.r": 4, "unet.lora_alpha": 1' + "0" * 400 + "}",  # float() overflows
            "meta-regex": '{"unet.r": 4, "unet.lora_alpha": 4, "unet.alpha_pattern": {"(a+)+$": 2}}',
        }

        def change_meta(meta):
            meta[key] = values[case]

        return _variant(root, good, case, lambda t: None, change_meta), dl.FormatError, key if case in (
            "meta-deep-json", "meta-huge-int") else ("lora_alpha" if case == "meta-alpha-overflow" else "pattern")
    raise AssertionError(case)


CASES = ["missing", "not-safetensors", "pickle", "other-family", "shape", "nan", "inf", "huge", "incomplete",
         "rank-absurd",
         "meta-deep-json", "meta-huge-int", "meta-alpha-overflow", "meta-regex"]


@pytest.mark.parametrize("case", CASES)
def test_bad_file_leaves_pipeline_untouched(files, make_pipe, case):
    root, good, xl = files
    path, error, words = _make_bad(root, good, xl, case)
    pipe = make_pipe("tiny-sd15")
    trained_adapter(pipe, "keep", seed=32, rank=4)
    dl.set_weights(pipe, {"keep": 0.8})
    before_out = run(pipe)
    before_state = model_state(pipe)
    before_list = dl.list_loras(pipe)
    with pytest.raises(error) as err:
        dl.load_lora(pipe, path, name="new")
    assert isinstance(err.value, dl.DiffusionLoraError)
    assert words.lower() in str(err.value).lower()
    assert dl.list_loras(pipe) == before_list
    assert pipe.get_list_adapters() == {"unet": ["keep"]}
    assert_same_state(model_state(pipe), before_state)
    assert torch.equal(run(pipe), before_out)


def test_bad_file_while_fused_keeps_fused_state(files, make_pipe):
    root, good, xl = files
    pipe = make_pipe("tiny-sd15")
    trained_adapter(pipe, "keep", seed=33, rank=4)
    dl.fuse(pipe)
    fused_state = model_state(pipe)
    fused_out = run(pipe)
    with pytest.raises(dl.FamilyMismatchError):
        dl.load_lora(pipe, xl)
    assert state_of(pipe).fused is not None
    assert_same_state(model_state(pipe), fused_state)
    assert torch.equal(run(pipe), fused_out)


def test_family_mismatch_message_names_both_families(files, make_pipe):
    _, _, xl = files
    with pytest.raises(dl.FamilyMismatchError) as err:
        dl.load_lora(make_pipe("tiny-sd15"), xl)
    msg = str(err.value)
    assert "xl.safetensors" in msg and "sdxl" in msg and "sd1" in msg
    assert "match no layer" in msg


def test_strict_false_loads_matching_and_reports_skipped(files, make_pipe):
    root, good, _ = files
    tensors = load_file(str(good))
    tensors["unet.no_such_block.to_q.lora_A.weight"] = torch.zeros(4, 8)
    tensors["unet.no_such_block.to_q.lora_B.weight"] = torch.zeros(8, 4)
    path = root / "extra.safetensors"
    save_file(tensors, str(path), metadata=read_metadata(good))
    pipe = make_pipe("tiny-sd15")
    with pytest.raises(dl.KeyMappingError, match="1 of .* module\\(s\\) match no layer"):
        dl.load_lora(pipe, path)
    assert dl.list_loras(pipe) == []
    report = dl.load_lora(pipe, path, strict=False)
    assert report.skipped == ("unet.no_such_block.to_q",)
    reference = make_pipe("tiny-sd15")
    dl.load_lora(reference, good)
    assert torch.equal(run(pipe), run(reference))


def test_unreadable_trigger_words_metadata_is_ignored_not_a_crash(files, make_pipe):
    root, good, _ = files

    def change_meta(meta):
        meta["diffusion_lora.trigger_words"] = "[" * 200_000

    path = _variant(root, good, "deep-trigger", lambda t: None, change_meta)
    pipe = make_pipe("tiny-sd15")
    name = dl.load_lora(pipe, path)
    assert dl.list_loras(pipe)[0].name == name


def _unet_pair(tensors):
    down = next(k for k in sorted(tensors) if k.startswith("unet.") and ".lora_A." in k)
    return down, down.replace(".lora_A.", ".lora_B.")


def _beyond_float16(root, good, case):
    """A file whose numbers are finite and sane in float32 but overflow float16."""
    def change(t):
        kd, ku = _unet_pair(t)
        t[kd], t[ku] = t[kd].clone(), t[ku].clone()
        if case == "value":  # one up value above 65504; its down row is tiny, so the delta stays small
            t[ku][0, 0] = 70000.0
            t[kd][0] *= 1e-6
        else:  # small factors whose product passes 65504: PEFT computes lora_B(lora_A(x)) before scaling
            t[kd].fill_(300.0)
            t[ku].fill_(300.0)

    def change_meta(meta):
        if case == "product":  # a tiny scale keeps the scaled delta sane
            config = json.loads(meta["lora_adapter_metadata"])
            config["unet.lora_alpha"] = 1e-5
            meta["lora_adapter_metadata"] = json.dumps(config)

    return _variant(root, good, f"fp16-{case}", change, change_meta)


@pytest.mark.parametrize("case", ["value", "product"])
def test_values_float16_cannot_hold_are_refused_by_a_float16_pipeline(files, make_pipe, case):
    root, good, _ = files
    path = _beyond_float16(root, good, case)
    module = _unet_pair(load_file(str(path)))[0].removesuffix(".lora_A.weight")
    pipe = make_pipe("tiny-sd15").to(torch.float16)
    before = model_state(pipe)
    with pytest.raises(dl.FormatError) as err:
        dl.load_lora(pipe, path)
    msg = str(err.value)
    assert path.name in msg and module in msg and "torch.float16" in msg and "float32" in msg
    assert dl.list_loras(pipe) == [] and pipe.get_list_adapters() == {}
    assert_same_state(model_state(pipe), before)
    # The same file is fine where its numbers fit: the refusal is about the pipeline's dtype.
    pipe32 = make_pipe("tiny-sd15")
    dl.load_lora(pipe32, path)
    assert torch.isfinite(run(pipe32)).all()


def test_large_factors_whose_product_is_zero_still_load(files, make_pipe):
    """‖up‖·‖down‖ is huge, up @ down is 0: the norm bound cannot clear it, the exact check must."""
    root, good, _ = files

    def change(t):
        kd, ku = _unet_pair(t)
        t[kd] = t[kd].clone()
        t[ku] = torch.zeros_like(t[ku])
        t[ku][:, 0] = t[ku][:, 1] = 1e3  # two equal columns of up ...
        t[kd][0] = 1e3
        t[kd][1] = -1e3  # ... against opposite rows of down: they cancel exactly
        t[kd][2:] = 0.0

    def zero_up(t):
        t[_unet_pair(t)[1]] = torch.zeros_like(t[_unet_pair(t)[1]])

    pipe, reference = make_pipe("tiny-sd15"), make_pipe("tiny-sd15")
    dl.load_lora(pipe, _variant(root, good, "cancelling", change), name="x")
    dl.load_lora(reference, _variant(root, good, "zero-up", zero_up), name="x")
    assert torch.equal(run(pipe), run(reference))


def test_nan_in_a_dora_magnitude_is_refused(tmp_path, make_pipe):
    src = make_pipe("tiny-sd15")
    trained_adapter(src, "dora", seed=34, rank=4, use_dora=True)
    tensors = load_file(str(dl.save_lora(src, "dora", tmp_path / "dora.safetensors")))
    key = _first_key(tensors, "magnitude")
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")  # up and down stay finite: only the magnitude is broken
    path = tmp_path / "nan-magnitude.safetensors"
    save_file(tensors, str(path), metadata=read_metadata(tmp_path / "dora.safetensors"))
    pipe = make_pipe("tiny-sd15")
    before = model_state(pipe)
    with pytest.raises(dl.FormatError, match="magnitude weight of .* contains NaN"):
        dl.load_lora(pipe, path)
    assert dl.list_loras(pipe) == []
    assert_same_state(model_state(pipe), before)
