"""The dense FFN (SwiGLU): the floor every mechanism is measured against, registered like one so that a
block's FFN slot is always filled by a mechanism."""

from __future__ import annotations

from ..layers.ffn import SwiGLU
from .registry import Mechanism, register


class DenseMechanism(Mechanism):
    kind = "dense"
    title = "dense FFN"

    def build(self, config, d_model: int, d_hidden: int | None = None, **_) -> SwiGLU:
        return SwiGLU(d_model, d_hidden)

    def flops(self, config, model, d_hidden: int) -> dict[str, float]:
        return {"ffn": 6.0 * model.d_model * d_hidden}


DENSE = register(DenseMechanism())
