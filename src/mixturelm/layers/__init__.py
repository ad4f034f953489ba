"""Building blocks: attention, FFNs, and (in later modules) routers, dispatch and routed layers.

Each layer is an nn.Module mapping (B, T, d) to (B, T, d), usable in any PyTorch model.
"""

from .attention import Attention, LayerKVCache, apply_rope, rope_angles
from .ffn import SwiGLU

__all__ = ["Attention", "LayerKVCache", "SwiGLU", "apply_rope", "rope_angles"]
