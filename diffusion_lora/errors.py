"""The exception hierarchy of diffusion_lora.

Every error the library raises on bad input is a :class:`DiffusionLoraError`. A message says what was
wrong (naming the file, key or setting at fault) and what to do about it.
"""

from __future__ import annotations


class DiffusionLoraError(Exception):
    """Base class of every error raised by diffusion_lora on bad input or state."""


class ConfigError(DiffusionLoraError, ValueError):
    """A configuration value, argument or option is unknown, of the wrong type or out of range."""


class FormatError(DiffusionLoraError, ValueError):
    """A file is not a readable adapter file (not safetensors, truncated, corrupt header, bad tensors)."""


class UnsafeFileError(FormatError):
    """A file needs pickle to be read, which can execute code; refused unless explicitly allowed."""


class KeyMappingError(DiffusionLoraError, KeyError):
    """Keys of an adapter file map to no module of the model, or a module's shapes do not fit."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class FamilyMismatchError(KeyMappingError):
    """An adapter or pipeline belongs to another model family than the one it is used with."""


class UnsupportedModelError(DiffusionLoraError, ValueError):
    """A pipeline or model is not of a family diffusion_lora knows."""


class ModelLoadError(DiffusionLoraError, OSError):
    """A base model could not be loaded from the given name, folder, file or hub id."""


class AdapterNotFoundError(DiffusionLoraError, KeyError):
    """An adapter name is not loaded in the pipeline."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class AdapterStateError(DiffusionLoraError, RuntimeError):
    """An operation does not fit the adapters' current state (e.g. loading while adapters are fused)."""


class DatasetError(DiffusionLoraError, ValueError):
    """Training images or captions are missing, unreadable or unusable."""


class RequestLimitError(ConfigError):
    """A generation request asks for more than the server allows (steps, pixels, images, adapters, prompt)."""


class ServerBusyError(DiffusionLoraError, RuntimeError):
    """The server's queue is full; retry later (HTTP 429)."""


class ServerClosedError(DiffusionLoraError, RuntimeError):
    """The server is shutting down and takes no more work (HTTP 503)."""
