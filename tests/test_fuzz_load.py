"""Fuzzing load_lora with mutated real adapter files: it loads with finite outputs or raises our error.

Mutations hit every part of a file: header bytes and length, JSON fields (dtype, shape, offsets,
metadata), tensor bytes (NaN/Inf patterns included), keys (renamed to other formats and families),
truncation and trailing garbage. After a refusal the pipeline must be exactly as before.
"""

from __future__ import annotations

import json
import os
import struct
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diffusion_lora as dl

CASES = int(os.environ.get("DL_FUZZ_CASES", "2000"))

_STATE: dict = {}


def _setup(tmp_dir):
    """One tiny pipeline, a small valid adapter file for it, and the pipeline's base output."""
    if _STATE:
        return _STATE

    pipe = dl.build_tiny_pipeline("tiny-sd15")
    dl.add_lora(pipe, "seed", rank=2, targets=["to_q", "to_v"], text_encoder=True)
    torch.manual_seed(0)
    for module in pipe.unet.modules():
        if hasattr(module, "lora_B") and "seed" in module.lora_B:
            torch.nn.init.normal_(module.lora_B["seed"].weight, std=0.1)
    valid = dl.save_lora(pipe, "seed", tmp_dir / "valid.safetensors").read_bytes()
    dl.remove_lora(pipe, "seed")
    g = torch.Generator().manual_seed(1)
    # A small input keeps each forward pass at a few ms: 2000 cases must fit in a minute.
    inputs = (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]),
              torch.randn(1, 8, pipe.unet.config.cross_attention_dim, generator=g))

    def forward():
        with torch.no_grad():
            return pipe.unet(*inputs).sample

    header_len = struct.unpack("<Q", valid[:8])[0]
    header = json.loads(valid[8 : 8 + header_len])
    _STATE.update(pipe=pipe, valid=valid, forward=forward, base=forward(), modules=_module_count(pipe),
                  header_end=8 + header_len,
                  keys=sorted(k for k in header if k != "__metadata__"), path=tmp_dir / "fuzz.safetensors")
    return _STATE


def _module_count(pipe) -> int:
    return sum(1 for _ in pipe.unet.modules()) + sum(1 for _ in pipe.text_encoder.modules())


def _json_values():
    return st.recursive(
        st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
        max_leaves=5,
    )


KEY_RENAMES = [
    ("unet.", "transformer."), ("unet.", "lora_unet_"), ("lora_A", "lora_down"), ("lora_B", "lora_up"),
    ("lora_A", "lora_B"), ("text_encoder.", "text_encoder_2."), ("to_q", "to_k"), (".weight", ""),
    ("down_blocks.0", "down_blocks.9"), ("unet.", "diffusion_model."), ("lora_A.weight", "hada_w1_a"),
]
MUTATIONS = st.one_of(
    st.tuples(st.just("byte"), st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
    st.tuples(st.just("header-byte"), st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
    st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
    st.tuples(st.just("tensor-bytes"), st.floats(0, 1, exclude_max=True),
              st.sampled_from([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\xff\xff\xff\xff", b"\x00\x00\x80\xff",
                               b"\xff\xff\x7f\x7f", b"\x01\x00\x00\x00"])),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=24)),
    st.tuples(st.just("length"), st.sampled_from([0, 1, 7, 2**31, 2**63, -1])),
    st.tuples(st.just("field"), st.integers(0, 10**6), st.sampled_from(["dtype", "shape", "data_offsets"]),
              _json_values()),
    st.tuples(st.just("dtype"), st.integers(0, 10**6),
              st.sampled_from(["I64", "BOOL", "C64", "F8_E4M3", "F16", "BF16", "F64", "U8", "XX"])),
    st.tuples(st.just("offsets"), st.integers(0, 10**6), st.integers(0, 10**6), st.integers(-8, 8)),
    st.tuples(st.just("rename"), st.integers(0, 10**6), st.sampled_from(KEY_RENAMES)),
    st.tuples(st.just("metadata"), st.sampled_from(["lora_adapter_metadata", "ss_network_dim", "ss_network_alpha",
                                                     "diffusion_lora.trigger_words", "ss_base_model_version"]),
              _json_values(), st.booleans()),
)


def _at(fraction: float, start: int, end: int) -> int:
    return start + int(fraction * (end - start))


def _with_header(data: bytes, change) -> bytes:
    try:
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8 : 8 + n])
        change(header)
        body = json.dumps(header).encode()
        return struct.pack("<Q", len(body)) + body + data[8 + n :]
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, struct.error, RecursionError):
        return data  # an earlier edit broke the header: leave it broken


def _mutate(data: bytes, edit: tuple, keys: list[str], header_end: int) -> bytes:
    kind = edit[0]
    if kind in ("byte", "header-byte", "flip"):
        if not data:  # an earlier edit truncated the file to nothing
            return data
        end = header_end if kind == "header-byte" else len(data)
        i = min(_at(edit[1], 0, end), len(data) - 1)
        value = data[i] ^ (1 << edit[2]) if kind == "flip" else edit[2]
        return data[:i] + bytes([value]) + data[i + 1 :]
    if kind == "tensor-bytes":
        i = _at(edit[1], header_end, max(header_end, len(data) - 4))
        return data[:i] + edit[2] + data[i + len(edit[2]) :]
    if kind == "truncate":
        return data[: _at(edit[1], 0, len(data))]
    if kind == "append":
        return data + edit[1]
    if kind == "length":
        return struct.pack("<Q", edit[1] % 2**64) + data[8:]
    if kind == "metadata":  # a JSON text (what real files hold) or a raw JSON value (not allowed)
        value = json.dumps(edit[2]) if edit[3] else edit[2]
        return _with_header(data, lambda h: h.setdefault("__metadata__", {}).__setitem__(edit[1], value))
    key = keys[edit[1] % len(keys)]
    if kind == "field":
        return _with_header(data, lambda h: h[key].__setitem__(edit[2], edit[3]))
    if kind == "dtype":
        return _with_header(data, lambda h: h[key].__setitem__("dtype", edit[2]))
    if kind == "offsets":
        other = keys[edit[2] % len(keys)]

        def overlap(h):
            begin, end = h[other]["data_offsets"]
            h[key]["data_offsets"] = [max(0, begin + edit[3]), end + edit[3]]

        return _with_header(data, overlap)
    if kind == "rename":
        old, new = edit[2]
        return _with_header(data, lambda h: h.__setitem__(key.replace(old, new), h.pop(key)))
    raise AssertionError(kind)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


_SEEN = {"cases": 0, "loaded": 0, "start": None}


@settings(max_examples=CASES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(edits=st.lists(MUTATIONS, min_size=1, max_size=3))
def test_mutated_adapter_files_load_with_finite_outputs_or_raise_our_error(fuzz_dir, edits):
    s = _setup(fuzz_dir)
    if _SEEN["start"] is None:
        _SEEN["start"] = time.perf_counter()
    data = s["valid"]
    for edit in edits:
        data = _mutate(data, edit, s["keys"], s["header_end"])
    s["path"].write_bytes(data)
    pipe = s["pipe"]
    _SEEN["cases"] += 1
    try:
        dl.load_lora(pipe, s["path"], name="fuzz")
    except dl.DiffusionLoraError:
        assert dl.list_loras(pipe) == [] and _module_count(pipe) == s["modules"]
        if _SEEN["cases"] % 10 == 0:  # the full check costs a forward pass; sample it
            assert torch.equal(s["forward"](), s["base"])
        return
    _SEEN["loaded"] += 1
    try:
        assert torch.isfinite(s["forward"]()).all()
    finally:
        dl.remove_lora(pipe, "fuzz")
    assert torch.equal(s["forward"](), s["base"])


def test_fuzz_ran_every_case_in_time():
    """The fuzz test above ran its 2000 cases (some loading, most refused) within the CI budget."""
    if _SEEN["start"] is None:
        pytest.skip("the fuzz test did not run in this session (deselected)")
    elapsed = time.perf_counter() - _SEEN["start"]
    assert _SEEN["cases"] >= CASES
    assert 0 < _SEEN["loaded"] < _SEEN["cases"]
    print(f"fuzz: {_SEEN['cases']} cases, {_SEEN['loaded']} loaded, {elapsed:.1f} s")
