"""Measure the CPU peak memory of one LoRA training step on a real-width, reduced-depth denoiser, beside
``train --estimate``'s numbers for the same reduced model. Used by bench/bench_memory.py, by the
calibration in diffusion_lora/families/memory.py and by tests/test_memory_estimate.py.

    MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072 \\
    python bench/memory_probe.py --variant flux1 --depth "num_layers=1;num_single_layers=1" --px 512 --quant nf4

Method: the variant's published denoiser config with fewer blocks, built on the meta device, then
``to_empty`` + bf16 random weights, quantized with the library's ``quantize_denoiser``; LoRA through the
library's injection (PEFT's quantized layers), float32 LoRA weights as the trainer keeps them; AdamW's
state created first (a zero-gradient step) so the measured step is a steady-state one. Peak = ``VmHWM``
(reset by writing 5 to /proc/self/clear_refs) minus RSS before the step. Without the two malloc settings
glibc keeps freed chunks and RSS over-reports. Prints one JSON line.

``--cuda`` measures on a GPU instead (torch.cuda.max_memory_allocated / max_memory_reserved); ``--dry-run``
shrinks the model to a tiny width so the script itself can be checked anywhere in seconds.
"""

from __future__ import annotations

import argparse
import ast
import gc
import json
import os
import sys
import time
import types

import torch

_WANTED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def rss() -> int:
    gc.collect()
    return _status("VmRSS")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def parse_depth(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(";")):
        key, _, value = item.partition("=")
        out[key.strip()] = ast.literal_eval(value.strip())
    return out


def inputs_for(model: torch.nn.Module, px: int, txt: int, batch: int, dtype: torch.dtype, device: str) -> dict:
    """Random inputs of the right shapes for one call of ``model`` (bench code: keyed by denoiser class)."""
    g = torch.Generator().manual_seed(0)
    c = model.config
    name = type(model).__name__

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    t = torch.full((batch,), 0.5, dtype=dtype, device=device)
    if name == "UNet2DConditionModel":
        side = px // 8
        kw = dict(sample=rnd(batch, c.in_channels, side, side), timestep=t * 1000,
                  encoder_hidden_states=rnd(batch, 77, c.cross_attention_dim), return_dict=False)
        if c.addition_embed_type == "text_time":
            text_dim = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            kw["added_cond_kwargs"] = {"text_embeds": rnd(batch, text_dim), "time_ids": rnd(batch, 6)}
        return kw
    n = (px // 16) ** 2
    axes = 4 if name.startswith("Flux2") else 3
    kw = dict(hidden_states=rnd(batch, n, c.in_channels), encoder_hidden_states=rnd(batch, txt, c.joint_attention_dim),
              timestep=t, img_ids=torch.zeros(n, axes, device=device), txt_ids=torch.zeros(txt, axes, device=device),
              return_dict=False)
    if name == "FluxTransformer2DModel":
        kw["pooled_projections"] = rnd(batch, c.pooled_projection_dim)
    if getattr(c, "guidance_embeds", False):
        kw["guidance"] = torch.full((batch,), 3.5, dtype=dtype, device=device)
    return kw


def build(args: argparse.Namespace, device: str) -> tuple[torch.nn.Module, object, object]:
    from diffusion_lora.families import get_family
    from diffusion_lora.models.reference import build_component

    family_name = args.family or args.variant.split("-")[0]
    family = get_family(family_name)
    variant = family.variant(args.variant)
    spec = next(s for s in variant.reference if s.name == family.denoiser)
    config = {**spec.config, **parse_depth(args.depth)}
    if args.dry_run:  # a tiny width of the same structure: checks the script, measures nothing real
        if "num_attention_heads" in config:
            config.update(num_attention_heads=1)  # head_dim kept: it must match the rotary axes
            if "joint_attention_dim" in config:
                config["joint_attention_dim"] = 64
        else:
            config.update(block_out_channels=(32, 64, 64), cross_attention_dim=64, attention_head_dim=(2, 4, 4),
                          projection_class_embeddings_input_dim=64 + 6 * 8, addition_time_embed_dim=8,
                          norm_num_groups=8)
    with torch.device("meta"):
        model = build_component(type(spec)(spec.name, spec.cls, config))
    return model, family, variant


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", required=True, help="a family variant: flux1, sdxl, flux2-klein, ...")
    p.add_argument("--family", help="the variant's family when its name does not start with it")
    p.add_argument("--depth", default="", help="config overrides, e.g. 'num_layers=1;num_single_layers=1'")
    p.add_argument("--px", type=int, default=512)
    p.add_argument("--txt", type=int, help="text tokens (default: the family's, as the estimate assumes)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--quant", default="none", choices=["none", "nf4", "int8", "fp8"])
    p.add_argument("--ckpt", action="store_true", help="gradient checkpointing")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="weights and compute (float32: bf16 convolutions are very slow on CPUs without AMX)")
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    device = "cuda" if args.cuda else "cpu"
    if not args.cuda and any(os.environ.get(k) != v for k, v in _WANTED_MALLOC.items()):
        print("warning: run with MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072 or RSS over-reports",
              file=sys.stderr)

    from peft import LoraConfig

    from diffusion_lora.adapters.inject import inject, target_paths
    from diffusion_lora.families.memory import SEQUENCE_TOKENS
    from diffusion_lora.models.quantize import quantize_denoiser
    from diffusion_lora.training.config import OptimizerName
    from diffusion_lora.training.memory import EstimateSettings, estimate_modules
    from diffusion_lora.training.memory_models import ModelLayout

    dtype = getattr(torch, args.dtype)
    t0 = time.time()
    if args.cuda:
        torch.cuda.init()
        base = torch.cuda.memory_allocated()
    else:
        base = rss()
    meta, family, variant = build(args, device)
    model = meta.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for prm in model.parameters():
            prm.normal_(0, 0.02)
        for buf in model.buffers():
            buf.zero_()
    mode = None if args.quant == "none" else args.quant
    if mode:
        quantize_denoiser(types.SimpleNamespace(**{family.denoiser: model}), mode, compute_dtype=dtype)
    if args.cuda:
        torch.cuda.synchronize()
        weights = torch.cuda.memory_allocated() - base
    else:
        weights = rss() - base
    paths = target_paths(model, family, "attn", family.denoiser)
    inject(model, "probe", LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=paths),
           dict.fromkeys(paths, (args.rank, float(args.rank), False)), empty=False)
    lora = []
    for n, prm in model.named_parameters():
        prm.requires_grad_("lora_" in n)
        if "lora_" in n:
            prm.data = prm.data.float()
            lora.append(prm)
    if args.ckpt:
        model.enable_gradient_checkpointing()
    model.train()
    opt = torch.optim.AdamW(lora, lr=1e-4)
    for prm in lora:  # create AdamW's state now: the measured step is a steady-state one
        prm.grad = torch.zeros_like(prm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    seq = SEQUENCE_TOKENS[variant.conditioning or family.conditioning]
    txt = args.txt if args.txt is not None else seq.text
    # a small warm-up step first: one-time allocations (kernels, thread pools) stay out of the measurement
    warm = inputs_for(model, 64, min(txt, 16), 1, dtype, device)
    model(**warm)[0].float().pow(2).mean().backward()
    opt.zero_grad(set_to_none=True)
    del warm
    kw = inputs_for(model, args.px, txt, args.batch, dtype, device)

    if args.cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = rss()
        reset_peak()
    t = time.time()
    out = model(**kw)[0]
    out.float().pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if args.cuda:
        torch.cuda.synchronize()
        step_peak = torch.cuda.max_memory_allocated() - before
        reserved = torch.cuda.max_memory_reserved()
    else:
        step_peak = _status("VmHWM") - before
        reserved = None
    step_s = time.time() - t

    size = dtype.itemsize
    settings = EstimateSettings(resolution=args.px, batch_size=args.batch, weight_bytes=size, activation_bytes=size,
                                quantize=_quantize(mode), rank=args.rank, optimizer=OptimizerName.ADAMW,
                                checkpointing=args.ckpt, text_tokens=txt)
    fresh, _, _ = build(args, device)  # `meta` became the measured model (to_empty works in place)
    est = estimate_modules(ModelLayout(family, variant, fresh, {}, 0, None, "probe"), settings)
    # measured "step" = what grows above the resident weights + LoRA + AdamW state during one step
    est_step = est.part("LoRA gradients") + est.part("activations") + est.part("dequantized weight")
    est_resident = est.part("LoRA weights") + est.part("optimizer state")
    result = dict(
        variant=args.variant, depth=args.depth, dtype=args.dtype, px=args.px, txt=txt, batch=args.batch,
        quant=args.quant,
        ckpt=args.ckpt, device=device, dry_run=args.dry_run, lora_params=sum(x.numel() for x in lora),
        measured_weights=weights, estimated_weights=est.part("denoiser weights"),
        measured_step=step_peak, estimated_step=est_step, estimated_resident_training_state=est_resident,
        estimated_activations=est.part("activations"), cuda_max_reserved=reserved,
        step_seconds=round(step_s, 2), total_seconds=round(time.time() - t0, 2),
    )
    print(json.dumps(result))


def _quantize(mode: str | None):  # noqa: ANN202
    from diffusion_lora.models.quantize import parse_quantize

    return parse_quantize(mode)


if __name__ == "__main__":
    main()
