"""Engine.pin/unpin (what the Ray front end holds per routed stack): a pinned adapter outlives cache pressure."""

from __future__ import annotations

import pytest

import diffusion_lora as dl
from diffusion_lora.errors import ServerClosedError
from diffusion_lora.serve import Engine, Job

from .helpers import randomize


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pin-loras")
    pipe = dl.build_tiny_pipeline("tiny-sd15")
    for i, name in enumerate(("a", "b", "c")):
        dl.add_lora(pipe, name, rank=2, alpha=2)
        randomize(pipe, name, seed=90 + i, std=0.1)
        dl.save_lora(pipe, name, folder / f"{name}.safetensors")
    with Engine(dl.build_tiny_pipeline("tiny-sd15"), [str(folder)], cache_size=2, max_batch=1) as eng:
        yield eng


def _cached(engine):
    return {e.shown: e.pins for e in engine.cache.entries()}


def _job(name):
    return Job(f"a dot <lora:{name}:1>", steps=1, width=32, height=32)


def test_pinned_adapter_survives_eviction_until_unpinned(engine):
    pins = engine.pin(["a"]).result(timeout=60)
    assert _cached(engine) == {"a": 1}
    engine.generate(_job("b"), timeout=60)
    engine.generate(_job("c"), timeout=60)  # room for c: b goes (LRU and unpinned), a stays
    assert _cached(engine) == {"a": 1, "c": 0} and engine.cache.evictions == 1
    engine.unpin(pins).result(timeout=60)
    engine.generate(_job("b"), timeout=60)  # now a is the least recently used unpinned adapter
    assert _cached(engine) == {"c": 0, "b": 0}


def test_pin_is_all_or_nothing_and_refused_after_close(engine):
    with pytest.raises(dl.ConfigError, match="nothere"):
        engine.pin(["b", "nothere"]).result(timeout=60)
    assert all(pins == 0 for pins in _cached(engine).values())
    engine.close()
    with pytest.raises(ServerClosedError):
        engine.pin(["b"])
