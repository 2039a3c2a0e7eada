"""Adapter file formats: the one place that knows key names. Never imports diffusers."""
