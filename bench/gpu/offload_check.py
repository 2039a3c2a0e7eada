"""GPU check for offloading (issue 15): prints one JSON object; not a test, needs a CUDA device.

1. Generation: the tiny Flux.1 pipeline with two LoRAs, for offload none / model / sequential / group
   (through ``diffusion_lora.models.offload.apply_offload``, group with CUDA streams): the output must
   equal the no-offload output (max abs difference reported) with adapters loaded before offloading,
   and, for model and group, after load_lora / set_weights / fuse / unfuse / remove_lora done while
   offloading is on (the re-applied group hooks with streams are what only a GPU can check).
2. Training through group offload: a Flux.1-width transformer (published Flux.1-dev layout cut to
   2 double + 2 single blocks, bf16 random weights), LoRA r16 on attention, gradient checkpointing on,
   one forward+backward at 512 px; LoRA gradients and peak CUDA memory
   (``max_memory_allocated``) without offload vs diffusers' group offload (block level, one block per
   group, ``use_stream=False`` — streams are unsafe with checkpointing, SimpleTuner #1984).

    python bench/gpu/offload_check.py            # ~1-2 min on one GPU
    python bench/gpu/offload_check.py --cpu      # plumbing only (group offload CPU -> CPU, small sizes)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import diffusion_lora as dl  # noqa: E402
from diffusion_lora.models.offload import Offload, apply_offload  # noqa: E402


def _randomize(pipe, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pipe.transformer.named_parameters():
            if f".{name}." in n and ("lora_A" in n or "lora_B" in n):
                p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.2)


def _generate(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    out = pipe(prompt="a red circle", num_inference_steps=2, height=32, width=32, generator=g, output_type="pt")
    return out.images.float().cpu()


def generation(device: torch.device, modes: list[str], folder: Path) -> dict:
    source = dl.build_tiny_pipeline("tiny-flux")
    files = []
    for i, name in enumerate(("a", "b")):
        dl.add_lora(source, name, rank=4, targets="attn")
        _randomize(source, name, i + 1)
        files.append(dl.save_lora(source, name, folder / f"{name}.safetensors"))
        dl.remove_lora(source, name)

    def fresh():
        pipe = dl.build_tiny_pipeline("tiny-flux")
        pipe.set_progress_bar_config(disable=True)
        return pipe

    ref = fresh().to(device)
    steps = [("load a", lambda p: dl.load_lora(p, files[0], name="a")),
             ("load b", lambda p: dl.load_lora(p, files[1], name="b", weight=0.5)),
             ("set_weights", lambda p: dl.set_weights(p, {"a": 0.7, "b": 0.3})),
             ("fuse", dl.fuse), ("unfuse", dl.unfuse), ("remove a", lambda p: dl.remove_lora(p, "a"))]
    expected = {"base": _generate(ref)}
    for label, change in steps:
        change(ref)
        expected[label] = _generate(ref)
    results: dict = {}
    for mode in modes:
        row: dict = {}
        try:
            # adapters loaded before offloading (what `generate --offload` does)
            pipe = fresh()
            for label, change in steps[:3]:
                change(pipe)
            apply_offload(pipe, Offload(mode), device)
            row["before_offload_max_abs"] = float((_generate(pipe) - expected["set_weights"]).abs().max())
            if mode != "sequential":  # adapter changes while offloading is on
                pipe = fresh()
                apply_offload(pipe, Offload(mode), device)
                for label, change in steps:
                    change(pipe)
                    row[f"{label}_max_abs"] = float((_generate(pipe) - expected[label]).abs().max())
        except Exception as exc:  # report and go on with the next mode
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            row["trace"] = traceback.format_exc()[-1500:]
        results[mode] = row
    return results


def _flux_width(device: torch.device, dtype: torch.dtype, small: bool):
    from diffusers import FluxTransformer2DModel

    from diffusion_lora.families import FAMILIES

    ref = FAMILIES["flux1"].reference
    config = dict(ref[[s.name for s in ref].index("transformer")].config)
    config.update(num_layers=2, num_single_layers=2)
    if small:
        config.update(num_attention_heads=4, attention_head_dim=32, joint_attention_dim=256,
                      pooled_projection_dim=64, axes_dims_rope=(8, 12, 12))
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        for b in model.buffers():
            b.zero_()
    return model.to(dtype)


def _inputs(model, tokens: int, text: int, device: torch.device, dtype: torch.dtype) -> dict:
    c = model.config
    g = torch.Generator().manual_seed(0)
    side = int(tokens ** 0.5)
    img_ids = torch.zeros(tokens, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(tokens) // side, torch.arange(tokens) % side
    kw = dict(hidden_states=torch.randn(1, tokens, c.in_channels, generator=g),
              encoder_hidden_states=torch.randn(1, text, c.joint_attention_dim, generator=g),
              pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g),
              timestep=torch.tensor([0.5]), img_ids=img_ids, txt_ids=torch.zeros(text, 3))
    if c.guidance_embeds:
        kw["guidance"] = torch.tensor([3.5])
    return {k: v.to(device, dtype if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v.dtype)
            for k, v in kw.items()}


def training(device: torch.device, small: bool) -> dict:
    from diffusers.hooks import apply_group_offloading
    from peft import LoraConfig, inject_adapter_in_model

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens, text = (1024, 512) if not small else (64, 16)
    rows = {}
    grads = {}
    for offload in (False, True):
        model = _flux_width(device, dtype, small)
        inject_adapter_in_model(LoraConfig(r=16, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                                model)
        g = torch.Generator().manual_seed(1)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
            if "lora_B" in n:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.02)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        model.enable_gradient_checkpointing()
        model.train()
        if offload:
            apply_group_offloading(model, onload_device=device, offload_device=torch.device("cpu"),
                                   offload_type="block_level", num_blocks_per_group=1, use_stream=False)
        else:
            model.to(device)
        kw = _inputs(model, tokens, text, device, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            out = model(**kw, return_dict=False)[0]
        out.float().pow(2).mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        row = {"seconds": round(time.perf_counter() - start, 3)}
        if device.type == "cuda":
            row.update(resident_gb=round(base / 1e9, 3), peak_gb=round(torch.cuda.max_memory_allocated() / 1e9, 3),
                       reserved_gb=round(torch.cuda.max_memory_reserved() / 1e9, 3))
        grads[offload] = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad}
        rows["group_offload" if offload else "no_offload"] = row
        del model, out
        if device.type == "cuda":
            torch.cuda.empty_cache()
    a, b = grads[False], grads[True]
    rows["grads_all_present"] = a.keys() == b.keys() and all(v.abs().sum() > 0 for v in b.values())
    rows["grads_equal"] = all(torch.equal(a[n], b[n]) for n in a)
    rows["grads_max_rel"] = max(float((a[n] - b[n]).norm() / a[n].norm().clamp_min(1e-30)) for n in a)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="CPU plumbing run: group offload only, small sizes")
    args = ap.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device; run with --cpu for the plumbing only"}))
        sys.exit(1)
    device = torch.device("cpu" if args.cpu else "cuda")
    report: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "torch": torch.__version__}
    import diffusers

    report["diffusers"] = diffusers.__version__
    with tempfile.TemporaryDirectory() as tmp:
        for key, run in (("generation", lambda: generation(device, ["group"] if args.cpu else
                                                                       ["model", "sequential", "group"], Path(tmp))),
                         ("training", lambda: training(device, small=args.cpu))):
            start = time.perf_counter()
            try:
                report[key] = run()
            except Exception as exc:
                report[key] = {"error": f"{type(exc).__name__}: {exc}"[:500], "trace": traceback.format_exc()[-2000:]}
            report[f"{key}_seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
