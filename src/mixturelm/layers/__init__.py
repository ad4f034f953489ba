"""Building blocks: attention, FFNs, and (in later modules) routers, dispatch and routed layers.

Each layer is an nn.Module mapping (B, T, d) to (B, T, d), usable in any PyTorch model.
"""

from .attention import Attention, LayerKVCache, apply_rope, rope_angles
from .ffn import SwiGLU
from .moe import MoE
from .peer import PEER

__all__ = ["Attention", "LayerKVCache", "MoE", "PEER", "SwiGLU", "apply_rope", "rope_angles"]
