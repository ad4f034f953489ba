"""Typed, validated configs for the model and for training, and the named presets.

Every config is a small kw_only dataclass validated in ``__post_init__``; an invalid value raises
``UsageError`` naming the field, the value and what would be valid. Configs round-trip through JSON
(``to_dict`` / ``from_dict``) so each checkpoint carries the resolved config that made it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import UsageError

# FFN kinds a block may have. Later mechanisms (moe, peer) register theirs in layers/__init__.py;
# the list here is what config validation accepts.
FFN_KINDS = ("dense", "moe", "peer")
# Routing wrappers that may surround a whole block: Mixture-of-Depths routes tokens around it.
WRAPPER_KINDS = ("none", "mod")


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UsageError(f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}")


ROUTER_KINDS = ("softmax", "noisy", "switch", "sigmoid_bias", "expert_choice")
DISPATCH_IMPLS = ("auto", "grouped", "loop")


@dataclass(kw_only=True)
class MoEConfig:
    """A Mixture-of-Experts FFN (layers/moe.py): which router, how many experts of which size."""

    n_experts: int = 8
    top_k: int = 2
    d_expert: int = 176  # hidden size of each SwiGLU expert
    router: str = "softmax"
    n_shared: int = 0  # always-on shared experts (DeepSeekMoE), each of d_expert
    capacity_factor: float | None = None  # None: dropless; for expert_choice, its capacity (default 2)
    renormalize: bool = True  # softmax router: renormalise the top-k gates to sum to 1
    route_scale: float = 1.0  # sigmoid_bias router: gate scale (DeepSeek-V3 uses 2.5)
    bias_rate: float = 1e-3  # sigmoid_bias router: bias update per optimizer step
    impl: str = "auto"  # grouped matmul implementation
    # no-op experts (integrated MoDE, Raposo et al. 2024 section 4.3): the router may send a token to one,
    # which computes nothing, so the token learns to take the residual path instead of an expert
    n_noop: int = 0

    def __post_init__(self) -> None:
        _positive(self, "n_experts", "top_k", "d_expert")
        if self.n_noop < 0:
            raise UsageError(f"MoEConfig.n_noop must be >= 0, got {self.n_noop}")
        if self.n_noop and self.router not in ("softmax", "noisy", "switch"):
            raise UsageError(f"MoEConfig.n_noop needs a token-choice router (softmax, noisy, switch), "
                             f"not {self.router!r}")
        if self.n_shared < 0:
            raise UsageError(f"MoEConfig.n_shared must be >= 0, got {self.n_shared}")
        if self.top_k > self.n_experts + self.n_noop:
            raise UsageError(f"MoEConfig.top_k={self.top_k} exceeds n_experts={self.n_experts}"
                             + (f" + n_noop={self.n_noop}" if self.n_noop else ""))
        if self.router not in ROUTER_KINDS:
            raise UsageError(f"MoEConfig.router={self.router!r} is unknown; choose one of {', '.join(ROUTER_KINDS)}")
        if self.impl not in DISPATCH_IMPLS:
            raise UsageError(f"MoEConfig.impl={self.impl!r} is unknown; choose one of {', '.join(DISPATCH_IMPLS)}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise UsageError(f"MoEConfig.capacity_factor must be > 0 (or None for dropless), got {self.capacity_factor}")
        if self.router == "switch" and self.top_k != 1:
            raise UsageError("MoEConfig.router='switch' is top-1; set top_k=1")

    def experts_per_token(self) -> float:
        """Average routed experts a token computes: k, or capacity_factor for expert choice. With no-op
        experts, the real share of k under balanced routing (the balance loss spreads choices evenly)."""
        if self.router == "expert_choice":
            return self.capacity_factor or 2.0
        return self.top_k * self.n_experts / (self.n_experts + self.n_noop)


MOD_CAUSAL_KINDS = ("aux_loss", "predictor")
# MoDConfig fields that `mixturelm train` sets, by their command-line names (one table for the parser,
# the overrides and the error messages)
MOD_OPTION_FIELDS = {"capacity": "capacity", "mod_causal": "causal", "mod_gate": "gate"}
# PEERConfig fields that `mixturelm train` sets on every PEER layer, by their command-line names
PEER_OPTION_FIELDS = {"peer_experts": "n_experts", "peer_heads": "n_heads", "peer_top_k": "top_k",
                      "peer_query_norm": "query_norm"}
# the command-line names of the block configs' fields, by block config kind
OPTION_FIELDS = {"moe": {}, "mod": MOD_OPTION_FIELDS, "peer": PEER_OPTION_FIELDS}


@dataclass(kw_only=True)
class MoDConfig:
    """Mixture-of-Depths around one block (layers/mod.py): top capacity x T tokens of each sequence enter.

    causal: how sampling decides token by token, where top-k over the sequence is unavailable (section 3.5):
    "aux_loss" trains the router logits with BCE on top-k membership and routes in when sigmoid > 0.5;
    "predictor" trains a small MLP on stop-gradient inputs to predict membership.
    calibrate: move the sampling threshold to the running (1 - capacity) quantile of the causal scores
    seen in training, so the realised fraction at sampling stays near the capacity; off, the paper's 0.5."""

    capacity: float = 0.125
    causal: str = "aux_loss"
    predictor_hidden: int | None = None  # None: d_model / 2
    calibrate: bool = True
    threshold_momentum: float = 0.2  # weight of each step's quantile in the running threshold
    gate: str = "linear"  # what multiplies the block's branch: r (Eq. 1) or sigmoid(r)

    def __post_init__(self) -> None:
        if not 0 < self.capacity <= 1:
            raise UsageError(f"MoDConfig.capacity must be in (0, 1] (a fraction of the sequence), got {self.capacity}")
        if self.causal not in MOD_CAUSAL_KINDS:
            raise UsageError(f"MoDConfig.causal={self.causal!r} is unknown; choose one of {', '.join(MOD_CAUSAL_KINDS)}")
        if self.predictor_hidden is not None:
            _positive(self, "predictor_hidden")
        if self.gate not in ("linear", "sigmoid"):
            raise UsageError(f"MoDConfig.gate={self.gate!r} is unknown; choose linear or sigmoid")
        if not 0 < self.threshold_momentum <= 1:
            raise UsageError(f"MoDConfig.threshold_momentum must be in (0, 1], got {self.threshold_momentum}")


PEER_ACTIVATIONS = ("gelu", "relu", "silu")
PEER_QUERY_NORMS = ("batch", "layer", "none", "whiten")


@dataclass(kw_only=True)
class PEERConfig:
    """A PEER layer (layers/peer.py, He 2024): N single-neuron experts retrieved by product keys.
    Defaults are the paper's (Sec. 3.1): N = 1024^2, h = 8 heads, k = 16 per head, query BatchNorm."""

    n_experts: int = 1024 * 1024  # N, a perfect square (two sets of sqrt(N) sub-keys)
    n_heads: int = 8  # h query networks sharing one key set and one expert pool
    top_k: int = 16  # k experts per head
    d_key: int = 128  # query / product-key size (each sub-key is d_key / 2)
    activation: str = "gelu"  # of the single-neuron experts: gelu, relu (the paper's two), silu
    glu: bool = False  # expert act(g_i . x) (u_i . x) v_i, one more N x d table
    per_head_keys: bool = False  # each head its own sub-keys (the paper shares them); experts stay shared
    query_norm: str = "batch"  # batch (the paper's; leaks batch statistics in training), layer, none, whiten
    sparse_grad: bool = True  # row-sparse gradients of the expert tables (trained by SparseAdam)

    def __post_init__(self) -> None:
        _positive(self, "n_experts", "n_heads", "top_k", "d_key")
        s = math.isqrt(self.n_experts)
        if s * s != self.n_experts:
            raise UsageError(f"PEERConfig.n_experts={self.n_experts} is not a perfect square; product keys need "
                             f"N = S*S, e.g. {s * s} or {(s + 1) ** 2}")
        if self.d_key % 2:
            raise UsageError(f"PEERConfig.d_key={self.d_key} is odd; the query is split in two halves, use an even size")
        if self.top_k > s:
            raise UsageError(f"PEERConfig.top_k={self.top_k} exceeds sqrt(n_experts)={s}; each half's top-k "
                             "picks among sqrt(N) sub-keys; lower top_k or raise n_experts")
        if self.activation not in PEER_ACTIVATIONS:
            raise UsageError(f"PEERConfig.activation={self.activation!r} is unknown; choose one of "
                             f"{', '.join(PEER_ACTIVATIONS)}")
        if self.query_norm not in PEER_QUERY_NORMS:
            raise UsageError(f"PEERConfig.query_norm={self.query_norm!r} is unknown; choose one of "
                             f"{', '.join(PEER_QUERY_NORMS)}")


@dataclass(kw_only=True)
class BlockSpec:
    """What one transformer block computes: its FFN kind and an optional routing wrapper around it."""

    ffn: str = "dense"
    ffn_hidden: int | None = None  # None: the model's d_ffn
    moe: MoEConfig | None = None  # required when ffn == "moe"
    peer: PEERConfig | None = None  # required when ffn == "peer" or peer_beside
    peer_beside: bool = False  # add PEER(x) to this block's FFN output instead of replacing the FFN
    wrapper: str = "none"
    mod: MoDConfig | None = None  # required when wrapper == "mod"

    def __post_init__(self) -> None:
        if self.ffn not in FFN_KINDS:
            raise UsageError(f"BlockSpec.ffn={self.ffn!r} is unknown; choose one of {', '.join(FFN_KINDS)}")
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        if self.ffn == "moe" and self.moe is None:
            raise UsageError("BlockSpec.ffn='moe' needs its MoEConfig in BlockSpec.moe")
        if isinstance(self.peer, dict):
            self.peer = PEERConfig(**self.peer)
        if (self.ffn == "peer" or self.peer_beside) and self.peer is None:
            raise UsageError("BlockSpec.ffn='peer' and peer_beside need a PEERConfig in BlockSpec.peer")
        if self.peer_beside and self.ffn == "peer":
            raise UsageError("BlockSpec.peer_beside=True adds PEER beside a dense or moe FFN; with ffn='peer' "
                             "it would be there twice, set one of them")
        if self.peer is not None and self.ffn != "peer" and not self.peer_beside:
            raise UsageError("BlockSpec.peer is given but unused; set ffn='peer' (replace the FFN) or "
                             "peer_beside=True (add it beside the FFN)")
        if self.wrapper not in WRAPPER_KINDS:
            raise UsageError(
                f"BlockSpec.wrapper={self.wrapper!r} is unknown; choose one of {', '.join(WRAPPER_KINDS)}"
            )
        if isinstance(self.mod, dict):
            self.mod = MoDConfig(**self.mod)
        if self.wrapper == "mod" and self.mod is None:
            raise UsageError("BlockSpec.wrapper='mod' needs its MoDConfig in BlockSpec.mod")
        if self.ffn_hidden is not None:
            _positive(self, "ffn_hidden")


@dataclass(kw_only=True)
class ModelConfig:
    """A decoder-only LM: pre-norm RMSNorm, RoPE, causal SDPA attention, a per-block FFN spec."""

    vocab_size: int = 257
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: as many as n_heads (multi-head); fewer: grouped-query attention
    d_ffn: int = 352
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    blocks: list[BlockSpec] = field(default_factory=list)  # empty: every block dense
    # weight of each auxiliary loss (by name, from any routed layer) in the training objective:
    # Switch balance 1e-2 (Fedus et al.), ST-MoE z-loss 1e-3, the noisy gate's importance and load 1e-2,
    # and the small complementary balance loss of the aux-loss-free sigmoid_bias router 1e-4 (DeepSeek-V3);
    # Mixture-of-Depths: the router's causal BCE 1e-2 (small: it shares the router with the LM objective)
    # and the predictor's BCE 1.0 (its input is detached, so it cannot disturb the LM objective)
    aux_loss_weights: dict[str, float] = field(default_factory=lambda: {
        "balance": 1e-2, "z": 1e-3, "importance": 1e-2, "load": 1e-2, "complementary_balance": 1e-4,
        "mod_bce": 1e-2, "mod_predictor": 1.0})

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "d_model", "n_layers", "n_heads", "d_ffn", "max_seq_len")
        if self.d_model % self.n_heads:
            raise UsageError(
                f"ModelConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "pick d_model a multiple of n_heads"
            )
        if (self.d_model // self.n_heads) % 2:
            raise UsageError(
                f"head size d_model/n_heads={self.d_model // self.n_heads} is odd; RoPE needs an even head size"
            )
        if self.n_kv_heads is not None:
            _positive(self, "n_kv_heads")
            if self.n_heads % self.n_kv_heads:
                raise UsageError(
                    f"ModelConfig.n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}"
                )
        if self.rope_theta <= 0 or self.norm_eps <= 0 or self.init_std <= 0:
            raise UsageError("ModelConfig.rope_theta, norm_eps and init_std must be positive")
        self.blocks = [b if isinstance(b, BlockSpec) else BlockSpec(**b) for b in self.blocks]
        for name, w in self.aux_loss_weights.items():
            if not isinstance(w, (int, float)) or w < 0:
                raise UsageError(f"ModelConfig.aux_loss_weights[{name!r}] must be a number >= 0, got {w!r}")
        if self.blocks and len(self.blocks) != self.n_layers:
            raise UsageError(
                f"ModelConfig.blocks has {len(self.blocks)} entries but n_layers={self.n_layers}; "
                "give one BlockSpec per layer or none"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def block_spec(self, layer: int) -> BlockSpec:
        return self.blocks[layer] if self.blocks else BlockSpec()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return cls(**_known_fields(cls, d))


@dataclass(kw_only=True)
class TrainConfig:
    """Everything about a training run except the model. One budget among steps, tokens, FLOPs."""

    batch_size: int = 16  # sequences per optimizer step, over all processes and accumulation steps
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    max_steps: int | None = None
    max_tokens: int | None = None
    max_flops: float | None = None
    eval_every: int = 50
    eval_tokens: int = 32768
    log_every: int = 1
    ckpt_every: int = 100
    keep_ckpts: int = 2
    seed: int = 0
    dtype: str = "fp32"  # fp32, or bf16 autocast
    data: str | None = None  # None: the default corpus (the Python standard library's source)
    tokenizer: str = "bytes"  # bytes, or bpe:VOCAB
    text_field: str = "text"  # the field read from .jsonl records
    val_fraction: float = 0.02
    # PEER: learning rate of the expert tables, held constant (product-key memories train their values at a
    # fixed, higher rate: Lample et al. 2019, Berges et al. 2024); None: lr and its schedule
    peer_lr: float | None = None
    # PEER: learning rate of the product keys, held constant; None: lr and its schedule (as PKM trains them)
    peer_key_lr: float | None = None
    # PEER: before each evaluation and checkpoint, recompute the query BatchNorm's running statistics over the
    # last this-many training batches at the current weights (precise BN); 0: keep the momentum-0.1 averages,
    # which lag far behind a fast-moving query network (eval usage 1.6 % against 8.6 % at step 50 of peer-tiny)
    peer_bn_calibration: int = 4

    def __post_init__(self) -> None:
        _positive(self, "batch_size", "seq_len", "grad_accum", "eval_every", "eval_tokens", "log_every",
                  "ckpt_every", "keep_ckpts")
        if self.warmup_steps < 0:
            raise UsageError(f"TrainConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.seed < 0:  # numpy's generators take no negative seed (a traceback at the first step)
            raise UsageError(f"--seed must be >= 0, got {self.seed}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise UsageError(f"TrainConfig.lr must be > 0 and min_lr_ratio in [0, 1], got {self.lr}, {self.min_lr_ratio}")
        for name in ("peer_lr", "peer_key_lr"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UsageError(f"TrainConfig.{name} must be > 0 (or None: lr), got {getattr(self, name)}")
        if self.peer_bn_calibration < 0:
            raise UsageError(f"TrainConfig.peer_bn_calibration must be >= 0, got {self.peer_bn_calibration}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise UsageError("TrainConfig.weight_decay and grad_clip must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise UsageError(f"TrainConfig.beta1/beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.dtype not in ("fp32", "bf16"):
            raise UsageError(f"TrainConfig.dtype={self.dtype!r} is unknown; choose fp32 or bf16")
        if not 0 < self.val_fraction < 1:
            raise UsageError(f"TrainConfig.val_fraction must be in (0, 1), got {self.val_fraction}")
        budgets = [b for b in ("max_steps", "max_tokens", "max_flops") if getattr(self, b) is not None]
        if len(budgets) > 1:
            raise UsageError(f"give one budget, not {' and '.join(budgets)}")
        for b in budgets:
            if getattr(self, b) <= 0:
                raise UsageError(f"--{b.replace('_', '-')} must be positive, got {getattr(self, b)}")
        if self.batch_size % self.grad_accum:
            raise UsageError(
                f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}; "
                "the global batch is split evenly into accumulation steps"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return cls(**_known_fields(cls, d))


def _known_fields(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise UsageError(f"{cls.__name__} has no field(s) {', '.join(sorted(unknown))}")
    return dict(d)


# ----------------------------------------------------------------------------------------------
# Presets: a model shape and the training settings that suit it, by "<arch>-<size>".

@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    model: dict[str, Any]
    train: dict[str, Any]


_DENSE_SIZES: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    # size: (model fields, train fields, why)
    "debug": (dict(d_model=64, n_layers=2, n_heads=4, d_ffn=192, max_seq_len=64),
              dict(batch_size=8, seq_len=64, lr=3e-3, warmup_steps=5, eval_every=10, eval_tokens=2048,
                   ckpt_every=10), "golden test run, trains in seconds"),
    "tiny": (dict(d_model=128, n_layers=4, n_heads=4, d_ffn=352, max_seq_len=256),
             dict(batch_size=16, seq_len=256, lr=3e-3), "~0.9M params, minutes on 2 CPU cores"),
    "small": (dict(d_model=256, n_layers=6, n_heads=4, d_ffn=704, max_seq_len=256),
              dict(batch_size=16, seq_len=256, lr=2e-3), "~4.8M params"),
    "medium": (dict(d_model=512, n_layers=8, n_heads=8, d_ffn=1408, max_seq_len=256),
               dict(batch_size=16, seq_len=256, lr=1e-3), "~25M params, the benchmark shape"),
    "large": (dict(d_model=768, n_layers=12, n_heads=12, d_ffn=2048, max_seq_len=512),
              dict(batch_size=32, seq_len=512, lr=6e-4), "~85M params, for a GPU"),
}

PRESETS: dict[str, Preset] = {
    f"dense-{size}": Preset(f"dense-{size}", why, model, train)
    for size, (model, train, why) in _DENSE_SIZES.items()
}


def _moe_preset(size: str, n_experts: int, top_k: int, n_shared: int = 0, fine: bool = False) -> Preset:
    """Every block MoE, with the same ACTIVE FFN parameters per token as dense-<size>:
    (top_k + n_shared) * d_expert = d_ffn."""
    model, train, _ = _DENSE_SIZES[size]
    d_expert = model["d_ffn"] // (top_k + n_shared)
    moe = {"n_experts": n_experts, "top_k": top_k, "d_expert": d_expert, "n_shared": n_shared}
    blocks = [{"ffn": "moe", "moe": moe} for _ in range(model["n_layers"])]
    kind = "fine-grained, " if fine else ""
    why = (f"{kind}{n_experts} experts top-{top_k}" + (f" + {n_shared} shared" if n_shared else "")
           + f" of hidden {d_expert}: dense-{size}'s active FFN size")
    name = f"moe{'-fg' if fine else ''}-{size}"
    return Preset(name, why, model | {"blocks": blocks}, train)


def _mod_preset(size: str) -> Preset:
    """dense-<size> with every other block (the 2nd, 4th, ...) routed at 12.5 % capacity: the paper's best."""
    model, train, _ = _DENSE_SIZES[size]
    blocks = [{"wrapper": "mod", "mod": {"capacity": 0.125}} if i % 2 else {} for i in range(model["n_layers"])]
    return Preset(f"mod-{size}", f"dense-{size} shape, MoD 12.5 % on every other block", model | {"blocks": blocks},
                  train)


def _mode_preset(size: str, staged: bool) -> Preset:
    """MoDE (section 4.3). Integrated: every FFN a MoE of 8 experts top-2 (moe-<size>) whose router also
    offers 8 no-op experts, so about half of the expert slots are skipped. Staged: moe-<size> with MoD
    12.5 % around every other block, so routed tokens skip attention and the MoE alike."""
    base = _moe_preset(size, 8, 2)
    moe = base.model["blocks"][0]["moe"]
    if staged:
        blocks = [{"ffn": "moe", "moe": moe} | ({"wrapper": "mod", "mod": {"capacity": 0.125}} if i % 2 else {})
                  for i in range(base.model["n_layers"])]
        name, why = f"mode-staged-{size}", f"moe-{size} with MoD 12.5 % on every other block"
    else:
        blocks = [{"ffn": "moe", "moe": moe | {"n_noop": 8}} for _ in range(base.model["n_layers"])]
        name, why = f"mode-{size}", f"moe-{size} whose router also offers 8 no-op experts (integrated MoDE)"
    return Preset(name, why, base.model | {"blocks": blocks}, base.train)


for _size in ("debug", "tiny", "small", "medium"):
    PRESETS[f"moe-{_size}"] = _moe_preset(_size, 8, 2)
    PRESETS[f"moe-fg-{_size}"] = _moe_preset(_size, 64, 6, n_shared=2, fine=True)
    PRESETS[f"mod-{_size}"] = _mod_preset(_size)
    PRESETS[f"mode-{_size}"] = _mode_preset(_size, staged=False)
    PRESETS[f"mode-staged-{_size}"] = _mode_preset(_size, staged=True)


def _peer_preset(size: str, n_experts: int, why: str, train_extra: dict | None = None, **peer: Any) -> Preset:
    """dense-<size> with the FFN of the middle block replaced by PEER, as the paper places it ("in a 12
    block transformer, we replace the FFN in block 6": block (n_layers - 1) // 2, counted from 0)."""
    model, train, _ = _DENSE_SIZES[size]
    middle = (model["n_layers"] - 1) // 2
    blocks = [{"ffn": "peer", "peer": {"n_experts": n_experts} | peer} if i == middle else {"ffn": "dense"}
              for i in range(model["n_layers"])]
    return Preset(f"peer-{size}", why, model | {"blocks": blocks}, train | {"peer_lr": 1e-2} | (train_extra or {}))


PRESETS["peer-debug"] = _peer_preset("debug", 64 * 64, "PEER in block 0: 64^2 experts, h 4, k 8, d_key 32; seconds",
                                     n_heads=4, top_k=8, d_key=32)
PRESETS["peer-tiny"] = _peer_preset("tiny", 1024 * 1024, "dense-tiny with block 1's FFN a PEER of 1024^2 experts, "
                                    "h 8, k 16, d_key 128 (the paper's N, h, k)",
                                    # evaluation over 2^17 tokens: 16 retrievals per expert, so usage can be near 100 %;
                                    # product keys at a fixed 1e-4, the rate product-key memories train them at (with
                                    # the model: 2.5e-4 in PKM, 1e-4 in Memory Layers at Scale); at tiny's model rate,
                                    # 3e-3, the sub-keys that win early grow and win more. Step 200 (README, PEER):
                                    # usage 12.2 % -> 21.2 %, KL 4.31 -> 3.65, val loss 1.4945 -> 1.4737
                                    train_extra={"eval_tokens": 131072, "peer_key_lr": 1e-4})
PRESETS["peer-small"] = _peer_preset("small", 1024 * 1024, "dense-small with block 2's FFN a PEER of 1024^2 experts, "
                                     "h 8, k 16, d_key 128", train_extra={"eval_tokens": 131072, "peer_key_lr": 1e-4})


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; see `mixturelm train --list-presets` ({', '.join(PRESETS)})")
    return PRESETS[name]


def presets() -> list[str]:
    """Names of the available presets."""
    return list(PRESETS)
