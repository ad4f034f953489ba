"""What a layer returns beside its output: its auxiliary losses and statistics, as a small typed object.

Every FFN-slot layer (SwiGLU, MoE, PEER) and every block wrapper (MoD) returns `(y, aux)`. `aux.losses`
holds the auxiliary losses by name ("balance", "z", "mod_bce", ...), which a model weights and adds to
its training loss; `aux.scalars()` the scalar statistics worth logging every step. Statistics that cost
something (PEER's per-expert scores over a million experts) are computed only when read, so inference
pays nothing for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch


@dataclass
class Aux:
    """A layer with nothing to report (the dense FFN): no losses, no statistics."""

    kind: ClassVar[str] = "dense"  # the mechanism that made it (mixturelm.mechanisms)
    losses: dict[str, torch.Tensor] = field(default_factory=dict)

    def scalars(self) -> dict[str, torch.Tensor]:
        """Scalar statistics for the training log, by name."""
        return {}
