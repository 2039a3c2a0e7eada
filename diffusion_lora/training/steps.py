"""One training micro-step: batch → latents and text conditions (cached) → noise → prediction → loss.

Every random draw comes from a generator seeded by (seed, step, micro-step, process), so a resumed
run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import DatasetError
from ..families import Family, Objective
from . import objectives as obj
from .cache import TensorCache, entry_key, to_device
from .conditioning import Conditioner, SizeInfo, latent_dist, text_cond_cat, text_cond_slice
from .config import TimestepSampling
from .flux_inputs import random_box_masks


def step_generator(seed: int, step: int, micro: int, rank: int, stream: int) -> torch.Generator:
    """A generator for one purpose (``stream``) of one micro-step on one process."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 101 + micro) * 1009 + rank * 17 + stream)


@dataclass
class StepContext:
    """What every micro-step needs and that does not change during a run."""

    pipe: Any
    denoiser: Any  # the module to call (accelerate-prepared for data parallelism)
    family: Family
    conditioner: Conditioner
    config: Any  # TrainConfig
    latent_cache: TensorCache
    text_cache: TensorCache
    vae_fingerprint: str
    text_fingerprint: str
    schedule: obj.DiffusionSchedule | None
    device: torch.device
    weight_dtype: torch.dtype
    train_text_encoder: bool


def _latents(ctx: StepContext, pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    means, stds = _latent_dists(ctx, pixels)
    return ctx.conditioner.latents(ctx.pipe.vae, means, stds, gen).to(ctx.weight_dtype)


def _latent_dists(ctx: StepContext, pixels: torch.Tensor, cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of each image's latent distribution, cached under the digest of its pixels (a target,
    a control image, a masked image: whatever changes in them gives another key)."""
    means, stds = [], []
    for px in pixels:
        key = entry_key("latent", ctx.vae_fingerprint, tuple(px.shape), _tensor_digest(px))

        def compute(px: torch.Tensor = px) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                mean, std = latent_dist(ctx.pipe.vae, px[None].to(ctx.device, ctx.pipe.vae.dtype))
            return {"mean": mean[0], "std": std[0]}

        entry = to_device(ctx.latent_cache.get(key, compute) if cache else compute(), ctx.device, torch.float32)
        means.append(entry["mean"])
        stds.append(entry["std"])
    return torch.stack(means), torch.stack(stds)


def _image_cond(ctx: StepContext, batch: Sequence[dict], pixels: torch.Tensor, gen: torch.Generator) -> dict:
    """The image condition the conditioner asks for (``Conditioner.image_condition``), built like its pipeline:
    a Kontext reference from the latent mean, Control and Fill image latents sampled with ``gen``."""
    kind = ctx.conditioner.image_condition
    vae, dtype = ctx.pipe.vae, ctx.weight_dtype
    if kind in ("reference", "control"):
        controls = [b.get("control_values") for b in batch]
        if all(c is None for c in controls) and kind == "reference":
            return {}  # unpaired targets (data.allow_unpaired): text-to-image
        if any(c is None for c in controls) and kind == "control":
            raise DatasetError("Flux.1 Control needs a control image for every target; set data.control_path")
        if kind == "control":
            means, stds = _latent_dists(ctx, torch.stack(controls))
            return {"control": ctx.conditioner.latents(vae, means, stds, gen).to(dtype)}
        refs = [None if c is None else _mode_latents(ctx, c[None]) for c in controls]
        return {"references": refs} if any(r is None for r in refs) else {"reference": torch.cat(refs)}
    if kind == "fill":
        given = [b.get("mask_values") for b in batch]
        b, _, height, width = pixels.shape
        random_masks = random_box_masks(b, height, width, gen)
        masks = torch.stack([m if m is not None else random_masks[i] for i, m in enumerate(given)])
        # a random mask changes every step: caching its masked image would only fill the cache
        means, stds = _latent_dists(ctx, pixels * (1 - masks), cache=all(m is not None for m in given))
        masked = ctx.conditioner.latents(vae, means, stds, gen).to(dtype)
        return {"masked": masked, "mask": masks.to(ctx.device, dtype)}
    return {}


def _mode_latents(ctx: StepContext, pixels: torch.Tensor) -> torch.Tensor:
    """Scaled latents of the distribution's mean (Kontext encodes its reference with sample_mode="argmax")."""
    means, _ = _latent_dists(ctx, pixels)
    vae = ctx.pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((means - shift) * vae.config.scaling_factor).to(ctx.weight_dtype)


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().to("cpu").contiguous().numpy().tobytes()).hexdigest()


def text_condition(ctx: StepContext, captions: Sequence[str]) -> dict[str, torch.Tensor]:
    """The text conditions of ``captions``, from the text cache (computed on a miss) unless the encoder trains."""
    if ctx.train_text_encoder:  # gradients must flow: never cached
        return ctx.conditioner.encode_text(ctx.pipe, captions, ctx.device)
    parts = []
    for caption in captions:
        key = entry_key("text", ctx.text_fingerprint, caption)

        def compute(caption: str = caption) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                return text_cond_slice(ctx.conditioner.encode_text(ctx.pipe, [caption], ctx.device), 0)

        parts.append(to_device(ctx.text_cache.get(key, compute), ctx.device, ctx.weight_dtype))
    return text_cond_cat(parts)


def micro_step_loss(ctx: StepContext, batch: Sequence[dict], step: int, micro: int, rank: int) -> torch.Tensor:
    """The (weighted) loss of one micro-batch of dataset items."""
    cfg = ctx.config.train
    pixels = torch.stack([b["pixel_values"] for b in batch])
    latents = _latents(ctx, pixels, step_generator(cfg.seed, step, micro, rank, 0))
    text = text_condition(ctx, [b["caption"] for b in batch])
    noise_gen = step_generator(cfg.seed, step, micro, rank, 1)
    noise = obj.noise_with_offset(latents.shape, noise_gen, cfg.noise_offset).to(ctx.device, latents.dtype)
    sizes = [SizeInfo(tuple(b["original_size"]), tuple(b["crop_top_left"]), tuple(b["target_size"])) for b in batch]
    weights = torch.tensor([ctx.config.prior.weight if b.get("is_class") else 1.0 for b in batch], device=ctx.device)
    time_gen = step_generator(cfg.seed, step, micro, rank, 2)
    cond = _image_cond(ctx, batch, pixels, step_generator(cfg.seed, step, micro, rank, 3))
    if ctx.family.objective is Objective.FLOW_MATCHING:
        pred, target = _flow_step(ctx, latents, noise, text, sizes, time_gen, cond)
    else:
        pred, target, snr_weights = _ddpm_step(ctx, latents, noise, text, sizes, time_gen)
        if snr_weights is not None:
            weights = weights * snr_weights
    return obj.lora_loss(pred.float(), target.float(), kind=cfg.loss, huber_delta=cfg.huber_delta, weights=weights)


def _ddpm_step(ctx: StepContext, latents, noise, text, sizes, gen):  # noqa: ANN001, ANN202
    cfg = ctx.config.train
    schedule = ctx.schedule
    assert schedule is not None
    t = obj.sample_timesteps_ddpm(latents.shape[0], schedule.num_train_timesteps, gen).to(ctx.device)
    noisy = obj.add_noise(latents, noise, t, schedule)
    objective = schedule.prediction_type
    target = obj.ddpm_target(latents, noise, t, schedule, objective)
    pred = ctx.conditioner.predict(ctx.pipe, ctx.denoiser, noisy, t, text, sizes, cfg.guidance)
    weights = None
    if cfg.min_snr_gamma is not None:
        weights = obj.min_snr_weights(t, schedule, cfg.min_snr_gamma, objective).to(ctx.device)
    return pred, target, weights


def _flow_step(ctx: StepContext, latents, noise, text, sizes, gen, cond=None):  # noqa: ANN001, ANN202
    cfg = ctx.config.train
    b, _, h, w = latents.shape
    common = {"logit_mean": cfg.logit_mean, "logit_std": cfg.logit_std}
    sampling = cfg.timestep_sampling
    if sampling is TimestepSampling.SHIFT and cfg.shift is None and ctx.family.dynamic_shift:
        # a resolution-dependent shift (Flux), from the image sequence length
        mu = obj.flux_shift(ctx.conditioner.image_seq_len(h, w))
        sigmas = obj.sample_flux_sigmas(b, gen, mu=mu, **common)
    elif sampling is TimestepSampling.SHIFT:
        # unset: the pipeline scheduler's own constant shift (SD3 3.0, Flux.3 6.93), 3.0 if it has none
        shift = cfg.shift or float(ctx.pipe.scheduler.config.get("shift", 3.0))
        sigmas = obj.sample_sigmas(b, gen, sampling=sampling, shift=shift)
    else:
        sigmas = obj.sample_sigmas(b, gen, sampling=sampling, shift=cfg.shift, **common)
    sigmas = sigmas.to(ctx.device, latents.dtype)
    noisy = obj.flow_noisy(latents, noise, sigmas.view(-1, 1, 1, 1))
    target = obj.flow_target(latents, noise)
    timesteps = obj.sigmas_to_timesteps(sigmas)
    extra = {"cond": cond} if cond else {}  # only image-conditioned denoisers take one
    pred = ctx.conditioner.predict(ctx.pipe, ctx.denoiser, noisy, timesteps, text, sizes, cfg.guidance, **extra)
    return pred, target
