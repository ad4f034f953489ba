"""Typed, validated configs for the model and for training.

Every config is a small kw_only dataclass validated in ``__post_init__``; an invalid value raises
``UsageError`` naming the field, the value and what would be valid. Configs round-trip through JSON
(``to_dict`` / ``from_dict``) so each checkpoint carries the resolved config that made it.

A block's mechanisms are named by kind ("dense", "moe", "peer", "mod", or any registered one: see
mixturelm.mechanisms); each mechanism's config class lives in its home and checks itself.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import UsageError, positive_ints
from .mechanisms import registry

NO_WRAPPER = "none"


class BlockSpec:
    """What one transformer block computes: the mechanism in its FFN slot, mechanisms added beside that
    FFN (their outputs summed with it: PEER beside a dense FFN, He 2024 Fig. 2), and an optional wrapper
    around the whole block (Mixture-of-Depths). Each mechanism used takes its config, by kind:

        BlockSpec(ffn="moe", moe=MoEConfig(n_experts=8, top_k=2, d_expert=176), wrapper="mod", mod={...})

    Saved as a flat dict: {"ffn", "ffn_hidden", "beside", "wrapper", <kind>: <config dict>...}."""

    def __init__(self, ffn: str = "dense", *, ffn_hidden: int | None = None, beside: tuple[str, ...] | list = (),
                 wrapper: str = NO_WRAPPER, **configs: Any) -> None:
        self.ffn, self.ffn_hidden, self.beside, self.wrapper = ffn, ffn_hidden, tuple(beside), wrapper
        for name, value in list(configs.items()):  # saved dicts: "<kind>_beside": True, absent configs as None
            if name.endswith("_beside"):
                if configs.pop(name):
                    self.beside += (name.removesuffix("_beside"),)
            elif value is None:
                configs.pop(name)
        _check_kind("ffn", ffn, "ffn")
        for kind in self.beside:
            _check_kind("beside", kind, "ffn")
        if ffn in self.beside or len(set(self.beside)) < len(self.beside):
            raise UsageError(f"BlockSpec.beside={list(self.beside)} names a mechanism twice (the FFN is {ffn!r}); a "
                             "block uses each mechanism once, with one config")
        if wrapper != NO_WRAPPER:
            _check_kind("wrapper", wrapper, "wrapper")
        used = [k for k in (ffn, *self.beside, wrapper) if k != NO_WRAPPER]
        unused = sorted(set(configs) - set(used))
        if unused:
            known = set(registry.kinds())
            what = [k for k in unused if k not in known]
            if what:
                raise UsageError(f"BlockSpec has no field(s) {', '.join(what)}")
            raise UsageError(f"BlockSpec.{unused[0]} is given but unused; name it in ffn, beside or wrapper")
        self.configs: dict[str, Any] = {}
        for kind in used:
            mechanism = registry.get(kind)
            if mechanism.config_class is None:
                continue
            if kind not in configs:
                raise UsageError(f"BlockSpec uses {kind!r} but gives no {mechanism.config_class.__name__} "
                                 f"(BlockSpec.{kind})")
            self.configs[kind] = mechanism.new_config(configs[kind])
        if ffn_hidden is not None:
            positive_ints(self, "ffn_hidden")

    def __getattr__(self, name: str) -> Any:
        """spec.<kind>: the config of a mechanism the block uses (None if it does not)."""
        if name.startswith("_") or name == "configs":
            raise AttributeError(name)
        if name in registry.kinds():
            return self.configs.get(name)
        raise AttributeError(f"BlockSpec has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        """spec.<kind> = config replaces the config of a mechanism the block uses (checked as in __init__)."""
        if name in registry.kinds() and "configs" in self.__dict__:
            if name not in self.kinds() or registry.get(name).config_class is None:
                raise UsageError(f"BlockSpec.{name} is not used by this block; name it in ffn, beside or wrapper")
            self.configs[name] = registry.get(name).new_config(value)
        else:
            super().__setattr__(name, value)

    def kinds(self) -> list[str]:
        """Every mechanism kind the block uses: its FFN, those beside it, its wrapper."""
        return [k for k in (self.ffn, *self.beside, self.wrapper) if k != NO_WRAPPER]

    def to_dict(self) -> dict[str, Any]:
        d = {"ffn": self.ffn, "ffn_hidden": self.ffn_hidden, "beside": list(self.beside), "wrapper": self.wrapper}
        return d | {kind: dataclasses.asdict(c) for kind, c in self.configs.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlockSpec:
        return cls(**d)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockSpec) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"BlockSpec({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"


def _check_kind(field_name: str, kind: str, role: str) -> None:
    if kind not in registry.kinds(role):
        choices = registry.kinds(role) + ([NO_WRAPPER] if role == "wrapper" else [])
        raise UsageError(f"BlockSpec.{field_name}={kind!r} is unknown; choose one of {', '.join(choices)}")


QK_NORMS = ("none", "head", "full")
ROPE_SCALINGS = {"default": (), "linear": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def check_rope_scaling(scaling: dict | None) -> None:
    """None, or {"rope_type": one of ROPE_SCALINGS, its numbers} (transformers' rope_parameters form)."""
    if scaling is None:
        return
    kind = scaling.get("rope_type") if isinstance(scaling, dict) else None
    if kind not in ROPE_SCALINGS:
        raise UsageError(f"ModelConfig.rope_scaling={scaling!r} is not supported; give null or a dict with rope_type "
                         f"{', '.join(ROPE_SCALINGS)} and its numbers")
    for name in ROPE_SCALINGS[kind]:
        v = scaling.get(name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < math.inf:
            raise UsageError(f"ModelConfig.rope_scaling[{name!r}] must be a finite number > 0 for rope_type "
                             f"{kind}, got {v!r}")
    if kind == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise UsageError(f"ModelConfig.rope_scaling: llama3 needs high_freq_factor > low_freq_factor, got "
                         f"{scaling['high_freq_factor']} and {scaling['low_freq_factor']}")


@dataclass(kw_only=True)
class ModelConfig:
    """A decoder-only LM: pre-norm RMSNorm, RoPE, causal SDPA attention, a per-block spec."""

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
    # options of the attention that imported Hugging Face models use (mixturelm import-hf)
    d_head: int | None = None  # None: d_model / n_heads; else each head's size (Qwen3: 128 at d_model 2048, 32 heads)
    qk_norm: str = "none"  # RMSNorm of queries and keys before RoPE: "head" per head (Qwen3), "full" over all heads (OLMoE)
    qkv_bias: bool = False  # a bias on the query, key and value projections (Qwen2)
    # RoPE frequency scaling in transformers' rope_parameters form: {"rope_type": "linear", "factor"} or
    # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    rope_scaling: dict | None = None
    blocks: list[BlockSpec] = field(default_factory=list)  # empty: every block dense
    # weight of each auxiliary loss (by name, from any routed layer) in the training objective; the
    # defaults are each mechanism's (Mechanism.loss_weights), a loss not named here weighs 1
    aux_loss_weights: dict[str, float] = field(default_factory=registry.default_loss_weights)

    def __post_init__(self) -> None:
        positive_ints(self, "vocab_size", "d_model", "n_layers", "n_heads", "d_ffn", "max_seq_len")
        if self.d_head is not None:
            positive_ints(self, "d_head")
        elif self.d_model % self.n_heads:
            raise UsageError(
                f"ModelConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "pick d_model a multiple of n_heads (or give d_head)"
            )
        if self.head_dim % 2:
            raise UsageError(f"head size {self.head_dim} is odd; RoPE needs an even head size")
        if self.qk_norm not in QK_NORMS:
            raise UsageError(f"ModelConfig.qk_norm={self.qk_norm!r} is unknown; choose one of {', '.join(QK_NORMS)}")
        if not isinstance(self.qkv_bias, bool):
            raise UsageError(f"ModelConfig.qkv_bias must be true or false, got {self.qkv_bias!r}")
        check_rope_scaling(self.rope_scaling)
        if self.n_kv_heads is not None:
            positive_ints(self, "n_kv_heads")
            if self.n_heads % self.n_kv_heads:
                raise UsageError(
                    f"ModelConfig.n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}"
                )
        for name in ("rope_theta", "norm_eps", "init_std"):
            if not 0 < getattr(self, name) < math.inf:
                raise UsageError(f"ModelConfig.{name} must be a finite number > 0, got {getattr(self, name)}")
        self.blocks = [b if isinstance(b, BlockSpec) else BlockSpec.from_dict(b) for b in self.blocks]
        for name, w in self.aux_loss_weights.items():
            if not isinstance(w, (int, float)) or not 0 <= w < math.inf:
                raise UsageError(f"ModelConfig.aux_loss_weights[{name!r}] must be a number >= 0, got {w!r}")
        if self.blocks and len(self.blocks) != self.n_layers:
            raise UsageError(
                f"ModelConfig.blocks has {len(self.blocks)} entries but n_layers={self.n_layers}; "
                "give one BlockSpec per layer or none"
            )

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def block_spec(self, layer: int) -> BlockSpec:
        return self.blocks[layer] if self.blocks else BlockSpec()

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return d | {"blocks": [b.to_dict() for b in self.blocks], "aux_loss_weights": dict(self.aux_loss_weights)}

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
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine, or wsd: warm-up, stable, then a linear decay (extends to a longer budget)
    decay_fraction: float = 0.2  # wsd: the share of the steps spent decaying
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
    compile: bool = False  # the training step's model through torch.compile (how it runs, not what it learns)
    data: str | None = None  # None: the default corpus (the Python standard library's source)
    tokenizer: str = "bytes"  # bytes, or bpe:VOCAB
    text_field: str = "text"  # the field read from .jsonl records
    val_fraction: float = 0.02
    # each mechanism's own training options, by kind (Mechanism.train_options_class): PEER's table and key
    # learning rates, its query-norm calibration
    mechanisms: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        positive_ints(self, "batch_size", "seq_len", "grad_accum", "eval_every", "eval_tokens", "log_every",
                      "ckpt_every", "keep_ckpts")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise UsageError(f"TrainConfig.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not isinstance(self.seed, int) or self.seed < 0:  # numpy's generators take no negative seed
            raise UsageError(f"TrainConfig.seed must be an integer >= 0, got {self.seed!r}")
        if not 0 < self.lr < math.inf:  # also refuses NaN
            raise UsageError(f"TrainConfig.lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UsageError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("weight_decay", "grad_clip"):
            if not 0 <= getattr(self, name) < math.inf:
                raise UsageError(f"TrainConfig.{name} must be a finite number >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise UsageError(f"TrainConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.schedule not in ("cosine", "wsd"):
            raise UsageError(f"TrainConfig.schedule={self.schedule!r} is unknown; choose cosine or wsd")
        if not 0 <= self.decay_fraction <= 1:
            raise UsageError(f"TrainConfig.decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if not isinstance(self.compile, bool):
            raise UsageError(f"TrainConfig.compile must be True or False, got {self.compile!r}")
        if self.dtype not in ("fp32", "bf16"):
            raise UsageError(f"TrainConfig.dtype={self.dtype!r} is unknown; choose fp32 or bf16")
        if not 0 < self.val_fraction < 1:
            raise UsageError(f"TrainConfig.val_fraction must be in (0, 1), got {self.val_fraction}")
        budgets = [b for b in ("max_steps", "max_tokens", "max_flops") if getattr(self, b) is not None]
        if len(budgets) > 1:
            raise UsageError(f"give one budget, not {' and '.join(f'TrainConfig.{b}' for b in budgets)}")
        for b in budgets:
            if not 0 < getattr(self, b) < math.inf:
                raise UsageError(f"TrainConfig.{b} must be a finite number > 0, got {getattr(self, b)}")
        if self.batch_size % self.grad_accum:
            raise UsageError(
                f"TrainConfig.batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}; "
                "the global batch is split evenly into accumulation steps"
            )
        self.mechanisms = {kind: _train_options(kind, value) for kind, value in self.mechanisms.items()}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """From a saved or assembled dict; a mechanism's train flag given flat (peer_lr=...) joins its options."""
        d = dict(d)
        options = {kind: dict(v) if isinstance(v, dict) else dataclasses.asdict(v)
                   for kind, v in d.pop("mechanisms", {}).items()}
        names = {f.name for f in dataclasses.fields(cls)}
        flat: dict[str, dict] = {}
        for key in [k for k in d if k not in names]:
            found = registry.train_flag(key)
            if found is None:
                raise UsageError(f"TrainConfig has no field {key}")
            mechanism, option = found
            flat.setdefault(mechanism.kind, {})[option] = d.pop(key)
        for kind, given in flat.items():
            # configs saved before 2026-12 held every mechanism's options flat, at their defaults when unused
            defaults = dataclasses.asdict(registry.get(kind).train_options_class())
            if kind in options or any(defaults.get(k) != v for k, v in given.items()):
                options[kind] = options.get(kind, {}) | given
        return cls(**d, mechanisms=options)


def _train_options(kind: str, value: Any) -> Any:
    mechanism = registry.get(kind)
    cls = mechanism.train_options_class
    if cls is None:
        raise UsageError(f"TrainConfig.mechanisms[{kind!r}]: {kind} has no training options")
    if isinstance(value, cls):
        return value
    unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise UsageError(f"{cls.__name__} has no field(s) {', '.join(unknown)}")
    return cls(**value)


def _known_fields(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise UsageError(f"{cls.__name__} has no field(s) {', '.join(sorted(unknown))}")
    return dict(d)
