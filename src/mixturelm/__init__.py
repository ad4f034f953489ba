"""mixturelm: conditional-computation language models (MoE, Mixture-of-Depths, PEER, MoE-F) in PyTorch."""

import os

# PyTorch's CPU allocator backs tensors of 2 MiB and more with transparent huge pages when this is set
# (read once, at its first allocation). Without it every fresh large activation page-faults 4 KiB at a
# time: 325k faults and ~20 % of a fine-grained MoE step on CPU (`mixturelm bench moe`). Set
# THP_MEM_ALLOC_ENABLE=0 to opt out. It must be set before torch allocates, hence here, first.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from . import config as _config
from .config import BlockSpec, ModelConfig, TrainConfig
from .errors import UsageError
from .model import MixtureLM, ModelOutput

__version__ = "0.1.0"
presets = _config.presets

__all__ = ["BlockSpec", "MixtureLM", "ModelConfig", "ModelOutput", "TrainConfig", "UsageError", "presets"]
