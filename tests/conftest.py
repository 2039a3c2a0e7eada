"""Shared fixtures: tiny pipelines built from the package's own configs, offline."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models gain nothing from a second thread, and on a shared 2-core machine it costs a lot.
torch.set_num_threads(1)

import diffusion_lora as dl  # noqa: E402
from diffusion_lora.models.tiny import missing_classes  # noqa: E402

from . import helpers  # noqa: E402

# every tiny pipeline of every family and variant, from the registry: a new one is tested everywhere.
# Those the installed diffusers cannot build (Flux.3 before 0.42, on the floor versions) are left out here;
# tests/test_models.py checks that building one says so.
ALL_TINY = tuple(kind for kind in dl.families.tiny_models() if not missing_classes(kind))


@pytest.fixture(params=ALL_TINY)
def tiny_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make_pipe():
    """Build a fresh tiny pipeline (cheap) so tests never see each other's adapters."""

    def make(kind: str):
        pipe = dl.build_tiny_pipeline(kind)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make


@pytest.fixture
def pipe(tiny_kind: str, make_pipe):
    return make_pipe(tiny_kind)


@pytest.fixture
def run():
    return helpers.run
