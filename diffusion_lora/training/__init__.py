"""Training: config, dataset, buckets, captions, cache, objectives and the training loop.

``diffusion_lora.train(config)`` (re-exported from here) runs :func:`.trainer.train`.
"""

from .config import TrainConfig, load_config
from .trainer import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "load_config", "train"]
