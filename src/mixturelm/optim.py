"""The optimizer a model holding mixturelm layers needs, for the trainer and for users' own loops.

    opt = mixturelm.optim.build_optimizer(model, lr=3e-3, weight_decay=0.1)
    ...
    loss.backward()
    mixturelm.optim.clip_grad_norm(model, 1.0)   # sparse gradients too; side networks apart
    opt.step(); opt.zero_grad()

One `torch.optim.Optimizer` (AdamRows), so LR schedulers, `state_dict` and `zero_grad` work as usual:
- AdamW (torch's fused kernel) with weight decay on matrices only, never on norms, biases or embeddings;
- the parameter groups each mechanism asks for (PEER's product keys and tables at their own rates, no decay);
- parameters with row-sparse gradients (PEER's expert tables, switched to them by build_optimizer): lazy Adam
  on the rows the step touched, reading and writing only those rows of the table and its two moments, in
  one pass (a compiled kernel on CPU). torch.optim.SparseAdam computes the same numbers through a dozen
  sparse-tensor ops that each materialise the touched rows again; a dense-gradient AdamW reads and writes
  all N rows of the table, its gradient and both moments every step.
"""

from __future__ import annotations

import math

import torch

from .errors import UsageError
from .mechanisms import registry
from .mechanisms.registry import OptimizerNeeds


def mechanism_needs(model: torch.nn.Module, mechanisms: dict | None = None) -> OptimizerNeeds:
    """What every mechanism of the model asks of the optimizer, gathered (Mechanism.optimizer_needs).
    mechanisms: each mechanism's training options by kind (TrainConfig.mechanisms), e.g. {"peer": {"lr": 1e-3}}."""
    from .config import TrainConfig

    train = TrainConfig(mechanisms=dict(mechanisms or {}))
    total = OptimizerNeeds()
    for mechanism in registry.present(model):
        options = mechanism.train_options(train) if mechanism.train_options_class else None
        needs = mechanism.optimizer_needs(registry.modules_of(model, mechanism), options)
        total.groups += needs.groups
        total.sparse += needs.sparse
        total.side += needs.side
        total.sparse_lr = needs.sparse_lr if needs.sparse else total.sparse_lr
    return total


def param_groups(model: torch.nn.Module, weight_decay: float, needs: OptimizerNeeds | None = None) -> list[dict]:
    """Decay matrices; never norms, biases or embeddings (nor a head tied to the embedding). The groups a
    mechanism asks for come next, then one group (row_sparse=True) of the parameters with row-sparse gradients."""
    needs = needs if needs is not None else mechanism_needs(model)
    apart = {id(p) for g in needs.groups for p in g["params"]} | {id(p) for p in needs.sparse}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in apart:
            continue
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}] + needs.groups
    if needs.sparse:
        groups.append({"params": needs.sparse, "weight_decay": 0.0, "row_sparse": True,
                       "fixed_lr": needs.sparse_lr is not None} | ({"lr": needs.sparse_lr} if needs.sparse_lr else {}))
    return groups


class AdamRows(torch.optim.Optimizer):
    """AdamW on the groups of dense gradients (torch's fused kernel), lazy Adam on the groups marked
    row_sparse=True: only the rows a step's gradient holds move, with torch.optim.SparseAdam's arithmetic
    (its moments and step count, a decoupled weight decay on those rows if the group has one). A row that no
    token retrieved keeps its weights and its moments until one does; see docs/optimizer.md."""

    def __init__(self, groups: list[dict], lr: float = 3e-3, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, row_sparse=False))
        self._link()

    def _link(self) -> None:
        """The dense groups (the same dicts, so schedulers reach them) and the state, shared with a fused AdamW."""
        for group in self.param_groups:  # groups loaded from a state dict hold only the keys saved
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        dense = [g for g in self.param_groups if not g["row_sparse"]]
        if getattr(self, "_adamw", None) is None:
            has_params = any(g["params"] for g in dense)
            self._adamw = torch.optim.AdamW(dense, fused=True) if has_params else None
        else:
            for group in dense:
                for key, value in self._adamw.defaults.items():
                    group.setdefault(key, value)
            self._adamw.param_groups = dense
        if self._adamw is not None:
            self._adamw.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._link()  # loading replaced the group dicts and the state

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_adamw"):  # after __init__: a new dense group joins the fused AdamW too
            self._link()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._adamw is not None:
            self._adamw.step()
        for group in self.param_groups:
            if group["row_sparse"]:
                for p in group["params"]:
                    if p.grad is not None:
                        self._row_step(p, group)
        return loss

    def _row_step(self, p: torch.Tensor, group: dict) -> None:
        rows_R, grad_RD = touched_rows(p.grad)
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        step_size = group["lr"] * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
        decay = 1.0 - group["lr"] * group["weight_decay"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        from .layers import kernels

        if p.dim() == 2 and all(t.is_contiguous() for t in (p, m, v)) and kernels.usable(p):
            kernels.row_adam(p, m, v, rows_R, grad_RD, beta1, beta2, group["eps"], step_size, decay)
            return
        grad_RD = grad_RD.to(p.dtype)
        m_R, v_R = m.index_select(0, rows_R), v.index_select(0, rows_R)
        m_R.lerp_(grad_RD, 1 - beta1)
        v_R.lerp_(grad_RD * grad_RD, 1 - beta2)
        m.index_copy_(0, rows_R, m_R)
        v.index_copy_(0, rows_R, v_R)
        p_R = p.index_select(0, rows_R).mul_(decay).addcdiv_(m_R, v_R.sqrt_().add_(group["eps"]), value=-step_size)
        p.index_copy_(0, rows_R, p_R)


def touched_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, their gradient rows) of a row-sparse gradient, rows distinct; a dense gradient touches every row."""
    if not grad.is_sparse:
        return torch.arange(grad.shape[0], device=grad.device), grad
    if not grad.is_coalesced():
        grad = coalesced(grad)
    return grad._indices()[0], grad._values()


def coalesced(g: torch.Tensor) -> torch.Tensor:
    """Autograd drops the coalesced flag of a sparse gradient when it stores it; rows already distinct and
    sorted (PEER's) are checked cheaply and flagged again, sparing a sort."""
    idx = g._indices()[0]
    if idx.numel() < 2 or bool((idx[1:] > idx[:-1]).all()):
        return torch.sparse_coo_tensor(g._indices(), g._values(), g.shape, is_coalesced=True, check_invariants=False)
    return g.coalesce()


def mark_coalesced(params) -> None:
    """Each sparse gradient among params, flagged coalesced (see coalesced)."""
    for p in params:
        if p.grad is not None and p.grad.is_sparse and not p.grad.is_coalesced():
            p.grad = coalesced(p.grad)


def build_optimizer(model: torch.nn.Module, lr: float = 3e-3, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, *, mechanisms: dict | None = None,
                    row_sparse_tables: bool = True) -> AdamRows:
    """The optimizer for any model holding mixturelm layers (see the module's docstring).

    mechanisms: each mechanism's training options by kind, e.g. {"peer": {"lr": 1e-3, "key_lr": 1e-4}}
    (PEER's tables and keys at fixed rates; a scheduler leaves groups with fixed_lr=True alone if it is told to).
    row_sparse_tables: switch PEER layers to row-sparse table gradients (their sparse_grad), which this
    optimizer updates row by row; False keeps each layer's setting."""
    _check_hyperparameters(lr, weight_decay, betas, eps)
    if row_sparse_tables:
        for mechanism in registry.present(model):
            mechanism.use_row_sparse_gradients(registry.modules_of(model, mechanism))
    groups = param_groups(model, weight_decay, mechanism_needs(model, mechanisms))
    return AdamRows(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def _check_hyperparameters(lr, weight_decay, betas, eps) -> None:
    if not 0 < lr < math.inf:
        raise UsageError(f"build_optimizer: lr must be a finite number > 0, got {lr}")
    if not 0 <= weight_decay < math.inf:
        raise UsageError(f"build_optimizer: weight_decay must be a finite number >= 0, got {weight_decay}")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise UsageError(f"build_optimizer: betas must be two numbers in [0, 1), got {betas}")
    if not 0 < eps < math.inf:
        raise UsageError(f"build_optimizer: eps must be a finite number > 0, got {eps}")


@torch.no_grad()
def clip_grad_norm(params_or_model, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for dense and row-sparse gradients alike (one norm over all). Given a
    model, its side networks (MoD's predictor) are clipped apart under their own norm, as the trainer does,
    and the model's norm is returned."""
    if isinstance(params_or_model, torch.nn.Module):
        side = mechanism_needs(params_or_model).side
        side_ids = {id(p) for p in side}
        if side:
            clip_grad_norm(side, max_norm)
        params_or_model = [p for p in params_or_model.parameters() if id(p) not in side_ids]
    params = list(params_or_model)
    mark_coalesced(params)
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
