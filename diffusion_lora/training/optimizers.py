"""What a run optimizes and how: the adapter's trainable parameters in groups, the optimizer and the
learning-rate schedule the config names."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers.optimization import get_scheduler

from ..errors import ConfigError
from .config import OptimizerName, TrainConfig

Named = list[tuple[str, torch.nn.Parameter]]


def trainable_parameters(state: Any) -> Named:
    """``("<component>.<parameter name>", parameter)`` for every parameter of the pipeline's adapted
    components that requires a gradient (the adapter's weights), in module order."""
    named: Named = []
    for component, model in state.components.items():
        named += [(f"{component}.{n}", p) for n, p in model.named_parameters() if p.requires_grad]
    return named


def param_groups(cfg: TrainConfig, named: Sequence[tuple[str, torch.nn.Parameter]], denoiser: str) -> list[dict]:
    """The denoiser's parameters at ``train.learning_rate``, then the text encoders' (if any) at
    ``train.text_encoder_lr`` (default: the same rate)."""
    in_denoiser = [n.startswith(denoiser + ".") for n, _ in named]
    groups = [{"params": [p for (_, p), d in zip(named, in_denoiser, strict=True) if d],
               "lr": cfg.train.learning_rate}]
    text_encoders = [p for (_, p), d in zip(named, in_denoiser, strict=True) if not d]
    if text_encoders:
        groups.append({"params": text_encoders, "lr": cfg.train.text_encoder_lr or cfg.train.learning_rate})
    return groups


def build_optimizer(cfg: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """``optimizer.name`` over ``groups``; the 8-bit AdamW and Prodigy need their optional packages."""
    opt = cfg.optimizer
    kwargs = {"weight_decay": opt.weight_decay}
    if opt.name is OptimizerName.ADAMW:
        return torch.optim.AdamW(groups, betas=tuple(opt.betas), eps=opt.eps, **kwargs)
    if opt.name is OptimizerName.ADAMW_8BIT:
        try:
            import bitsandbytes as bnb  # why here: an optional dependency, needed only for this optimizer
        except ImportError:
            raise ConfigError("optimizer.name = adamw8bit needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(groups, betas=tuple(opt.betas), eps=opt.eps, **kwargs)
    try:
        from prodigyopt import Prodigy  # why here: an optional dependency, needed only for this optimizer
    except ImportError:
        raise ConfigError("optimizer.name = prodigy needs prodigyopt: pip install prodigyopt") from None
    return Prodigy(groups, betas=tuple(opt.betas), eps=opt.eps, **kwargs)


def build_lr_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> Any:
    """diffusers' ``scheduler.name`` schedule with ``scheduler.warmup_steps``, over ``train.steps``."""
    return get_scheduler(cfg.scheduler.name.value, optimizer, num_warmup_steps=cfg.scheduler.warmup_steps,
                         num_training_steps=cfg.train.steps)
