"""MixtureLM: a pre-norm decoder-only transformer whose blocks each say which FFN they have and
whether a routing wrapper surrounds them (ModelConfig.blocks).

Dimension letters: B batch, T tokens, D d_model, V vocabulary.

A block returns its output and a dict of auxiliary losses and statistics; the model gathers them
under "layer{i}." names and returns them with the logits, so nothing flows through global state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import BlockSpec, ModelConfig
from .layers.attention import Attention, LayerKVCache, rope_angles
from .layers.ffn import SwiGLU
from .layers.mod import MoD
from .layers.moe import MoE
from .layers.peer import PEER

Aux = dict[str, torch.Tensor]  # "loss/<name>" entries are auxiliary losses, "stat/<name>" statistics

# How each FFN kind and each wrapper kind is built. Later mechanisms add entries here.
def _build_moe(spec: BlockSpec, cfg: ModelConfig) -> MoE:
    m = spec.moe
    return MoE(cfg.d_model, m.d_expert, m.n_experts, m.top_k, m.router, n_shared=m.n_shared,
               capacity_factor=m.capacity_factor, renormalize=m.renormalize, route_scale=m.route_scale,
               bias_rate=m.bias_rate, impl=m.impl, n_noop=m.n_noop)


def _build_mod(block: nn.Module, spec: BlockSpec, cfg: ModelConfig) -> MoD:
    m = spec.mod
    return MoD(block, cfg.d_model, m.capacity, causal=m.causal, predictor_hidden=m.predictor_hidden,
               calibrate=m.calibrate, threshold_momentum=m.threshold_momentum, gate=m.gate)


def _build_peer(spec: BlockSpec, cfg: ModelConfig) -> PEER:
    p = spec.peer
    return PEER(cfg.d_model, p.n_experts, p.n_heads, p.top_k, p.d_key, activation=p.activation, glu=p.glu,
                per_head_keys=p.per_head_keys, query_norm=p.query_norm, sparse_grad=p.sparse_grad)


FFN_BUILDERS: dict[str, Callable[[BlockSpec, ModelConfig], nn.Module]] = {
    "dense": lambda spec, cfg: SwiGLU(cfg.d_model, spec.ffn_hidden or cfg.d_ffn),
    "moe": _build_moe,
    "peer": _build_peer,
}


class Beside(nn.Module):
    """An FFN with a second one added beside it: main(x) + extra(x) (PEER beside the dense FFN, Fig. 2 of
    He 2024; clovaai/pkm-transformers found memories next to the FFN stay in use)."""

    has_aux = True

    def __init__(self, main: nn.Module, extra: nn.Module) -> None:
        super().__init__()
        self.main, self.extra = main, extra

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        y1, aux1 = call_with_aux(self.main, x, return_aux)
        y2, aux2 = call_with_aux(self.extra, x, return_aux)
        return (y1 + y2, {**aux1, **{f"{k}_beside" if k in aux1 else k: v for k, v in aux2.items()}}) \
            if return_aux else y1 + y2


def build_ffn(spec: BlockSpec, cfg: ModelConfig) -> nn.Module:
    ffn = FFN_BUILDERS[spec.ffn](spec, cfg)
    return Beside(ffn, _build_peer(spec, cfg)) if spec.peer_beside else ffn
WRAPPER_BUILDERS: dict[str, Callable[[nn.Module, BlockSpec, ModelConfig], nn.Module]] = {
    "none": lambda block, spec, cfg: block,
    "mod": _build_mod,
}


def call_with_aux(layer: nn.Module, x: torch.Tensor, return_aux: bool = True) -> tuple[torch.Tensor, Aux]:
    """Routed layers (has_aux) return (output, aux) when asked; plain layers return the output."""
    if return_aux and getattr(layer, "has_aux", False):
        return layer(x, return_aux=True)
    return layer(x), {}


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Block(nn.Module):
    """x + attn(norm(x)), then + ffn(norm(x)). A block is called on any subset of a sequence's tokens,
    given their rope angles and their own cache, which is what a routing wrapper needs."""

    def __init__(self, spec: BlockSpec, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.kv_heads)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = build_ffn(spec, cfg)

    def forward(self, x_BTD: torch.Tensor, rope, cache: LayerKVCache | None = None,
                return_aux: bool = True, causal_routing: bool = False) -> tuple[torch.Tensor, Aux]:
        """causal_routing concerns routing wrappers around a block; a plain block has none."""
        h = x_BTD + self.attn(self.attn_norm(x_BTD), rope, cache)
        y, aux = call_with_aux(self.ffn, self.ffn_norm(h), return_aux)
        return h + y, aux

    def branch(self, x_BTD: torch.Tensor, rope, cache=None, return_aux: bool = True) -> tuple[torch.Tensor, Aux]:
        """The residual branch f alone, forward(x) = x + f(x): what Mixture-of-Depths scales by the router
        weight. Returning f, not x + f, is what keeps the residual from being counted twice."""
        a = self.attn(self.attn_norm(x_BTD), rope, cache)
        y, aux = call_with_aux(self.ffn, self.ffn_norm(x_BTD + a), return_aux)
        return a + y, aux

    def new_cache(self, batch: int, capacity: int, device, dtype) -> LayerKVCache:
        a = self.attn
        return LayerKVCache(batch, a.kv_heads, a.head_dim, capacity, device, dtype)


class KVCache:
    """One LayerKVCache per block, for decoding; `length` is the number of tokens seen so far."""

    def __init__(self, model: MixtureLM, batch: int, capacity: int) -> None:
        p = next(model.parameters())
        # each block makes its own: plain blocks a uniform cache, routed (MoD) blocks a ragged one
        self.layers = [block.new_cache(batch, capacity, p.device, p.dtype) for block in model.blocks]
        self.length = 0


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V), float32 when targets are given
    loss: torch.Tensor | None = None  # mean next-token cross-entropy, nats
    aux_loss: torch.Tensor | None = None  # weighted sum of the auxiliary losses: train on loss + aux_loss
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # "layer3.balance" -> value
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # "layer3.load_max_over_mean" -> value


class MixtureLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(
            WRAPPER_BUILDERS[spec.wrapper](Block(spec, config), spec, config)
            for spec in (config.block_spec(i) for i in range(config.n_layers))
        )
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        # Residual-branch outputs are scaled down with depth (GPT-2) so the residual stream stays O(1).
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (MoE, PEER)):
                module.reset_parameters(std, out_std)
            elif isinstance(module, (nn.Linear, nn.Embedding)) and ".router." not in name and not name.endswith(
                    ".query"):  # PEER's query network: initialised by PEER.reset_parameters
                is_out = name.endswith(("attn.out", ".down"))
                nn.init.normal_(module.weight, 0.0, out_std if is_out else std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embeddings else n

    def forward(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False, return_aux: bool | None = None,
                causal_routing: bool = False) -> ModelOutput:
        """return_aux: gather the routed layers' losses and statistics (default: when gradients are on).
        causal_routing: Mixture-of-Depths blocks decide token by token, as when sampling (always so with
        a cache), instead of by the top-k of the whole sequence, which looks at future tokens."""
        return_aux = torch.is_grad_enabled() if return_aux is None else return_aux
        B, T = idx_BT.shape
        past = cache.length if cache is not None else 0
        positions_T = torch.arange(past, past + T, device=idx_BT.device)
        rope = rope_angles(positions_T, self.config.head_dim, self.config.rope_theta)
        x = self.embed(idx_BT)
        aux: Aux = {}
        for i, block in enumerate(self.blocks):
            x, block_aux = block(x, rope, cache.layers[i] if cache is not None else None, return_aux,
                                 causal_routing)
            aux.update({f"layer{i}.{k}": v for k, v in block_aux.items()})
        if cache is not None:
            cache.length += T
        x = self.norm(x[:, -1:] if last_only else x)
        logits = F.linear(x, self.embed.weight) if self.head is None else self.head(x)
        out = ModelOutput(logits=logits)
        out.aux_losses = {k.replace("loss/", ""): v for k, v in aux.items() if "loss/" in k}
        out.stats = {k.replace("stat/", ""): v for k, v in aux.items() if "stat/" in k}
        if out.aux_losses:
            weights = self.config.aux_loss_weights
            out.aux_loss = sum(weights.get(k.split(".")[-1], 1.0) * v for k, v in out.aux_losses.items())
        if targets_BT is not None:
            out.logits = logits.float()
            out.loss = F.cross_entropy(out.logits.view(-1, logits.shape[-1]), targets_BT.reshape(-1))
        return out

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache(self, batch, capacity)
