"""Adapter files and solo references for the serving tests (engine, safety, cache, HTTP, Ray).

A reference image is made the way `diffusion-lora generate` makes it, on its own pipeline: the stack set
with ``set_weights``, one prompt, one seed, nothing else in the batch.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import diffusion_lora as dl
from diffusion_lora.models.invoke import run_pipeline

from .helpers import randomize

STEPS, SIZE = 2, 32


def write_adapters(folder: Path, names: list[str], *, seed: int = 0, std: float = 0.15, dora: tuple[str, ...] = (),
                   text_encoder: tuple[str, ...] = (), targets: Any = "attn", rank: int = 4) -> dict[str, Path]:
    """Tiny-sd15 adapters (rank 4 unless said) with random weights saved as ``folder/NAME.safetensors``."""
    pipe = dl.build_tiny_pipeline("tiny-sd15")
    paths = {}
    for i, name in enumerate(names):
        dl.add_lora(pipe, name, rank=rank, alpha=rank, targets=targets, text_encoder=name in text_encoder,
                    use_dora=name in dora)
        randomize(pipe, name, seed=seed + i, std=std)
        paths[name] = folder / f"{name}.safetensors"
        dl.save_lora(pipe, name, paths[name])
    return paths


def rewrite_random(source: Path, target: Path, seed: int, std: float = 0.15, dtype: torch.dtype | None = None) -> None:
    """``target``: ``source``'s keys, shapes and metadata with other random up/down values (in ``dtype``)."""
    from safetensors import safe_open

    with safe_open(str(source), "pt") as f:
        metadata = f.metadata()
    g = torch.Generator().manual_seed(seed)
    tensors = {k: (torch.randn(v.shape, generator=g) * std).to(dtype or v.dtype) if v.dim() == 2 else v
               for k, v in load_file(str(source)).items()}
    save_file(tensors, str(target), metadata=metadata)


class Marker:
    """A pickle payload that creates a file when unpickled: if it exists, a pickle was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


def write_hostile(folder: Path, good: Path, marker: Path, other_family: Path) -> dict[str, str]:
    """Broken and hostile ``.safetensors`` files in ``folder`` (name -> what is wrong), made from ``good``."""
    raw = good.read_bytes()
    tensors = load_file(str(good))
    files = {}

    def put(name: str, data: bytes, why: str) -> None:
        (folder / f"{name}.safetensors").write_bytes(data)
        files[name] = why

    put("truncated", raw[: len(raw) - 64], "truncated")
    put("garbage", (40).to_bytes(8, "little") + os.urandom(40), "garbage header")
    put("hugehdr", (2**40).to_bytes(8, "little") + b"{}" + b"\0" * 32, "declared header of 1 TB")
    put("pickled", pickle.dumps({"w": Marker(marker)}), "a pickle named .safetensors")
    zipped = folder / "zipped.safetensors"
    torch.save({"w": torch.zeros(2)}, zipped)  # torch's zip checkpoint
    files["zipped"] = "a torch zip checkpoint named .safetensors"
    for name, value in (("nan", float("nan")), ("inf", float("inf"))):
        bad = dict(tensors)
        key = sorted(k for k in bad if bad[k].dim() == 2)[0]
        bad[key] = bad[key].clone()
        bad[key][0, 0] = value
        save_file(bad, str(folder / f"{name}.safetensors"))
        files[name] = f"a {name} value"
    misfit = dict(tensors)
    key = sorted(k for k in misfit if misfit[k].dim() == 2)[0]
    misfit[key] = torch.zeros(misfit[key].shape[0], misfit[key].shape[1] + 3)
    save_file(misfit, str(folder / "misfit.safetensors"))
    files["misfit"] = "shapes that do not fit the model"
    (folder / "otherfamily.safetensors").write_bytes(other_family.read_bytes())
    files["otherfamily"] = "an adapter of another model family"
    for suffix in (".ckpt", ".pt", ".bin"):  # pickles beside the adapters: never resolved
        (folder / f"evil{suffix}").write_bytes(pickle.dumps(Marker(marker)))
    return files


def other_family_adapter(path: Path) -> Path:
    pipe = dl.build_tiny_pipeline("tiny-flux")
    dl.add_lora(pipe, "f", rank=2)
    randomize(pipe, "f", seed=3)
    dl.save_lora(pipe, "f", path)
    return path


def weight_of(weight: float, text_encoder_weight: float | None) -> Any:
    """The weight ``set_weights`` takes for an A1111 tag's (unet, te) weights on tiny-sd15."""
    if text_encoder_weight is None:
        return weight
    return {"default": weight, "text_encoder": text_encoder_weight}


def solo(pipe: Any, prompt: str, seed: int, stack: dict[str, Any], negative: str | None = None) -> np.ndarray:
    """One image alone: ``stack`` (adapter name -> weight) set with set_weights, pixels as int RGB."""
    dl.set_weights(pipe, stack)
    kwargs: dict[str, Any] = {"num_inference_steps": STEPS, "height": SIZE, "width": SIZE}
    if negative:
        kwargs["negative_prompt"] = [negative]
    with torch.inference_mode():
        image = run_pipeline(pipe, [prompt], generator=[torch.Generator().manual_seed(seed)], **kwargs).images[0]
    return pixels(image)


def pixels(image: Any) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


def peft_names(pipe: Any) -> set[str]:
    """Every adapter name any PEFT LoRA layer of the pipe holds tensors for."""
    from diffusion_lora.adapters.state import state_of

    names: set[str] = set()
    for site in state_of(pipe).sites():
        for holder in (site.layer.lora_A, site.layer.lora_B, site.layer.lora_magnitude_vector):
            names.update(holder.keys())
    return names


def lora_params(pipe: Any) -> int:
    """Elements of every LoRA tensor in the pipe (counted from the layers, not from the cache)."""
    from peft.tuners.lora import LoraLayer

    total = 0
    for component in (pipe.unet, pipe.text_encoder):
        for module in component.modules():
            if isinstance(module, LoraLayer):
                for holder in (module.lora_A, module.lora_B, module.lora_magnitude_vector):
                    total += sum(p.numel() for p in holder.parameters())
    return total


def cli_image(out: Path, lora_dir: Path, prompt: str, seed: int, *extra: str) -> tuple[np.ndarray, str]:
    """(pixels as int, PNG parameters text) of `diffusion-lora generate` on tiny-sd15, 3 steps at 32 px, with the
    prompt's tags resolved in ``lora_dir``: the independent reference every served image is compared with."""
    from PIL import Image

    from diffusion_lora.cli import main

    args = ["generate", "--model", "tiny-sd15", "--prompt", prompt, "--steps", "3", "--height", "32", "--width", "32",
            "--seed", str(seed), "--out", str(out), "--lora-dir", str(lora_dir), *extra]
    assert main(args) == 0
    image = Image.open(sorted(Path(out).glob("*.png"))[0])
    return np.asarray(image.convert("RGB")).astype(int), image.text["parameters"]


def wait_for_stats(client: Any, ready: Any, timeout: float = 60.0) -> None:
    """Poll a running server's ``/v1/stats`` (an httpx client) until ``ready(stats)`` is true."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready(client.get("/v1/stats").json()):
            return
        time.sleep(0.02)
    raise AssertionError("the server never reached the expected state")
