"""The adapter cache: LRU order, bounds by count and by bytes, pins, reloading changed files, churn without
leftovers, preloaded adapters; and the engine deferring a batch whose adapters do not fit. Sizes and counts
are read from the PEFT layers themselves, not from the cache's own accounting."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import diffusion_lora as dl
from diffusion_lora.errors import AdapterStateError, FormatError
from diffusion_lora.serve import AdapterCache, AdapterRef, Engine, Job

from .serve_files import SIZE, STEPS, lora_params, peft_names, pixels, rewrite_random, solo, write_adapters

NAMES = ["a", "b", "c", "d", "e"]
CHURN = 60


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-cache")
    loras = root / "loras"
    (loras / "churn").mkdir(parents=True)
    paths = write_adapters(loras, NAMES, seed=500, text_encoder=("b",))
    small = write_adapters(root, ["small"], seed=501, targets=["to_q"])["small"]  # churn: 4x fewer layers to load
    for i in range(CHURN):
        rewrite_random(small, loras / "churn" / f"c{i:02d}.safetensors", seed=600 + i)
    big = write_adapters(root, ["big"], seed=502, rank=32)["big"]
    rewrite_random(big, loras / "half.safetensors", seed=503, dtype=torch.float16)  # twice its size when loaded
    shutil.copy(small, loras / "small.safetensors")
    write_adapters(root, ["pre"], seed=700)
    rewrite_random(paths["a"], loras / "pre.safetensors", seed=701)  # a file of the same name: not served
    return loras


@pytest.fixture(scope="module")
def pipe(folder):
    pipe = dl.build_tiny_pipeline("tiny-sd15")
    dl.load_lora(pipe, folder.parent / "pre.safetensors", weight=0.6)
    return pipe


@pytest.fixture
def caches(pipe, folder):
    made = []

    def make(**kw):
        made.append(AdapterCache(pipe, [folder], **kw))
        return made[-1]

    yield make
    for cache in made:
        for entry in cache.entries():
            entry.pins = 0
        cache.clear()
    assert peft_names(pipe) == {"pre"}


def _use(cache, *names):
    for name in names:
        cache.release(cache.acquire(name))


def _bytes(pipe, name):
    """Bytes of adapter ``name``'s tensors, counted from the PEFT layers."""
    total = 0
    for module in [*pipe.unet.modules(), *pipe.text_encoder.modules()]:
        for holder in (getattr(module, "lora_A", {}), getattr(module, "lora_B", {})):
            if name in holder:
                total += sum(p.numel() * p.element_size() for p in holder[name].parameters())
    return total


def _abs_sum(pipe, name):
    return sum(float(holder[name].weight.abs().sum()) for m in [*pipe.unet.modules(), *pipe.text_encoder.modules()]
               for holder in (getattr(m, "lora_A", {}), getattr(m, "lora_B", {})) if name in holder)


def _file_abs_sum(path):
    return sum(float(v.abs().sum()) for v in load_file(str(path)).values() if v.dim() == 2)


def test_lru_order_and_eviction_by_count(caches, pipe):
    cache = caches(max_count=3)
    _use(cache, "a", "b", "c", "a", "d")  # a used again: b is the least recently used when d comes
    assert [e.shown for e in cache.entries()] == ["c", "a", "d"]
    assert (cache.loads, cache.evictions) == (4, 1)
    assert peft_names(pipe) == {"pre"} | {e.loaded_as for e in cache.entries()}


def test_eviction_by_bytes(caches, pipe):
    probe = caches()
    one = _bytes(pipe, probe.acquire("a").loaded_as)
    probe.release(probe.entries()[0])
    probe.clear()
    cache = caches(max_bytes=2 * one + one // 2)  # room for two
    _use(cache, "a", "c", "d")
    assert [e.shown for e in cache.entries()] == ["c", "d"]
    assert cache.nbytes == 2 * one == sum(_bytes(pipe, e.loaded_as) for e in cache.entries())
    small = caches(max_bytes=one // 2)
    with pytest.raises(AdapterStateError, match=r"e\.safetensors.*alone is over cache_bytes"):
        small.acquire("e")
    assert len(small) == 0 and peft_names(pipe) == {"pre"} | {e.loaded_as for e in cache.entries()}


def test_pinned_adapters_are_never_evicted(caches, pipe):
    cache = caches(max_count=2)
    a, b = cache.acquire("a"), cache.acquire("b")  # pinned: a batch is using them
    with pytest.raises(AdapterStateError, match=r"c\.safetensors.*in use"):
        cache.acquire("c")
    assert {a.loaded_as, b.loaded_as} <= peft_names(pipe) and len(cache) == 2
    cache.release(a)
    c = cache.acquire("c")
    assert [e.shown for e in cache.entries()] == ["b", "c"] and a.loaded_as not in peft_names(pipe)
    cache.release(b)
    cache.release(c)


def test_changed_file_is_loaded_again(caches, pipe, folder, tmp_path):
    path = folder / "x.safetensors"
    shutil.copy(folder / "a.safetensors", path)
    try:
        cache = caches()
        _use(cache, "x")
        first = cache.entries()[0]
        assert _abs_sum(pipe, first.loaded_as) == pytest.approx(_file_abs_sum(path), rel=1e-5)

        def rewrite(seed):
            rewrite_random(folder / "a.safetensors", path, seed=seed, std=0.3)
            st = path.stat()
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

        rewrite(801)
        second = cache.acquire("x")
        assert cache.loads == 2 and first.loaded_as not in peft_names(pipe)
        assert _abs_sum(pipe, second.loaded_as) == pytest.approx(_file_abs_sum(path), rel=1e-5)
        # changed while the running batch pins it: that batch keeps its version, the next one reloads
        rewrite(802)
        assert cache.acquire("x") is second and cache.loads == 2
        cache.release(second)
        cache.release(second)
        third = cache.acquire("x")
        cache.release(third)
        assert cache.loads == 3 and third is not second
        assert _abs_sum(pipe, third.loaded_as) == pytest.approx(_file_abs_sum(path), rel=1e-5)
    finally:
        path.unlink()


def test_churn_leaves_no_leftover_tensors(caches, pipe):
    before = lora_params(pipe)
    probe = caches()
    _use(probe, "churn/c00")
    per_adapter = lora_params(pipe) - before
    probe.clear()
    assert per_adapter > 0 and lora_params(pipe) == before
    cache = caches(max_count=4)
    for i in range(CHURN):
        _use(cache, f"churn/c{i:02d}")
    assert len(cache) == 4 and (cache.loads, cache.evictions) == (CHURN, CHURN - 4)
    assert peft_names(pipe) == {"pre"} | {e.loaded_as for e in cache.entries()}
    assert lora_params(pipe) == before + 4 * per_adapter


def test_preloaded_adapter_is_served_by_name_and_never_evicted(caches, pipe):
    cache = caches(max_count=1)
    assert cache.acquire("pre") == "pre" and cache.loads == 0  # the pipe's own, not the file of that name
    _use(cache, "a", "b", "c")
    info = {i.name: i for i in dl.list_loras(pipe)}["pre"]
    assert "pre" in peft_names(pipe) and (info.weight, info.enabled) == (0.6, True)
    assert len(cache) == 1


def test_engine_defers_a_batch_over_the_cache_and_fails_a_job_that_cannot_fit(folder):
    ref = dl.build_tiny_pipeline("tiny-sd15")
    for name in NAMES:
        dl.load_lora(ref, folder / f"{name}.safetensors")
    specs = [("one", 1, [("a", 1.0), ("b", 0.8)]), ("two", 2, [("c", 1.0)], 2), ("three", 3, [("a", -0.5)]),
             ("too many", 4, [("a", 1.0), ("b", 1.0), ("c", 1.0)]), ("four", 5, [("d", 0.7)])]
    pipe = dl.build_tiny_pipeline("tiny-sd15")
    with Engine(pipe, [str(folder)], cache_size=2, max_batch=8, batch_window=0.3) as eng:
        futures = [eng.submit(Job(p, loras=[AdapterRef(*r) for r in refs], steps=STEPS, width=SIZE, height=SIZE,
                                  seed=s, count=(n or [1])[0])) for p, s, refs, *n in specs]
        for (prompt, seed, refs, *count), future in zip(specs, futures):
            if prompt == "too many":
                with pytest.raises(AdapterStateError, match="3 adapters do not fit.*cache_size 2"):
                    future.result(timeout=120)
                continue
            result = future.result(timeout=120)
            assert result.seeds == [seed + i for i in range((count or [1])[0])]  # a deferred job, once
            for image in result.images:
                assert abs(pixels(image.image) - solo(ref, prompt, image.seed, dict(refs))).max() <= 1, prompt
        # batch 1: one and three (a, b pinned; the rest deferred); 2: two and four (too many deferred again, with
        # c pinned); then too many is first in line and, alone, cannot fit: it fails without a pipeline call
        assert eng.batches == 2
        assert all(e.pins == 0 for e in eng.cache.entries()) and len(eng.cache) <= 2
    assert peft_names(pipe) == set()  # close unloaded the cache


def test_engine_byte_bound_fails_only_the_adapter_that_cannot_fit(folder, pipe, caches):
    """half.safetensors is float16 on disk, float32 loaded: its file size says it fits, its real size does not."""
    probe = caches()
    small_bytes, full = (_bytes(pipe, probe.acquire(name).loaded_as) for name in ("small", "half"))
    assert (folder / "half.safetensors").stat().st_size < 0.6 * full and small_bytes < 0.3 * full
    ref = dl.build_tiny_pipeline("tiny-sd15")
    dl.load_lora(ref, folder / "small.safetensors")
    served = dl.build_tiny_pipeline("tiny-sd15")
    with Engine(served, [str(folder)], cache_bytes=int(0.85 * full), max_batch=4, batch_window=0.3) as eng:
        good = eng.submit(Job("fits", loras=[AdapterRef("small", 0.9)], steps=STEPS, width=SIZE, height=SIZE, seed=8))
        bad = eng.submit(Job("too big", loras=[AdapterRef("half")], steps=STEPS, width=SIZE, height=SIZE, seed=9))
        image = good.result(timeout=120).images[0]
        assert abs(pixels(image.image) - solo(ref, "fits", 8, {"small": 0.9})).max() <= 1
        with pytest.raises(AdapterStateError, match=r"half\.safetensors.*alone is over cache_bytes"):
            bad.result(timeout=120)
        assert all(e.pins == 0 for e in eng.cache.entries()) and eng.cache.nbytes <= 0.85 * full
        assert peft_names(served) == {e.loaded_as for e in eng.cache.entries()}


def test_broken_file_is_refused_until_it_changes(caches, folder):
    path = folder / "mended.safetensors"
    path.write_bytes((40).to_bytes(8, "little") + b"\xff" * 40)
    try:
        cache = caches()
        errors = []
        for _ in range(2):  # the second time from memory: same error, nothing loaded
            with pytest.raises(FormatError, match=r"mended\.safetensors") as info:
                cache.acquire("mended")
            errors.append(str(info.value))
        assert errors[0] == errors[1] and cache.loads == 0
        shutil.copy(folder / "a.safetensors", path)  # fixed on disk: another size and time
        cache.release(cache.acquire("mended"))
        assert cache.loads == 1
    finally:
        path.unlink()


def test_internal_names_skip_the_pipes_own_and_a_fused_pipe_is_refused(folder):
    own = dl.build_tiny_pipeline("tiny-sd15")
    dl.load_lora(own, folder / "b.safetensors", name="serve_0")  # say, left by an engine that was not closed
    cache = AdapterCache(own, [folder])
    entry = cache.acquire("a")
    assert entry.loaded_as != "serve_0" and {"serve_0", entry.loaded_as} == peft_names(own)
    assert cache.acquire("serve_0") == "serve_0"  # the pipe's own adapter, served by its name
    cache.release(entry)
    cache.clear()
    dl.fuse(own)
    with pytest.raises(AdapterStateError, match="fused"):
        Engine(own, [str(folder)])
