"""Which file format an adapter's keys are in, decided from all of its keys."""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import FormatError
from .comfyui import is_comfyui
from .file_format import FileFormat
from .flux_variants import refuse_control_lora
from .kohya import is_kohya
from .peft_format import PEFT_MODEL_PREFIX, split_peft_key


def detect_format(keys: Iterable[str], source: str = "") -> FileFormat:
    """The format every key of a file fits; FormatError with examples when no single format does."""
    keys = list(keys)
    if not keys:
        raise FormatError(f"{source}: the file holds no tensors; it is not an adapter")
    refuse_control_lora(keys, source)
    if is_kohya(keys):
        return FileFormat.KOHYA
    if is_comfyui(keys):
        return FileFormat.COMFYUI
    misfits = [k for k in keys if split_peft_key(k.removeprefix(PEFT_MODEL_PREFIX)) is None]
    if not misfits:
        return FileFormat.DIFFUSERS
    shown = ", ".join(repr(k) for k in misfits[:5])
    raise FormatError(
        f"{source}: {len(misfits)} of {len(keys)} keys fit no known LoRA format (e.g. {shown}); "
        f"diffusion_lora reads diffusers/PEFT, kohya/A1111 and ComfyUI files"
    )
