"""The optimizer of a run: AdamW with parameter groups, what each mechanism needs besides (its own groups,
SparseAdam for row-sparse tables, side networks clipped apart), warm-up and cosine, gradient clipping."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..config import TrainConfig
from ..errors import UsageError
from ..mechanisms import registry
from ..mechanisms.registry import OptimizerNeeds


def mechanism_needs(model: torch.nn.Module, train: TrainConfig | None = None) -> OptimizerNeeds:
    """What every mechanism of the model asks of the optimizer, gathered (Mechanism.optimizer_needs)."""
    total = OptimizerNeeds()
    for mechanism in registry.present(model):
        options = mechanism.train_options(train or TrainConfig()) if mechanism.train_options_class else None
        needs = mechanism.optimizer_needs(registry.modules_of(model, mechanism), options)
        total.groups += needs.groups
        total.sparse += needs.sparse
        total.side += needs.side
        total.sparse_lr = needs.sparse_lr if needs.sparse else total.sparse_lr
    return total


def param_groups(model: torch.nn.Module, weight_decay: float, needs: OptimizerNeeds | None = None) -> list[dict]:
    """Decay matrices; never norms, biases or embeddings (nor a head tied to the embedding). The groups a
    mechanism asks for come after these two; its sparse-gradient parameters are left to a SparseAdam."""
    needs = needs if needs is not None else mechanism_needs(model)
    apart = {id(p) for g in needs.groups for p in g["params"]} | {id(p) for p in needs.sparse}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in apart:
            continue
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}] + needs.groups


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
        shared = min(self.decay_start, other.decay_start)
        if self.kind != other.kind or self.warmup != other.warmup:
            shared = 0
        return next((s for s in range(shared, min(self.total, other.total))
                     if self.factor(s) != other.factor(s)), min(self.total, other.total))


def mark_coalesced(params) -> None:
    """Autograd drops the coalesced flag of a sparse gradient when it stores it; row gradients made
    coalesced (distinct, sorted rows) are checked cheaply and flagged again, sparing SparseAdam a sort."""
    for p in params:
        g = p.grad
        if g is None or not g.is_sparse or g.is_coalesced():
            continue
        idx = g._indices()[0]
        if idx.numel() < 2 or bool((idx[1:] > idx[:-1]).all()):
            p.grad = torch.sparse_coo_tensor(g._indices(), g._values(), g.shape, is_coalesced=True,
                                             check_invariants=False)
        else:
            p.grad = g.coalesce()


@torch.no_grad()
def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_, for dense and (coalesced) sparse gradients alike."""
    grads = [p.grad for p in params if p.grad is not None]
    dense = [g for g in grads if not g.is_sparse]
    sparse = [g._values() for g in grads if g.is_sparse]
    norms = [torch.linalg.vector_norm(g) for g in dense + sparse]
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    if max_norm != float("inf"):
        for g in dense + sparse:
            g.mul_(coef.to(g.device))
    return total


@dataclass
class Optimizers:
    """AdamW over the model (with a SparseAdam for row-sparse parameters, if any), their schedules and
    clipping: the model under one norm, side networks apart."""

    model: torch.nn.Module
    train: TrainConfig
    total_steps: int
    sparse_opt: torch.optim.Optimizer | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        t = self.train
        needs = mechanism_needs(self.model, t)
        groups = param_groups(self.model, t.weight_decay, needs)
        self.opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2),
                                     fused=True)  # one kernel per step, on CPU as on CUDA
        self.schedule = Schedule.of(t, self.total_steps)
        schedule = self.schedule.factor

        def constant(s: int) -> float:
            return 1.0

        self.sched = torch.optim.lr_scheduler.LambdaLR(  # a group with fixed_lr keeps its rate
            self.opt, [constant if g.get("fixed_lr") else schedule for g in groups])
        # row-sparse parameters: lazy Adam on the touched rows only (no N x d work per step)
        self.sparse_params = needs.sparse
        if self.sparse_params:
            self.sparse_opt = torch.optim.SparseAdam(self.sparse_params, lr=needs.sparse_lr or t.lr,
                                                     betas=(t.beta1, t.beta2))
            self.sparse_sched = torch.optim.lr_scheduler.LambdaLR(
                self.sparse_opt, schedule if needs.sparse_lr is None else constant)
        self.side_params = needs.side
        side = {id(p) for p in self.side_params}
        self.clipped_params = [p for p in self.model.parameters() if id(p) not in side]

    def step(self) -> tuple[float, torch.Tensor]:
        """Clip, step, schedule, zero; returns the learning rate used and the gradient norm before clipping."""
        clip = self.train.grad_clip if self.train.grad_clip > 0 else float("inf")
        if self.sparse_opt is None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.clipped_params, clip)
        else:  # one norm over dense and sparse gradients alike
            mark_coalesced(self.sparse_params)
            grad_norm = clip_grad_norm(self.clipped_params, clip)
        if self.side_params:
            clip_grad_norm(self.side_params, clip)
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if self.sparse_opt is not None:
            self.sparse_opt.step()
            self.sparse_sched.step()
            self.sparse_opt.zero_grad(set_to_none=True)
        return lr, grad_norm

    def state_dict(self) -> dict:
        state = {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}
        if self.sparse_opt is not None:
            state["sparse_optimizer"] = self.sparse_opt.state_dict()
            state["sparse_scheduler"] = self.sparse_sched.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """The saved moments and step; the learning rates of this config (equal to the saved ones unless a
        resumed run changed TrainConfig.lr)."""
        base = list(self.sched.base_lrs)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        _set_base_lrs(self.sched, base)
        if self.sparse_opt is not None:
            # checkpoints of mixturelm before 2026-12 named the sparse-row optimizer after its only user
            old = {"sparse_optimizer": "peer_optimizer", "sparse_scheduler": "peer_scheduler"}
            opt, sched = (state.get(k, state.get(old[k])) for k in ("sparse_optimizer", "sparse_scheduler"))
            if opt is None or sched is None:
                raise UsageError("the checkpoint holds no state of the sparse-row optimizer; it cannot be resumed, "
                                 "start a new run")
            base = list(self.sparse_sched.base_lrs)
            self.sparse_opt.load_state_dict(opt)
            self.sparse_sched.load_state_dict(sched)
            _set_base_lrs(self.sparse_sched, base)


def _set_base_lrs(sched, base: list[float]) -> None:
    """A LambdaLR's base rates, and each group's rate at its current step, as LambdaLR computes it."""
    sched.base_lrs = base
    for group, lr, factor in zip(sched.optimizer.param_groups, base, sched.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(sched.last_epoch)
