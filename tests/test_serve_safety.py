"""The engine's safety (issue 16, item 4): names stay inside the adapter folders, pickles never load, a hostile
adapter fails only its own job, no request changes another's adapters or weights, every limit answers before
the queue, a full queue is busy, close drains or rejects, the worker survives a failing batch, DoRA is batched
apart. Every served image is compared with the same stack and seed generated alone (``set_weights``) on
another pipeline."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import diffusion_lora as dl
from diffusion_lora.errors import (
    AdapterStateError,
    ConfigError,
    DiffusionLoraError,
    FormatError,
    RequestLimitError,
    ServerBusyError,
    ServerClosedError,
    UnsafeFileError,
)
from diffusion_lora.serve import AdapterRef, Engine, Job, ServeLimits

from .serve_files import (
    SIZE,
    STEPS,
    other_family_adapter,
    peft_names,
    pixels,
    solo,
    weight_of,
    write_adapters,
    write_hostile,
)

GOOD = [f"g{i}" for i in range(6)]
PRE_WEIGHT = 0.7


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-safety")
    loras, loras2, outside = root / "loras", root / "loras2", root / "outside"
    for folder in (loras, loras2, outside):
        folder.mkdir()
    paths = write_adapters(loras, GOOD, seed=100, text_encoder=("g1", "g3", "g5"))
    write_adapters(loras, ["dora"], seed=200, dora=("dora",))
    write_adapters(outside, ["pre", "secret"], seed=300, text_encoder=("pre",))
    (loras2 / "dup.safetensors").write_bytes(paths["g0"].read_bytes())
    (loras / "dup.safetensors").write_bytes(paths["g1"].read_bytes())
    (loras / "escape.safetensors").symlink_to(outside / "secret.safetensors")
    marker = root / "pickle-was-loaded"
    hostile = write_hostile(loras, paths["g0"], marker, other_family_adapter(outside / "flux.safetensors"))
    return {"loras": loras, "loras2": loras2, "outside": outside, "marker": marker, "hostile": hostile}


@pytest.fixture(scope="module")
def engine(files):
    pipe = dl.build_tiny_pipeline("tiny-sd15")
    dl.load_lora(pipe, files["outside"] / "pre.safetensors", weight=PRE_WEIGHT)  # the operator's --lora
    with Engine(pipe, [str(files["loras"]), str(files["loras2"])], max_batch=16, batch_window=0.3) as eng:
        yield eng


@pytest.fixture(scope="module")
def ref(files):
    """The reference pipeline: the same adapters loaded by name, each image made alone."""
    pipe = dl.build_tiny_pipeline("tiny-sd15")
    for name in GOOD + ["dora"]:
        dl.load_lora(pipe, files["loras"] / f"{name}.safetensors")
    dl.load_lora(pipe, files["outside"] / "pre.safetensors")
    return pipe


def _job(prompt, seed, refs=(), **kw):
    return Job(prompt, loras=[AdapterRef(*r) for r in refs], steps=STEPS, width=SIZE, height=SIZE, seed=seed, **kw)


def _stack(refs):
    return {name: weight_of(w, te) for name, w, te in ((r + (None,))[:3] for r in refs)}


def _pre_record(pipe):
    info = {i.name: i for i in dl.list_loras(pipe)}["pre"]
    return info.weight, info.enabled


def _base_weights(pipe):
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder")
            for k, v in getattr(pipe, c).state_dict().items() if "lora_" not in k}


def test_names_outside_the_folders_are_refused(engine, files):
    loads, names = engine.cache.loads, peft_names(engine.pipe)
    for name in ("../x", "sub/../../outside/secret", "/etc/passwd", str(files["outside"] / "secret"), "C:\\x",
                 "C:x", "\\\\server\\share\\x", "a\0b"):
        with pytest.raises(ConfigError, match="adapter name"):
            AdapterRef(name)
    for tag in ("<lora:../outside/secret:1>", "<lora:/etc/passwd:1>", "<lora:..\\outside\\secret:1>"):
        with pytest.raises(ConfigError, match="without '..'"):
            engine.submit(_job(f"a cat {tag}", 1))
    # found on disk but refused: a symlink leading out, a name in two folders, a missing name
    futures = {name: engine.submit(_job("a cat", 1, [(name, 1.0)])) for name in ("escape", "dup", "nope")}
    for name, why in (("escape", "leads outside"), ("dup", "ambiguous"), ("nope", "no file")):
        with pytest.raises(ConfigError, match=why) as info:
            futures[name].result(timeout=60)
        assert f"<lora:{name}:" in str(info.value)
    assert engine.cache.loads == loads and peft_names(engine.pipe) == names  # nothing was loaded


def test_pickles_never_load(engine, files):
    futures = {name: engine.submit(_job("a cat", 2, [(name, 1.0)]))
               for name in ("evil", "evil.ckpt", "evil.pt", "evil.bin", "pickled", "zipped")}
    for name in ("evil", "evil.ckpt", "evil.pt", "evil.bin"):  # only .safetensors files are ever resolved
        with pytest.raises(ConfigError, match="no file"):
            futures[name].result(timeout=60)
    with pytest.raises(UnsafeFileError, match="pickled.safetensors"):
        futures["pickled"].result(timeout=60)
    with pytest.raises(FormatError, match="zipped.safetensors"):
        futures["zipped"].result(timeout=60)
    assert not files["marker"].exists()


def test_hostile_adapter_fails_only_its_job(engine, files, ref):
    hostile = files["hostile"]
    names_before, pre_before, batches = peft_names(engine.pipe), _pre_record(engine.pipe), engine.batches
    good = [("a red circle", 21, [("g0", 0.8)]), ("a blue square", 22, [("g1", 1.0, 0.5), ("g2", -0.6)]),
            ("a green cube", 23, [])]
    futures = [engine.submit(_job(p, s, r)) for p, s, r in good]
    bad = {name: engine.submit(_job("a cat", 30, [("g3", 1.0), (name, 1.0)])) for name in hostile}
    for name, future in bad.items():
        with pytest.raises(DiffusionLoraError) as info:
            future.result(timeout=120)
        assert f"{name}.safetensors" in str(info.value), (hostile[name], str(info.value))
    for (prompt, seed, refs), future in zip(good, futures):
        served = pixels(future.result(timeout=120).images[0].image)
        assert abs(served - solo(ref, prompt, seed, _stack(refs))).max() <= 1
    assert engine.batches == batches + 1  # the good jobs ran together in the batch the hostile ones were in
    cached = {e.loaded_as for e in engine.cache.entries()}
    assert peft_names(engine.pipe) == {"pre"} | cached and names_before <= peft_names(engine.pipe)
    assert len(cached) <= len(GOOD)  # only good adapters were kept
    assert _pre_record(engine.pipe) == pre_before
    assert not files["marker"].exists()


def test_concurrent_random_stacks_each_get_their_own(engine, ref):
    rng = random.Random(7)
    jobs = []
    for i in range(24):
        names = rng.sample(GOOD + ["pre"], rng.randint(0, 3))
        refs = [(n, rng.choice((-1, 1)) * rng.uniform(0.5, 1.2),
                 rng.choice((None, rng.uniform(-1.0, 1.5)))) for n in names]
        negative = "blurry" if i % 5 == 0 else ""
        jobs.append((f"prompt number {i}", 1000 + 3 * i, refs, rng.choice((1, 1, 1, 2)), negative))
    same = [("the same stack", 90 + i, [("g4", 0.9), ("pre", 0.4)], 1, "") for i in range(3)]
    pre_before, base_before = _pre_record(engine.pipe), _base_weights(engine.pipe)

    def submit(spec):
        prompt, seed, refs, count, negative = spec
        return engine.generate(_job(prompt, seed, refs, count=count, negative_prompt=negative), timeout=300)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(submit, jobs))
    batches = engine.batches
    results += [f.result(timeout=120) for f in [engine.submit(_job(p, s, r)) for p, s, r, _, _ in same]]
    assert engine.batches == batches + 1  # the identical stacks ran as one batch (PEFT's own path)
    base = solo(ref, "the same stack", 90, {})
    for (prompt, seed, refs, count, negative), result in zip(jobs + same, results):
        assert result.seeds == [seed + i for i in range(count)]
        for image in result.images:
            expected = solo(ref, prompt, image.seed, _stack(refs), negative or None)
            assert abs(pixels(image.image) - expected).max() <= 1, (prompt, refs)
    assert abs(pixels(results[len(jobs)].images[0].image) - base).max() > 8  # the adapters do change the image
    assert _pre_record(engine.pipe) == pre_before
    after = _base_weights(engine.pipe)
    assert all(torch.equal(after[k], v) for k, v in base_before.items())


def test_dora_runs_in_its_own_batch(engine, ref):
    specs = [("plain one", 41, [("g0", 1.0)]), ("with dora", 42, [("dora", 0.9)]), ("plain two", 43, [("g2", -0.7)]),
             ("dora and lora", 44, [("dora", 1.0), ("g1", 0.5)])]
    batches = engine.batches
    futures = [engine.submit(_job(p, s, r)) for p, s, r in specs]
    for (prompt, seed, refs), future in zip(specs, futures):
        served = pixels(future.result(timeout=120).images[0].image)
        assert abs(served - solo(ref, prompt, seed, _stack(refs))).max() <= 1, prompt
    assert engine.batches == batches + 3  # the plain ones together, each DoRA stack alone


# -- limits, the queue, shutdown, a failing batch -------------------------------------------------------------

LIMITS = ServeLimits(max_steps=5, max_pixels=48 * 48, max_images=3, max_adapters=2, max_prompt_chars=60, max_queue=4)


class Gate:
    """Holds the denoiser's first call until opened, or makes it fail once (a fault in the pipeline call)."""

    def __init__(self, pipe):
        self.open, self.entered, self.fail = threading.Event(), threading.Event(), False
        pipe.unet.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.entered.set()
        assert self.open.wait(60)
        if self.fail:
            self.fail = False
            raise RuntimeError("injected fault in the denoiser")


@pytest.fixture
def gated(files):
    pipe = dl.build_tiny_pipeline("tiny-sd15")
    gate = Gate(pipe)
    eng = Engine(pipe, [str(files["loras"])], limits=LIMITS, max_batch=1, batch_window=0)
    yield eng, gate
    gate.open.set()
    eng.close(drain=False)


@pytest.mark.parametrize("field, job", [
    ("max_steps", dict(steps=6)),
    ("max_pixels", dict(width=56, height=48)),
    ("max_images", dict(count=4)),
    ("max_adapters", dict(prompt="a <lora:g0:1> <lora:g1:1>", loras=[AdapterRef("g2")])),
    ("max_adapters", dict(loras=[AdapterRef("g0")] * 3)),  # duplicates count before they collapse
    ("max_prompt_chars", dict(prompt="a" * 61)),
    ("max_prompt_chars", dict(negative_prompt="b" * 61)),
])
def test_each_limit_is_named_before_queueing(gated, field, job):
    eng, _ = gated
    with pytest.raises(RequestLimitError, match=field):
        eng.submit(Job(**{"prompt": "a", "steps": 2, "width": 32, "height": 32, **job}))
    assert eng.progress()["queued"] == 0


@pytest.mark.parametrize("make, what", [
    (lambda: AdapterRef("g0", 101.0), "weight"),
    (lambda: AdapterRef("g0", float("nan")), "weight"),
    (lambda: AdapterRef("g0", 1.0, float("-inf")), "text_encoder_weight"),
    (lambda: AdapterRef("x" * 1001), "adapter name"),
    (lambda: Job("a", seed=-1), "seed"),
    (lambda: Job("a", seed=2**64 - 1, count=2), "seed"),
    (lambda: Job("a", count=0), "count"),
    (lambda: Job("a", steps=0), "steps"),
    (lambda: Job("a", width=36), "width"),
    (lambda: Job("a", height=16392), "height"),
    (lambda: Job("a", guidance=float("inf")), "guidance"),
    (lambda: Job("a", loras="g0"), "loras"),
    (lambda: Job("a", loras=[{"name": "g0"}]), "loras"),
    (lambda: Job("a", sampler="E" * 101), "sampler"),
    (lambda: Job("a", steps=2.5), "steps"),
])
def test_untrusted_values_are_bounded(make, what):
    with pytest.raises(ConfigError, match=what):
        make()


def test_job_keeps_no_list_the_caller_can_change():
    loras = [AdapterRef("g0")]
    job = Job("a", loras=loras)
    loras.extend(AdapterRef(f"g{i}") for i in range(1, 6))  # after the limits were checked: no effect
    assert job.stack()[1] == (AdapterRef("g0"),)


def test_more_images_than_the_queue_holds_is_a_limit():
    with pytest.raises(RequestLimitError, match="max_queue"):  # never fits: a 4xx, not a 429 to retry
        ServeLimits(max_images=8, max_queue=4).check(Job("a", count=5), (32, 32), 32)


def _wait(predicate, timeout=60.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end
        time.sleep(0.01)


def test_full_queue_is_busy_and_close_without_drain_rejects(gated):
    eng, gate = gated
    running = eng.submit(_job("running", 1))
    assert gate.entered.wait(60)  # the worker is inside the pipeline call; the queue no longer moves
    queued = [eng.submit(_job("queued", 2, count=2)), eng.submit(_job("queued", 4, count=2))]
    with pytest.raises(ServerBusyError, match="queue is full"):
        eng.submit(_job("one too many", 6))
    closer = threading.Thread(target=eng.close, kwargs={"drain": False})
    closer.start()
    for future in queued:
        with pytest.raises(ServerClosedError):
            future.result(timeout=60)
    with pytest.raises(ServerClosedError):
        eng.submit(_job("after close", 7))
    gate.open.set()
    closer.join(60)
    assert len(running.result(timeout=60).images) == 1  # the batch already running finished


def test_close_with_drain_finishes_queued_jobs(gated, ref):
    eng, gate = gated
    futures = [eng.submit(_job("first", 11, [("g0", 1.0)]))]
    assert gate.entered.wait(60)
    futures += [eng.submit(_job("second", 12, [("g1", 0.5)])), eng.submit(_job("third", 13, [("g2", 1.0)]))]
    closer = threading.Thread(target=eng.close, kwargs={"drain": True})
    closer.start()
    _wait(lambda: eng._closing)
    with pytest.raises(ServerClosedError):
        eng.submit(_job("late", 14))
    gate.open.set()
    closer.join(60)
    assert not closer.is_alive()
    for (prompt, seed, refs), future in zip([("first", 11, [("g0", 1.0)]), ("second", 12, [("g1", 0.5)]),
                                             ("third", 13, [("g2", 1.0)])], futures):
        assert abs(pixels(future.result(timeout=1).images[0].image) - solo(ref, prompt, seed, _stack(refs))).max() <= 1
    assert peft_names(eng.pipe) == set()  # close unloaded what the cache had loaded


def test_worker_survives_a_failing_batch(gated, ref):
    eng, gate = gated
    gate.fail = True
    gate.open.set()
    with pytest.raises(AdapterStateError, match="injected fault"):
        eng.generate(_job("fails", 1, [("g0", 1.0)]), timeout=60)
    assert eng.cache.entries()[0].pins == 0  # the failed batch released its adapters
    batches = eng.batches
    result = eng.generate(_job("works", 2, [("g0", 1.0)], count=2), timeout=60)
    assert eng.batches == batches + 2 and result.seeds == [2, 3]  # max_batch 1: one job split over two batches
    for image in result.images:
        assert abs(pixels(image.image) - solo(ref, "works", image.seed, {"g0": 1.0})).max() <= 1
