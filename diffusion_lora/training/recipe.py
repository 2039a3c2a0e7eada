"""The recipe a config leaves to the model and the data: learning rate, batch size, steps and targets.

A setting the config (or a command-line flag) gives is kept. One it leaves unset is chosen here, once
the model is loaded and the training images are counted, and the choice is logged and written to the
resolved ``config.toml`` beside the adapter:

``train.learning_rate``
    ``1e-4`` (the usual LoRA rate of kohya, diffusers and ai-toolkit at SD 1.5 size and above) for
    denoisers of at least 500 M parameters; below that it grows as ``sqrt(500 M / parameters)`` up to
    ``2e-3``: small networks take larger steps (``1.8e-3`` for the embedded 1.5 M-parameter UNet).
``train.batch_size``
    ``1`` for real-size denoisers (memory you can predict; raise it when ``--estimate`` allows), and
    ``min(8, images)`` for denoisers under 50 M parameters, where a batch of 8 costs little more than 1.
``train.steps``
    every image seen :data:`EPOCHS` times: ``ceil(EPOCHS × images / batch)``, within ``[100, 4000]``
    (20 images at batch 1: 4000 steps, what kohya users run for a style with 10 repeats and 20 epochs;
    at batch 8 on the embedded model: 500 steps, where its style LoRAs were measured to converge).
``lora.targets``
    ``"attn-ff"`` for UNet families (attention and feed-forward: kohya's LoRA adapts every Linear of
    the transformer blocks, and a style lives as much in the feed-forward layers), ``"attn"`` for
    transformer families (diffusers' and ai-toolkit's default).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace

from diffusion_lora.errors import ConfigError

from .config import TrainConfig

__all__ = ["AUTO_TARGETS", "EPOCHS", "auto_batch_size", "auto_learning_rate", "auto_steps", "auto_targets",
           "resolve_recipe"]

logger = logging.getLogger(__name__)

AUTO_TARGETS = "auto"
EPOCHS = 200  # times each training image is seen by an automatic step count
_REAL_SIZE = 500e6  # parameters from which a denoiser trains at the usual 1e-4
_SMALL = 50e6  # parameters under which a denoiser trains at batch 8
_BASE_LR, _MAX_LR = 1e-4, 2e-3
_MIN_STEPS, _MAX_STEPS = 100, 4000


def auto_learning_rate(parameters: int) -> float:
    """The learning rate for a denoiser of ``parameters`` parameters (see the module docstring)."""
    scale = math.sqrt(_REAL_SIZE / max(parameters, 1))
    return float(f"{min(_MAX_LR, _BASE_LR * max(1.0, scale)):.2g}")


def auto_batch_size(parameters: int, images: int) -> int:
    return max(1, min(8, images)) if parameters < _SMALL else 1


def auto_steps(images: int, batch_size: int) -> int:
    return max(_MIN_STEPS, min(_MAX_STEPS, math.ceil(EPOCHS * images / batch_size)))


def auto_targets(denoiser: str) -> str:
    """``denoiser`` is the family's denoiser component (``"unet"`` or ``"transformer"``)."""
    return "attn-ff" if denoiser == "unet" else "attn"


def resolve_recipe(cfg: TrainConfig, *, parameters: int, images: int, denoiser: str,
                   report: Callable[[str], None] | None = None) -> TrainConfig:
    """``cfg`` with every recipe setting it leaves unset chosen from the denoiser's size and the number
    of training images (repeats included); the choices go to ``report`` (default: the log)."""
    t, chosen = cfg.train, []
    lr = t.learning_rate
    if lr is None:
        lr = auto_learning_rate(parameters)
        chosen.append(f"train.learning_rate = {lr:g} (a {parameters / 1e6:.1f} M-parameter {denoiser})")
    batch = t.batch_size
    if batch is None:
        batch = auto_batch_size(parameters, images)
        chosen.append(f"train.batch_size = {batch}")
    steps = t.steps
    if steps is None:
        steps = auto_steps(images, batch)
        chosen.append(f"train.steps = {steps} ({images} images seen about {steps * batch / max(images, 1):.0f} "
                      f"times each at batch {batch})")
    targets = cfg.lora.targets
    if targets == AUTO_TARGETS:
        targets = auto_targets(denoiser)
        chosen.append(f"lora.targets = {targets!r} (a {denoiser})")
    if cfg.scheduler.warmup_steps >= steps:
        raise ConfigError(f"scheduler.warmup_steps: {cfg.scheduler.warmup_steps} must be smaller than train.steps "
                          f"({steps}{', chosen for ' + str(images) + ' images' if t.steps is None else ''}); "
                          "lower it or set train.steps")
    if chosen:
        (report or logger.info)("recipe from the model and the data: " + "; ".join(chosen))
    return replace(cfg, train=replace(t, learning_rate=lr, batch_size=batch, steps=steps),
                   lora=replace(cfg.lora, targets=targets))
