"""The optimizer of a run: mixturelm.optim's (AdamW with parameter groups, what each mechanism needs besides,
row-wise Adam for row-sparse tables), its schedule (warm-up and cosine, or warm-up, stable, decay) and
gradient clipping (side networks apart)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import TrainConfig
from ..errors import UsageError
from ..optim import build_optimizer, clip_grad_norm, mark_coalesced, mechanism_needs, param_groups
from ..parallel.expert import local

__all__ = ["Optimizers", "Schedule", "lr_factor", "mechanism_needs", "param_groups"]


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


SCHEDULES = ("cosine", "wsd")


@dataclass(frozen=True)
class Schedule:
    """The learning-rate factor of each optimizer step (0-based) of a run of `total` steps.

    cosine: linear warm-up, then cosine down to min_ratio at the end. Every step's rate depends on the
    total, so a run extended to a longer budget changes its rate from the step it resumes at on.
    wsd (warm-up, stable, decay): linear warm-up, the peak rate, then a linear decay to min_ratio over the
    last `decay_fraction` of the steps, the last step at min_ratio. Up to the decay the rates do not depend
    on the total: a run stopped there and extended is the run trained to the longer budget, and a finished
    one is extended from its checkpoint at the start of its decay (kept for that)."""

    kind: str
    warmup: int
    total: int
    min_ratio: float
    decay_fraction: float = 0.2

    @classmethod
    def of(cls, train: TrainConfig, total_steps: int) -> Schedule:
        return cls(train.schedule, min(train.warmup_steps, total_steps), total_steps, train.min_lr_ratio,
                   train.decay_fraction)

    @property
    def decay_start(self) -> int:
        """wsd: the steps trained at the stable rate before the decay (the cosine decays from its warm-up)."""
        if self.kind == "cosine":
            return self.warmup
        return max(self.warmup, self.total - round(self.decay_fraction * self.total))

    def factor(self, step: int) -> float:
        if self.kind == "cosine":
            return lr_factor(step, self.warmup, self.total, self.min_ratio)
        if step < self.warmup:
            return (step + 1) / self.warmup
        if step < self.decay_start:
            return 1.0
        progress = (step + 1 - self.decay_start) / max(1, self.total - self.decay_start)
        return 1.0 - (1.0 - self.min_ratio) * min(1.0, progress)

    def agrees_until(self, other: Schedule) -> int:
        """The number of first steps both schedules train at the same rates: a checkpoint written at or
        before it continues under `other` exactly as a run trained under `other` from the start."""
        if self == other:
            return self.total
        if self.min_ratio == other.min_ratio == 1 and self.kind == other.kind and self.warmup == other.warmup:
            return min(self.total, other.total)  # no decay at all: every rate past the warm-up is the peak
        shared = min(self.decay_start, other.decay_start)
        if self.kind != other.kind or self.warmup != other.warmup:
            shared = 0
        return next((s for s in range(shared, min(self.total, other.total))
                     if self.factor(s) != other.factor(s)), min(self.total, other.total))


@dataclass
class Optimizers:
    """The run's optimizer (mixturelm.optim.build_optimizer, the layers' gradient kinds as configured), its
    schedule and clipping: the model under one norm, side networks apart."""

    model: torch.nn.Module
    train: TrainConfig
    total_steps: int

    def __post_init__(self) -> None:
        t = self.train
        needs = mechanism_needs(self.model, t.mechanisms)
        self.opt = build_optimizer(self.model, lr=t.lr, weight_decay=t.weight_decay, betas=(t.beta1, t.beta2),
                                   mechanisms=t.mechanisms, row_sparse_tables=False)
        self.schedule = Schedule.of(t, self.total_steps)

        def constant(s: int) -> float:
            return 1.0

        self.sched = torch.optim.lr_scheduler.LambdaLR(  # a group with fixed_lr keeps its rate
            self.opt, [constant if g.get("fixed_lr") else self.schedule.factor for g in self.opt.param_groups])
        self.sparse_params = needs.sparse
        self.side_params = needs.side
        side = {id(p) for p in self.side_params}
        self.clipped_params = [p for p in self.model.parameters() if id(p) not in side]
        # the norm of the clipped gradients when they are sharded over processes (expert parallelism, FSDP)
        self.grad_norm_of = None

    def step(self) -> tuple[float, torch.Tensor]:
        """Clip, step, schedule, zero; returns the learning rate used and the gradient norm before clipping."""
        clip = self.train.grad_clip if self.train.grad_clip > 0 else float("inf")
        if self.grad_norm_of is not None:
            grad_norm = self.grad_norm_of(self.clipped_params).float()
            _clip_with_norm(self.clipped_params, clip, grad_norm)
        elif not self.sparse_params:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.clipped_params, clip)
        else:  # one norm over dense and sparse gradients alike
            mark_coalesced(self.sparse_params)
            grad_norm = clip_grad_norm(self.clipped_params, clip)
        if self.side_params and self.grad_norm_of is not None:  # sharded: the norm over every process
            _clip_with_norm(self.side_params, clip, self.grad_norm_of(self.side_params).float())
        elif self.side_params:
            clip_grad_norm(self.side_params, clip)
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return lr, grad_norm

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """The saved moments and step; the learning rates of this config (equal to the saved ones unless a
        resumed run changed TrainConfig.lr)."""
        base = list(self.sched.base_lrs)
        self.opt.load_state_dict(_merge_legacy(state, self.opt))
        self.sched.load_state_dict({k: v for k, v in state["scheduler"].items() if k != "base_lrs"}
                                   | {"base_lrs": base, "lr_lambdas": [None] * len(base)})
        _set_base_lrs(self.sched, base)


@torch.no_grad()
def _clip_with_norm(params: list[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """torch.nn.utils.clip_grads_with_norm_'s arithmetic on each process's part of the gradients: the
    gradients may be DTensors on different meshes (FSDP's, the experts'), which one foreach call refuses."""
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in params:
        if p.grad is not None:
            g = local(p.grad)
            g.mul_(coef.to(g.device))


def _merge_legacy(state: dict, opt: torch.optim.Optimizer) -> dict:
    """Checkpoints of mixturelm before 2026-12 hold two optimizers: AdamW ("optimizer") and SparseAdam for the
    row-sparse tables ("sparse_optimizer", earlier "peer_optimizer"), whose state has the same moments and
    step count as the row groups now: appended to AdamW's, as one optimizer's."""
    sparse = state.get("sparse_optimizer", state.get("peer_optimizer"))
    dense = state["optimizer"]
    if sparse is None:
        if any(g.get("row_sparse") for g in opt.param_groups) and not any(g.get("row_sparse")
                                                                           for g in dense["param_groups"]):
            raise UsageError("the checkpoint holds no state of the sparse-row optimizer; it cannot be resumed, "
                             "start a new run")
        return dense
    offset = sum(len(g["params"]) for g in dense["param_groups"])
    groups = dense["param_groups"] + [g | {"params": [i + offset for i in g["params"]], "row_sparse": True,
                                           "weight_decay": 0.0} for g in sparse["param_groups"]]
    states = dense["state"] | {i + offset: v for i, v in sparse["state"].items()}
    return {"state": states, "param_groups": groups}
def _set_base_lrs(sched, base: list[float]) -> None:
    """A LambdaLR's base rates, and each group's rate at its current step, as LambdaLR computes it."""
    sched.base_lrs = base
    for group, lr, factor in zip(sched.optimizer.param_groups, base, sched.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(sched.last_epoch)
    sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]
