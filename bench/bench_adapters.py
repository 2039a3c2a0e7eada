"""Benchmark: diffusion_lora's adapter API against diffusers' own LoRA API on a full-size SD1.5 UNet.

Both sides use the same model (the real SD1.5 UNet config, random weights, built from one seed) and
the same adapter files. Ours runs in pipeline A, diffusers in pipeline B; the two share nothing. A third,
plain UNet C with the same weights is the no-adapter reference for forwards and for bit-exactness.

    python bench/bench_adapters.py            # full run (~8 min on 2 quiet CPU cores, ~15 busy)
    python bench/bench_adapters.py --quick    # 20 adapters, fewer repetitions, k ≤ 2 (~3–4 min)
    python bench/bench_adapters.py --out results.md --profile 3
    python bench/bench_adapters.py --quick --load-only   # the load rows only (~3 min)

Measured, in this order:

1. ``--adapters`` rank-16 attention LoRA files (random non-zero up/lora_B, one seed each).
2. Load one adapter: ``dl.load_lora`` (then ``dl.remove_lora``) vs ``pipe.load_lora_weights``
   (then ``pipe.delete_adapters``), interleaved, after one untimed warm-up each; also into plain
   layers and next to an already loaded adapter. Everything runs at torch's default thread count
   (what a user gets); the main load row is repeated with ``torch.set_num_threads(1)`` and while a
   CPU-bound process (a Python loop of matmuls, one thread) runs beside the benchmark.
3. Switch the active pair of adapters with all of them loaded: ``dl.set_weights`` vs
   ``pipe.set_adapters``, interleaved, a different pair each repetition.
4. UNet forward (batch 1, latents 1×4×32×32 = 256 px, timestep 500, fixed random inputs) with k stacked
   adapters unfused and fused, as a ratio to the same model without adapters; plus whether unfuse gives
   back the base weights bit for bit. A, B and C run in turn, so all three see the same slow periods.

Timings are wall-clock (``time.perf_counter``) with the garbage collector off; each figure is a median.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import logging
import os
import platform
import pstats
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# transformers warns at import that torchvision is missing; it does not matter here.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import diffusers
import peft
import torch
from busy import busy_cpu  # bench/busy.py, beside this script
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft.tuners.lora import LoraLayer

import diffusion_lora as dl

# The UNet config of runwayml/stable-diffusion-v1-5 (unet/config.json); 859.5 M parameters.
SD15_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
RANK = 16
LORA_UP_STD = 0.02  # non-zero up/lora_B so fused weights really change
TIMESTEP = 500
_T0 = time.perf_counter()


@dataclass(frozen=True)
class Settings:
    """What one run measures; ``--quick`` picks the smaller values."""

    adapters: int
    load_reps: int
    switch_reps: int
    forward_reps: int
    ks: tuple[int, ...]
    latent: int


FULL = Settings(adapters=50, load_reps=9, switch_reps=30, forward_reps=5, ks=(1, 2, 4, 8), latent=32)
QUICK = Settings(adapters=20, load_reps=5, switch_reps=20, forward_reps=3, ks=(1, 2), latent=32)


@dataclass
class Results:
    """Rows of the final table, in order: (measurement, ours, diffusers, diffusers/ours)."""

    rows: list[tuple[str, str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, what: str, ours: str, theirs: str, ratio: str = "") -> None:
        self.rows.append((what, ours, theirs, ratio))


# ── timing helpers ────────────────────────────────────────────────────────────────────────────


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Collect once, then keep the collector out of the timed region (it adds ms-scale noise)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes."""
    with no_gc():
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def ms(x: float) -> str:
    return f"{x * 1e3:.1f} ms" if x < 10 else f"{x:.1f} s"


def ratio(num: float, den: float) -> str:
    return f"{num / den:.2f}×"


def log(msg: str) -> None:
    """Progress line with seconds since import, so a long run can be followed."""
    print(f"[{time.perf_counter() - _T0:7.1f} s] {msg}", flush=True)


# ── model and files ──────────────────────────────────────────────────────────────────────────


def build_unet(seed: int) -> UNet2DConditionModel:
    """A full-size SD1.5 UNet with random weights; the same seed gives bit-identical weights."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(**SD15_UNET_CONFIG).eval().requires_grad_(False)


def build_pipeline(unet: UNet2DConditionModel) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline around ``unet`` with the tiny VAE, text encoder and tokenizer.

    Only the UNet is ever run; the tiny text encoder's width (32, not 768) does not matter.
    """
    tiny = dl.build_tiny_pipeline("tiny-sd15")
    return StableDiffusionPipeline(
        vae=tiny.vae,
        text_encoder=tiny.text_encoder,
        tokenizer=tiny.tokenizer,
        unet=unet,
        scheduler=tiny.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def make_files(pipe: StableDiffusionPipeline, folder: Path, count: int) -> list[Path]:
    """Write ``count`` rank-16 attention LoRA files with our API, each from its own seed."""
    files = []
    for i in range(count):
        name = f"lora_{i:02d}"
        torch.manual_seed(1000 + i)  # seeds PEFT's random init of down/lora_A
        dl.add_lora(pipe, name, rank=RANK, targets="attn")
        gen = torch.Generator().manual_seed(2000 + i)
        with torch.no_grad():
            for layer in pipe.unet.modules():
                if isinstance(layer, LoraLayer) and name in layer.lora_B:
                    w = layer.lora_B[name].weight
                    w.copy_(torch.randn(w.shape, generator=gen) * LORA_UP_STD)
        files.append(dl.save_lora(pipe, name, folder / f"{name}.safetensors"))
        dl.remove_lora(pipe, name)
    return files


def base_weights(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's state dict without LoRA tensors, keyed as in the plain model (``base_layer`` dropped)."""
    return {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if ".lora_" not in k}


def compare_weights(got: torch.nn.Module, reference: torch.nn.Module) -> tuple[int, int, float]:
    """(tensors that differ, tensors compared, largest |difference|) between two UNets' base weights."""
    a, b = base_weights(got), base_weights(reference)
    if a.keys() != b.keys():
        raise RuntimeError(f"state dicts differ in keys: {sorted(a.keys() ^ b.keys())[:5]}")
    differ, worst = 0, 0.0
    for k, t in a.items():
        if not torch.equal(t, b[k]):
            differ += 1
            worst = max(worst, (t.float() - b[k].float()).abs().max().item())
    return differ, len(a), worst


def restore_from(got: torch.nn.Module, reference: torch.nn.Module) -> None:
    """Copy the reference's base weights into ``got`` (undoes the drift of a non-exact unfuse)."""
    ref = base_weights(reference)
    with torch.no_grad():
        for k, t in base_weights(got).items():
            if not torch.equal(t, ref[k]):
                t.copy_(ref[k])


# ── 2. load one adapter ──────────────────────────────────────────────────────────────────────


def load_rounds(a, b, files: list[Path], reps: int, their_unload: Callable[[str], object]) -> list[tuple[float, ...]]:
    """``reps`` rounds of (ours load, ours remove, diffusers load, diffusers unload) seconds, after a warm-up.

    Ours and diffusers alternate within each round, so a slow period of the machine hits both.
    """
    rounds = []
    for rep in range(reps + 1):
        f = files[rep % len(files)]
        times = (
            timed(partial(dl.load_lora, a, f)),
            timed(partial(dl.remove_lora, a, f.stem)),
            timed(partial(b.load_lora_weights, str(f), adapter_name=f.stem)),
            timed(partial(their_unload, f.stem)),
        )
        if rep:
            rounds.append(times)
    return rounds


def column(rounds: list[tuple[float, ...]], i: int) -> float:
    return med([r[i] for r in rounds])


# One core's worth of steady CPU work in another process: what a user's machine usually has beside
# the program (a browser, a second job). torch's thread pool then waits for a core at every parallel op.




@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bench_load(a, b, files: list[Path], s: Settings, res: Results) -> None:
    n = s.load_reps
    threads = torch.get_num_threads()
    # As asked: delete after each load. diffusers' delete_adapters leaves empty PEFT wrappers behind,
    # so its later loads skip creating them; our remove_lora gives back plain layers every time.
    main = load_rounds(a, b, files[:-1], n, b.delete_adapters)
    b.unload_lora_weights()
    plain = load_rounds(a, b, files[:-1], n, lambda _: b.unload_lora_weights())
    dl.load_lora(a, files[-1])
    b.load_lora_weights(str(files[-1]), adapter_name=files[-1].stem)
    wrapped = load_rounds(a, b, files[:-1], n, b.delete_adapters)
    dl.remove_lora(a, files[-1].stem)
    b.unload_lora_weights()
    with torch_threads(1):
        one_thread = load_rounds(a, b, files[:-1], n, lambda _: b.unload_lora_weights())
    with busy_cpu():
        busy = load_rounds(a, b, files[:-1], n, lambda _: b.unload_lora_weights())
    rows = (
        (f"load 1 adapter (median of {n}; ours remove_lora / diffusers delete_adapters after each)", main, 0, 2),
        ("remove 1 adapter (remove_lora / delete_adapters)", main, 1, 3),
        ("load 1 adapter into plain layers (diffusers: unload_lora_weights after each)", plain, 0, 2),
        ("load 1 adapter next to 1 loaded adapter (layers already wrapped)", wrapped, 0, 2),
        (f"load 1 adapter into plain layers, torch.set_num_threads(1) (default here: {threads})", one_thread, 0, 2),
        (
            f"load 1 adapter into plain layers while a CPU-bound process runs beside it ({threads} threads)",
            busy,
            0,
            2,
        ),
    )
    for what, rounds, i, j in rows:
        # Ratio of the medians, then the median of each round's own ratio (ours and diffusers ran
        # back to back in a round, so a slow period of the machine cancels there).
        per_round = med([r[j] / r[i] for r in rounds])
        cell = f"{ratio(column(rounds, j), column(rounds, i))} · per round {per_round:.2f}×"
        res.add(what, ms(column(rounds, i)), ms(column(rounds, j)), cell)
    for label, rounds in (("quiet", plain), ("1 thread", one_thread), ("busy CPU", busy)):
        ours, theirs = [round(r[0] * 1e3) for r in rounds], [round(r[2] * 1e3) for r in rounds]
        log(f"load, {label}: ours {ours} ms, diffusers {theirs} ms")


def profile_text(prof: cProfile.Profile, title: str, dirs: Sequence[str], top: int = 16) -> str:
    """Top entries of ``prof`` inside the given package folders, by own time and by cumulative time."""
    out = io.StringIO()
    for sort in ("tottime", "cumulative"):
        print(f"\n### cProfile of {title}: top {sort} in {', '.join(dirs)}\n", file=out)
        pstats.Stats(prof, stream=out).sort_stats(sort).print_stats("|".join(f"/{d}/" for d in dirs), top)
    return out.getvalue()


def profile_loads(a, b, files: list[Path], count: int) -> str:
    """cProfile of ``count`` loads per library into plain layers (the unloads are not profiled)."""
    texts = []
    for label, load, unload, dirs in (
        (
            "diffusion_lora.load_lora",
            partial(dl.load_lora, a),
            lambda f: dl.remove_lora(a, f.stem),
            ("diffusion_lora", "peft", "safetensors"),
        ),
        (
            "diffusers load_lora_weights",
            lambda f: b.load_lora_weights(str(f), adapter_name=f.stem),
            lambda f: b.unload_lora_weights(),
            ("diffusers", "peft", "safetensors"),
        ),
    ):
        prof = cProfile.Profile()
        for f in files[:count]:
            prof.enable()
            load(f)
            prof.disable()
            unload(f)
        texts.append(profile_text(prof, f"{count} × {label} into plain layers", dirs))
    return "".join(texts)


# ── 3. switch the active set with many adapters loaded ──────────────────────────────────────


def bench_switch(a, b, files: list[Path], s: Settings, res: Results, profile: int) -> str:
    """Time switching the active pair with all adapters loaded; returns a cProfile text if ``profile``."""
    names = [f.stem for f in files]
    t_ours = timed(lambda: [dl.load_lora(a, f) for f in files])
    t_theirs = timed(lambda: [b.load_lora_weights(str(f), adapter_name=f.stem) for f in files])
    res.add(
        f"load all {len(files)} adapters one after another, total", ms(t_ours), ms(t_theirs), ratio(t_theirs, t_ours)
    )
    log(f"loaded {len(files)} adapters: ours {t_ours:.1f} s, diffusers {t_theirs:.1f} s")
    ours, theirs = [], []
    for rep in range(s.switch_reps + 2):  # reps 0 and 1 are warm-ups
        x, y = names[rep % len(names)], names[(rep + len(names) // 2) % len(names)]
        t = timed(partial(dl.set_weights, a, {x: 0.7, y: 0.3}))
        d = timed(partial(b.set_adapters, [x, y], adapter_weights=[0.7, 0.3]))
        if rep >= 2:
            ours.append(t)
            theirs.append(d)
    res.add(
        f"switch active pair, {len(files)} loaded (median of {s.switch_reps}; target ours ≤ 5 ms)",
        ms(med(ours)),
        ms(med(theirs)),
        ratio(med(theirs), med(ours)),
    )
    text = ""
    if profile:
        prof = cProfile.Profile()
        for rep in range(profile):
            with profiling(prof):
                dl.set_weights(a, {names[rep]: 0.7, names[-1 - rep]: 0.3})
        text = profile_text(prof, f"{profile} × dl.set_weights with {len(files)} loaded", ("diffusion_lora", "peft"))
    t_ours = timed(lambda: [dl.remove_lora(a, n) for n in names])
    t_theirs = timed(b.unload_lora_weights)
    res.add(
        f"unload all {len(files)} (ours: remove_lora × {len(files)}; diffusers: one unload_lora_weights)",
        ms(t_ours),
        ms(t_theirs),
        ratio(t_theirs, t_ours),
    )
    return text


@contextlib.contextmanager
def profiling(prof: cProfile.Profile) -> Iterator[None]:
    prof.enable()
    try:
        yield
    finally:
        prof.disable()


# ── 4. forward passes ─────────────────────────────────────────────────────────────────────────
#
# On a shared CPU machine one forward can take 1.5 s or 8 s depending on what else runs. So the two
# adapted UNets (A: ours, B: diffusers', both with the same k adapters) and a third, plain UNet C with
# the same weights are run in turn, in a rotating order, round after round: both libraries and the
# base see the same slow periods, and a configuration's figure is the median over rounds of
# (its time / C's time). A calibration with all three plain gives the noise floor.

Inputs = tuple[torch.Tensor, torch.Tensor]


def forward_rounds(unets: Sequence[torch.nn.Module], inputs: Inputs, reps: int) -> list[list[float]]:
    """``reps`` rounds of one forward per UNet (seconds, in the order given), after one warm-up round."""
    latents, context = inputs
    rounds = []
    with torch.inference_mode():
        for rep in range(reps + 1):
            times = [0.0] * len(unets)
            for i in [(rep + j) % len(unets) for j in range(len(unets))]:
                times[i] = timed(partial(unets[i], latents, TIMESTEP, encoder_hidden_states=context))
            if rep:
                rounds.append(times)
    return rounds


def vs_base(rounds: list[list[float]], i: int) -> tuple[float, float, float]:
    """(median of per-round time_i / time_base, fastest_i / fastest base, median seconds of i); base is last."""
    ratios = [r[i] / r[-1] for r in rounds]
    fastest = min(r[i] for r in rounds) / min(r[-1] for r in rounds)
    return med(ratios), fastest, med([r[i] for r in rounds])


def cell(x: tuple[float, float, float]) -> str:
    return f"{x[0]:.3f}× · min {x[1]:.3f}× ({x[2]:.2f} s)"


@dataclass
class KResult:
    """One k: forward rounds (A, B, C) unfused and fused, fuse/unfuse seconds, unfuse exactness of A and B."""

    unfused: list[list[float]]
    fused: list[list[float]]
    fuse_s: tuple[float, float]
    unfuse_s: tuple[float, float]
    exact: tuple[tuple[int, int, float], tuple[int, int, float]]


def measure_k(a, b, c_unet, files: list[Path], k: int, inputs: Inputs, s: Settings) -> KResult:
    """Bring A and B to k adapters (loading only the missing ones), then time unfused and fused."""
    for f in files[len(dl.list_loras(a)) : k]:
        dl.load_lora(a, f)
    for f in files[len(b.get_list_adapters().get("unet", [])) : k]:
        b.load_lora_weights(str(f), adapter_name=f.stem)
    dl.set_weights(a, {f.stem: 1.0 for f in files[:k]})
    b.set_adapters([f.stem for f in files[:k]], adapter_weights=[1.0] * k)
    unets = (a.unet, b.unet, c_unet)
    unfused = forward_rounds(unets, inputs, s.forward_reps)
    fuse_s = (timed(partial(dl.fuse, a)), timed(b.fuse_lora))
    fused = forward_rounds(unets, inputs, s.forward_reps)
    unfuse_s = (timed(partial(dl.unfuse, a)), timed(b.unfuse_lora))
    exact = (compare_weights(a.unet, c_unet), compare_weights(b.unet, c_unet))
    restore_from(b.unet, c_unet)  # diffusers' unfuse is not exact; start the next k from the true weights
    r = KResult(unfused, fused, fuse_s, unfuse_s, exact)
    log(
        f"k={k}: unfused ours {cell(vs_base(unfused, 0))}, diffusers {cell(vs_base(unfused, 1))}; "
        f"fused ours {cell(vs_base(fused, 0))}, diffusers {cell(vs_base(fused, 1))}; "
        f"unfuse differs: ours {exact[0][0]}, diffusers {exact[1][0]} of {exact[0][1]} tensors"
    )
    assert exact[0][0] == 0, f"dl.unfuse is not bit-exact at k={k}: {exact[0]}"
    return r


def bench_forward(a, b, c_unet, files: list[Path], s: Settings, res: Results) -> None:
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 4, s.latent, s.latent, generator=gen), torch.randn(1, 77, 768, generator=gen))
    for unet in (a.unet, b.unet):
        same = compare_weights(unet, c_unet)
        assert same[0] == 0, f"the UNets differ before the forward benchmark: {same}"
    calib = forward_rounds((a.unet, b.unet, c_unet), inputs, s.forward_reps)
    log(f"all plain: A {cell(vs_base(calib, 0))}, B {cell(vs_base(calib, 1))} of C")
    results = {k: measure_k(a, b, c_unet, files, k, inputs, s) for k in s.ks}
    for f in files[: max(s.ks)]:
        dl.remove_lora(a, f.stem)
    b.unload_lora_weights()
    res.add(
        f"UNet forward, all three plain: × C (noise floor); {s.forward_reps} rounds after 1 warm-up, "
        f"C median {med([r[2] for r in calib]):.2f} s",
        cell(vs_base(calib, 0)),
        cell(vs_base(calib, 1)),
    )
    for k, r in results.items():
        res.add(f"forward, {k} adapter(s) unfused, × plain", cell(vs_base(r.unfused, 0)), cell(vs_base(r.unfused, 1)))
    for k, r in results.items():
        res.add(
            f"forward, {k} adapter(s) fused, × plain (target ours ≤ 1.01×)",
            cell(vs_base(r.fused, 0)),
            cell(vs_base(r.fused, 1)),
        )
    for k, r in results.items():
        res.add(
            f"fuse / unfuse call, k={k}",
            f"{ms(r.fuse_s[0])} / {ms(r.unfuse_s[0])}",
            f"{ms(r.fuse_s[1])} / {ms(r.unfuse_s[1])}",
        )
    for k, r in results.items():
        res.add(
            f"unfuse bit-exact, k={k} (base tensors differing; max abs diff)",
            exact_cell(r.exact[0]),
            exact_cell(r.exact[1]),
        )


def exact_cell(e: tuple[int, int, float]) -> str:
    differ, total, worst = e
    return f"yes (0/{total})" if differ == 0 else f"NO ({differ}/{total}; {worst:.1e})"


# ── report ───────────────────────────────────────────────────────────────────────────────────


def render(res: Results, s: Settings, elapsed: float) -> str:
    lines = [
        (
            f"torch {torch.__version__} · diffusers {diffusers.__version__} · peft {peft.__version__} · "
            f"diffusion_lora {dl.__version__} · python {platform.python_version()}"
        ),
        (
            f"torch threads {torch.get_num_threads()} (torch's default here, used by every row but the 1-thread one) · "
            f"CPU cores {os.cpu_count()} · {platform.processor() or platform.machine()}"
        ),
        (
            f"model: SD1.5 UNet config, random weights, float32, CPU · adapters: rank {RANK}, attention "
            f"(to_q/to_k/to_v/to_out.0) · forward: batch 1, latents 1×4×{s.latent}×{s.latent} "
            f"({s.latent * 8} px), timestep {TIMESTEP}, torch.inference_mode"
        ),
        "ours = pipeline A (diffusion_lora API); diffusers = pipeline B (its own API); same weights and files",
        (
            "forward: A, B and a plain UNet C (same weights) run in turn, round after round; a cell is the "
            "median over rounds of (time / C's time) · fastest / fastest C (median seconds)"
        ),
        *res.notes,
        f"total runtime {elapsed / 60:.1f} min",
        "",
        "| measurement | ours | diffusers | diffusers / ours |",
        "|---|---|---|---|",
    ]
    lines += [f"| {w} | {o} | {t} | {r} |" for w, o, t, r in res.rows]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="20 adapters, fewer repetitions, k ≤ 2 (~3–4 min)")
    p.add_argument("--latent", type=int, help="latent side length (default 32, i.e. 256 px)")
    p.add_argument("--adapters", type=int, help="number of adapter files (default 50; 20 with --quick)")
    p.add_argument("--out", type=Path, help="also write the table to this file")
    p.add_argument("--load-only", action="store_true", help="only the load rows (no switch, no forward)")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after the table, print a cProfile of N loads per library and of N dl.set_weights",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    s = QUICK if args.quick else FULL
    overrides = {k: v for k, v in (("latent", args.latent), ("adapters", args.adapters)) if v}
    s = Settings(**{**s.__dict__, **overrides})
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    diffusers.utils.logging.set_verbosity_error()  # "No LoRA keys ... text_encoder" on every load
    # PEFT warns on every second adapter that a peft_config exists; stacking is what we do here.
    warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")
    warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")  # delete_adapters
    start = time.perf_counter()
    res = Results()
    res.notes.append(f"load average at start: {os.getloadavg()[0]:.2f}")
    log("building the SD1.5 UNets (same seed)")
    a, b = build_pipeline(build_unet(0)), build_pipeline(build_unet(0))
    with tempfile.TemporaryDirectory(prefix="bench_adapters_") as tmp:
        files = make_files(a, Path(tmp), s.adapters)
        log(f"wrote {len(files)} adapter files of {files[0].stat().st_size / 1e6:.1f} MB")
        bench_load(a, b, files, s, res)
        log("load benchmark done")
        profile = ""
        if not args.load_only:
            profile = bench_switch(a, b, files, s, res, args.profile)
            log("switch benchmark done")
            bench_forward(a, b, build_unet(0), files, s, res)
            log("forward benchmark done")
        if args.profile:
            profile = profile_loads(a, b, files, args.profile) + profile
    res.notes.append(f"load average at end: {os.getloadavg()[0]:.2f}")
    table = render(res, s, time.perf_counter() - start)
    print("\n" + table, flush=True)
    if args.out:
        args.out.write_text(table, encoding="utf-8")
    if profile:
        print(profile)


if __name__ == "__main__":
    main()
