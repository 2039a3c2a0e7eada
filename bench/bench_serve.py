"""Benchmark: the serving engine — mixed-adapter batches against a shared adapter and one-at-a-time serving.

In one run, on the embedded model (``shapes-sd15``, 1.5 M-parameter UNet, 64 px) and on an SD1.5-size model
(the published SD1.5 UNet layout, ``families.published.SD15_UNET``, 859.5 M parameters, and a CLIP-L-layout
text encoder, both random; a small 8×-downscaling VAE; the embedded model's tokenizer):

1. **Throughput** (images/s) of 8 requests submitted together, each with its own random rank-r attention
   adapter (``to_q/k/v/out.0``; files on disk), through ``Engine(max_batch=8)`` (one mixed batch:
   :func:`per_sample_adapters`) vs 8 requests sharing one adapter (same engine: one batch, PEFT's own path)
   vs the same 8 requests through ``Engine(max_batch=1)`` (one at a time, ``set_weights`` between them: what
   diffusers' ``set_adapters`` per request gives). The three run interleaved, in rotating order, round after
   round; each figure is a median and each ratio the median of per-round ratios.
2. **Cold adapter latency**: a request naming an adapter not in the cache (disk → first image), then the
   same request again (warm), interleaved; p50/p99.
3. **Churn**: 200 different adapters through a cache of 16 (8-image batches, one step); RSS (after
   ``gc.collect()`` and glibc ``malloc_trim``), Python heap (tracemalloc) and torch tensor bytes of the
   pipeline, when the cache is first full and at the end; growth in units of one cache slot.
4. **Load generator**: open loop, Poisson arrivals (fixed seed) at a fixed rate (a fraction of the mixed
   batch's measured throughput), in-process against the engine with ``max_batch=8`` and, with the same arrival
   times, ``max_batch=1``; latency = arrival → image, p50/p90/p99.
5. **Verification**: every request of the throughput rounds and the load generator uses the same prompt and
   seed and differs only in its adapter; each answer must equal the same request's one-at-a-time image within
   1/255 per channel, and the 8 adapters' images must differ from each other by more than that (so a request
   answered with another's image would be caught). No future may be left unanswered.

    python bench/bench_serve.py                 # both models: ~22 min on 2 shared CPU cores (1 thread)
    python bench/bench_serve.py --sd15-128      # plus SD1.5-size throughput at 128 px: ~27 min
    python bench/bench_serve.py --quick         # fewer rounds / requests, no heap tracing at SD1.5 size: ~14 min
    python bench/bench_serve.py --models shapes-sd15 --out serve.md --json serve.json   # ~6 min

Timings are wall-clock (``time.perf_counter``). No HTTP row: the HTTP front end is measured only when
``diffusion_lora.serve.http`` exists (it does not on this branch); the engine is what it would call.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from busy import busy_cpu  # noqa: E402  (bench/busy.py, beside this script)
from diffusers import AutoencoderKL, StableDiffusionPipeline  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

import diffusion_lora as dl  # noqa: E402
from diffusion_lora.errors import ServerBusyError  # noqa: E402
from diffusion_lora.families.published import CLIP_L, SD15  # noqa: E402
from diffusion_lora.models.reference import build_component  # noqa: E402
from diffusion_lora.serve import Engine, Job  # noqa: E402

PROMPT = "a red circle on a blue square"
SEED = 7
UP_STD = 0.02  # random non-zero up: every adapter changes the image
_T0 = time.perf_counter()


@dataclass(frozen=True)
class Plan:
    """What one model's part of the run measures."""

    label: str
    sizes: tuple[int, ...]  # image sides (px) of the throughput rows; the first is used for everything else
    steps: int
    ranks: tuple[int, ...]  # adapter ranks of the throughput rows (the first is used for everything else)
    rounds: int
    cold: int  # cold / warm request pairs
    churn: int  # adapters pushed through the cache
    cache: int
    load_requests: int
    load_fraction: float  # arrival rate as a fraction of the mixed batch's throughput
    busy: bool  # repeat the first throughput row beside a CPU-bound process
    heap: bool = True  # trace the Python heap during the churn (tracemalloc makes the loads ~4× slower)


PLANS = {
    "shapes-sd15": Plan("shapes-sd15", (64, 32), 4, (16, 32), 7, 10, 200, 16, 40, 0.7, True),
    "sd15-size": Plan("sd15-size", (64,), 2, (16,), 3, 6, 200, 16, 24, 0.6, False),
}
QUICK = {
    "shapes-sd15": Plan("shapes-sd15", (64, 32), 4, (16,), 3, 5, 200, 16, 24, 0.7, True),
    "sd15-size": Plan("sd15-size", (64,), 2, (16,), 2, 4, 200, 16, 16, 0.6, False, heap=False),
}


@dataclass
class Report:
    """Markdown rows and the same numbers as JSON."""

    rows: list[tuple[str, ...]] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def add(self, *row: str) -> None:
        self.rows.append(row)


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f} s] {msg}", flush=True)


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def pct(xs: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation (with few samples p99 is close to the maximum)."""
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def secs(x: float) -> str:
    return f"{x * 1e3:.0f} ms" if x < 10 else f"{x:.1f} s"


# ── models and adapter files ─────────────────────────────────────────────────────────────────────


def build_embedded() -> StableDiffusionPipeline:
    return dl.load_pipeline("shapes-sd15")


def build_sd15_size() -> StableDiffusionPipeline:
    """SD1.5's real UNet and CLIP-L layouts with random weights; a small VAE (8× down, like SD's) and the
    embedded model's tokenizer and scheduler. Only the UNet and text encoder are SD1.5-size."""
    small = dl.load_pipeline("shapes-sd15")
    tok = small.tokenizer
    torch.manual_seed(0)
    unet = build_component(SD15[0]).eval().requires_grad_(False)
    config = CLIPTextConfig(**{**CLIP_L, "vocab_size": len(tok), "bos_token_id": tok.bos_token_id,
                               "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id})
    text = CLIPTextModel(config).eval().requires_grad_(False)
    vae = AutoencoderKL(block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=16,
                        latent_channels=4).eval().requires_grad_(False)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=small.scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def template(pipe, folder: Path, rank: int) -> Path:
    """One attention adapter of ``rank`` saved with our API (PEFT's initial down, zero up): the key layout."""
    dl.add_lora(pipe, "template", rank=rank, alpha=rank, targets="attn")
    path = dl.save_lora(pipe, "template", folder / f"template_r{rank}.safetensors")
    dl.remove_lora(pipe, "template")
    return Path(path)


def write_adapters(layout: Path, folder: Path, prefix: str, count: int, seed: int) -> list[str]:
    """``count`` files with the layout of ``layout`` and random weights (down ~ N(0, 1/in), up ~ N(0, UP_STD²)),
    one generator seed each; returns their names (file stems)."""
    with safe_open(str(layout), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    names = []
    for i in range(count):
        g = torch.Generator().manual_seed(seed + i)
        out = {}
        for key, t in tensors.items():
            if t.dim() < 2:
                out[key] = t  # alpha
            elif "lora_A" in key or "lora_down" in key:
                out[key] = torch.randn(t.shape, generator=g) / t.shape[1] ** 0.5
            else:
                out[key] = torch.randn(t.shape, generator=g) * UP_STD
        name = f"{prefix}{i:03d}"
        save_file(out, str(folder / f"{name}.safetensors"), metadata=metadata)
        names.append(name)
    return names


# ── helpers around the engine ────────────────────────────────────────────────────────────────────


def job(name: str | None, size: int, steps: int, seed: int = SEED) -> Job:
    tag = f" <lora:{name}:1>" if name else ""
    return Job(PROMPT + tag, steps=steps, width=size, height=size, seed=seed)


def served(engine: Engine, jobs: Sequence[Job]) -> tuple[float, list[np.ndarray]]:
    """Seconds to answer ``jobs`` submitted together, and their images as int arrays."""
    gc.collect()
    start = time.perf_counter()
    futures = [engine.submit(j) for j in jobs]
    results = [f.result(timeout=1800) for f in futures]
    seconds = time.perf_counter() - start
    return seconds, [pixels(r.images[0].image) for r in results]


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def worst(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())




# ── 1. throughput ────────────────────────────────────────────────────────────────────────────────


@dataclass
class Checker:
    """Each request's one-at-a-time image (its reference) and the worst deviation seen from it."""

    reference: dict[str, np.ndarray] = field(default_factory=dict)
    worst: int = 0
    checked: int = 0
    wrong: list[str] = field(default_factory=list)

    def check(self, names: Sequence[str], images: Sequence[np.ndarray], what: str) -> None:
        for name, image in zip(names, images):
            d = worst(image, self.reference[name])
            self.worst, self.checked = max(self.worst, d), self.checked + 1
            if d > 1:
                self.wrong.append(f"{what}: request with {name} differs from its solo image by {d}/255")

    def distinct(self) -> int:
        """The smallest difference between two different adapters' images."""
        refs = list(self.reference.values())
        return min(worst(a, b) for i, a in enumerate(refs) for b in refs[i + 1:])


def throughput(pipe, names: list[str], size: int, steps: int, rounds: int, checker: Checker | None,
               busy: bool = False) -> dict:
    """Mixed / shared / one-at-a-time, interleaved in rotating order, one warm-up round first."""
    mixed_jobs = [job(n, size, steps) for n in names]
    shared_jobs = [job(names[0], size, steps) for _ in names]
    times: dict[str, list[float]] = {"mixed": [], "shared": [], "solo": []}
    with Engine(pipe, [], max_batch=8, batch_window=0.5) as batched, Engine(pipe, [], max_batch=1) as solo:
        runs = {"mixed": (batched, mixed_jobs), "shared": (batched, shared_jobs), "solo": (solo, mixed_jobs)}
        order = ["solo", "mixed", "shared"]
        ctx = busy_cpu() if busy else contextlib.nullcontext()
        with ctx:
            for r in range(rounds + 1):
                for kind in order[r % 3:] + order[: r % 3]:
                    engine, jobs = runs[kind]
                    before = engine.batches
                    seconds, images = served(engine, jobs)
                    expect = 1 if engine is batched else len(jobs)
                    if engine.batches - before != expect:
                        raise SystemExit(f"{kind}: {engine.batches - before} pipeline calls, expected {expect}")
                    if checker is not None:
                        if kind == "solo" and not checker.reference:
                            checker.reference = dict(zip(names, images))
                        batch_names = names if kind != "shared" else [names[0]] * len(names)
                        checker.check(batch_names, images, f"{kind} round {r}")
                    if r:  # round 0 is the warm-up
                        times[kind].append(seconds)
    n = len(names)
    per_round = list(zip(times["mixed"], times["shared"], times["solo"]))
    return {
        "images_per_s": {k: n / med(v) for k, v in times.items()},
        "seconds": {k: med(v) for k, v in times.items()},
        "mixed_vs_shared": med([s / m for m, s, _ in per_round]),
        "mixed_vs_solo": med([o / m for m, _, o in per_round]),
        "mixed_vs_shared_min": min(times["shared"]) / min(times["mixed"]),
        "mixed_vs_solo_min": min(times["solo"]) / min(times["mixed"]),
        "rounds": rounds,
    }


# ── 2. cold adapters ─────────────────────────────────────────────────────────────────────────────


def cold_latency(pipe, folder: Path, names: list[str], size: int, steps: int) -> dict:
    cold, warm = [], []
    with Engine(pipe, [str(folder)], max_batch=1, cache_size=len(names) + 1) as engine:
        served(engine, [job(None, size, steps)])  # warm the pipeline itself
        for name in names:
            cold.append(served(engine, [job(name, size, steps)])[0])
            warm.append(served(engine, [job(name, size, steps)])[0])
        loads = engine.cache.loads
    if loads != len(names):
        raise SystemExit(f"cold run: {loads} loads for {len(names)} adapters")
    return {"cold_p50": pct(cold, 0.5), "cold_p99": pct(cold, 0.99), "warm_p50": pct(warm, 0.5),
            "warm_p99": pct(warm, 0.99), "load_p50": med([c - w for c, w in zip(cold, warm)]), "n": len(names)}


# ── 3. churn ─────────────────────────────────────────────────────────────────────────────────────


def rss() -> int:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def tensor_bytes(pipe) -> int:
    seen, total = set(), 0
    for part in (pipe.unet, pipe.text_encoder, pipe.vae):
        for t in [*part.parameters(), *part.buffers()]:
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def hooks(pipe) -> int:
    return sum(len(m._forward_hooks) for part in (pipe.unet, pipe.text_encoder) for m in part.modules())


def memory(pipe) -> dict:
    heap = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else float("nan")
    return {"rss": rss(), "heap": heap, "tensors": tensor_bytes(pipe), "hooks": hooks(pipe)}


def churn(pipe, folder: Path, names: list[str], cache: int, steps: int, heap: bool) -> dict:
    """All ``names`` through a cache of ``cache`` in 8-image mixed batches; memory when first full and at the end."""
    if heap:
        tracemalloc.start()
    marks = {}
    with Engine(pipe, [str(folder)], max_batch=8, cache_size=cache, batch_window=0.5) as engine:
        marks["empty"] = memory(pipe)
        for start in range(0, len(names), 8):
            served(engine, [job(n, 64, steps) for n in names[start:start + 8]])
            if start + 8 == cache:
                marks["full"] = memory(pipe)
                slot = engine.cache.nbytes / len(engine.cache)
            if (start + 8) * 2 >= len(names) and "half" not in marks:
                marks["half"] = memory(pipe)
            if (start + 8) % 40 == 0:
                marks.setdefault("rss_series_mib", []).append(round(rss() / 2**20, 1))
        marks["end"] = memory(pipe)
        loads, evictions, held = engine.cache.loads, engine.cache.evictions, len(engine.cache)
    tracemalloc.stop()
    growth = {k: (marks["end"][k] - marks["full"][k]) / slot for k in ("rss", "heap", "tensors")}
    growth["rss_second_half"] = (marks["end"]["rss"] - marks["half"]["rss"]) / slot
    return {"marks": marks, "slot_bytes": slot, "growth_slots": growth, "loads": loads, "evictions": evictions,
            "held": held, "adapters": len(names)}


# ── 4. load generator ────────────────────────────────────────────────────────────────────────────


def open_loop(engine: Engine, jobs: Sequence[Job], arrivals: Sequence[float]) -> tuple[list[float], list, int]:
    """Submit ``jobs[i]`` at ``arrivals[i]`` seconds from now whatever the answers do; latency from arrival."""
    done: dict[int, float] = {}
    lock = threading.Lock()
    futures, rejected = [], 0
    start = time.perf_counter()

    def finished(i: int) -> Callable:
        def callback(_f) -> None:
            with lock:
                done[i] = time.perf_counter()
        return callback

    for i, (j, at) in enumerate(zip(jobs, arrivals)):
        delay = start + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        try:
            f = engine.submit(j)
        except ServerBusyError:
            rejected += 1
            futures.append(None)
            continue
        f.add_done_callback(finished(i))
        futures.append(f)
    results = [f.result(timeout=1800) if f is not None else None for f in futures]
    latency = [done[i] - start - at for i, at in enumerate(arrivals) if futures[i] is not None]
    return latency, results, rejected


def load_generator(pipe, names: list[str], size: int, steps: int, rate: float, count: int,
                   checker: Checker) -> dict:
    rng = random.Random(1234)
    arrivals, t = [], 0.0
    for _ in range(count):
        t += rng.expovariate(rate)
        arrivals.append(t)
    picks = [names[rng.randrange(len(names))] for _ in range(count)]
    jobs = [job(n, size, steps) for n in picks]
    out = {"rate": rate, "requests": count}
    for label, batch in (("max_batch=8", 8), ("max_batch=1", 1)):
        with Engine(pipe, [], max_batch=batch) as engine:
            served(engine, [jobs[0]])  # warm
            before = (engine.batches, engine.images_done)
            latency, results, rejected = open_loop(engine, jobs, arrivals)
            batches = engine.batches - before[0]
            images = engine.images_done - before[1]
        answered = [(n, r) for n, r in zip(picks, results) if r is not None]
        checker.check([n for n, _ in answered], [pixels(r.images[0].image) for _, r in answered], f"load {label}")
        out[label] = {"p50": pct(latency, 0.5), "p90": pct(latency, 0.9), "p99": pct(latency, 0.99),
                      "answered": len(answered), "rejected": rejected, "mean_batch": images / max(batches, 1)}
    return out


# ── per model ────────────────────────────────────────────────────────────────────────────────────


def bench_model(plan: Plan, pipe, folder: Path, report: Report) -> None:
    pipe.set_progress_bar_config(disable=True)
    data = report.data.setdefault(plan.label, {})
    size, steps, rank = plan.sizes[0], plan.steps, plan.ranks[0]
    checker = Checker()
    layouts = {r: template(pipe, folder, r) for r in plan.ranks}
    for r in plan.ranks:
        names = write_adapters(layouts[r], folder, f"t{r}_", 8, seed=100 * r)
        for n in names:
            dl.load_lora(pipe, folder / f"{n}.safetensors", name=n)  # warm: served by name, never evicted
        for s in plan.sizes if r == rank else plan.sizes[:1]:
            log(f"{plan.label}: throughput rank {r}, {s} px")
            rounds = plan.rounds if s <= 64 else max(2, plan.rounds - 1)  # bigger images: fewer rounds
            got = throughput(pipe, names, s, steps, rounds, checker if (r, s) == (rank, size) else None)
            data[f"throughput_r{r}_{s}px"] = got
            throughput_rows(report, plan, f"rank {r}, {s} px", got)
            if plan.busy and (r, s) == (rank, size):
                log(f"{plan.label}: throughput beside a busy process")
                got = throughput(pipe, names, s, steps, min(plan.rounds, 3), None, busy=True)
                data[f"throughput_r{r}_{s}px_busy"] = got
                throughput_rows(report, plan, f"rank {r}, {s} px, busy machine", got)
        if r == rank:
            keep = names
        else:
            for n in names:
                dl.remove_lora(pipe, n)
    names = keep
    data["distinct_min"] = checker.distinct()

    log(f"{plan.label}: cold adapters")
    cold_names = write_adapters(layouts[rank], folder, "cold_", plan.cold, seed=5000)
    got = cold_latency(pipe, folder, cold_names, size, steps)
    data["cold"] = got
    report.add(plan.label, f"first image, cold adapter (disk → image), n={got['n']}",
               f"p50 {secs(got['cold_p50'])}, p99 {secs(got['cold_p99'])}",
               f"warm: p50 {secs(got['warm_p50'])}, p99 {secs(got['warm_p99'])}",
               f"cold − warm (load) {secs(got['load_p50'])}")

    rate = plan.load_fraction * data[f"throughput_r{rank}_{size}px"]["images_per_s"]["mixed"]
    log(f"{plan.label}: load generator at {rate:.2f} requests/s")
    got = load_generator(pipe, names, size, steps, rate, plan.load_requests, checker)
    data["load"] = got
    a, b = got["max_batch=8"], got["max_batch=1"]
    report.add(plan.label, f"latency, Poisson {rate:.2f} req/s ({plan.load_fraction:.0%} of mixed throughput), "
               f"{plan.load_requests} requests",
               f"max_batch 8: p50 {secs(a['p50'])} · p90 {secs(a['p90'])} · p99 {secs(a['p99'])} "
               f"(mean batch {a['mean_batch']:.1f})",
               f"max_batch 1: p50 {secs(b['p50'])} · p90 {secs(b['p90'])} · p99 {secs(b['p99'])}",
               f"p50 {b['p50'] / a['p50']:.2f}× lower, p99 {b['p99'] / a['p99']:.2f}× lower")
    for n in names:
        dl.remove_lora(pipe, n)

    log(f"{plan.label}: churn of {plan.churn} adapters through a cache of {plan.cache}")
    churn_names = write_adapters(layouts[rank], folder, "churn_", plan.churn, seed=9000)
    got = churn(pipe, folder, churn_names, plan.cache, 1, plan.heap)
    data["churn"] = got
    g, full, end = got["growth_slots"], got["marks"]["full"], got["marks"]["end"]
    heap = f"{g['heap']:+.2f} slots" if plan.heap else "not traced"
    report.add(plan.label, f"churn: {plan.churn} adapters through a cache of {plan.cache} "
               f"(slot {got['slot_bytes'] / 2**20:.2f} MiB)",
               f"RSS {full['rss'] / 2**20:.0f} → {end['rss'] / 2**20:.0f} MiB: {g['rss']:+.2f} slots "
               f"({g['rss_second_half']:+.2f} over the last {plan.churn // 2}; every 40: "
               f"{', '.join(map(str, got['marks']['rss_series_mib']))} MiB)",
               f"torch tensors {g['tensors']:+.2f} slots, Python heap {heap}, hooks left "
               f"{end['hooks']}", f"{got['loads']} loads, {got['evictions']} evictions")
    if g["rss"] > 1 or g["tensors"] > 0.01 or end["hooks"]:
        report.failures.append(f"{plan.label}: churn grew RSS by {g['rss']:.2f} slots "
                               f"({(end['rss'] - full['rss']) / 2**20:.1f} MiB), tensors by {g['tensors']:.2f}")

    data["verify"] = {"checked": checker.checked, "worst": checker.worst, "wrong": checker.wrong,
                      "distinct_min": data["distinct_min"]}
    load = [data["load"][k] for k in ("max_batch=8", "max_batch=1")]
    rejected = sum(x["rejected"] for x in load)
    report.add(plan.label, "verification: every answer vs the same request alone (max_batch 1)",
               f"{checker.checked} answers, worst {checker.worst}/255, {len(checker.wrong)} wrong, none lost "
               f"({rejected} load-generator requests rejected as queue full)",
               f"different adapters' images differ by ≥ {data['distinct_min']}/255", "")
    report.failures.extend(checker.wrong)
    if data["distinct_min"] <= 1:
        report.failures.append(f"{plan.label}: adapters' images differ by ≤ 1/255: verification is blind")


def throughput_rows(report: Report, plan: Plan, what: str, got: dict) -> None:
    ips = got["images_per_s"]
    report.add(plan.label, f"throughput, 8 requests, {what}, {plan.steps} steps",
               f"mixed (8 adapters, 1 batch) {ips['mixed']:.2f} img/s",
               f"shared (1 adapter, 1 batch) {ips['shared']:.2f} · one at a time {ips['solo']:.2f} img/s",
               f"mixed/shared **{got['mixed_vs_shared']:.2f}×** (min {got['mixed_vs_shared_min']:.2f}×; ≥ 0.85) · "
               f"mixed/one-at-a-time **{got['mixed_vs_solo']:.2f}×** (min {got['mixed_vs_solo_min']:.2f}×; ≥ 2)")


# ── output ───────────────────────────────────────────────────────────────────────────────────────


def render(report: Report, elapsed: float) -> str:
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}; {elapsed / 60:.1f} min. "
        "Ratios are medians of per-round ratios (the runs compared are interleaved).",
        "",
        "| model | measurement | ours | peer | ratio / note |",
        "|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in report.rows]
    lines += ["", *report.notes]
    if report.failures:
        lines += ["", "FAILED:", *(f"- {f}" for f in report.failures)]
    return "\n".join(lines)


def write(report: Report, args: argparse.Namespace) -> str:
    text = render(report, time.perf_counter() - _T0)
    if args.out:
        args.out.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps(report.data, indent=1, default=float) + "\n")
    return text


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(PLANS), default=["shapes-sd15", "sd15-size"])
    p.add_argument("--quick", action="store_true", help="fewer rounds and requests; SD1.5 size at 64 px only")
    p.add_argument("--sd15-128", action="store_true",
                   help="also the SD1.5-size throughput rows at 128 px (about 12 more minutes on 2 cores)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine two threads wait for each other)")
    p.add_argument("--out", type=Path, help="also write the markdown table to this file")
    p.add_argument("--json", type=Path, help="also write every number as JSON to this file")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    plans = dict(QUICK if args.quick else PLANS)
    if args.sd15_128:
        plans["sd15-size"] = replace(plans["sd15-size"], sizes=(*plans["sd15-size"].sizes, 128))
    report = Report()
    builders = {"shapes-sd15": build_embedded, "sd15-size": build_sd15_size}
    report.notes.append("SD1.5 size: UNet = families.published.SD15_UNET (859.5 M parameters), text encoder = "
                        "CLIP-L layout (vocabulary of the embedded tokenizer), random weights; VAE 4 levels "
                        "(32, 32, 64, 64), 8× down; scheduler DPM-Solver++ (the embedded model's); guidance 7.5 "
                        "(CFG: 2 rows per image). Adapters: random rank-r LoRA on to_q/to_k/to_v/to_out.0 "
                        "(alpha = r), files on disk. No HTTP row: serve/http.py is not on this branch.")
    for model in args.models:
        log(f"{model}: building")
        pipe = builders[model]()
        with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
            bench_model(plans[model], pipe, Path(tmp), report)
        del pipe
        gc.collect()
        write(report, args)  # after each model, so a long run interrupted later keeps what it measured
    print("\n" + write(report, args))
    if report.failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
