"""Building blocks, each an nn.Module usable in any PyTorch model.

FFN-slot layers map (B, T, D) to `((B, T, D), aux)`, aux a small dataclass of auxiliary losses and
statistics (`Aux`; empty for the dense SwiGLU): SwiGLU, MoE, PEER. MoD wraps a residual block and returns
`(y, [aux, ...])`. Each routed layer takes its config (MoEConfig, MoDConfig, PEERConfig) or its fields as
keywords. Attention (with RoPE and a KV cache) is the block's other half.
"""

from .attention import Attention, LayerKVCache, apply_rope, rope_angles
from .auxiliary import Aux
from .ffn import SwiGLU
from .mod import MoD, MoDAux, MoDConfig
from .moe import MoE, MoEAux, MoEConfig
from .peer import PEER, PEERAux, PEERConfig

__all__ = ["Attention", "Aux", "LayerKVCache", "MoD", "MoDAux", "MoDConfig", "MoE", "MoEAux", "MoEConfig", "PEER",
           "PEERAux", "PEERConfig", "SwiGLU", "apply_rope", "rope_angles"]
