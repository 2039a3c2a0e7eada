"""The package version, in a module of its own so that the CLI and file metadata can read it without
importing the library (``import diffusion_lora.version`` imports nothing else)."""

__version__ = "0.1.0"
