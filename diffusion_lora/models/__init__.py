"""Base models: the built-in tiny pipelines and :func:`load_pipeline` for names, folders and files."""

from .loading import load_pipeline
from .offload import enable_offload
from .tiny import TINY_MODELS, build_tiny_pipeline

__all__ = ["TINY_MODELS", "build_tiny_pipeline", "enable_offload", "load_pipeline"]
