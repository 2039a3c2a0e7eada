"""What a run leaves for people to look at: the metrics log, sample grids and a model card beside the adapter."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from ..formats.atomic import open_append_no_follow
from ..models.invoke import run_pipeline
from .files import own_folder, write_output, write_png
from .sample_inputs import sample_plans

logger = logging.getLogger(__name__)


class MetricsLog:
    """Loss/lr to ``<out>/logs/metrics.jsonl`` always, and to TensorBoard when it is installed; does
    nothing unless ``enabled`` (the main process)."""

    def __init__(self, out: Path, *, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.writer = None
        self.file = None
        if not enabled:
            return
        logs = own_folder(out / "logs")
        self.file = os.fdopen(open_append_no_follow(logs / "metrics.jsonl", what="metrics log"), "a", encoding="utf-8")
        if tensorboard:
            try:
                # why here: tensorboard is an optional dependency
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "logs"))
            except ImportError:
                logger.info("tensorboard is not installed; metrics go to logs/metrics.jsonl only")

    def write(self, step: int, values: Mapping[str, float | int | None]) -> None:
        if not self.enabled:
            return
        assert self.file is not None
        self.file.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in values.items():
                if value is not None:
                    self.writer.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def image_grid(rows: Sequence[Sequence[Image.Image]], labels: Sequence[str] = ()) -> Image.Image:
    """Paste images into a grid (rows × columns); an optional label strip above each row."""
    w, h = rows[0][0].size
    label_h = 14 if labels else 0
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (cols * w, len(rows) * (h + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        top = r * (h + label_h)
        if labels:
            draw.text((2, top + 1), labels[r][: max(8, cols * w // 6)], fill="black")
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB").resize((w, h)), (c * w, top + label_h))
    return grid


def _sample_kwargs(cfg: Any) -> dict[str, Any]:
    s = cfg.sample
    kwargs: dict[str, Any] = {"num_inference_steps": s.steps}
    if s.guidance is not None:
        kwargs["guidance_scale"] = s.guidance
    side = cfg.data.resolution
    kwargs["height"] = s.height or side
    kwargs["width"] = s.width or side
    return kwargs


def sample_image(pipe: Any, cfg: Any, prompt: str, seed: int) -> Image.Image:
    """One sample image: ``prompt`` at ``seed`` with the sample settings of ``cfg``; the prompt's
    ``--image``/``--mask``/``--control_image`` options are the variant's image inputs."""
    ((text, images),) = sample_plans(pipe, [prompt])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return run_pipeline(pipe, text, generator=generator, images=images, **_sample_kwargs(cfg)).images[0]


def write_sample_grid(pipe: Any, cfg: Any, path: Path) -> Path:
    """Generate every sample prompt × seed with the adapter as it is now; rows = prompts."""
    rows = [[sample_image(pipe, cfg, prompt, seed) for seed in cfg.sample.seeds] for prompt in cfg.sample.prompts]
    own_folder(path.parent)
    return write_png(image_grid(rows, list(cfg.sample.prompts)), path, "sample grid")


def write_model_card(
    path: Path, cfg: Any, adapter: Path, samples: Sequence[Path], losses: Sequence[float], family: Any
) -> Path:
    """A README.md beside the adapter: what it is, how to use it, how it was trained."""
    trigger = cfg.data.trigger_word
    lines = [
        f"# {cfg.output.name}",
        "",
        f"A LoRA for **{family.title}** (`{cfg.model.name}`), trained with diffusion-lora.",
        "",
        f"- file: `{adapter.name}` ({cfg.output.save_format.value} format)",
        f"- rank {cfg.lora.rank}, alpha {_number(cfg.lora.effective_alpha)}, "
        f"targets `{cfg.lora.targets}`" + (", text encoder" if cfg.lora.text_encoder else ""),
        f"- {cfg.train.steps} steps, batch {cfg.train.batch_size}, learning rate {cfg.train.learning_rate}, "
        f"resolution {cfg.data.resolution}",
    ]
    if cfg.model.quantize is not None:
        lines.append(f"- trained on the base quantized to {cfg.model.quantize.value} (QLoRA); the file is an "
                     "ordinary LoRA that loads on the unquantized base too")
    if trigger:
        lines.append(f"- trigger word: `{trigger}`")
    if losses:
        lines.append(f"- loss: first {losses[0]:.4f}, last {losses[-1]:.4f}")
    lines += ["", "## Use", "", "```bash",
              f'diffusion-lora generate --model {cfg.model.name} --lora {adapter.name}:1.0 --prompt "{trigger or "…"}"',
              "```", ""]
    for sample in samples:
        lines += [f"![samples]({sample.relative_to(path.parent).as_posix()})", ""]
    lines += ["## Training config", "", "```toml", cfg.to_toml().rstrip(), "```", ""]
    return write_output(path, "\n".join(lines).encode("utf-8"), "model card")


def _number(value: float) -> int | float:
    """``value`` as written in a config: ``16`` for a whole number, else the float."""
    return int(value) if value.is_integer() else value
