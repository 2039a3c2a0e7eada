"""Load a base pipeline from a tiny-model name, a diffusers folder, a single checkpoint file or a hub id.

Everything is loaded with ``local_files_only`` except a hub id while the hub is not switched off: the
library never downloads behind the user's back, and every failure is a :class:`ModelLoadError` that
says what was tried and what to pass instead.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import diffusers
import huggingface_hub.constants
import torch
from diffusers import DiffusionPipeline
from diffusers.loaders.single_file_utils import (
    DIFFUSERS_DEFAULT_PIPELINE_PATHS,
    SingleFileComponentError,
    infer_diffusers_model_type,
)
from safetensors import safe_open

from ..compat.diffusers import modular_setting
from ..errors import ConfigError, ModelLoadError
from ..families import single_file_pipelines, supported_titles
from ..model_names import DEFAULT_MODEL, EMBEDDED_MODELS
from .denoiser_load import (
    DenoiserFile,
    denoiser_slot,
    is_gguf_file,
    load_denoiser_file,
    load_quantized_denoiser,
    read_denoiser_file,
)
from .offload import Offload, apply_offload, check_offload
from .quantize import Quantize, parse_quantize, quantize_denoiser, require_library
from .tiny import TINY_MODELS, build_tiny_pipeline

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "SINGLE_FILE_SUFFIXES",
    "detect_single_file_pipeline",
    "embedded_model_path",
    "load_pipeline",
    "read_checkpoint_shapes",
]

logger = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def native_size(pipe: object) -> int | None:
    """The image side in pixels the pipeline generates by default (its denoiser's sample size × the
    VAE's scale factor, as diffusers pipelines compute it), or None when the pipeline does not say."""
    sample = getattr(pipe, "default_sample_size", None)
    if sample is None:
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        sample = getattr(getattr(denoiser, "config", None), "sample_size", None)
    if isinstance(sample, (tuple, list)) and sample:
        sample = max(sample)
    if sample is None:  # a modular pipeline (Flux.3) keeps its default size on its latents step
        height = modular_setting(pipe, "default_height", None)
        return height if isinstance(height, int) and height > 0 else None
    factor = getattr(pipe, "vae_scale_factor", None)
    ok = isinstance(sample, int) and isinstance(factor, int) and sample > 0 and factor > 0
    return sample * factor if ok else None
_ASSETS = Path(__file__).resolve().parent.parent / "assets"
_WHAT_TO_PASS = (
    "pass a local diffusers folder (with model_index.json), a .safetensors/.ckpt file "
    f"or one of {', '.join(EMBEDDED_MODELS + tuple(TINY_MODELS))}"
)


def embedded_model_path(name: str) -> Path:
    """The diffusers folder of the embedded model ``name`` (one of :data:`EMBEDDED_MODELS`)."""
    if name not in EMBEDDED_MODELS:
        raise ModelLoadError(f"{name}: not an embedded model; expected one of {', '.join(EMBEDDED_MODELS)}")
    path = _ASSETS / name
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(
            f"{name}: the embedded model's folder {path} is missing or incomplete; reinstall the "
            "package, or retrain it with train_scripts/train_base_model.py"
        )
    return path

# infer_diffusers_model_type answers "v1" for any unknown checkpoint; a real one has the LDM UNet.
_SD1_MARKER = "model.diffusion_model.input_blocks."


def load_pipeline(
    source: str | os.PathLike[str],
    *,
    torch_dtype: torch.dtype | None = None,
    device: str | None = None,
    config: str | os.PathLike[str] | None = None,
    exact: bool = False,
    quantize: str | Quantize | None = None,
    denoiser: str | os.PathLike[str] | None = None,
    offload: str | Offload | None = None,
) -> DiffusionPipeline:
    """Load a base pipeline from ``source`` and move it to ``device`` (default: stay on the CPU).

    ``source`` is tried in this order:

    * a name in :data:`EMBEDDED_MODELS` — a small trained pipeline shipped with the package
      (``shapes-sd15``: SD1.x architecture, 64×64 images of coloured shapes);
    * a name in :data:`TINY_MODELS` — a built-in tiny random-weight pipeline (seed 0);
    * an existing folder with ``model_index.json`` — ``DiffusionPipeline.from_pretrained``, offline;
    * an existing ``.safetensors`` / ``.ckpt`` single file — the pipeline class is detected from the
      checkpoint's keys and loaded with ``from_single_file``, offline; the component configs come from
      ``config``, a diffusers folder of the same model (without one the hub cache is tried);
    * an ``org/name`` hub id — ``DiffusionPipeline.from_pretrained`` (only the local cache when
      ``HF_HUB_OFFLINE`` is set).

    ``torch_dtype`` converts every component (e.g. ``torch.float16``). With ``exact``, weights loaded
    from disk onto the CPU are copied to aligned memory, so a pipeline loaded from a saved folder
    computes bit-identically what the saved one did (memory-mapped weights take a kernel path that
    differs by ~1e-7); it costs a second copy of the weights at load time, so it is off by default.
    ``quantize`` ("nf4", "int8", "fp8"; see :mod:`diffusion_lora.models.quantize`) quantizes the
    denoiser's linear layers (``torch_dtype``, default float32, is their compute dtype): a diffusers folder
    or hub id through diffusers' ``TorchAoConfig`` (int8, fp8) or, when ``device`` is an accelerator,
    ``BitsAndBytesConfig`` (nf4) while loading; everything else in place after loading.
    ``denoiser`` is a file holding the denoiser's weights to use instead of the base's: a GGUF file
    (loaded quantized through diffusers' ``GGUFQuantizationConfig``) or a ``.safetensors`` file with the
    denoiser's keys; the base supplies the denoiser's config and every other component.
    ``offload`` ("model", "sequential", "group"; see :mod:`diffusion_lora.models.offload`) keeps the
    weights in CPU memory and computes on ``device`` (default: the machine's accelerator); it needs one.
    Raises ModelLoadError for anything that cannot be loaded, ConfigError for a malformed ``device``,
    ``quantize`` or ``offload``, a missing quantization library, ``quantize`` for a denoiser that is
    already quantized, or offloading without an accelerator.
    """
    mode = parse_quantize(quantize)
    if mode is not None:
        require_library(mode)
    file = None if denoiser is None else read_denoiser_file(denoiser)
    if file is not None and mode is not None and file.quantization:
        raise ConfigError(
            f"quantize: the denoiser file {file.path} is already quantized ({file.quantization}); drop quantize "
            "(--quantize)"
        )
    offloading = check_offload(offload, device)
    name = os.fspath(source)
    target = torch.device("cpu") if offloading is not None else _parse_device(device)
    path = Path(name).expanduser()
    try:
        path.exists()
    except OSError as exc:  # e.g. a name over 255 bytes, which no later check should meet as a traceback
        raise ModelLoadError(f"{name}: cannot be read as a model path: {exc.strerror or exc}") from None
    parts: dict[str, torch.nn.Module] = {}  # denoiser loaded here, handed to from_pretrained
    if name in EMBEDDED_MODELS:
        pipe = _load_folder(embedded_model_path(name), torch_dtype)
    elif name in TINY_MODELS:
        pipe = build_tiny_pipeline(name)
    elif path.is_dir():
        parts = _denoiser_part(path, file, mode, torch_dtype, target, offline=True)
        pipe = _load_folder(path, torch_dtype, **parts)
    elif path.is_file():
        pipe = _load_single_file(path, torch_dtype, config)
    elif _HUB_ID.match(name) and not name.lower().endswith(SINGLE_FILE_SUFFIXES):
        parts = _denoiser_part(name, file, mode, torch_dtype, target, offline=_hub_offline())
        pipe = _load_hub(name, torch_dtype, **parts)
    else:
        raise ModelLoadError(_missing_message(name))
    if file is not None and not parts:
        _swap_denoiser(pipe, file, torch_dtype)
    try:
        in_place = mode is not None and not (parts and getattr(next(iter(parts.values())), "is_quantized", False))
        # quantized on the CPU, then moved: the full-precision denoiser never has to fit on the accelerator
        _move(pipe, torch.device("cpu") if in_place else target, torch_dtype)
        if in_place:
            quantize_denoiser(pipe, mode, compute_dtype=torch_dtype)
            _move(pipe, target, None)
    except (RuntimeError, AssertionError) as exc:  # torch asserts when built without that backend
        raise ConfigError(f"device: cannot move the pipeline to {device!r}: {exc}") from exc
    if exact and target.type == "cpu":
        _realign_cpu_tensors(pipe)
    if offloading is not None:
        apply_offload(pipe, *offloading)
    return pipe


def _denoiser_part(
    source: str | Path, file: DenoiserFile | None, mode: Quantize | None, torch_dtype: torch.dtype | None,
    target: torch.device, *, offline: bool,
) -> dict[str, torch.nn.Module]:
    """{slot: denoiser} loaded before the pipeline (from ``file``, or quantized by diffusers), so the base's own
    denoiser weights are never loaded; {} when there is nothing to load first."""
    if file is None and mode is None:
        return {}
    try:
        index = DiffusionPipeline.load_config(str(source), local_files_only=offline)
    except (OSError, ValueError):
        return {}  # the pipeline load that follows says what is wrong with the folder or id
    slot = denoiser_slot(index)
    if slot is None:
        return {}
    cls = getattr(diffusers, slot[1], None)
    if file is not None and cls is not None:
        try:
            saved = cls.load_config(str(source), subfolder=slot[0], local_files_only=offline)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{source}: cannot read the {slot[0]}'s config.json: {exc}") from exc
        return {slot[0]: load_denoiser_file(file, cls, saved, torch_dtype=torch_dtype)}
    if file is None and mode is not None:
        model = load_quantized_denoiser(source, slot[0], slot[1], mode, torch_dtype=torch_dtype, device=target,
                                        local_files_only=offline)
        return {} if model is None else {slot[0]: model}
    return {}


def _swap_denoiser(pipe: DiffusionPipeline, file: DenoiserFile, torch_dtype: torch.dtype | None) -> None:
    """Replace ``pipe``'s denoiser by one with the weights of ``file`` (configured as the base's)."""
    for slot in ("transformer", "unet"):
        current = getattr(pipe, slot, None)
        if isinstance(current, torch.nn.Module):
            model = load_denoiser_file(file, type(current), current.config, torch_dtype=torch_dtype or current.dtype)
            setattr(pipe, slot, model)
            return
    raise ModelLoadError(f"denoiser {file.path}: {type(pipe).__name__} has no transformer or unet to replace")


def _move(pipe: DiffusionPipeline, target: torch.device, torch_dtype: torch.dtype | None) -> None:
    """``pipe.to(target, torch_dtype)``, except that components quantized by diffusers only move: diffusers
    refuses to cast a quantized model's dtype (their float layers got ``torch_dtype`` at load)."""
    parts = {n: c for n, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
    if torch_dtype is None or not any(getattr(c, "is_quantized", False) for c in parts.values()):
        pipe.to(device=target, dtype=torch_dtype)
        return
    for component in parts.values():
        if getattr(component, "is_quantized", False):
            component.to(device=target)
        else:
            component.to(device=target, dtype=torch_dtype)


def _parse_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(
            f"device: {device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1', 'mps')"
        ) from exc


def _missing_message(name: str) -> str:
    close = difflib.get_close_matches(name, EMBEDDED_MODELS + tuple(TINY_MODELS), n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"{name}: no such file or folder, and not a built-in model{hint}; {_WHAT_TO_PASS}"


def _load_folder(path: Path, torch_dtype: torch.dtype | None, **parts: torch.nn.Module) -> DiffusionPipeline:
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(
            f"{path}: folder has no model_index.json, so it is not a diffusers pipeline; pass the folder "
            "written by save_pretrained (or a hub snapshot), or a single .safetensors/.ckpt file"
        )
    try:
        return DiffusionPipeline.from_pretrained(path, torch_dtype=torch_dtype, local_files_only=True, **parts)
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise ModelLoadError(f"{path}: could not load the diffusers pipeline in this folder: {exc}") from exc


def _hub_offline() -> bool:
    """Whether hub access is switched off, read now (huggingface_hub reads it only at import)."""
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return flag in {"1", "true", "yes", "on"} or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def _load_hub(repo_id: str, torch_dtype: torch.dtype | None, **parts: torch.nn.Module) -> DiffusionPipeline:
    offline = _hub_offline()
    try:
        return DiffusionPipeline.from_pretrained(repo_id, torch_dtype=torch_dtype, local_files_only=offline, **parts)
    except (OSError, ValueError) as exc:
        why = "offline (HF_HUB_OFFLINE is set) and not in the local cache"
        if not offline:
            why = "offline / not found"
        raise ModelLoadError(f"could not download {repo_id}: {why}; {_WHAT_TO_PASS}") from exc


class _Shape:
    """A stand-in for a tensor that only has a shape, for diffusers' key-and-shape checkpoint sniffing."""

    __slots__ = ("shape",)

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = torch.Size(shape)


def read_checkpoint_shapes(path: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """Every tensor key of a single-file checkpoint and its shape, without loading the tensors.

    ``.ckpt`` files are read with ``torch.load(weights_only=True)``, which refuses code in the pickle.
    Raises ModelLoadError for a file that is not a readable checkpoint.
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # safetensors, pickle and zip each raise their own error types
        raise ModelLoadError(
            f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc}); "
            "if it needs pickle to load, convert it to .safetensors"
        ) from exc
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ModelLoadError(f"{path}: holds a {type(state).__name__}, not a dict of tensors")
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def detect_single_file_pipeline(shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, str]:
    """(diffusers model type, pipeline class name) of a single-file checkpoint, from its keys and shapes.

    Uses diffusers' ``infer_diffusers_model_type``. Raises ModelLoadError for a checkpoint that is not
    of a registered family (:func:`~diffusion_lora.families.single_file_pipelines`).
    """
    sniffable = {k: _Shape(v) for k, v in shapes.items()}
    try:
        model_type = infer_diffusers_model_type(sniffable)
    except (KeyError, IndexError, UnboundLocalError, ValueError) as exc:  # sizes it has no branch for
        raise ModelLoadError(f"checkpoint layout not recognised by diffusers ({exc})") from exc
    if model_type == "v1" and not any(k.startswith(_SD1_MARKER) for k in shapes):
        raise ModelLoadError(
            f"checkpoint is not a {supported_titles()} model "
            f"(no {_SD1_MARKER}* keys and no other known layout)"
        )
    pipeline = single_file_pipelines().get(model_type)
    if pipeline is None:
        raise ModelLoadError(
            f"checkpoint is a {model_type!r} model, which diffusion_lora does not load as a base pipeline"
        )
    return model_type, pipeline


def _load_single_file(
    path: Path, torch_dtype: torch.dtype | None, config: str | os.PathLike[str] | None
) -> DiffusionPipeline:
    if is_gguf_file(path):
        raise ModelLoadError(
            f"{path}: a GGUF file holds only the denoiser, not a whole pipeline; pass the base model (a diffusers "
            "folder, hub id or built-in name) as the model and this file as denoiser (--denoiser FILE)"
        )
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(f"{path}: not a checkpoint file; {_WHAT_TO_PASS}")
    shapes = read_checkpoint_shapes(path)
    try:
        model_type, pipeline_name = detect_single_file_pipeline(shapes)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
    pipeline_cls = getattr(diffusers, pipeline_name)
    config_dir = None if config is None else Path(config).expanduser()
    if config_dir is not None and not (config_dir / "model_index.json").is_file():
        raise ModelLoadError(
            f"--config {config}: not a diffusers folder (no model_index.json); pass the folder of the "
            f"diffusers version of the same model as {path.name}"
        )
    logger.info("loading %s as %s (%s)", path, pipeline_name, model_type)
    try:
        return pipeline_cls.from_single_file(
            str(path),
            config=None if config_dir is None else str(config_dir),
            torch_dtype=torch_dtype,
            local_files_only=True,
        )
    except SingleFileComponentError as exc:
        raise ModelLoadError(
            f"{path}: {str(exc).splitlines()[0]} A file that holds only the denoiser (common for Flux) is "
            "not a whole pipeline: load the diffusers folder of the base model instead and swap in the "
            "denoiser with its class's from_single_file(path, config=DIR, subfolder=...)"
        ) from exc
    except (OSError, ValueError, KeyError) as exc:
        if config_dir is not None:
            raise ModelLoadError(f"{path}: could not load with the configs of {config_dir}: {exc}") from exc
        repo = DIFFUSERS_DEFAULT_PIPELINE_PATHS[model_type]["pretrained_model_name_or_path"]
        raise ModelLoadError(
            f"{path}: a single-file {model_type} checkpoint needs the component configs of its diffusers "
            f"model ({repo}), which are not in the local hub cache and cannot be downloaded offline; pass "
            "--config DIR (config=DIR), a folder with model_index.json of that model, e.g. a hub snapshot "
            "or a pipeline saved with save_pretrained"
        ) from exc


def _realign_cpu_tensors(pipe: DiffusionPipeline) -> None:
    """Copy CPU parameters and buffers that are not 64-byte aligned into freshly allocated memory.

    Memory-mapped safetensors weights start at arbitrary 8-byte offsets, and CPU matmul kernels take a
    different (numerically different, ~1e-7) path for them; after the copy a loaded pipeline computes
    bit-identically to the one that was saved. Parameter objects are kept, so tied weights stay tied.
    """
    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for tensor in (*component.parameters(), *component.buffers()):
            if tensor.device.type == "cpu" and tensor.numel() and tensor.data_ptr() % 64:
                tensor.data = tensor.data.clone()
