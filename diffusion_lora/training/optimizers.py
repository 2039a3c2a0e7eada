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
    ``train.text_encoder_lr`` (default: the same rate); each group is named (``"denoiser"``,
    ``"text_encoder"``) for logging.

    With LoRA+ (``optimizer.loraplus_*lr_ratio``, see :attr:`OptimizerSection.loraplus_ratios`) each
    part is split in two: its up factors (PEFT's ``lora_B``, with their bias if any) at rate × ratio in a
    group named ``"<part> plus"`` (kohya's naming), everything else at the part's rate. The DoRA
    magnitude stays at the part's rate: LoRA+'s ratio is about the zero-initialised B against the random
    A of the product BA, while the magnitude is a copy of the base weight's norms that DoRA trains at the
    LoRA rate (PEFT's ``create_loraplus_optimizer`` puts every 1-D parameter with B, a side effect of its
    bias rule). ``optimizer.weight_decay`` applies to every group (PEFT's function sets it to 0). Empty
    groups are left out."""
    in_denoiser = [n.startswith(denoiser + ".") for n, _ in named]
    unet_ratio, text_ratio = cfg.optimizer.loraplus_ratios
    parts = [("denoiser", True, cfg.train.learning_rate, unet_ratio),
             ("text_encoder", False, cfg.train.text_encoder_lr or cfg.train.learning_rate, text_ratio)]
    groups: list[dict] = []
    for label, want, lr, ratio in parts:
        members = [(n, p) for (n, p), d in zip(named, in_denoiser, strict=True) if d == want]
        if ratio is None:
            split = [(label, lr, [p for _, p in members])]
        else:
            split = [(label, lr, [p for n, p in members if not _is_up(n)]),
                     (f"{label} plus", lr * ratio, [p for n, p in members if _is_up(n)])]
        groups += [{"params": params, "lr": rate, "name": name} for name, rate, params in split if params]
    return groups


def _is_up(name: str) -> bool:
    """Whether a PEFT parameter name (``….lora_B.<adapter>.weight`` / ``.bias``) is an up factor's."""
    return "lora_B" in name.split(".")


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
            raise ConfigError(
                "optimizer.name = adamw8bit needs bitsandbytes: pip install 'diffusion-lora[quant]'"
            ) from None
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
