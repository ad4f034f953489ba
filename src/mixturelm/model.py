"""MixtureLM: a pre-norm decoder-only transformer whose blocks each say which mechanism fills their FFN
slot, which sit beside it, and whether a wrapper surrounds them (ModelConfig.blocks, mixturelm.mechanisms).

Dimension letters: B batch, T tokens, D d_model, V vocabulary.

Every FFN-slot layer returns (y, Aux) and every wrapper (x, [Aux, ...]); a block returns its output and the
list of its layers' Aux, and the model returns them with the logits, by block, so nothing flows through
global state. The model weights and sums their losses into `aux_loss`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import NO_WRAPPER, BlockSpec, ModelConfig
from .layers import kernels
from .layers.attention import Attention, LayerKVCache, rope_angles
from .layers.auxiliary import Aux
from .layers.linear import Linear, linear
from .mechanisms import registry


def build_ffn(kind: str, spec: BlockSpec, cfg: ModelConfig) -> nn.Module:
    return registry.get(kind).build(spec.configs.get(kind), cfg.d_model, d_hidden=spec.ffn_hidden or cfg.d_ffn)


def build_block(spec: BlockSpec, cfg: ModelConfig) -> nn.Module:
    block = Block(spec, cfg)
    if spec.wrapper == NO_WRAPPER:
        return block
    return registry.get(spec.wrapper).build(spec.configs.get(spec.wrapper), cfg.d_model, inner=block)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.inference_ready(x, self.weight) and self.weight.shape == x.shape[-1:]:  # one call, not six ops
            return kernels.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Block(nn.Module):
    """x + attn(norm(x)), then + ffn(norm(x)). A block is called on any subset of a sequence's tokens,
    given their rope angles and their own cache, which is what a routing wrapper needs."""

    def __init__(self, spec: BlockSpec, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.qk_norm, cfg.qkv_bias,
                              cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = build_ffn(spec.ffn, spec, cfg)
        # mechanisms beside the FFN, their outputs added to its own (none: no parameters, no state-dict keys)
        self.beside = nn.ModuleList(build_ffn(kind, spec, cfg) for kind in spec.beside)

    def mlp(self, h_BTD: torch.Tensor) -> tuple[torch.Tensor, list[Aux]]:
        """The FFN slot (and what sits beside it) on the normalised input."""
        y, aux = self.ffn(h_BTD)
        auxes = [aux]
        for extra in self.beside:
            y2, aux2 = extra(h_BTD)
            y = y + y2
            auxes.append(aux2)
        return y, auxes

    def forward(self, x_BTD: torch.Tensor, rope, cache: LayerKVCache | None = None,
                causal_routing: bool = False) -> tuple[torch.Tensor, list[Aux]]:
        """causal_routing concerns wrappers around a block; a plain block has none."""
        h = x_BTD + self.attn(self.attn_norm(x_BTD), rope, cache)
        y, aux = self.mlp(self.ffn_norm(h))
        return h + y, aux

    def branch(self, x_BTD: torch.Tensor, rope, cache=None) -> tuple[torch.Tensor, list[Aux]]:
        """The residual branch f alone, forward(x) = x + f(x): what Mixture-of-Depths scales by the router
        weight. Returning f, not x + f, is what keeps the residual from being counted twice."""
        a = self.attn(self.attn_norm(x_BTD), rope, cache)
        y, aux = self.mlp(self.ffn_norm(x_BTD + a))
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
    aux: list[tuple[int, Aux]] = field(default_factory=list)  # (block index, what one of its layers returned)

    def named_aux(self) -> list[tuple[str, Aux]]:
        """Every layer's Aux with the name of its block, "layer3" (a block uses each mechanism once)."""
        return [(f"layer{i}", a) for i, a in self.aux]

    @property
    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Every auxiliary loss by layer and name: "layer3.balance" -> value."""
        return _by_name((name, a.kind, a.losses) for name, a in self.named_aux())

    def stats(self) -> dict[str, torch.Tensor]:
        """Every layer's scalar statistics by layer and name: "layer3.load_max_over_mean" -> value."""
        return _by_name((name, a.kind, a.scalars()) for name, a in self.named_aux())


class MixtureLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(build_block(config.block_spec(i), config) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.head = None if config.tie_embeddings else Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        # Residual-branch outputs are scaled down with depth (GPT-2) so the residual stream stays O(1).
        out_std = std / math.sqrt(2 * self.config.n_layers)
        # A routed layer with reset_parameters(std, out_std) initialises its own tensors and the submodules it
        # names in `own_init` (MoE its router, PEER its query network); the rest of it is initialised here
        owned = {id(sub) for layer in self.modules() if _resets_itself(layer)
                 for child in layer.own_init for sub in getattr(layer, child).modules()}
        for name, module in self.named_modules():
            if _resets_itself(module):
                module.reset_parameters(std, out_std)
            elif isinstance(module, (nn.Linear, nn.Embedding)) and id(module) not in owned:
                is_out = name.endswith(("attn.out", ".down"))
                nn.init.normal_(module.weight, 0.0, out_std if is_out else std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embeddings else n

    def forward(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False, causal_routing: bool = False) -> ModelOutput:
        """causal_routing: wrapped blocks (Mixture-of-Depths) decide token by token, as when sampling (always
        so with a cache), instead of by the top-k of the whole sequence, which looks at future tokens."""
        B, T = idx_BT.shape
        past = cache.length if cache is not None else 0
        positions_T = torch.arange(past, past + T, device=idx_BT.device)
        rope = rope_angles(positions_T, self.config.head_dim, self.config.rope_theta, self.config.rope_scaling)
        x = self.embed(idx_BT)
        aux: list[tuple[int, Aux]] = []
        for i, block in enumerate(self.blocks):
            x, block_aux = block(x, rope, cache.layers[i] if cache is not None else None, causal_routing)
            aux.extend((i, a) for a in block_aux)
        if cache is not None:
            cache.length += T
        x = self.norm(x[:, -1:] if last_only else x)
        logits = linear(x, self.embed.weight) if self.head is None else self.head(x)
        out = ModelOutput(logits=logits, aux=aux)
        losses = [(name, v) for _, a in aux for name, v in a.losses.items()]
        if losses:
            weights = self.config.aux_loss_weights
            out.aux_loss = sum(weights.get(name, 1.0) * v for name, v in losses)
        if targets_BT is not None:
            out.logits = logits.float()
            out.loss = F.cross_entropy(out.logits.view(-1, logits.shape[-1]), targets_BT.reshape(-1))
        return out

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache(self, batch, capacity)


def _by_name(items) -> dict[str, torch.Tensor]:
    """"layer{i}.{name}" for each value; where two mechanisms of one block use a name, the later one's is
    "layer{i}.{kind}.{name}"."""
    out: dict[str, torch.Tensor] = {}
    for layer, kind, values in items:
        for k, v in values.items():
            key = f"{layer}.{k}"
            out[f"{layer}.{kind}.{k}" if key in out else key] = v
    return out


def _resets_itself(module: nn.Module) -> bool:
    """A routed layer that initialises its own parameters given the model's std (MoE, PEER)."""
    mechanism = registry.of_module(module)
    return mechanism is not None and mechanism.role == "ffn" and hasattr(module, "reset_parameters")
