"""Benchmark: diffusion_lora's adapter API against diffusers' own LoRA API on a full-size SD1.5 UNet.

Both sides use the same model (the real SD1.5 UNet config, random weights, built twice from one seed)
and the same adapter files. Ours runs in pipeline A, diffusers in pipeline B; the two share nothing.

    python bench/bench_adapters.py            # full run (~10 min on 2 CPU cores)
    python bench/bench_adapters.py --quick    # fewer repetitions, k ≤ 2 (~4 min)
    python bench/bench_adapters.py --out results.md --profile-loads 3

Measured, in this order:

1. ``--adapters`` rank-16 attention LoRA files (random non-zero up/lora_B, one seed each).
2. Load one adapter: ``dl.load_lora`` (then ``dl.remove_lora``) vs ``pipe.load_lora_weights``
   (then ``pipe.delete_adapters``), interleaved, after one untimed warm-up each.
3. Switch the active pair of adapters with all of them loaded: ``dl.set_weights`` vs
   ``pipe.set_adapters``, interleaved, a different pair each repetition.
4. UNet forward (batch 1, latents 1×4×32×32 = 256 px, timestep 500, fixed random inputs) with k stacked
   adapters unfused and fused, as a ratio to the same model without adapters; plus whether unfuse gives
   back the base weights bit for bit. Each timed forward is paired with one of the other, plain UNet.

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
QUICK = Settings(adapters=50, load_reps=5, switch_reps=20, forward_reps=3, ks=(1, 2), latent=32)


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


def build_pipeline(seed: int) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline with a full-size random SD1.5 UNet and tiny other components.

    Only the UNet is ever run; the tiny text encoder's width (32, not 768) does not matter.
    """
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG).eval().requires_grad_(False)
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
    return {
        k.replace(".base_layer", ""): v
        for k, v in unet.state_dict().items()
        if ".lora_" not in k
    }


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


def bench_load(a: StableDiffusionPipeline, b: StableDiffusionPipeline, files: list[Path], s: Settings, res: Results) -> None:
    ours_load, ours_rm, their_load, their_rm = [], [], [], []
    for rep in range(s.load_reps + 1):  # rep 0 is the warm-up
        f = files[rep % len(files)]
        t_load = timed(partial(dl.load_lora, a, f))
        t_rm = timed(partial(dl.remove_lora, a, f.stem))
        d_load = timed(partial(b.load_lora_weights, str(f), adapter_name=f.stem))
        d_rm = timed(partial(b.delete_adapters, f.stem))
        if rep:
            for series, t in zip((ours_load, ours_rm, their_load, their_rm), (t_load, t_rm, d_load, d_rm)):
                series.append(t)
    b.unload_lora_weights()  # delete_adapters leaves empty LoRA wrappers; go back to plain layers
    n = s.load_reps
    res.add(f"load 1 adapter (median of {n})", ms(med(ours_load)), ms(med(their_load)),
            ratio(med(their_load), med(ours_load)))
    res.add(f"remove 1 adapter (median of {n})", ms(med(ours_rm)), ms(med(their_rm)),
            ratio(med(their_rm), med(ours_rm)))
    res.add("load + remove, sum of medians", ms(med(ours_load) + med(ours_rm)),
            ms(med(their_load) + med(their_rm)),
            ratio(med(their_load) + med(their_rm), med(ours_load) + med(ours_rm)))
    log(f"load: ours {[round(x * 1e3) for x in ours_load]} ms, diffusers {[round(x * 1e3) for x in their_load]} ms")


def profile_loads(a: StableDiffusionPipeline, b: StableDiffusionPipeline, files: list[Path], count: int) -> str:
    """cProfile of ``count`` loads each (removes not profiled), top entries inside our code and peft."""
    out = io.StringIO()
    for label, load, unload, dirs in (
        ("diffusion_lora.load_lora", lambda f: dl.load_lora(a, f), lambda f: dl.remove_lora(a, f.stem),
         ("diffusion_lora", "peft")),
        ("diffusers load_lora_weights", lambda f: b.load_lora_weights(str(f), adapter_name=f.stem),
         lambda f: b.delete_adapters(f.stem), ("diffusers", "peft")),
    ):
        prof = cProfile.Profile()
        for f in files[:count]:
            prof.enable()
            load(f)
            prof.disable()
            unload(f)
        for sort in ("tottime", "cumulative"):
            print(f"\n### cProfile of {count} × {label}: top {sort} in {'/'.join(dirs)}\n", file=out)
            stats = pstats.Stats(prof, stream=out).sort_stats(sort)
            stats.print_stats("|".join(f"/{d}/" for d in dirs), 18)
    b.unload_lora_weights()
    return out.getvalue()


# ── 3. switch the active set with many adapters loaded ──────────────────────────────────────


def bench_switch(a: StableDiffusionPipeline, b: StableDiffusionPipeline, files: list[Path], s: Settings, res: Results) -> None:
    names = [f.stem for f in files]
    t_ours = timed(lambda: [dl.load_lora(a, f) for f in files])
    t_theirs = timed(lambda: [b.load_lora_weights(str(f), adapter_name=f.stem) for f in files])
    res.add(f"load all {len(files)} adapters, total", ms(t_ours), ms(t_theirs), ratio(t_theirs, t_ours))
    log(f"loaded {len(files)} adapters: ours {t_ours:.1f} s, diffusers {t_theirs:.1f} s")
    ours, theirs = [], []
    for rep in range(s.switch_reps + 2):  # reps 0 and 1 are warm-ups
        x, y = names[rep % len(names)], names[(rep + 7) % len(names)]
        t = timed(partial(dl.set_weights, a, {x: 0.7, y: 0.3}))
        d = timed(partial(b.set_adapters, [x, y], adapter_weights=[0.7, 0.3]))
        if rep >= 2:
            ours.append(t)
            theirs.append(d)
    res.add(f"switch active pair, {len(files)} loaded (median of {s.switch_reps}; target ours ≤ 5 ms)",
            ms(med(ours)), ms(med(theirs)), ratio(med(theirs), med(ours)))
    t_ours = timed(lambda: [dl.remove_lora(a, n) for n in names])
    t_theirs = timed(lambda: b.unload_lora_weights())
    res.add(f"unload all {len(files)} (ours: remove_lora each; diffusers: unload_lora_weights)",
            ms(t_ours), ms(t_theirs), ratio(t_theirs, t_ours))


# ── 4. forward passes ─────────────────────────────────────────────────────────────────────────
#
# On a shared 2-core machine one forward can take 1.5 s or 8 s depending on what else runs, so every
# timed forward of a configuration is paired with a forward of the *other*, plain UNet (same weights)
# right after it, and a configuration's figure is the median over rounds of (config / base). The two
# UNets are separate tensors, so a calibration pair of both plain UNets is reported as the noise floor.

Inputs = tuple[torch.Tensor, torch.Tensor]


def paired_forwards(unet: torch.nn.Module, base: torch.nn.Module, inputs: Inputs, reps: int) -> list[tuple[float, float]]:
    """``reps`` rounds of (seconds of ``unet`` forward, seconds of ``base`` forward), after one warm-up round."""
    latents, context = inputs
    rounds = []
    with torch.inference_mode():
        for rep in range(reps + 1):
            t = timed(lambda: unet(latents, TIMESTEP, encoder_hidden_states=context))
            b = timed(lambda: base(latents, TIMESTEP, encoder_hidden_states=context))
            if rep:
                rounds.append((t, b))
    return rounds


@dataclass
class ForwardResult:
    """Per k: paired forward rounds unfused and fused, fuse/unfuse seconds, unfuse exactness."""

    unfused: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    fused: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    fuse_s: dict[int, float] = field(default_factory=dict)
    unfuse_s: dict[int, float] = field(default_factory=dict)
    exact: dict[int, tuple[int, int, float]] = field(default_factory=dict)


def forwards_ours(a, ref_unet, files, inputs: Inputs, s: Settings) -> ForwardResult:
    """k stacked adapters in A, loaded incrementally; ``ref_unet`` (B, plain) is base and exactness reference."""
    r = ForwardResult()
    for k in s.ks:
        for f in files[len(dl.list_loras(a)):k]:
            dl.load_lora(a, f)
        dl.set_weights(a, {f.stem: 1.0 for f in files[:k]})
        r.unfused[k] = paired_forwards(a.unet, ref_unet, inputs, s.forward_reps)
        r.fuse_s[k] = timed(lambda: dl.fuse(a))
        r.fused[k] = paired_forwards(a.unet, ref_unet, inputs, s.forward_reps)
        r.unfuse_s[k] = timed(lambda: dl.unfuse(a))
        r.exact[k] = compare_weights(a.unet, ref_unet)
        log(f"ours k={k}: unfused {paired_ratio(r.unfused[k]):.3f}×, fused {paired_ratio(r.fused[k]):.3f}×, "
            f"unfuse differs in {r.exact[k][0]}/{r.exact[k][1]} tensors")
        assert r.exact[k][0] == 0, f"dl.unfuse is not bit-exact at k={k}: {r.exact[k]}"
    for f in files[: max(s.ks)]:
        dl.remove_lora(a, f.stem)
    return r


def forwards_diffusers(b, ref_unet, files, inputs: Inputs, s: Settings) -> ForwardResult:
    """The same with diffusers' API in B; ``ref_unet`` (A, plain again) is base and exactness reference."""
    r = ForwardResult()
    loaded: list[str] = []
    for k in s.ks:
        for f in files[len(loaded):k]:
            b.load_lora_weights(str(f), adapter_name=f.stem)
            loaded.append(f.stem)
        b.set_adapters(loaded, adapter_weights=[1.0] * k)
        r.unfused[k] = paired_forwards(b.unet, ref_unet, inputs, s.forward_reps)
        r.fuse_s[k] = timed(lambda: b.fuse_lora())
        r.fused[k] = paired_forwards(b.unet, ref_unet, inputs, s.forward_reps)
        r.unfuse_s[k] = timed(lambda: b.unfuse_lora())
        r.exact[k] = compare_weights(b.unet, ref_unet)
        log(f"diffusers k={k}: unfused {paired_ratio(r.unfused[k]):.3f}×, fused {paired_ratio(r.fused[k]):.3f}×, "
            f"unfuse differs in {r.exact[k][0]}/{r.exact[k][1]} tensors (max |Δ| {r.exact[k][2]:.2e})")
        restore_from(b.unet, ref_unet)  # so the next k starts from the true base weights
    b.unload_lora_weights()
    return r


def paired_ratio(rounds: list[tuple[float, float]]) -> float:
    """Median over rounds of config time / base time."""
    return med([t / b for t, b in rounds])


def min_ratio(rounds: list[tuple[float, float]]) -> float:
    """Fastest config forward / fastest base forward: noise here only ever adds time, so minima are stable."""
    return min(t for t, _ in rounds) / min(b for _, b in rounds)


def cell(rounds: list[tuple[float, float]]) -> str:
    return f"{paired_ratio(rounds):.3f}× · min {min_ratio(rounds):.3f}× ({med([t for t, _ in rounds]):.2f} s)"


def bench_forward(a, b, files, s: Settings, res: Results) -> None:
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 4, s.latent, s.latent, generator=gen), torch.randn(1, 77, 768, generator=gen))
    same = compare_weights(a.unet, b.unet)
    assert same[0] == 0, f"the two UNets differ before the forward benchmark: {same}"
    calib = paired_forwards(a.unet, b.unet, inputs, s.forward_reps)
    log(f"plain A vs plain B: {paired_ratio(calib):.3f}× ({[(round(x, 2), round(y, 2)) for x, y in calib]} s)")
    ours = forwards_ours(a, b.unet, files, inputs, s)
    theirs = forwards_diffusers(b, a.unet, files, inputs, s)
    res.add(f"UNet forward, no adapters: median s (A; B); {s.forward_reps} rounds after 1 warm-up",
            f"{med([t for t, _ in calib]):.2f} s", f"{med([x for _, x in calib]):.2f} s",
            f"B/A {1 / paired_ratio(calib):.3f}× · min {1 / min_ratio(calib):.3f}× (noise floor)")
    for k in s.ks:
        res.add(f"forward, {k} adapter(s) unfused, × base (median s)", cell(ours.unfused[k]), cell(theirs.unfused[k]))
    for k in s.ks:
        res.add(f"forward, {k} adapter(s) fused, × base (target ours ≤ 1.01×)",
                cell(ours.fused[k]), cell(theirs.fused[k]))
    for k in s.ks:
        res.add(f"fuse / unfuse call, k={k}", f"{ms(ours.fuse_s[k])} / {ms(ours.unfuse_s[k])}",
                f"{ms(theirs.fuse_s[k])} / {ms(theirs.unfuse_s[k])}")
    for k in s.ks:
        res.add(f"unfuse bit-exact, k={k} (base tensors differing; max abs diff)",
                exact_cell(ours.exact[k]), exact_cell(theirs.exact[k]))


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
        f"torch threads {torch.get_num_threads()} · CPU cores {os.cpu_count()} · {platform.processor() or platform.machine()}",
        (
            f"model: SD1.5 UNet config, random weights, float32, CPU · adapters: rank {RANK}, attention "
            f"(to_q/to_k/to_v/to_out.0) · forward: batch 1, latents 1×4×{s.latent}×{s.latent} "
            f"({s.latent * 8} px), timestep {TIMESTEP}, torch.inference_mode"
        ),
        "ours = pipeline A (diffusion_lora API); diffusers = pipeline B (its own API); same weights and files",
        (
            "forward ratios: each timed forward is followed by one of the other pipeline's plain UNet; the "
            "figure is the median over rounds of (config / plain) · the fastest config forward / the fastest "
            "plain one (median seconds of the config)"
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
    p.add_argument("--quick", action="store_true", help="fewer repetitions, k ≤ 2 (~4 min)")
    p.add_argument("--latent", type=int, help="latent side length (default 32, i.e. 256 px)")
    p.add_argument("--adapters", type=int, help="number of adapter files (default 50)")
    p.add_argument("--out", type=Path, help="also write the table to this file")
    p.add_argument("--profile-loads", type=int, default=0, metavar="N",
                   help="after the table, print a cProfile of N loads per library")
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
    start = time.perf_counter()
    res = Results()
    res.notes.append(f"load average at start: {os.getloadavg()[0]:.2f}")
    log("building two SD1.5 UNets (same seed)")
    a, b = build_pipeline(seed=0), build_pipeline(seed=0)
    with tempfile.TemporaryDirectory(prefix="bench_adapters_") as tmp:
        files = make_files(a, Path(tmp), s.adapters)
        log(f"wrote {len(files)} adapter files of {files[0].stat().st_size / 1e6:.1f} MB")
        bench_load(a, b, files, s, res)
        log("load benchmark done")
        bench_switch(a, b, files, s, res)
        log("switch benchmark done")
        bench_forward(a, b, files, s, res)
        log("forward benchmark done")
        profile = profile_loads(a, b, files, args.profile_loads) if args.profile_loads else ""
    res.notes.append(f"load average at end: {os.getloadavg()[0]:.2f}")
    table = render(res, s, time.perf_counter() - start)
    print("\n" + table, flush=True)
    if args.out:
        args.out.write_text(table, encoding="utf-8")
    if profile:
        print(profile)


if __name__ == "__main__":
    main()
