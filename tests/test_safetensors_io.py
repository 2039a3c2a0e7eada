"""Tests of the safe adapter-file reader/writer and of the file hashes.

Broken files are built by hand (struct + json) so that each test fails if its check is removed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diffusion_lora as dl
from diffusion_lora.formats import safetensors_header
from diffusion_lora.formats.hashes import (
    addnet_hash,
    addnet_hash_of_bytes,
    autov2_hash,
    file_sha256,
    legacy_hash,
    legacy_hash_of_bytes,
)
from diffusion_lora.formats.safetensors_io import (
    data_section_sha256,
    find_non_finite,
    read_adapter_file,
    read_header,
    read_metadata,
    write_adapter_file,
    write_adapter_file_with_hashes,
)

F32_2 = struct.pack("<2f", 1.0, 2.0)  # 8 bytes: one F32 tensor of shape [2]


def raw_file(header: dict | bytes, data: bytes = b"", *, header_len: int | None = None) -> bytes:
    """A safetensors-like file: u64 length, header bytes (JSON-encoded if a dict), data."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(hb) if header_len is None else header_len) + hb + data


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def write(tmp_path: Path, content: bytes, name: str = "adapter.safetensors") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "lora_unet_x.lora_down.weight": torch.randn(2, 4, generator=g),
        "lora_unet_x.lora_up.weight": torch.randn(4, 2, generator=g).to(torch.float16),
        "lora_unet_x.alpha": torch.tensor(2.0),
        "lora_te_y.lora_down.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "lora_te_y.lora_up.weight": torch.randn(5, 3, generator=g).to(torch.float64),
    }


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def raises_naming(exc: type[Exception], *needles: str):
    """pytest.raises that also checks the message names every needle (path, key, ...)."""

    class _Check:
        def __enter__(self):
            self._cm = pytest.raises(exc)
            self.info = self._cm.__enter__()
            return self.info

        def __exit__(self, *args):
            suppressed = self._cm.__exit__(*args)
            message = str(self.info.value)
            for needle in needles:
                assert needle in message, f"{needle!r} not in {message!r}"
            return suppressed

    return _Check()


# --- round trip -------------------------------------------------------------------------------


def test_write_then_read_is_identity(tmp_path):
    tensors, meta = sample_tensors(), {"ss_network_dim": "2", "note": "ünïcode ✓"}
    path = tmp_path / "a.safetensors"
    write_adapter_file(path, tensors, meta)
    got, got_meta = read_adapter_file(path)
    assert_same(got, tensors)
    assert got_meta == meta
    assert read_metadata(path) == meta
    header = read_header(path)
    assert header.tensors["lora_unet_x.lora_up.weight"].dtype == "F16"
    assert header.tensors["lora_te_y.lora_down.weight"].shape == (3, 5)


def test_zero_size_tensor_is_refused_naming_it(tmp_path):
    path = write(tmp_path, raw_file({"w": entry("F32", [2], 0, 8), "hollow": entry("F32", [0, 3], 8, 8)}, b"\0" * 8))
    with raises_naming(dl.FormatError, str(path), "'hollow'", "[0, 3]", "no numbers"):
        read_adapter_file(path)


def test_absurd_tensor_count_is_refused_before_parsing(tmp_path, monkeypatch):
    """1.5 M one-element entries fit a 100 MB header; they are refused by counting, not by parsing."""
    count = safetensors_header.MAX_TENSORS + 1
    header = {f"t{i}": entry("F16", [1], 2 * i, 2 * i + 2) for i in range(count)}
    path = write(tmp_path, raw_file(header, b"\0" * (2 * count)))
    parsed = []
    monkeypatch.setattr(safetensors_header, "_parse_tensor_entry", lambda *a: parsed.append(a))
    with raises_naming(dl.FormatError, str(path), f"{count:,} tensors", f"{safetensors_header.MAX_TENSORS:,}"):
        read_adapter_file(path)
    assert parsed == []  # refused before a single entry was looked at


def test_writer_accepts_views_shared_storage_and_grad_tensors(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    param = torch.nn.Parameter(torch.ones(3))
    tensors = {"t": base.t(), "slice": base[1:3], "same": base, "param": param}
    path = tmp_path / "v.safetensors"
    write_adapter_file(path, tensors, {})
    got, _ = read_adapter_file(path)
    assert_same(got, {k: v.detach() for k, v in tensors.items()})


def test_file_without_metadata_reads_empty_metadata(tmp_path):
    path = write(tmp_path, raw_file({"w": entry("F32", [2], 0, 8)}, F32_2))
    tensors, meta = read_adapter_file(path)
    assert meta == {} and read_metadata(path) == {}
    assert tensors["w"].tolist() == [1.0, 2.0]


def test_rewriting_the_file_read_from_keeps_read_tensors_valid(tmp_path):
    path = tmp_path / "a.safetensors"
    write_adapter_file(path, {"w": torch.ones(1000)}, {})
    got, _ = read_adapter_file(path)
    write_adapter_file(path, {"w": torch.zeros(1000)}, {})
    assert torch.equal(got["w"], torch.ones(1000))
    assert torch.equal(read_adapter_file(path)[0]["w"], torch.zeros(1000))


def test_header_length_that_looks_like_pickle_magic_still_reads(tmp_path):
    # 0x0280 = 640 makes the file start with b"\x80\x02", pickle protocol 2's first two bytes.
    header = json.dumps({"w": entry("F32", [2], 0, 8)}).encode()
    header += b" " * (640 - len(header))
    path = write(tmp_path, raw_file(header, F32_2))
    assert path.read_bytes()[:2] == b"\x80\x02"
    assert read_adapter_file(path)[0]["w"].tolist() == [1.0, 2.0]


def test_find_non_finite_names_only_bad_tensors():
    tensors = {
        "ok": torch.ones(3),
        "nan": torch.tensor([1.0, float("nan")]),
        "inf": torch.tensor([float("-inf")], dtype=torch.float16),
        "bf_ok": torch.ones(2, dtype=torch.bfloat16),
    }
    assert find_non_finite(tensors) == ["nan", "inf"]


# --- files that are not safetensors -----------------------------------------------------------


def test_missing_path(tmp_path):
    path = tmp_path / "nope.safetensors"
    with raises_naming(dl.FormatError, str(path), "no such file"):
        read_adapter_file(path)


def test_directory_path(tmp_path):
    with raises_naming(dl.FormatError, str(tmp_path), "directory"):
        read_adapter_file(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with raises_naming(dl.FormatError, str(fifo), "not a regular file"):
        read_adapter_file(fifo)


def test_empty_file(tmp_path):
    path = write(tmp_path, b"")
    with raises_naming(dl.FormatError, str(path), "empty"):
        read_adapter_file(path)


def test_file_shorter_than_length_prefix(tmp_path):
    path = write(tmp_path, b"\x01\x00\x00")
    with raises_naming(dl.FormatError, str(path), "too short"):
        read_adapter_file(path)


def test_header_length_beyond_file_size(tmp_path):
    path = write(tmp_path, raw_file({"w": entry("F32", [2], 0, 8)}, F32_2, header_len=10_000))
    with raises_naming(dl.FormatError, str(path), "10000-byte header", "truncated"):
        read_adapter_file(path)


def test_header_length_beyond_cap(tmp_path):
    huge = write(tmp_path, raw_file(b"{}", header_len=2**40), "huge.safetensors")
    # The declared length is the file's first 8 bytes: an error never echoes them, as a number either.
    with raises_naming(dl.FormatError, str(huge), "first 8 bytes", "limit"):
        read_adapter_file(huge)
    valid = write(tmp_path, raw_file({"w": entry("F32", [2], 0, 8)}, F32_2))
    with raises_naming(dl.FormatError, str(valid), "16-byte limit"):
        read_adapter_file(valid, max_header_bytes=16)


def test_non_json_header(tmp_path):
    path = write(tmp_path, raw_file(b'{"w": not json}', b""))
    with raises_naming(dl.FormatError, str(path), "not valid JSON"):
        read_adapter_file(path)
    other = write(tmp_path, raw_file(b"hello, world", b""), "other.safetensors")
    with raises_naming(dl.FormatError, str(other), "does not start with '{'"):
        read_adapter_file(other)


def test_non_utf8_header(tmp_path):
    path = write(tmp_path, raw_file(b'{"w\xff\xfe": 1}', b""))
    with raises_naming(dl.FormatError, str(path), "UTF-8"):
        read_adapter_file(path)


def test_header_that_is_not_an_object(tmp_path):
    path = write(tmp_path, raw_file(b"{}", b""))  # an empty object is a valid, empty file
    assert read_adapter_file(path) == ({}, {})
    array = write(tmp_path, raw_file(b' ["w"]', b""), "array.safetensors")
    with raises_naming(dl.FormatError, str(array)):
        read_adapter_file(array)


def test_deeply_nested_header_is_a_format_error(tmp_path):
    path = write(tmp_path, raw_file(b'{"w": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b""))
    with raises_naming(dl.FormatError, str(path), "JSON"):
        read_adapter_file(path)


def test_duplicate_tensor_key(tmp_path):
    header = b'{"w": ' + json.dumps(entry("F32", [2], 0, 8)).encode()
    header += b', "w": ' + json.dumps(entry("F32", [2], 0, 8)).encode() + b"}"
    path = write(tmp_path, raw_file(header, F32_2))
    with raises_naming(dl.FormatError, str(path), "'w' twice"):
        read_adapter_file(path)


@pytest.mark.parametrize("value", [1, 1.5, None, ["a"], {"x": "y"}, True])
def test_metadata_with_non_string_value(tmp_path, value):
    header = {"__metadata__": {"fine": "ok", "ss_network_dim": value}, "w": entry("F32", [2], 0, 8)}
    path = write(tmp_path, raw_file(header, F32_2))
    with raises_naming(dl.FormatError, str(path), "'ss_network_dim'"):
        read_adapter_file(path)
    with raises_naming(dl.FormatError, str(path), "'ss_network_dim'"):
        read_metadata(path)


def test_metadata_that_is_not_an_object(tmp_path):
    path = write(tmp_path, raw_file({"__metadata__": ["a", "b"]}))
    with raises_naming(dl.FormatError, str(path), "__metadata__"):
        read_metadata(path)


def test_overlapping_offsets(tmp_path):
    header = {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}
    path = write(tmp_path, raw_file(header, F32_2 + F32_2[:4]))
    with raises_naming(dl.FormatError, str(path), "'b'", "overlaps", "'a'"):
        read_adapter_file(path)


def test_gap_in_offsets(tmp_path):
    header = {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 12, 20)}
    path = write(tmp_path, raw_file(header, F32_2 + b"\0" * 4 + F32_2))
    with raises_naming(dl.FormatError, str(path), "'b'", "gap"):
        read_adapter_file(path)


def test_data_not_starting_at_zero_is_a_gap(tmp_path):
    path = write(tmp_path, raw_file({"a": entry("F32", [2], 8, 16)}, F32_2 + F32_2))
    with raises_naming(dl.FormatError, str(path), "'a'", "gap"):
        read_adapter_file(path)


def test_trailing_garbage(tmp_path):
    path = write(tmp_path, raw_file({"w": entry("F32", [2], 0, 8)}, F32_2 + b"junk"))
    with raises_naming(dl.FormatError, str(path), "4 bytes of trailing garbage"):
        read_adapter_file(path)


def test_truncated_data(tmp_path):
    path = write(tmp_path, raw_file({"w": entry("F32", [2], 0, 8)}, F32_2[:5]))
    with raises_naming(dl.FormatError, str(path), "truncated", "8 bytes", "5"):
        read_adapter_file(path)


def test_offsets_that_do_not_match_shape(tmp_path):
    path = write(tmp_path, raw_file({"w": entry("F32", [3], 0, 8)}, F32_2))
    with raises_naming(dl.FormatError, str(path), "'w'", "needs 12"):
        read_adapter_file(path)


@pytest.mark.parametrize("shape", [[-1], [2.0], "2", [True, 2], None])
def test_bad_shape(tmp_path, shape):
    path = write(tmp_path, raw_file({"w": entry("F32", shape, 0, 8)}, F32_2))
    with raises_naming(dl.FormatError, str(path), "'w'", "shape"):
        read_adapter_file(path)


@pytest.mark.parametrize("dtype", ["I32", "I64", "BOOL", "U8", "F8_E4M3", "C64"])
def test_non_float_dtype_is_refused(tmp_path, dtype):
    path = write(tmp_path, raw_file({"lora.weight": entry(dtype, [8], 0, 8)}, bytes(8)))
    with raises_naming(dl.FormatError, str(path), "'lora.weight'", dtype, "floating point"):
        read_adapter_file(path)


def test_unknown_dtype(tmp_path):
    path = write(tmp_path, raw_file({"w": entry("F128", [1], 0, 16)}, bytes(16)))
    with raises_naming(dl.FormatError, str(path), "'w'", "unknown dtype 'F128'"):
        read_adapter_file(path)


@pytest.mark.parametrize(
    "page", [b"<!DOCTYPE html>\n<html><body>Sign in</body></html>", b"\n  <html lang=en>...</html>"]
)
def test_html_page_saved_as_safetensors(tmp_path, page):
    path = write(tmp_path, page)
    with raises_naming(dl.FormatError, str(path), "HTML page", "/resolve/"):
        read_adapter_file(path)


def test_git_lfs_pointer(tmp_path):
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"a" * 64 + b"\nsize 151108832\n"
    path = write(tmp_path, pointer)
    with raises_naming(dl.FormatError, str(path), "git-lfs pointer", "git lfs pull"):
        read_adapter_file(path, allow_pickle=True)


def test_json_document_is_explained(tmp_path):
    path = write(tmp_path, b'{"error": "Repository not found"}')
    with raises_naming(dl.FormatError, str(path), "JSON document"):
        read_adapter_file(path)


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy-pickle"])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_torch_save_checkpoint_is_refused_then_allowed(tmp_path, zipfile, suffix):
    tensors = {"a.lora_down.weight": torch.randn(2, 3), "a.alpha": torch.tensor(1.0, dtype=torch.float16)}
    path = tmp_path / f"adapter{suffix}"
    torch.save(tensors, path, _use_new_zipfile_serialization=zipfile)
    with raises_naming(dl.UnsafeFileError, str(path), "execute", "allow_pickle=True", "convert"):
        read_adapter_file(path)
    got, meta = read_adapter_file(path, allow_pickle=True)
    assert_same(got, tensors)
    assert meta == {}


def test_pickle_with_state_dict_key(tmp_path):
    tensors = {"w": torch.ones(2, 2)}
    path = tmp_path / "adapter.ckpt"
    torch.save({"state_dict": tensors, "epoch": 3}, path)
    got, _ = read_adapter_file(path, allow_pickle=True)
    assert_same(got, tensors)


@pytest.mark.parametrize(
    "content, needle",
    [
        ({"w": torch.ones(2), "epoch": 3}, "'epoch'"),
        ([torch.ones(2)], "list"),
        ({"w": torch.ones(2, dtype=torch.int32)}, "'w'"),
    ],
)
def test_pickle_that_is_not_a_flat_float_tensor_dict(tmp_path, content, needle):
    path = tmp_path / "adapter.pt"
    torch.save(content, path)
    with raises_naming(dl.FormatError, str(path), needle):
        read_adapter_file(path, allow_pickle=True)


class _Evil:
    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_not_run_even_when_allowed(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = str(marker)
    path = write(tmp_path, pickle.dumps({"w": evil}, protocol=2), "evil.bin")
    with raises_naming(dl.UnsafeFileError, str(path)):
        read_adapter_file(path)
    with raises_naming(dl.FormatError, str(path), "torch checkpoint"):
        read_adapter_file(path, allow_pickle=True)
    assert not marker.exists()


def test_pickle_suffix_with_garbage_content(tmp_path):
    path = write(tmp_path, b"\x00garbage garbage garbage", "adapter.pth")
    with raises_naming(dl.FormatError, str(path)):
        read_adapter_file(path, allow_pickle=True)


# --- atomic writing ---------------------------------------------------------------------------


def _old_file(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "adapter.safetensors"
    write_adapter_file(path, {"w": torch.ones(4)}, {"version": "old"})
    return path, path.read_bytes()


def _assert_untouched(tmp_path: Path, path: Path, old: bytes) -> None:
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name], "temp file left behind"


def test_failed_replace_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path, old = _old_file(tmp_path)

    def failing_replace(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied", str(dst))

    monkeypatch.setattr(os, "replace", failing_replace)
    with raises_naming(dl.FormatError, str(path), "Permission denied"):
        write_adapter_file(path, {"w": torch.zeros(4)}, {"version": "new"})
    monkeypatch.undo()
    _assert_untouched(tmp_path, path, old)


def test_disk_full_at_fsync_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path, old = _old_file(tmp_path)

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with raises_naming(dl.FormatError, str(path), "No space left"):
        write_adapter_file(path, {"w": torch.zeros(4)}, {})
    monkeypatch.undo()
    _assert_untouched(tmp_path, path, old)


def test_interrupt_midway_is_reraised_and_cleaned_up(tmp_path, monkeypatch):
    path, old = _old_file(tmp_path)
    written = []

    def interrupted(fd):
        written.append(os.fstat(fd).st_size)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_adapter_file(path, {"w": torch.zeros(4)}, {})
    monkeypatch.undo()
    assert written and written[0] > 0, "the temp file existed and held data when interrupted"
    _assert_untouched(tmp_path, path, old)


@pytest.mark.parametrize(
    "tensors, needle",
    [
        ({"w": torch.zeros(4), "bad": [1.0, 2.0]}, "'bad'"),
        ({"w": torch.zeros(4, dtype=torch.int64)}, "'w'"),
        ({"w": torch.zeros(4, dtype=torch.bool)}, "'w'"),
        ({"__metadata__": torch.zeros(4)}, "'__metadata__'"),
    ],
)
def test_bad_tensors_are_refused_before_writing(tmp_path, tensors, needle):
    path, old = _old_file(tmp_path)
    with raises_naming(dl.FormatError, str(path), needle):
        write_adapter_file(path, tensors, {})
    _assert_untouched(tmp_path, path, old)


def test_non_string_metadata_value_is_refused(tmp_path):
    path, old = _old_file(tmp_path)
    with raises_naming(dl.FormatError, str(path), "'ss_network_dim'"):
        write_adapter_file(path, {"w": torch.zeros(4)}, {"ss_network_dim": 4})  # type: ignore[dict-item]
    _assert_untouched(tmp_path, path, old)


def test_missing_parent_folder(tmp_path):
    path = tmp_path / "no" / "such" / "adapter.safetensors"
    with raises_naming(dl.FormatError, str(path)):
        write_adapter_file(path, {"w": torch.zeros(4)}, {})
    assert list(tmp_path.iterdir()) == []


def test_target_is_a_directory(tmp_path):
    with raises_naming(dl.FormatError, str(tmp_path), "directory"):
        write_adapter_file(tmp_path, {"w": torch.zeros(4)}, {})


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_permissions_follow_umask_for_new_files_and_are_kept_for_existing(tmp_path):
    umask = os.umask(0o022)
    try:
        new = tmp_path / "new.safetensors"
        write_adapter_file(new, {"w": torch.zeros(1)}, {})
        assert new.stat().st_mode & 0o777 == 0o644
        new.chmod(0o600)
        write_adapter_file(new, {"w": torch.ones(1)}, {})
        assert new.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(umask)


# --- hashes -----------------------------------------------------------------------------------


def _by_hand(path: Path) -> tuple[str, str]:
    data = path.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    return hashlib.sha256(data[8 + header_len :]).hexdigest(), hashlib.sha256(data).hexdigest()


def test_hashes_match_independent_computation(tmp_path):
    path = tmp_path / "a.safetensors"
    write_adapter_file(path, sample_tensors(), {"ss_output_name": "a"})
    data_hash, whole_hash = _by_hand(path)
    assert addnet_hash(path) == data_hash
    assert file_sha256(path) == whole_hash
    assert autov2_hash(path) == whole_hash[:10]
    assert addnet_hash_of_bytes(path.read_bytes()) == data_hash


def test_hashes_stream_files_larger_than_a_chunk(tmp_path):
    path = tmp_path / "big.safetensors"
    write_adapter_file(path, {"w": torch.randn(700_000)}, {"k": "v"})  # 2.8 MB: several 1 MiB chunks
    data = path.read_bytes()
    assert (addnet_hash(path), file_sha256(path)) == _by_hand(path)
    assert legacy_hash(path) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert legacy_hash_of_bytes(data) == legacy_hash(path)


def test_data_hash_ignores_metadata_but_file_hash_does_not(tmp_path):
    tensors = sample_tensors()
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_adapter_file(a, tensors, {"title": "one"})
    write_adapter_file(b, tensors, {"title": "a much longer title", "extra": "x" * 1000})
    assert addnet_hash(a) == addnet_hash(b)
    assert file_sha256(a) != file_sha256(b)


def test_data_section_sha256_predicts_the_written_file(tmp_path):
    # Mixed dtypes and names out of order: the data order is safetensors' choice, not insertion order.
    g = torch.Generator().manual_seed(1)
    tensors = {
        f"{name}.{i}": torch.randn(i + 1, generator=g).to(dtype)
        for i, (name, dtype) in enumerate(
            [("z", torch.float16), ("a", torch.float64), ("m", torch.bfloat16), ("b", torch.float32)] * 3
        )
    }
    path = tmp_path / "a.safetensors"
    write_adapter_file(path, tensors, {"anything": "here"})
    assert data_section_sha256(tensors) == addnet_hash(path) == _by_hand(path)[0]


def test_write_with_hashes_stores_kohya_hashes(tmp_path):
    tensors = sample_tensors()
    meta = {"ss_network_dim": "2", "user_title": "mine", "sshs_model_hash": "stale"}
    path = tmp_path / "a.safetensors"
    written = write_adapter_file_with_hashes(path, tensors, meta)
    assert read_metadata(path) == written
    assert written["sshs_model_hash"] == addnet_hash(path) == _by_hand(path)[0]
    # kohya hashes a serialization that keeps only ss_* metadata (the legacy hash depends on it).
    kohya_bytes = safetensors.torch.save(tensors, {"ss_network_dim": "2"})
    assert written["sshs_legacy_hash"] == hashlib.sha256(kohya_bytes[0x100000:0x110000]).hexdigest()[:8]
    assert meta["sshs_model_hash"] == "stale", "caller's dict must not be modified"
    assert_same(read_adapter_file(path)[0], tensors)


def test_hash_errors_name_the_path(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with raises_naming(dl.FormatError, str(missing)):
        file_sha256(missing)
    short = write(tmp_path, raw_file(b"{}", header_len=999))
    with raises_naming(dl.FormatError, str(short), "999-byte header"):
        addnet_hash(short)


# --- fuzzing ----------------------------------------------------------------------------------


def _valid_bytes() -> bytes:
    tensors = {
        "lora_unet_a.lora_down.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "lora_unet_a.lora_up.weight": torch.arange(4, dtype=torch.float16).reshape(2, 2),
        "lora_unet_a.alpha": torch.tensor(2.0, dtype=torch.bfloat16),
    }
    return safetensors.torch.save(tensors, {"ss_network_dim": "2", "ss_network_alpha": "2"})


VALID = _valid_bytes()
_HEADER_END = 8 + struct.unpack("<Q", VALID[:8])[0]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
byte_edit = st.tuples(st.just("set"), st.integers(0, len(VALID) - 1), st.integers(0, 255))
header_edit = st.tuples(st.just("set"), st.integers(0, _HEADER_END - 1), st.integers(0, 255))
flip = st.tuples(st.just("flip"), st.integers(0, len(VALID) - 1), st.integers(0, 7))
truncate = st.tuples(st.just("truncate"), st.integers(0, len(VALID)))
append = st.tuples(st.just("append"), st.binary(min_size=1, max_size=32))
json_edit = st.tuples(
    st.just("json"),
    st.sampled_from(["__metadata__", "lora_unet_a.lora_down.weight", "lora_unet_a.alpha", "new"]),
    st.sampled_from([None, "dtype", "shape", "data_offsets", "ss_network_dim"]),
    json_values,
)
mutation = st.one_of(byte_edit, header_edit, flip, truncate, append, json_edit)


def _mutate(data: bytes, edit: tuple) -> bytes:
    kind = edit[0]
    if kind == "set" and edit[1] < len(data):
        return data[: edit[1]] + bytes([edit[2]]) + data[edit[1] + 1 :]
    if kind == "flip" and edit[1] < len(data):
        return data[: edit[1]] + bytes([data[edit[1]] ^ (1 << edit[2])]) + data[edit[1] + 1 :]
    if kind == "truncate":
        return data[: edit[1]]
    if kind == "append":
        return data + edit[1]
    if kind == "json":
        return _edit_json(data, *edit[1:])
    return data


def _edit_json(data: bytes, key: str, field: str | None, value: object) -> bytes:
    try:
        header_len = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8 : 8 + header_len])
        if field is None or not isinstance(header.get(key), dict):
            header[key] = value
        else:
            header[key][field] = value
        return raw_file(json.dumps(header).encode(), data[8 + header_len :])
    except (ValueError, TypeError, AttributeError, struct.error):
        return data  # an earlier edit broke the header; leave it broken


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(mutation, min_size=1, max_size=4))
def test_fuzzed_files_load_or_raise_format_error(tmp_path_factory, edits):
    data = VALID
    for edit in edits:
        data = _mutate(data, edit)
    path = tmp_path_factory.getbasetemp() / "fuzz.safetensors"
    path.write_bytes(data)
    try:
        tensors, meta = read_adapter_file(path)
    except dl.FormatError:
        return
    assert all(t.dtype in safetensors_header.FLOAT_DTYPES.values() for t in tensors.values())
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert read_metadata(path) == meta
