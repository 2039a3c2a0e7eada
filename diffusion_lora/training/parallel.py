"""What data-parallel training (accelerate, several processes) needs beyond DDP: the text encoders'
gradients averaged by hand, and a check that every rank ended with the same adapter."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import DiffusionLoraError
from .files import own_folder, write_output


def average_text_encoder_grads(acc: Any, named: Sequence[tuple[str, torch.nn.Parameter]], denoiser: str) -> None:
    """Text encoders are called through the pipeline, outside DDP; average their LoRA gradients here."""
    for name, p in named:
        if not name.startswith(denoiser + ".") and p.grad is not None:
            p.grad = acc.reduce(p.grad, "mean")


def check_ranks_agree(run: Any) -> None:
    """Data-parallel ranks must end with identical adapters; record each rank's digest in
    ``logs/ranks.json`` and compare. ``run`` has the run's ``named`` parameters, ``acc``, ``is_main``, ``out``."""
    h = hashlib.sha256()
    for name, p in run.named:
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    digest = torch.tensor(list(h.digest()[:16]), dtype=torch.int64, device=run.acc.device)
    gathered = run.acc.gather(digest).reshape(run.acc.num_processes, -1).tolist()
    if run.is_main:
        hexes = [bytes(row).hex() for row in gathered]
        write_output(own_folder(run.out / "logs") / "ranks.json", json.dumps(hexes).encode(), "rank digests")
        if len(set(hexes)) != 1:
            raise DiffusionLoraError(f"data-parallel ranks ended with different adapters: {hexes}")
