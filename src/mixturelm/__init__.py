"""mixturelm: conditional-computation language models (MoE, Mixture-of-Depths, PEER, MoE-F) in PyTorch."""

from . import config as _config
from .config import BlockSpec, ModelConfig, TrainConfig
from .errors import UsageError
from .model import MixtureLM, ModelOutput

__version__ = "0.1.0"
presets = _config.presets

__all__ = ["BlockSpec", "MixtureLM", "ModelConfig", "ModelOutput", "TrainConfig", "UsageError", "presets"]
