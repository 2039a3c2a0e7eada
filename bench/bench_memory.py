"""Memory of LoRA training per family and base format: `train --estimate`'s numbers at full size, CPU
measurements of real-width reduced-depth models beside the estimate for the same reduced model, and the
peers' published numbers. A script, not a timed test.

    python bench/bench_memory.py                        # estimates + the rows already in --rows
    python bench/bench_memory.py --measure              # also run the missing measurements (slow: minutes each)

Measurements run bench/memory_probe.py in subprocesses (peak RSS with glibc trimming forced; see that file);
their rows are kept in --rows (JSON lines) so an interrupted run resumes. The estimate for each measured
row is recomputed here with the current coefficients. "extrapolated" = measured (reduced) + estimate(full)
- estimate(reduced): the per-block extrapolation of the estimate, anchored on the measurement. Estimated and
measured columns are kept apart. GB = 1e9 bytes; GPU runtime overhead (CUDA context ~0.5 GB) not included.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from memory_probe import build  # noqa: E402

from diffusion_lora.families import get_family  # noqa: E402
from diffusion_lora.models.quantize import parse_quantize  # noqa: E402
from diffusion_lora.training.config import OptimizerName  # noqa: E402
from diffusion_lora.training.memory import EstimateSettings, estimate_modules  # noqa: E402
from diffusion_lora.training.memory_models import ModelLayout, layout_of_reference  # noqa: E402

GB = 1e9
QUANTS = (None, "int8", "nf4")
# (label, variant, family, px): the estimate's full-size rows
FULL = [
    ("SD1.5", "sd1", "sd1", 512),
    ("SDXL", "sdxl", "sdxl", 1024),
    ("SD3.5 Large", "sd35-large", "sd3", 1024),
    ("Flux.1-dev", "flux1", "flux1", 512),
    ("Flux.1-dev", "flux1", "flux1", 1024),
    ("Chroma", "chroma", "chroma", 1024),
    ("Flux.2 Klein 4B", "flux2-klein", "flux2", 1024),
    ("Flux.2 Klein 4B", "flux2-klein", "flux2", 512),
    ("Flux.2 Klein 9B", "flux2-klein-9b", "flux2", 1024),
    ("Flux.2 dev", "flux2", "flux2", 1024),
]
# measured rows: name, probe arguments (all with gradient checkpointing, batch 1, LoRA r16 attn, AdamW)
_F11 = "num_layers=1;num_single_layers=1"
MEASURE = [
    ("sdxl-1024", ["--variant", "sdxl", "--depth", "transformer_layers_per_block=(1,1,1)", "--px", "1024"],
     ("none", "nf4")),
    ("flux1-512", ["--variant", "flux1", "--depth", _F11, "--px", "512"], ("none", "int8", "nf4")),
    ("flux1-1024", ["--variant", "flux1", "--depth", _F11, "--px", "1024"], ("nf4",)),
    ("klein4b-1024", ["--variant", "flux2-klein", "--family", "flux2", "--depth", _F11, "--px", "1024"],
     ("none", "nf4")),
]
TARGETS = {("SDXL", 1024): (10, "any base"), ("Flux.1-dev", 512): (10, "nf4"), ("Flux.2 Klein 4B", 1024): (8, "any")}
ANCHORS = [
    ("SimpleTuner (FLUX quickstart)", "Flux.1 LoRA r16: ~30 GB bf16, 18 GB int8, 13 GB int4, 9 GB nf4"),
    ("diffusers QLoRA Flux example / HF blog", "Flux.1-dev nf4 + 8-bit Adam + ckpt + cached text: ~9-10 GB (4090)"),
    ("kohya sd-scripts (Flux)", "24 GB bf16 -> 12 GB fp8 -> 8 GB fp8 + block swap"),
    ("OneTrainer", "8 GB preset for Flux.2 Klein 9B"),
]


def _settings(px: int, quant: str | None, ckpt: bool, optimizer: OptimizerName = OptimizerName.ADAMW):  # noqa: ANN202
    return EstimateSettings(resolution=px, batch_size=1, weight_bytes=2, activation_bytes=2,
                            quantize=parse_quantize(quant), rank=16, optimizer=optimizer, checkpointing=ckpt)


def estimates_table() -> list[str]:
    lines = ["## Estimated at full size (train --estimate; LoRA r16 attn, batch 1, bf16 compute, AdamW, cached+freed "
             "text encoders; step peak, GB)", "",
             "| model | px | bf16 ckpt | int8 ckpt | nf4 ckpt | nf4 + 8-bit AdamW, ckpt | bf16 no ckpt | "
             "setup: nf4 base + bf16 text encoders loaded |", "|---|---|---|---|---|---|---|---|"]
    for label, variant, family_name, px in FULL:
        family = get_family(family_name)
        model = layout_of_reference(family, family.variant(variant), variant)
        cells = [estimate_modules(model, _settings(px, q, True)).step_total / GB for q in QUANTS]
        adam8 = estimate_modules(model, _settings(px, "nf4", True, OptimizerName.ADAMW_8BIT)).step_total / GB
        off = estimate_modules(model, _settings(px, None, False))
        setup = estimate_modules(model, _settings(px, "nf4", True)).setup_total
        target = TARGETS.get((label, px))
        mark = f" (target <= {target[0]} GB, {target[1]})" if target else ""
        lines.append(f"| {label}{mark} | {px} | " + " | ".join(f"{c:.1f}" for c in cells)
                     + f" | {adam8:.1f} | {off.step_total / GB:.1f} | {setup / GB:.1f} |")
    return lines


def _reduced_estimate(row: dict) -> tuple[float, float, float]:
    """(weights, step growth, full-size step total) for a measured row, with the current coefficients."""
    args = types.SimpleNamespace(variant=row["variant"], family=row.get("family"), depth=row["depth"], dry_run=False)
    meta, family, variant = build(args, "cpu")
    s = _settings(row["px"], None if row["quant"] == "none" else row["quant"], row["ckpt"])
    s = dataclasses.replace(s, text_tokens=row["txt"])
    reduced = estimate_modules(ModelLayout(family, variant, meta, {}, 0, None, "probe"), s)
    full_denoiser = layout_of_reference(family, variant, "").denoiser
    full = estimate_modules(ModelLayout(family, variant, full_denoiser, {}, 0, None, ""), s)
    step = reduced.part("LoRA gradients") + reduced.part("activations") + reduced.part("dequantized weight")
    return reduced.part("denoiser weights"), step, full.step_total - reduced.step_total


def measured_table(rows: list[dict]) -> list[str]:
    lines = ["## Measured on CPU (peak RSS, real width, reduced depth) beside the estimate for the same model (GB)",
             "", "| row | depth | quant | weights meas / est (err) | step growth meas / est (err) | "
             "measured total | extrapolated to full depth |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("failed"):
            lines.append(f"| {r['name']} | failed | | | | | |")
            continue
        w_est, s_est, add = _reduced_estimate(r)
        mw, ms = r["measured_weights"], r["measured_step"]
        resident = r["estimated_resident_training_state"]
        total = mw + resident + ms
        lines.append(f"| {r['name']} | {r['depth'] or 'full'} | {r['quant']} | {mw / GB:.3f} / {w_est / GB:.3f} "
                     f"({(w_est - mw) / mw:+.0%}) | {ms / GB:.3f} / {s_est / GB:.3f} ({(s_est - ms) / ms:+.0%}) | "
                     f"{total / GB:.2f} | {(total + add) / GB:.1f} |")
    return lines


def measure(rows_file: Path, names: set[str], only: str) -> None:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    for name, args, quants in MEASURE:
        for quant in quants:
            key = f"{name}-{quant}"
            if key in names or only not in key:
                continue
            cmd = [sys.executable, str(HERE / "memory_probe.py"), *args, "--quant", quant, "--ckpt"]
            try:
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
                found = [x for x in done.stdout.splitlines() if x.startswith("{")]
                row = json.loads(found[-1]) if found else {"failed": True, "rc": done.returncode}
            except subprocess.TimeoutExpired:
                row = {"failed": True, "rc": "timeout"}
            row.update(name=key, family=args[args.index("--family") + 1] if "--family" in args else None)
            with rows_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"measured {key}: {row}", file=sys.stderr, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=Path, default=Path("/tmp/bench_memory_rows.jsonl"))
    p.add_argument("--measure", action="store_true")
    p.add_argument("--only", default="", help="measure only the rows whose name contains this")
    a = p.parse_args()
    rows = [json.loads(x) for x in a.rows.read_text().splitlines() if x.strip()] if a.rows.exists() else []
    if a.measure:
        measure(a.rows, {r["name"] for r in rows if not r.get("failed")}, a.only)
        rows = [json.loads(x) for x in a.rows.read_text().splitlines() if x.strip()]
    out = estimates_table() + [""] + measured_table(rows) + ["", "## Published by peers (their measurements)", ""]
    out += [f"- {who}: {what}" for who, what in ANCHORS]
    print("\n".join(out))


if __name__ == "__main__":
    main()
