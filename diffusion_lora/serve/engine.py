"""The serving engine: one base pipeline, adapters on demand, requests with different stacks in one batch.

Jobs go into a bounded queue as single images (image ``i`` of a job has seed ``seed + i``). One worker
thread owns the pipeline: it takes the oldest image and up to ``max_batch − 1`` more that can share its
denoiser calls (same size, steps, guidance, sampler), loads their adapters through the cache, and runs
one pipeline call for all of them. When the samples' stacks differ, every sample gets exactly its own
adapters and weights (:func:`adapters.per_sample_adapters`); when they agree, PEFT's own path runs (the
same computation as ``diffusion-lora generate``). Nothing is fused while serving.

A broken adapter fails only the jobs that name it; a failing pipeline call fails only its batch. Jobs
whose adapters do not fit the cache beside the batch's (or that mix a DoRA adapter into other stacks) go
back to the queue in their place and run in a later batch. Between batches the pipeline's adapters are as
the operator left them: weights a batch sets are put back, and ``close`` unloads what the cache loaded.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapters import Weight, adapter_settings, disable, is_fused, per_sample_adapters, set_weights, uses_dora
from ..errors import (
    AdapterStateError,
    ConfigError,
    DiffusionLoraError,
    FormatError,
    RequestLimitError,
    ServerBusyError,
    ServerClosedError,
    UnsupportedModelError,
)
from ..families import detect_variant
from ..generate import GeneratedImage, GenerationSettings, call_kwargs, check_size, parameters_text, pixels_or_oom
from ..models.invoke import call_parameters, is_modular
from ..models.loading import native_size
from ..models.samplers import choose, swapped_scheduler
from ..prompt_tags import tag_weight
from .cache import AdapterCache, CachedAdapter
from .jobs import AdapterRef, Job, JobResult, ServeLimits

__all__ = ["Engine"]

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Pending:
    """A job in the engine: its checked settings, its future and the images done so far."""

    job: Job
    prompt: str  # without tags
    refs: tuple[AdapterRef, ...]
    size: tuple[int, int]  # (height, width)
    future: Future
    images: dict[int, GeneratedImage] = field(default_factory=dict)
    failed: bool = False

    @property
    def key(self) -> tuple:
        """Images with equal keys can share one pipeline call."""
        j = self.job
        return (j.steps, j.guidance, self.size, j.sampler, j.scheduler, bool(j.negative_prompt))

    def fail(self, exc: BaseException) -> None:
        # close(drain=False) on a client thread may race the worker finishing this job: first one wins
        self.failed = True
        try:
            self.future.set_exception(exc)
        except InvalidStateError:
            pass

    def deliver(self, image: GeneratedImage, index: int) -> None:
        if self.failed:
            return
        self.images[index] = image
        if len(self.images) == self.job.count:
            try:
                self.future.set_result(JobResult([self.images[i] for i in range(self.job.count)]))
            except InvalidStateError:
                pass


@dataclass(eq=False)
class _Unit:
    pending: _Pending
    index: int
    order: int  # submission order: a unit sent back to the queue goes back to its place

    @property
    def seed(self) -> int:
        return self.pending.job.seed + self.index


class Engine:
    """Serve ``pipe`` with adapters from ``lora_dirs``: ``submit(job)`` returns a Future of a :class:`JobResult`.

    ``max_batch`` images share one pipeline call; the cache holds at most ``cache_size`` adapters and
    ``cache_bytes`` bytes of adapter tensors. ``batch_window`` (seconds) is how long the worker waits for
    more requests to fill a batch when the queue holds fewer than ``max_batch`` images.
    """

    def __init__(self, pipe: Any, lora_dirs: Sequence[str] = (), *, limits: ServeLimits | None = None,
                 max_batch: int = 8, cache_size: int = 32, cache_bytes: int | None = None,
                 batch_window: float = 0.01, model_file: str | None = None) -> None:
        if detect_variant(pipe).inputs:
            raise UnsupportedModelError(
                f"{type(pipe).__name__} needs image inputs ({', '.join(detect_variant(pipe).inputs)}); the server "
                "generates from text only")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise AdapterStateError(f"max_batch must be a whole number of at least 1, got {max_batch!r}")
        self.pipe = pipe
        self.limits = limits or ServeLimits()
        # a modular pipeline takes one prompt per call: batching would only run them one by one
        self.max_batch = 1 if is_modular(pipe) else max_batch
        if is_fused(pipe):
            raise AdapterStateError("the pipeline's adapters are fused; unfuse them before serving (the server "
                                    "applies adapters per request and never changes the base weights)")
        self.batch_window = batch_window
        self.model_file = model_file
        self.native = native_size(pipe) or 1024
        self.cache = AdapterCache(pipe, lora_dirs, max_count=cache_size, max_bytes=cache_bytes)
        # the model's own scheduler: every request's sampler is built from it (the worker swaps pipe.scheduler)
        self._scheduler = pipe.scheduler
        pipe.set_progress_bar_config(disable=True)
        self._cond = threading.Condition()
        self._queue: collections.deque[_Unit] = collections.deque()
        self._closing = False
        self._drain = True
        self._running: list[_Unit] = []
        self._chores: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._order = itertools.count()
        self._step = (0, 0)  # (steps done, steps) of the running batch
        self._started = 0.0  # when the running batch started (time.monotonic)
        self.batches = self.images_done = 0
        self._worker = threading.Thread(target=self._work, name="diffusion-lora-engine", daemon=True)
        self._worker.start()

    # -- client side -------------------------------------------------------------------------------------

    def size_of(self, job: Job) -> tuple[int, int]:
        return (job.height or self.native, job.width or self.native)

    def check(self, job: Job) -> _Pending:
        """The job checked against the limits and parsed (tags), not yet queued."""
        size = self.size_of(job)
        self.limits.check(job, size, self.native)
        try:  # a sampler this model cannot run is refused here, not queued
            choose(self.pipe, job.sampler, job.scheduler, base=self._scheduler)
        except RequestLimitError:
            raise
        except ConfigError as exc:
            raise RequestLimitError(str(exc)) from None
        prompt, refs = job.stack()
        return _Pending(job, prompt, refs, size, Future())

    def submit(self, job: Job) -> Future:
        """Queue ``job``; raises RequestLimitError, ServerBusyError (queue full) or ServerClosedError."""
        pending = self.check(job)
        with self._cond:
            if self._closing:
                raise ServerClosedError("the server is shutting down and takes no new requests")
            if len(self._queue) + job.count > self.limits.max_queue:
                raise ServerBusyError(f"the queue is full ({len(self._queue)} images waiting, limit "
                                      f"{self.limits.max_queue}); retry later")
            pending.future.set_running_or_notify_cancel()
            self._queue.extend(_Unit(pending, i, next(self._order)) for i in range(job.count))
            self._cond.notify_all()
        return pending.future

    def generate(self, job: Job, timeout: float | None = None) -> JobResult:
        """Submit ``job`` and wait for its images."""
        return self.submit(job).result(timeout)

    def pin(self, names: Sequence[str]) -> Future:
        """Load adapters ``names`` and keep them loaded until :meth:`unpin` (the cache never evicts them).

        Runs on the worker between two batches; the Future gives the pins to pass to :meth:`unpin`, or the
        error of the first name that fails (naming it; the others are then released). A front end that
        routes requests by adapter stack (Ray Serve's model multiplexing) holds the stacks it advertises.
        """
        def chore() -> list[CachedAdapter | str]:
            got: list[CachedAdapter | str] = []
            try:
                for name in names:
                    got.append(self.cache.acquire(name))
            except BaseException:
                for entry in got:
                    self.cache.release(entry)
                raise
            return got

        return self._chore(chore)

    def unpin(self, pins: Sequence[CachedAdapter | str]) -> Future:
        """Release what :meth:`pin` gave (on the worker, between batches); the adapters become evictable."""
        def chore() -> None:
            for entry in pins:
                self.cache.release(entry)

        return self._chore(chore)

    def _chore(self, fn: Callable[[], Any]) -> Future:
        future: Future = Future()
        with self._cond:
            if self._closing or not self._worker.is_alive():
                raise ServerClosedError("the server is shutting down and takes no new requests")
            future.set_running_or_notify_cancel()
            self._chores.append((fn, future))
            self._cond.notify_all()
        return future

    def progress(self) -> dict[str, Any]:
        """Queue length, running images, the running batch's step and its seconds so far (``elapsed``)."""
        with self._cond:
            done, total = self._step
            elapsed = time.monotonic() - self._started if total else 0.0
            return {"queued": len(self._queue), "running": len(self._running), "step": done, "steps": total,
                    "elapsed": elapsed, "batches": self.batches, "images": self.images_done}

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking jobs; finish the queued ones (``drain``) or fail them with ServerClosedError."""
        with self._cond:
            self._closing = True
            self._drain = drain
            if not drain:
                closed = ServerClosedError("the server shut down before this request ran")
                while self._queue:
                    self._queue.popleft().pending.fail(closed)
            self._cond.notify_all()
        self._worker.join(timeout)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- worker side -------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            self._do_chores()
            units = self._take()
            if units is None:
                self._do_chores()
                break
            if not units:
                continue
            try:
                self._run(units)
            except BaseException as exc:  # never let the worker die with jobs waiting on it
                logger.exception("batch failed")
                for unit in units:
                    unit.pending.fail(exc if isinstance(exc, DiffusionLoraError) else
                                      AdapterStateError(f"generation failed: {type(exc).__name__}: {exc}"))
            finally:
                with self._cond:
                    self._running = []
                    self._step = (0, 0)
        try:
            self.cache.clear()  # the pipeline leaves the server with the adapters it came with
        except Exception:
            logger.exception("unloading the cached adapters failed")

    def _do_chores(self) -> None:
        while True:
            with self._cond:
                if not self._chores:
                    return
                fn, future = self._chores.popleft()
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    def _take(self) -> list[_Unit] | None:
        """The next batch; [] when only chores wait; None when closing with nothing queued."""
        with self._cond:
            while True:
                self._fail_if_closed()
                self._queue = collections.deque(u for u in self._queue if not u.pending.failed)
                if self._queue:
                    break
                if self._chores:
                    return []
                if self._closing:
                    return None
                self._cond.wait()
            deadline = time.monotonic() + self.batch_window
            while len(self._queue) < self.max_batch and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            self._fail_if_closed()
            key = self._queue[0].pending.key if self._queue else None
            units = [u for u in self._queue if u.pending.key == key and not u.pending.failed][: self.max_batch]
            taken = set(map(id, units))
            self._queue = collections.deque(u for u in self._queue if id(u) not in taken and not u.pending.failed)
            self._running = units
            return units

    def _fail_if_closed(self) -> None:
        """Under the lock: after close(drain=False), every queued job fails with ServerClosedError."""
        if self._closing and not self._drain:
            closed = ServerClosedError("the server shut down before this request ran")
            while self._queue:
                self._queue.popleft().pending.fail(closed)

    def _requeue(self, units: list[_Unit]) -> None:
        """Send units back to the queue, each in its submission place (ahead of younger ones)."""
        with self._cond:
            self._queue = collections.deque(sorted([*self._queue, *units], key=lambda u: u.order))
            self._fail_if_closed()
            self._cond.notify_all()

    def _acquire(self, units: list[_Unit]) -> tuple[list[_Unit], dict[_Pending, dict], list[CachedAdapter | str]]:
        """Load the adapters of the units' jobs; jobs whose adapters fail are failed, those that do not fit
        the cache beside the others go back to the queue. Returns (units to run, stack per job, pins to
        release); on any error every pin taken here is released."""
        stacks: dict[_Pending, dict] = {}
        pins: list[CachedAdapter | str] = []
        deferred: set[_Pending] = set()
        try:
            for unit in units:
                pending = unit.pending
                if pending.failed or pending in stacks or pending in deferred:
                    continue
                got = self._acquire_job(pending, alone=not stacks)
                if got is None:
                    deferred.add(pending)
                    continue
                pins.extend(got)
                stacks[pending] = {(e.loaded_as if isinstance(e, CachedAdapter) else e): (e, ref)
                                   for e, ref in zip(got, pending.refs)}
        except BaseException:
            for entry in pins:
                self.cache.release(entry)
            raise
        if deferred:
            self._requeue([u for u in units if u.pending in deferred])
        run = [u for u in units if not u.pending.failed and u.pending in stacks]
        return run, stacks, pins

    def _acquire_job(self, pending: _Pending, alone: bool) -> list[CachedAdapter | str] | None:
        """Pin one job's adapters: their entries, or None when they do not fit beside the batch's (try later).
        A job whose adapters fail to load, or do not fit even ``alone``, is failed (returns [] then)."""
        got: list[CachedAdapter | str] = []
        try:
            for ref in pending.refs:
                got.append(self.cache.acquire(ref.name))
            return got
        except AdapterStateError as exc:  # no room beside the adapters this batch pins
            error: DiffusionLoraError = exc
            if not alone:
                for entry in got:
                    self.cache.release(entry)
                return None
            error = AdapterStateError(f"this request's {len(pending.refs)} adapters do not fit in the adapter cache "
                                      f"(cache_size {self.cache.max_count}, cache_bytes {self.cache.max_bytes}): "
                                      f"{exc}")
        except DiffusionLoraError as exc:
            error = exc
        except Exception as exc:  # whatever a hostile file does, it fails the request that names it, only
            name = pending.refs[len(got)].name
            error = FormatError(f"adapter {name!r} could not be loaded: {type(exc).__name__}: {exc}")
        for entry in got:
            self.cache.release(entry)
        pending.fail(error)
        return []

    def _weights(self, stack: dict) -> dict[str, Weight]:
        return {name: tag_weight(self.pipe, ref.as_tag()) for name, (_, ref) in stack.items()}

    def _run(self, units: list[_Unit]) -> None:
        units, stacks, pins = self._acquire(units)
        try:
            if units:
                self._generate(units, stacks)
        finally:
            for entry in pins:
                self.cache.release(entry)

    def _split_dora(self, units: list[_Unit], weights: list[dict[str, Weight]]) -> list[_Unit]:
        """Units that can run together: all when their stacks agree or none uses DoRA; else, when the first
        uses DoRA, those sharing its stack, and otherwise those without DoRA (the others go back to the queue)."""
        if all(w == weights[0] for w in weights):
            return units
        dora = [any(uses_dora(self.pipe, n) for n in w) for w in weights]
        if not any(dora):
            return units
        if dora[0]:
            keep = [w == weights[0] for w in weights]
        else:
            keep = [not d for d in dora]
        self._requeue([u for u, k in zip(units, keep) if not k])
        return [u for u, k in zip(units, keep) if k]

    def _set_weights(self, weights: dict[str, Weight]) -> dict[str, tuple[bool, Weight]]:
        """Activate exactly ``weights`` (PEFT's path); returns what to give :meth:`_restore` afterwards."""
        saved = adapter_settings(self.pipe)
        set_weights(self.pipe, weights)
        return saved

    def _restore(self, saved: dict[str, tuple[bool, Weight]]) -> None:
        """Every adapter's enabled flag and weight as before the batch (adapters loaded since: disabled)."""
        records = adapter_settings(self.pipe)
        now = {n: r for n, r in records.items() if n in saved}
        if now == saved and all(not enabled for n, (enabled, _) in records.items() if n not in saved):
            return
        set_weights(self.pipe, {n: w for n, (_, w) in saved.items() if n in records})
        off = [n for n, (enabled, _) in saved.items() if not enabled and n in records]
        if off:
            disable(self.pipe, off)

    def _generate(self, units: list[_Unit], stacks: dict[_Pending, dict]) -> None:
        weights = [self._weights(stacks[u.pending]) for u in units]
        keep = self._split_dora(units, weights)
        weights = [w for u, w in zip(units, weights) if u in keep]
        units = keep
        first = units[0].pending
        job = first.job
        settings = GenerationSettings(prompts=[first.prompt], negative_prompt=job.negative_prompt or None,
                                      steps=job.steps, guidance=job.guidance, height=first.size[0],
                                      width=first.size[1], max_pixels=first.size[0] * first.size[1],
                                      sampler=job.sampler, scheduler=job.scheduler)
        size = check_size(self.pipe, settings)
        kwargs = call_kwargs(self.pipe, settings)
        if job.negative_prompt:
            kwargs["negative_prompt"] = [u.pending.job.negative_prompt for u in units]
        if "callback_on_step_end" in call_parameters(self.pipe):
            kwargs["callback_on_step_end"] = self._on_step
        with self._cond:
            self._step = (0, job.steps)
            self._started = time.monotonic()
        prompts = [u.pending.prompt for u in units]
        generators = [torch.Generator(device="cpu").manual_seed(u.seed) for u in units]
        # the batch's sampler (part of its key); a stochastic one draws each sample's noise from its own generator
        choice = choose(self.pipe, job.sampler, job.scheduler, base=self._scheduler)
        scheduler = choice.build(self._scheduler) if choice is not None else None
        with torch.inference_mode(), swapped_scheduler(self.pipe, scheduler):
            if all(w == weights[0] for w in weights):
                saved = self._set_weights(weights[0])
                try:
                    images = pixels_or_oom(self.pipe, prompts, generators, kwargs, size, {})
                finally:
                    self._restore(saved)
            else:
                with per_sample_adapters(self.pipe, weights):
                    images = pixels_or_oom(self.pipe, prompts, generators, kwargs, size, {})
        self.batches += 1
        self.images_done += len(units)
        for unit, image in zip(units, images):
            unit.pending.deliver(self._described(unit, image, stacks[unit.pending]), unit.index)

    def _on_step(self, pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        with self._cond:
            self._step = (step + 1, self._step[1])
        return kwargs

    def _described(self, unit: _Unit, image: Any, stack: dict) -> GeneratedImage:
        pending = unit.pending
        job = pending.job
        shown, hashes = [], {}
        for name, (entry, ref) in stack.items():
            label = entry.shown if isinstance(entry, CachedAdapter) else name
            shown.append(AdapterRef(label, ref.weight, ref.text_encoder_weight).as_tag().as_text())
            if isinstance(entry, CachedAdapter) and entry.short_hash:
                hashes[label] = entry.short_hash
        settings = GenerationSettings(prompts=[pending.prompt], negative_prompt=job.negative_prompt or None,
                                      steps=job.steps, guidance=job.guidance, height=pending.size[0],
                                      width=pending.size[1], sampler=job.sampler, scheduler=job.scheduler)
        text = parameters_text(self.pipe, pending.prompt, settings, unit.seed, image.size, shown, hashes,
                               self.model_file)
        return GeneratedImage(image, pending.prompt, unit.seed, text)
