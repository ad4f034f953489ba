"""The registry of mechanisms, and what a mechanism tells the rest of mixturelm.

A mechanism is what a block can compute besides plain attention and a dense FFN: Mixture-of-Experts,
Mixture-of-Depths, PEER. Each has one home module in this package, holding everything the trainer, the
FLOP counter, compare, the report, the routing views and the command line must know of it; they reach it
only through `get(kind)`, `of_module(module)`, `of_aux(aux)` and `present(model)`, and never name a
mechanism. Adding one is one module with a `Mechanism` subclass and one call of `register`.

Roles:
- "ffn": the block's FFN slot (or beside it, added to its output): a module mapping (B, T, D) to
  `((B, T, D), Aux)`, built from the mechanism's config and d_model.
- "wrapper": around the whole block (MoD): a module `(x, rope, cache, causal_routing) -> (x, [Aux, ...])`
  built from the block, d_model and the config.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import UsageError
from ..layers.auxiliary import Aux

if TYPE_CHECKING:
    from ..config import ModelConfig


@dataclass(frozen=True)
class Option:
    """A command-line option of `mixturelm train` that sets one config field of a mechanism."""

    field: str
    type: type
    help: str


@dataclass
class OptimizerNeeds:
    """What the optimizer must do for one module of a mechanism.

    groups: AdamW parameter groups of their own ({"params", "weight_decay", "lr"?, "fixed_lr"?}); their
    parameters leave the default decay / no-decay groups. sparse: parameters with row-sparse gradients,
    trained row by row (mixturelm.optim's row_sparse group, lazy Adam) at sparse_lr (None: the run's lr and schedule). side: parameters of networks
    trained on their own loss from stop-gradient inputs, clipped apart from the model."""

    groups: list[dict] = field(default_factory=list)
    sparse: list[nn.Parameter] = field(default_factory=list)
    sparse_lr: float | None = None
    side: list[nn.Parameter] = field(default_factory=list)


class Mechanism:
    """Defaults for every hook: a mechanism overrides what concerns it."""

    kind: str = ""  # its name in BlockSpec, presets and saved configs
    title: str = ""  # for people: "Mixture-of-Experts"
    role: str = "ffn"  # "ffn" or "wrapper"
    config_class: type | None = None  # its config dataclass; None: no options
    module_types: tuple[type, ...] = ()  # the nn.Module classes it builds
    loss_weights: dict[str, float] = {}  # default weight of each of its auxiliary losses
    forward_only_flops: tuple[str, ...] = ()  # FLOP parts with no backward pass
    causal_eval: bool = False  # its training routing looks ahead: evaluate with causal routing too
    block_options: dict[str, Option] = {}  # train flags that set a field of every block config of this kind
    train_options_class: type | None = None  # its training options (TrainConfig.mechanisms[kind])
    train_flags: dict[str, Option] = {}  # train flags (and their keys in saved configs) -> train_options_class fields
    presets_hint: str = ""  # which presets have it, for errors
    summary_key: str = ""  # the key of its part of a run's results.json (Mechanism.summarize)

    # -- building -------------------------------------------------------------------------------
    def build(self, config: Any, d_model: int, inner: nn.Module | None = None) -> nn.Module:
        raise NotImplementedError

    def new_config(self, value: Any) -> Any:
        """Its config from a saved dict (or the object itself)."""
        if self.config_class is None or isinstance(value, self.config_class):
            return value
        if not isinstance(value, dict):
            raise UsageError(f"the {self.kind} config must be a mapping of {self.config_class.__name__} fields, "
                             f"got {value!r}")
        known = set(self.config_class.__dataclass_fields__)
        unknown = sorted(set(value) - known)
        if unknown:
            raise UsageError(f"{self.config_class.__name__} has no field(s) {', '.join(unknown)}")
        return self.config_class(**value)

    # -- FLOPs and active parameters ---------------------------------------------------------------
    def flops(self, config: Any, model: ModelConfig, d_hidden: int) -> dict[str, float]:
        """ffn role: forward FLOPs per token, by part (d_hidden: the model's dense FFN size for this block)."""
        return {}

    def wrap_flops(self, parts: dict[str, float], config: Any, model: ModelConfig, seq_len: int) -> dict[str, float]:
        """wrapper role: the block's forward FLOPs per token once wrapped."""
        return parts

    def token_share(self, config: Any, seq_len: int) -> float:
        """wrapper role: the share of a sequence's tokens that enter the wrapped block in training."""
        return 1.0

    def param_shares(self, module: nn.Module, seq_len: int) -> dict[int, float]:
        """The share of some of a module's parameters that one token uses (id -> share, multiplied with the
        shares of enclosing modules); unlisted: all."""
        return {}

    def realized_flops_correction(self, model: ModelConfig, seq_len: int, record: dict) -> float | None:
        """Forward FLOPs per token to add to the budgeted count, from one training record's statistics,
        where what the layer computed depends on what its router chose (None: nothing to correct)."""
        return None

    # -- training ---------------------------------------------------------------------------------
    def train_options(self, train) -> Any:
        """Its training options of a TrainConfig (the defaults where none were given)."""
        given = train.mechanisms.get(self.kind)
        return given if given is not None else self.train_options_class()

    def optimizer_needs(self, modules: list[nn.Module], options: Any) -> OptimizerNeeds:
        """For all its modules of a model at once (options: its training options, or None)."""
        return OptimizerNeeds()

    def use_row_sparse_gradients(self, modules: list[nn.Module]) -> None:
        """Switch its modules to row-sparse gradients where they offer them (mixturelm.optim.build_optimizer
        steps those row by row); nothing by default."""

    def calibration_batches(self, options: Any) -> int:
        """Training batches to calibrate on before each evaluation and checkpoint (0: none)."""
        return 0

    def calibrate(self, model: nn.Module, batches, autocast, all_reduce_mean) -> int:
        """Re-estimate what evaluation needs from `batches` at the current weights; returns layers set."""
        return 0

    def sampling_warning(self, module: nn.Module) -> str | None:
        """Why sampling from a model with this module would route differently from training, if it would."""
        return None

    # -- evaluation and summaries ------------------------------------------------------------------
    def eval_value(self, aux: Aux) -> torch.Tensor | None:
        """What to sum over the evaluation batches (and processes) from one batch's aux, or None."""
        return None

    def eval_metrics(self, name: str, total: torch.Tensor) -> dict[str, float]:
        """Metrics of layer `name` ("layer3") from the sum of its eval_value over the evaluation."""
        return {}

    def summarize(self, record: dict) -> dict:
        """Its part of a run's results.json, from the last training record merged with the last evaluation."""
        return {}

    def describe(self, summary: dict) -> list[str]:
        """Lines for people, from its part of a results.json."""
        return []

    # -- routing views (mixturelm.views) ----------------------------------------------------------------
    def view(self) -> Any:
        """Its routing view (an object with the hooks of views.routing.LayerView), or None."""
        return None


_REGISTRY: dict[str, Mechanism] = {}


def register(mechanism: Mechanism) -> Mechanism:
    if mechanism.kind in _REGISTRY or mechanism.kind == "none":
        raise ValueError(f"a mechanism named {mechanism.kind!r} is already registered")
    if mechanism.role not in ("ffn", "wrapper"):
        raise ValueError(f"mechanism {mechanism.kind!r}: role must be ffn or wrapper, not {mechanism.role!r}")
    _REGISTRY[mechanism.kind] = mechanism
    return mechanism


def unregister(kind: str) -> None:
    _REGISTRY.pop(kind, None)


def kinds(role: str | None = None) -> list[str]:
    return [k for k, m in _REGISTRY.items() if role is None or m.role == role]


def get(kind: str, role: str | None = None) -> Mechanism:
    mechanism = _REGISTRY.get(kind)
    if mechanism is None or (role is not None and mechanism.role != role):
        raise UsageError(f"{kind!r} is not a known {role or 'mechanism'}; choose one of {', '.join(kinds(role))}")
    return mechanism


def all_mechanisms() -> list[Mechanism]:
    return list(_REGISTRY.values())


def of_module(module: nn.Module) -> Mechanism | None:
    """The mechanism that builds this module's class, or None."""
    return next((m for m in _REGISTRY.values() if m.module_types and isinstance(module, m.module_types)), None)


def of_aux(aux: Aux) -> Mechanism:
    return _REGISTRY[aux.kind]


def present(model: nn.Module) -> list[Mechanism]:
    """The mechanisms with a module in `model`, in registration order."""
    found = {id(m) for module in model.modules() if (m := of_module(module)) is not None}
    return [m for m in _REGISTRY.values() if id(m) in found]


def modules_of(model: nn.Module, mechanism: Mechanism) -> list[nn.Module]:
    types = mechanism.module_types
    return [module for module in model.modules() if types and isinstance(module, types)]


def default_loss_weights() -> dict[str, float]:
    """Every registered mechanism's default auxiliary-loss weights (ModelConfig.aux_loss_weights)."""
    return {name: w for m in _REGISTRY.values() for name, w in m.loss_weights.items()}


def forward_only_flops() -> tuple[str, ...]:
    return tuple(part for m in _REGISTRY.values() for part in m.forward_only_flops)


def stat_key(layer: int, name: str, prefix: str = "stat") -> str:
    """How the trainer names a layer's statistic (prefix "stat") or auxiliary loss ("aux") in metrics.jsonl."""
    return f"{prefix}/layer{layer}.{name}"


def layer_stats(record: dict, name: str, prefix: str = "stat") -> dict[int, float]:
    """{layer: value} of one statistic in a metrics record (stat_key's names)."""
    found = {}
    for key, value in record.items():
        m = re.fullmatch(rf"{prefix}/layer(\d+)\.{re.escape(name)}", key)
        if m:
            found[int(m.group(1))] = value
    return found


def train_flag(flag: str) -> tuple[Mechanism, str] | None:
    """The mechanism and train-options field that a train flag (or a legacy saved key) sets."""
    return next(((m, m.train_flags[flag].field) for m in _REGISTRY.values() if flag in m.train_flags), None)
