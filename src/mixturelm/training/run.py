"""Setting up a run: its configuration (a preset with options on top, or the saved one to resume), its
budget in steps, and its output folder, all checked before anything is written."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, replace
from pathlib import Path

from .. import checkpoint
from ..config import ModelConfig, TrainConfig
from ..errors import UsageError
from ..files import OutputFolder
from ..flops import train_flops_per_token
from ..mechanisms import registry
from ..presets import get_preset

DEFAULT_PRESET = "dense-tiny"
DEFAULT_MAX_STEPS = 200
MAX_STEPS = 10**9  # a budget beyond this is a typo (years of steps), not a plan
BUDGETS = ("max_steps", "max_tokens", "max_flops")
# what a resumed run may change: its budget (to extend it), the step size (to go on after a divergence), how
# often it logs, evaluates and checkpoints, and whether torch.compile runs it (the same step either way);
# anything else would make it another run
RESUME_CHANGES = BUDGETS + ("lr", "grad_clip", "eval_every", "log_every", "ckpt_every", "keep_ckpts", "compile")


@dataclass
class RunConfig:
    preset: str
    model: ModelConfig
    train: TrainConfig

    def to_dict(self) -> dict:
        return {"preset": self.preset, "model": self.model.to_dict(), "train": self.train.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        return cls(d["preset"], ModelConfig.from_dict(d["model"]), TrainConfig.from_dict(d["train"]))


def new_run_config(preset: str | None, train_overrides: dict, model_overrides: dict | None = None,
                   block_overrides: dict[str, dict] | None = None) -> RunConfig:
    """The preset's config with the given options on top: train_overrides are TrainConfig fields (or a
    mechanism's train flags, e.g. peer_lr), model_overrides ModelConfig fields, block_overrides by mechanism
    kind the config fields to set on every block of that kind ({"moe": {"top_k": 1}})."""
    p = get_preset(preset or DEFAULT_PRESET)
    model_fields = p.model | (model_overrides or {})
    for kind, overrides in (block_overrides or {}).items():
        model_fields = _override_blocks(model_fields, kind, overrides, p.name)
    model = ModelConfig(**model_fields)
    train = TrainConfig.from_dict(_merge_train(p.train, train_overrides))
    if train.max_steps is None and train.max_tokens is None and train.max_flops is None:
        train = replace(train, max_steps=DEFAULT_MAX_STEPS)
    if train.seq_len > model.max_seq_len:
        model = replace(model, max_seq_len=train.seq_len)
    return RunConfig(p.name, model, train)


def _merge_train(preset_train: dict, overrides: dict) -> dict:
    """A budget given replaces the preset's; a mechanism's train flag joins its options."""
    if any(overrides.get(b) is not None for b in BUDGETS):
        preset_train = {k: v for k, v in preset_train.items() if k not in BUDGETS}
    return preset_train | overrides


def _override_blocks(model_fields: dict, kind: str, overrides: dict, preset: str) -> dict:
    """The blocks' `kind` configs with overrides on top; an error if the preset has none."""
    if not overrides:
        return model_fields
    if not any(b.get(kind) for b in model_fields.get("blocks", [])):
        mechanism = registry.get(kind)
        raise UsageError(f"BlockSpec.{kind}.{next(iter(overrides))}: preset {preset} has no {mechanism.title} "
                         f"blocks; choose a {mechanism.presets_hint} preset")
    blocks = [b | {kind: _as_dict(b[kind]) | overrides} if b.get(kind) else b for b in model_fields["blocks"]]
    return model_fields | {"blocks": blocks}


def _as_dict(config) -> dict:
    return config if isinstance(config, dict) else dataclasses.asdict(config)


def resumed_run_config(out_dir: Path, preset: str | None, train_overrides: dict,
                       model_overrides: dict | None = None,
                       block_overrides: dict[str, dict] | None = None) -> RunConfig:
    """The saved config of the run in out_dir; any option given again must agree with it."""
    path = out_dir / checkpoint.CONFIG_FILE
    if not path.is_file():
        raise UsageError(f"{out_dir} holds no run to resume (no {checkpoint.CONFIG_FILE}); start a new run there")
    try:
        saved = RunConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{path} is unreadable or not a mixturelm config; the run directory is "
                         "damaged, start a new run in another folder") from None
    if preset is not None and preset != saved.preset:
        raise UsageError(f"preset {preset} differs from the run's preset {saved.preset}; "
                         "leave the preset out or start a new run in another folder")
    given = [(*_train_field(saved.train, k), v) for k, v in train_overrides.items()]
    given += [("ModelConfig", k, getattr(saved.model, k), v) for k, v in (model_overrides or {}).items()]
    for kind, overrides in (block_overrides or {}).items():
        if overrides:  # the same error as a new run when the run has no such blocks
            _override_blocks(saved.model.to_dict(), kind, overrides, saved.preset)
            block = next(b.configs[kind] for b in saved.model.blocks if kind in b.configs)
            given += [(f"BlockSpec.{kind}", k, getattr(block, k), v) for k, v in overrides.items()]
    changes = {}
    for owner, key, saved_value, value in given:
        if saved_value == value:
            continue
        if owner == "TrainConfig" and key in RESUME_CHANGES:
            changes[key] = value
            continue
        raise UsageError(f"{owner}.{key} {value} differs from the run's {saved_value}; leave it out to resume "
                         f"(only {', '.join(f'TrainConfig.{k}' for k in RESUME_CHANGES)} may change), or start a "
                         "new run in another folder")
    if any(b in changes for b in BUDGETS):  # a budget given replaces the saved one, of whatever kind
        changes = {b: None for b in BUDGETS} | changes
    return replace(saved, train=replace(saved.train, **changes)) if changes else saved


def _train_field(train: TrainConfig, key: str) -> tuple[str, str, object]:
    """(owner, field, value) of a TrainConfig field, or of a mechanism's training option by its train flag."""
    if key in {f.name for f in dataclasses.fields(train)}:
        return "TrainConfig", key, getattr(train, key)
    mechanism, option = registry.train_flag(key)
    return mechanism.train_options_class.__name__, option, getattr(mechanism.train_options(train), option)


def steps_in_budget(cfg: RunConfig) -> int:
    t = cfg.train
    tokens_per_step = t.batch_size * t.seq_len
    if t.max_steps is not None:
        if t.max_steps > MAX_STEPS:
            raise UsageError(f"TrainConfig.max_steps {t.max_steps:.3g} is more than {MAX_STEPS:,} steps; give a "
                             "smaller budget")
        return t.max_steps
    if t.max_tokens is not None:
        steps = t.max_tokens // tokens_per_step
        unit, per_step = "TrainConfig.max_tokens", f"{tokens_per_step:,} tokens"
    else:
        flops_per_step = train_flops_per_step(cfg)
        steps = int(t.max_flops // flops_per_step)
        unit, per_step = "TrainConfig.max_flops", f"{flops_per_step:.3g} FLOPs"
    if steps < 1:
        raise UsageError(f"{unit} is smaller than one step ({per_step} per step); raise the budget "
                         "or lower TrainConfig.batch_size or TrainConfig.seq_len")
    if steps > MAX_STEPS:
        raise UsageError(f"{unit} gives {steps:.3g} steps, more than {MAX_STEPS:,} ({per_step} per step); "
                         "give a smaller budget")
    return steps


def train_flops_per_step(cfg: RunConfig) -> float:
    """Training FLOPs of one optimizer step, as the budget counts them (mixturelm.flops)."""
    t = cfg.train
    return train_flops_per_token(cfg.model, t.seq_len) * t.batch_size * t.seq_len


RUN_KIND = "training run"


def run_folder(out_dir: Path, resume: bool, overwrite: bool) -> OutputFolder:
    """The run directory, checked (nothing written): new or empty, the run to resume, or (overwrite) a run
    to replace; a run that stopped before its first checkpoint is started again without asking."""
    return OutputFolder(out_dir, RUN_KIND, option="`out_dir`", resume=resume, overwrite=overwrite,
                        legacy=is_legacy_run, restartable=lambda p: checkpoint.latest_pointer(p) is None,
                        exists_hint="continue it (`resume=True`), replace it (`overwrite=True`), or choose "
                                    "another folder").check()


def is_legacy_run(path: Path) -> bool:
    """A run directory written before output folders were marked: its config and its checkpoints or metrics."""
    return (path / checkpoint.CONFIG_FILE).is_file() and ((path / "checkpoints").is_dir()
                                                          or (path / "metrics.jsonl").is_file())


def check_memory(cfg: RunConfig, processes: int = 1, device: str = "cpu") -> None:
    """Refuse a model or batch that cannot fit in memory, before allocating it: parameters with their
    gradients and AdamW moments (16 bytes each, counted on the meta device), and a rough bound of one
    micro-batch's activations (the residual stream kept per layer, about 16 copies, and the logits)."""
    import torch

    from ..model import MixtureLM
    from ..runtime import check_fits

    with torch.device("meta"):
        params = MixtureLM(cfg.model).num_params()
    t, m = cfg.train, cfg.model
    rows = t.batch_size // (processes * t.grad_accum)
    activations = 4.0 * rows * t.seq_len * (16 * m.d_model * m.n_layers + 3 * m.vocab_size)
    check_fits(16.0 * params + activations, f"this run ({params:,} parameters, micro-batches of {rows:,} x "
               f"{t.seq_len:,} tokens)", "choose a smaller model (fewer experts, a smaller d_model) or lower "
               "TrainConfig.batch_size (or raise TrainConfig.grad_accum) or TrainConfig.seq_len", device)
