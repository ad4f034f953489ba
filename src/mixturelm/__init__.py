"""mixturelm: conditional-computation language models (MoE, Mixture-of-Depths, PEER, MoE-F) in PyTorch.

    from mixturelm import MixtureLM, ModelConfig, presets
    from mixturelm.layers import MoE, MoD, PEER
"""

from . import presets
from .config import BlockSpec, ModelConfig, TrainConfig
from .errors import UsageError
from .model import MixtureLM, ModelOutput

__version__ = "0.1.0"

__all__ = ["BlockSpec", "MixtureLM", "ModelConfig", "ModelOutput", "TrainConfig", "UsageError", "presets"]
