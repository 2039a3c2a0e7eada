"""Serving many adapters from one base: the engine (per-request adapter stacks batched together), its
adapter cache, and the HTTP (AUTOMATIC1111 + native) and Ray Serve front ends."""

from .cache import AdapterCache, CachedAdapter, LoraFile
from .engine import Engine
from .jobs import AdapterRef, Job, JobResult, ServeLimits

__all__ = ["AdapterCache", "AdapterRef", "CachedAdapter", "Engine", "Job", "JobResult", "LoraFile", "ServeLimits"]
