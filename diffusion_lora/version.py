"""The package version, in a module that imports nothing (pyproject reads it; metadata writers stamp it)."""

__version__ = "0.1.0"
