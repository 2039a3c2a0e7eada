"""Benchmark: adapters on quantized bases — errors against the float and the dequantized base, and costs.

For each model (every buildable tiny pipeline and the embedded ``shapes-sd15``) and each quantization
(bitsandbytes nf4, torchao int8 and fp8 weight-only through ``quantize_denoiser``; GGUF Q8_0 and Q4_0 written
with the ``gguf`` package and loaded through diffusers' ``from_single_file``), with one rank-16 attention LoRA
(random up with std 0.02, PEFT's initial down) made on the float base:

* ``base``: the quantized denoiser's output vs the float32 one, ‖q − f‖/‖f‖ (the quantization error);
* ``lora vs deq``: LoRA on the quantized base vs the same LoRA on a float base holding the dequantized weights,
  max|q − d| / max|d| (float rounding: what the engine itself adds);
* ``lora vs fp32``: LoRA on the quantized base vs the LoRA on the float32 base, ‖q − f‖/‖f‖;
* ``fused vs unfused``: the fused quantized output vs the unfused one, ‖·‖ relative (the re-quantization error of
  W + ΔW; GGUF: fuse is refused), and the worst layer's ‖deq(fused) − (deq(W) + ΔW)‖/‖deq(W) + ΔW‖;
* times, medians of interleaved runs: ``load_lora`` (then ``remove_lora``) and one fuse + unfuse cycle on the
  quantized base as a ratio to the float32 base.

Outputs are one denoiser forward on the inputs of the first step of a two-step generation. Run:

    python bench/bench_quantized.py                 # every tiny model + shapes-sd15 (~5 min on 2 quiet cores)
    python bench/bench_quantized.py --models tiny-flux shapes-sd15 --repeats 9
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import diffusion_lora as dl  # noqa: E402
from diffusion_lora.adapters import plain_modules  # noqa: E402
from diffusion_lora.adapters.quantized import dequantized_weight, quant_kind  # noqa: E402
from diffusion_lora.adapters.state import state_of  # noqa: E402
from diffusion_lora.families import detect_family  # noqa: E402
from diffusion_lora.models.invoke import run_pipeline  # noqa: E402
from diffusion_lora.models.quantize import quantize_denoiser  # noqa: E402
from diffusion_lora.models.tiny import missing_classes  # noqa: E402
from tests.gguf_files import write_gguf  # noqa: E402

MODES = ("nf4", "int8", "fp8", "Q8_0", "Q4_0")


def build(model: str):
    pipe = dl.load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoiser_name(pipe) -> str:
    return detect_family(pipe).denoiser


def capture(pipe) -> tuple[tuple, dict]:
    """The denoiser's arguments at the first step of a two-step 32 px (64 px for SDXL) generation."""
    seen: list = []
    hook = getattr(pipe, denoiser_name(pipe)).register_forward_pre_hook(
        lambda m, a, k: seen.append(copy.deepcopy((a, k))) if not seen else None, with_kwargs=True)
    size = 64 if type(pipe).__name__.startswith("StableDiffusionXL") else 32
    try:
        with torch.no_grad():
            run_pipeline(pipe, "a red circle", num_inference_steps=2, height=size, width=size, output_type="latent",
                         generator=torch.Generator().manual_seed(0), images=_images(pipe, size))
    finally:
        hook.remove()
    args, kwargs = seen[0]
    return args, {**kwargs, "return_dict": False}


def _images(pipe, size: int) -> dict:
    from PIL import Image

    from diffusion_lora.families import detect_variant

    out = {}
    for i, name in enumerate(detect_variant(pipe).inputs):
        rng = np.random.default_rng(100 + i)
        mode = "L" if name == "mask_image" else "RGB"
        shape = (size, size) if mode == "L" else (size, size, 3)
        out[name] = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
    return out


def forward(pipe, inputs) -> torch.Tensor:
    args, kwargs = inputs
    with torch.no_grad():
        return getattr(pipe, denoiser_name(pipe))(*args, **kwargs)[0].float()


def gguf_quantized(src, qtype: str, folder: Path):
    from diffusers import GGUFQuantizationConfig

    pipe = copy.deepcopy(src)
    name = denoiser_name(pipe)
    model = getattr(pipe, name)
    model.save_config(folder)
    path = write_gguf(model, folder / f"{qtype}.gguf", qtype)
    loaded = type(model).from_single_file(str(path), config=str(folder), torch_dtype=torch.float32,
                                          quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32))
    setattr(pipe, name, loaded)
    return pipe


def quantized(src, mode: str, folder: Path):
    if mode.startswith("Q"):
        return gguf_quantized(src, mode, folder)
    pipe = copy.deepcopy(src)
    quantize_denoiser(pipe, mode)
    return pipe


def dequantized_twin(src, q):
    twin = copy.deepcopy(src)
    target = getattr(twin, denoiser_name(twin))
    with torch.no_grad():
        for path, module in plain_modules(getattr(q, denoiser_name(q))):
            if quant_kind(module) is not None:
                target.get_submodule(path).weight.copy_(dequantized_weight(module))
    return twin


def lora_file(src, folder: Path) -> Path:
    pipe = copy.deepcopy(src)
    dl.add_lora(pipe, "l", rank=16)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for site in state_of(pipe).sites():
            w = site.layer.lora_B["l"].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.02)
    return dl.save_lora(pipe, "l", folder / "l.safetensors")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def worst_requant(pipe) -> float:
    """The largest ‖deq(fused) − (deq(W) + ΔW)‖ / ‖deq(W) + ΔW‖ over the fused layers (ΔW from PEFT's layer)."""
    worst = 0.0
    for site in state_of(pipe).sites():
        layer = site.layer
        fused = dequantized_weight(layer.get_base_layer())
        original = dequantized_weight_of(state_of(pipe).fused, layer)
        target = original + layer.get_delta_weight("l")
        worst = max(worst, rel(fused, target))
    return worst


def dequantized_weight_of(fused, layer) -> torch.Tensor:
    weight = next(w for lay, w, _ in fused.originals if lay is layer)
    holder = torch.nn.Module()
    holder.weight = weight
    return dequantized_weight(holder)


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        gc.disable()
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
        gc.enable()
    return out


def measure(model: str, modes: list[str], repeats: int) -> list[dict]:
    folder = Path(tempfile.mkdtemp(prefix="bench-quantized-"))
    src = build(model)
    inputs = capture(src)
    path = lora_file(src, folder)
    fp = copy.deepcopy(src)
    out_f = forward(fp, inputs)
    dl.load_lora(fp, path, name="l")
    lora_f = forward(fp, inputs)
    rows = []
    for mode in modes:
        try:
            q = quantized(src, mode, folder)
        except Exception as exc:  # noqa: BLE001 — a mode this model cannot take is reported, not fatal
            rows.append({"model": model, "mode": mode, "error": f"{type(exc).__name__}: {str(exc)[:80]}"})
            continue
        d = dequantized_twin(src, q)
        row = {"model": model, "mode": mode, "base": rel(forward(q, inputs), out_f)}
        for p in (q, d):
            dl.load_lora(p, path, name="l")
        lora_q, lora_d = forward(q, inputs), forward(d, inputs)
        row["vs_deq"] = float((lora_q - lora_d).abs().max() / lora_d.abs().max())
        row["vs_fp32"] = rel(lora_q, lora_f)
        if not mode.startswith("Q"):
            dl.fuse(q)
            row["fused"] = rel(forward(q, inputs), lora_q)
            row["requant"] = worst_requant(q)
            dl.unfuse(q)
        # interleaved: quantized, float, quantized, float, …
        load_q, load_f, cycle_q, cycle_f = [], [], [], []
        for _ in range(repeats):
            for p, store in ((q, load_q), (fp, load_f)):
                dl.remove_lora(p, "l")
                store += timed(lambda p=p: dl.load_lora(p, path, name="l"), 1)
            if not mode.startswith("Q"):
                for p, store in ((q, cycle_q), (fp, cycle_f)):
                    store += timed(lambda p=p: (dl.fuse(p), dl.unfuse(p)), 1)
        row["load_ms"] = 1e3 * statistics.median(load_q)
        row["load_ratio"] = statistics.median(load_q) / statistics.median(load_f)
        if cycle_q:
            row["cycle_ms"] = 1e3 * statistics.median(cycle_q)
            row["cycle_ratio"] = statistics.median(cycle_q) / statistics.median(cycle_f)
        rows.append(row)
        del q, d
    return rows


def table(rows: list[dict]) -> str:
    head = ("| model | quant | base vs fp32 | LoRA: vs dequantized | LoRA: vs fp32 | fused vs unfused | worst layer "
            "re-quant | load_lora ms (× fp32) | fuse+unfuse ms (× fp32) |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['mode']} | {r['error']} | | | | | | |")
            continue
        fused = f"{r['fused']:.2e}" if "fused" in r else "refused"
        requant = f"{r['requant']:.2e}" if "requant" in r else "—"
        cycle = f"{r['cycle_ms']:.1f} (×{r['cycle_ratio']:.2f})" if "cycle_ms" in r else "—"
        lines.append(f"| {r['model']} | {r['mode']} | {r['base']:.2e} | {r['vs_deq']:.1e} | {r['vs_fp32']:.2e} | "
                     f"{fused} | {requant} | {r['load_ms']:.1f} (×{r['load_ratio']:.2f}) | {cycle} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    tiny = [k for k in dl.families.tiny_models() if not missing_classes(k)]
    parser.add_argument("--models", nargs="*", default=[*tiny, "shapes-sd15"])
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for model in args.models:
        rows += measure(model, args.modes, args.repeats)
        print(table(rows[-len(args.modes):]).split("\n", 2)[-1], flush=True)
    print()
    print(f"torch {torch.__version__}, {args.threads} thread(s), medians of {args.repeats} interleaved runs")
    print(table(rows))


if __name__ == "__main__":
    main()
