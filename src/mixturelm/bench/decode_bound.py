"""The least time one decoding step can take on a machine, from the bytes it must read and the FLOPs it
must do: what `bench mod` sets beside the measured tokens/s of dense and Mixture-of-Depths decoding.

A step is a chain of stages, each waiting for the one before (a block's matrix products need its input,
its attention needs their queries), so the least time of a step is the sum over its stages of
max(bytes / bandwidth, FLOPs / FLOP rate). Per block, two stages:
- its matrix products: the block's weights are read once for all the rows that run it (and not at all
  when no row does: a Mixture-of-Depths block that no token of the step enters), 2 FLOPs per weight per row;
- its attention: each row reads the keys and values it attends to (its own cached tokens: a routed block
  caches only the tokens that entered it), 4 x heads x head size FLOPs per cached token.
Then the final projection to the vocabulary (the head). A routed block's router is a stage of its own
(its one weight vector, every row). Left out, as they are under 0.5 % of the bytes here: activations,
norms, rope, the embedding rows, and the cache writes of the new token.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Machine:
    """What the hardware allows: bytes read per second and matrix-product FLOPs per second."""

    bytes_per_s: float
    flops_per_s: float

    def seconds(self, n_bytes: float, flops: float) -> float:
        """The least time of one stage: the slower of reading its bytes and doing its FLOPs."""
        return max(n_bytes / self.bytes_per_s, flops / self.flops_per_s)


@dataclass(frozen=True)
class BlockShape:
    """What one transformer block costs a decoding step."""

    weight_bytes: float  # every parameter, read once when the block runs
    flops_per_row: float  # 2 x the weights of its matrices: one token through them
    kv_bytes_per_token: float  # the key and value of one cached token
    attn_flops_per_token: float  # QK and AV of one query against one cached token: 4 x heads x head size

    @classmethod
    def of(cls, block: nn.Module) -> BlockShape:
        """mixturelm's Block (its `attn` gives the heads)."""
        params = list(block.parameters())
        a = block.attn
        elt = params[0].element_size()
        return cls(weight_bytes=float(sum(p.numel() * p.element_size() for p in params)),
                   flops_per_row=2.0 * sum(p.numel() for p in params if p.dim() == 2),
                   kv_bytes_per_token=2.0 * a.kv_heads * a.head_dim * elt,
                   attn_flops_per_token=4.0 * a.n_heads * a.head_dim)

    def stages(self, contexts_R: list[int]) -> list[tuple[float, float]]:
        """(bytes, FLOPs) of the block's two stages for rows attending to contexts_R[r] tokens each
        (their own included); none when no row runs the block."""
        if not contexts_R:
            return []
        rows, tokens = len(contexts_R), float(sum(contexts_R))
        return [(self.weight_bytes, rows * self.flops_per_row),
                (tokens * self.kv_bytes_per_token, tokens * self.attn_flops_per_token)]


def linear_stage(weight: nn.Parameter | None, rows: int) -> list[tuple[float, float]]:
    """(bytes, FLOPs) of a matrix applied to `rows` rows: the head, a router."""
    if weight is None:
        return []
    return [(float(weight.numel() * weight.element_size()), 2.0 * weight.numel() * rows)]


def step_seconds(stages: list[tuple[float, float]], machine: Machine) -> float:
    """The least time of a chain of stages: each stage's own bound, added."""
    return sum(machine.seconds(b, f) for b, f in stages)


def decode_stages(model: nn.Module, batch: int, context: int,
                  routed_contexts: list[list[int]]) -> list[tuple[float, float]]:
    """(bytes, FLOPs) of the stages of one decoding step of a MixtureLM: every row of a plain block attends
    to `context` tokens; routed_contexts[j] holds, for the rows whose token entered the j-th routed
    (Mixture-of-Depths) block, the tokens each attends to there."""
    from ..layers.mod import MoD

    stages: list[tuple[float, float]] = []
    routed = iter(routed_contexts)
    for block in model.blocks:
        if isinstance(block, MoD):
            side = [m for m in (block.router, *(block.predictor or ())) if isinstance(m, nn.Linear)]
            for linear in side:  # the router (and the predictor) score every row
                stages += linear_stage(linear.weight, batch)
            stages += BlockShape.of(block.block).stages(next(routed))
        else:
            stages += BlockShape.of(block).stages([context] * batch)
    head = model.head.weight if model.head is not None else model.embed.weight
    return stages + linear_stage(head, batch)
