"""``train(config)``: the LoRA training run, through accelerate.

The run is a pure function of its config: the data order, augmentation and every random draw come
from the seed and the step number, so ``resume`` after a crash (or Ctrl-C, which saves a checkpoint)
continues bit-identically on CPU. Multi-process data parallelism is accelerate's
(``accelerate launch --multi_gpu --num_processes N -m diffusion_lora.cli train …``, also on CPUs).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..adapters import add_lora, save_lora
from ..adapters.keys import model_keys_of
from ..adapters.state import state_of
from ..compat.accelerate import reset_accelerator_state
from ..errors import ConfigError, DiffusionLoraError
from ..families import Objective, detect_family, detect_variant
from ..formats.atomic import atomic_write_bytes
from ..models import load_pipeline
from ..models.quantize import require_library
from . import objectives as obj
from .cache import TensorCache, model_fingerprint
from .checkpoint import check_state, latest_checkpoint, load_checkpoint, resume_view, save_checkpoint
from .conditioning import conditioner_for
from .config import MixedPrecision, ModelDtype, TextCache, TrainConfig, load_config, resolve_sizes
from .data_setup import build_dataset
from .dataset import micro_batches
from .interrupts import interrupts_deferred
from .optimizers import build_lr_scheduler, build_optimizer, param_groups, trainable_parameters
from .outputs import MetricsLog, sample_image, write_model_card, write_sample_grid
from .parallel import average_text_encoder_grads, check_ranks_agree
from .preflight import check_folders, native_resolution, training_metadata
from .recipe import resolve_recipe
from .sample_inputs import sample_plans
from .steps import StepContext, micro_step_loss, text_condition
from .text_encoders import can_free, check_free_request, free_text_encoders

logger = logging.getLogger(__name__)
_DTYPES = {ModelDtype.FLOAT32: torch.float32, ModelDtype.FLOAT16: torch.float16, ModelDtype.BFLOAT16: torch.bfloat16}


@dataclass
class TrainResult:
    """What a finished (or stopped) run produced."""

    adapter: Path | None
    steps: int
    losses: list[float] = field(default_factory=list)
    checkpoint: Path | None = None
    samples: list[Path] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)  # steps whose update was skipped as non-finite
    freed_text_encoders: tuple[str, ...] = ()  # text encoders emptied after encoding every caption


class _Run:
    """State of one training run; methods are its phases."""

    def __init__(self, cfg: TrainConfig, *, progress: bool) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output.dir)
        self.progress = progress
        # accelerate keeps one process-wide state; each train() is a new run whose precision may differ
        # (a notebook, a test session). The process group (PartialState) is kept.
        reset_accelerator_state()
        self.acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.train.mixed_precision.value)
        self.is_main = self.acc.is_main_process
        self.skipped: list[int] = []  # steps whose update was skipped as non-finite, in this process's run

    def setup(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        dtype = _DTYPES[cfg.model.dtype]
        # QLoRA: the denoiser's linears are quantized (compute dtype ``dtype``); the LoRA trains in float32
        self.pipe = load_pipeline(cfg.model.name, torch_dtype=dtype, quantize=cfg.model.quantize)
        self.pipe.to(self.acc.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.family = detect_family(self.pipe)
        self.variant = detect_variant(self.pipe)
        conditioner_for(self.family, self.variant).check_trainable(self.pipe)
        if cfg.lora.text_encoder and not self.family.lora_text_encoders:
            raise ConfigError(
                f"lora.text_encoder: {self.family.title} LoRAs adapt the {self.family.denoiser} only (its text "
                f"encoder is encoded once and cached); set lora.text_encoder = false"
            )
        self.cfg = cfg = resolve_sizes(cfg, native_resolution(self.pipe))
        sample_plans(self.pipe, list(cfg.sample.prompts))  # their image inputs are checked before training
        self.dataset, self.items = build_dataset(cfg, self.pipe, self.acc)
        denoiser_module = getattr(self.pipe, self.family.denoiser)
        self.cfg = cfg = resolve_recipe(cfg, parameters=sum(p.numel() for p in denoiser_module.parameters()),
                                        images=len(self.dataset), denoiser=self.family.denoiser,
                                        report=_tell if self.progress and self.is_main else None)
        self.metadata = training_metadata(cfg, self.items)  # checked now, not at the final save
        name = cfg.output.name
        add_lora(self.pipe, name, rank=cfg.lora.rank, alpha=cfg.lora.effective_alpha, targets=cfg.lora.targets,
                 text_encoder=cfg.lora.text_encoder, use_dora=cfg.lora.use_dora, use_rslora=cfg.lora.use_rslora)
        self.state = state_of(self.pipe)
        denoiser = self.state.components[self.family.denoiser]
        if cfg.train.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        self.named = trainable_parameters(self.state)
        for _, p in self.named:  # LoRA weights train in float32 whatever the base dtype
            p.data = p.data.float()
        self.optimizer = build_optimizer(cfg, param_groups(cfg, self.named, self.family.denoiser))
        self.scheduler = build_lr_scheduler(cfg, self.optimizer)
        self.denoiser, self.optimizer = self.acc.prepare(denoiser, self.optimizer)
        self.ctx = self._context(dtype)
        self.freed = self._free_text_encoders()

    def _free_text_encoders(self) -> tuple[str, ...]:
        """Encode every caption and sample prompt now and free the text encoders, when nothing else needs them."""
        cfg = self.cfg
        captions = self.dataset.possible_captions()
        reason = can_free(self.pipe, cfg.lora.text_encoder, cfg.text_cache is not TextCache.OFF, captions)
        if not check_free_request(reason, cfg.cache.text_encoders.value):
            return ()
        model_keys_of(self.state)  # layer shapes, for saving the adapter, read while the weights exist
        prompts = cfg.sample.prompts if self.is_main else []
        calls = [functools.partial(sample_image, self.pipe, cfg, p, cfg.sample.seeds[0]) for p in prompts]
        return free_text_encoders(
            self.pipe, self.family, lambda caption: text_condition(self.ctx, [caption]), captions or set(), calls
        )

    def _context(self, dtype: torch.dtype) -> StepContext:
        cfg = self.cfg
        cache_dir = Path(cfg.cache_dir)
        encoders = [self.state.components[c] for c in self.family.text_encoders if c in self.state.components]
        schedule = None
        if self.family.objective is not Objective.FLOW_MATCHING:
            schedule = obj.ddpm_schedule(
                dict(self.pipe.scheduler.config), zero_terminal_snr=cfg.train.zero_terminal_snr
            )
        return StepContext(
            pipe=self.pipe, denoiser=self.denoiser, family=self.family,
            conditioner=conditioner_for(self.family, self.variant),
            config=cfg, latent_cache=TensorCache(cfg.cache.latents, cache_dir / "latents"),
            text_cache=TensorCache(cfg.text_cache, cache_dir / "text"),
            vae_fingerprint=model_fingerprint(self.pipe.vae) + str(self.pipe.vae.dtype),
            text_fingerprint=model_fingerprint(*encoders) if cfg.text_cache is not TextCache.OFF else "",
            schedule=schedule, device=self.acc.device, weight_dtype=dtype,
            train_text_encoder=cfg.lora.text_encoder,
        )

    def resume(self) -> int:
        ckpt = latest_checkpoint(self.out / "checkpoints")
        if ckpt is None:
            logger.info("no checkpoint under %s; starting from step 0", self.out / "checkpoints")
            return 0
        saved = load_checkpoint(ckpt)
        params = dict(self.named)
        check_state(saved, ckpt, params, self.optimizer, self.cfg.train.steps)  # before anything changes
        if saved["config"] != resume_view(self.cfg):
            raise ConfigError(
                f"{ckpt}: the checkpoint was made with a different config; resume needs the same settings "
                f"(only train.steps may grow)"
            )
        try:
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            raise DiffusionLoraError(f"{ckpt}: the optimizer or scheduler state does not fit this run ({exc}); "
                                     "delete this checkpoint to resume from the one before") from exc
        with torch.no_grad():
            for name, tensor in saved["params"].items():
                params[name].copy_(tensor)
        logger.info("resumed from %s at step %d", ckpt, saved["step"])
        return int(saved["step"])

    def checkpoint(self, step: int) -> Path | None:
        self.check_finite(step)  # every process: their adapters are identical, so all stop together
        self.acc.wait_for_everyone()
        path = None
        if self.is_main:
            state = {
                "step": step,
                "params": {n: p.detach().to("cpu").clone() for n, p in self.named},
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "config": resume_view(self.cfg),
            }
            path = save_checkpoint(self.out / "checkpoints", step, state, keep=self.cfg.checkpoint.keep)
        self.acc.wait_for_everyone()
        return path

    def samples(self, path: Path) -> Path:
        """The sample grid, under the run's autocast: accelerate makes the prepared denoiser return float32,
        which a bfloat16/float16 VAE would otherwise refuse."""
        with self.acc.autocast():
            return write_sample_grid(self.pipe, self.cfg, path)

    def check_finite(self, step: int) -> None:
        """Refuse to save (a checkpoint or the adapter) unless every trainable value is finite."""
        bad = [n for n, p in self.named if not bool(torch.isfinite(p.detach()).all())]
        if bad:
            raise DiffusionLoraError(
                f"train: after step {step}, {len(bad)} adapter tensor(s) hold NaN or Inf (first: {bad[0]}); nothing "
                "was saved. Lower train.learning_rate and start again"
            )

    def run(self, start: int, stop: int) -> list[float]:
        cfg = self.cfg
        world, rank = self.acc.num_processes, self.acc.process_index
        per_step = world * cfg.train.gradient_accumulation
        stream = micro_batches(self.dataset, cfg.train.batch_size, cfg.train.seed, skip=start * per_step)
        losses: list[float] = []
        bar = tqdm(total=cfg.train.steps, initial=start, desc="train", unit="step",
                   disable=not (self.progress and self.is_main))
        log = MetricsLog(self.out, enabled=self.is_main, tensorboard=cfg.log.tensorboard)
        self.completed = start  # optimizer steps applied; what an interrupt checkpoints
        try:
            for step in range(start, stop):
                loss = self._optimizer_step(stream, step, world, rank)
                losses.append(loss)
                lr = self.scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                bar.update(1)
                done = step + 1
                if done % cfg.log.every == 0 or done == stop:
                    values = {"loss": loss if math.isfinite(loss) else None, "lr": lr} | self._group_lrs()
                    log.write(done, values | ({"skipped_steps": len(self.skipped)} if self.skipped else {}))
                if cfg.sample.every and done % cfg.sample.every == 0 and self.is_main:
                    self.samples(self.out / "samples" / f"step_{done:06d}.png")
                if cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done < cfg.train.steps:
                    with interrupts_deferred():
                        self.checkpoint(done)
        except KeyboardInterrupt:
            with interrupts_deferred():
                self.checkpoint(self.completed)
            logger.warning("interrupted: saved a checkpoint at step %d; continue with --resume", self.completed)
            raise
        finally:
            bar.close()
            log.close()
        return losses

    def _group_lrs(self) -> dict[str, float]:
        """With LoRA+, every group's current rate as ``lr/<group name>`` (``lr/denoiser_plus``: TensorBoard
        tags take no spaces)."""
        names = [g.get("name", str(i)) for i, g in enumerate(self.optimizer.param_groups)]
        if not any(n.endswith(" plus") for n in names):
            return {}
        return {f"lr/{n.replace(' ', '_')}": lr for n, lr in zip(names, self.scheduler.get_last_lr(), strict=True)}

    def _optimizer_step(self, stream: Iterator[list[int]], step: int, world: int, rank: int) -> float:
        cfg = self.cfg
        accumulation = cfg.train.gradient_accumulation
        total = 0.0
        for micro in range(accumulation):
            batches = [next(stream) for _ in range(world)]
            batch = [self.dataset[i] for i in batches[rank]]
            sync = self.acc.no_sync(self.denoiser) if micro < accumulation - 1 else contextlib.nullcontext()
            with sync, self.acc.autocast():
                loss = micro_step_loss(self.ctx, batch, step, micro, rank) / accumulation
                self.acc.backward(loss)
            total += float(loss.detach())
        if world > 1 and self.cfg.lora.text_encoder:
            average_text_encoder_grads(self.acc, self.named, self.family.denoiser)
        if cfg.train.max_grad_norm:
            self.acc.clip_grad_norm_([p for _, p in self.named], cfg.train.max_grad_norm)
        mean = float(self.acc.reduce(torch.tensor(total, device=self.acc.device), "mean"))
        finite = self._finite(mean)
        # An interrupt must find the optimizer, scheduler and step count all before or all after this
        # update, or the checkpoint it triggers would not resume bit-identically.
        with interrupts_deferred():
            if finite:
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.completed = step + 1
        if not finite:
            self._skip_nonfinite(step + 1, mean)
        return mean

    def _finite(self, loss: float) -> bool:
        """Whether this step's loss and gradients are finite (the same answer on every process)."""
        if self.cfg.train.mixed_precision is MixedPrecision.FP16:
            # fp16 gradients overflow routinely; accelerate's GradScaler skips those steps itself
            return math.isfinite(loss)
        ok = math.isfinite(loss) and _all_finite([p.grad for _, p in self.named if p.grad is not None])
        flag = torch.tensor(0 if ok else 1, device=self.acc.device)
        return int(self.acc.reduce(flag, "sum")) == 0

    def _skip_nonfinite(self, step: int, loss: float) -> None:
        self.skipped.append(step)
        limit = self.cfg.train.max_nonfinite_steps
        if len(self.skipped) > limit:
            allowed = f"more than train.max_nonfinite_steps = {limit}" if limit else "train.max_nonfinite_steps = 0"
            raise DiffusionLoraError(
                f"train: step {step} has a non-finite loss or gradient (loss {loss}); {len(self.skipped)} such "
                f"step(s), {allowed}. The run diverged: lower train.learning_rate (it is "
                f"{self.cfg.train.learning_rate}); the adapter was not saved (earlier checkpoints are intact)"
            )
        logger.warning("step %d: non-finite loss or gradient (loss %s); update skipped (%d of at most %d)",
                       step, loss, len(self.skipped), limit)


def _tell(line: str) -> None:
    """A line for the user beside the progress bars (stderr, where tqdm writes)."""
    tqdm.write(line, file=sys.stderr)


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every value of ``tensors`` is finite, with one fused max-abs per device and dtype and one
    synchronisation, not a check and a sync per tensor (hundreds of tiny multi-threaded ops a step wait
    for a free core each on a busy machine). A NaN or Inf anywhere makes its group's max-abs non-finite."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t.detach())
    peaks = [torch.stack(torch._foreach_norm(group, float("inf"))).float().max() for group in groups.values()]
    return not peaks or bool(torch.isfinite(torch.stack([p.cpu() for p in peaks])).all())


def train(
    config: TrainConfig | str | os.PathLike | Mapping,
    *,
    overrides: Sequence[str] = (),
    resume: bool = False,
    progress: bool = True,
    max_steps_this_run: int | None = None,
) -> TrainResult:
    """Train a LoRA as ``config`` says; with ``resume``, continue from the latest checkpoint.

    ``max_steps_this_run`` stops early after that many steps (saving a checkpoint), as a scheduler
    with time limits would. Returns the adapter path (None when stopped early) and the losses.
    """
    cfg = config if isinstance(config, TrainConfig) else load_config(config, overrides)
    if cfg.model.quantize is not None:  # before any folder is made; the error names the config key
        require_library(cfg.model.quantize, "model.quantize")
    check_folders(cfg)
    run = _Run(cfg, progress=progress)
    run.setup()  # resolves the sizes and the recipe the config leaves to the model and data: run.cfg from here on
    steps = run.cfg.train.steps
    start = run.resume() if resume else 0
    stop = steps if max_steps_this_run is None else min(steps, start + max_steps_this_run)
    losses = run.run(start, stop) if start < stop else []
    if stop < steps:
        return TrainResult(None, stop, losses, run.checkpoint(stop), skipped_steps=list(run.skipped),
                           freed_text_encoders=run.freed)
    return _finish(run, losses)


def _finish(run: _Run, losses: list[float]) -> TrainResult:
    cfg = run.cfg
    if run.acc.num_processes > 1:
        check_ranks_agree(run)
    ckpt = run.checkpoint(cfg.train.steps)
    adapter = None
    samples: list[Path] = []
    if run.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run.out / "config.toml", cfg.to_toml().encode(), what="resolved config")
        adapter = run.out / f"{cfg.output.name}.safetensors"
        words = [cfg.data.trigger_word] if cfg.data.trigger_word else []
        save_lora(run.pipe, cfg.output.name, adapter, cfg.output.save_format.value, trigger_words=words,
                  extra_metadata=run.metadata)
        if cfg.sample.prompts:
            grid = run.out / "samples" / f"step_{cfg.train.steps:06d}.png"
            if not grid.exists():
                run.samples(grid)
            samples.append(grid)
        write_model_card(run.out / "README.md", cfg, adapter, samples, losses, run.family)
    run.acc.wait_for_everyone()
    return TrainResult(adapter, cfg.train.steps, losses, ckpt, samples, list(run.skipped), run.freed)
