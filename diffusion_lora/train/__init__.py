"""Training: config, dataset, buckets, captions, cache, objectives and the training loop.

The package itself is callable — ``diffusion_lora.train(config)`` runs :func:`.trainer.train` — while its
modules stay importable as ``diffusion_lora.train.config`` and so on.
"""

import sys
import types

from .config import TrainConfig, load_config
from .trainer import TrainResult, train


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage

__all__ = ["TrainConfig", "TrainResult", "load_config", "train"]
