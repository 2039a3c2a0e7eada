"""The one reader of small JSON files from users' folders (PEFT adapter_config.json, a model folder's
model_index.json and config.json): bounded, FIFO-safe, and every failure an error naming the file."""

from __future__ import annotations

import os
import tracemalloc

import pytest

import diffusion_lora as dl
from diffusion_lora.formats.json_text import read_json_object
from diffusion_lora.tools.base_keys import folder_keys


def test_a_small_object_is_read(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"a": [1, 2], "b": "x"}')
    assert read_json_object(path, max_bytes=100) == {"a": [1, 2], "b": "x"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"[1, 2]", "must hold a JSON object"),
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "more than the 1,000 a model config may have"),
    ],
    ids=["array", "syntax", "not-utf8", "too-big"],
)
def test_bad_content_is_the_callers_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(dl.ModelLoadError, match=message) as info:
        read_json_object(path, max_bytes=1000, error=dl.ModelLoadError, what="model config")
    assert str(path) in str(info.value)


def test_a_huge_sparse_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "model_index.json"
    with open(path, "wb") as f:
        f.truncate(256 * 2**20)
    tracemalloc.start()
    try:
        with pytest.raises(dl.FormatError, match="268,435,456 bytes, more than the 1,048,576 a x may have; advice"):
            read_json_object(path, max_bytes=2**20, what="x", too_big="advice")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"{peak:,} bytes allocated to refuse it"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_is_refused_without_hanging(tmp_path):
    path = tmp_path / "model_index.json"
    os.mkfifo(path)
    with pytest.raises(dl.ModelLoadError, match="not a regular file"):
        read_json_object(path, max_bytes=1000, error=dl.ModelLoadError)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_model_folder_with_a_fifo_model_index_is_refused_by_the_tools(tmp_path):
    """The tools read a base model folder's model_index.json (folder_keys) with this reader."""
    os.mkfifo(tmp_path / "model_index.json")
    with pytest.raises(dl.ModelLoadError, match="model_index.json: not a regular file"):
        folder_keys(tmp_path)
