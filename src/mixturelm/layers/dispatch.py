"""Permute tokens to their experts, run the experts on contiguous groups, combine back with the gates.

Every routed computation goes through here: given assignments (token, expert, weight) from any
router, `dispatch_swiglu` sorts them by expert (stable, so token order is kept within an expert),
gathers the rows, runs all experts as grouped matmuls, scales by the gate and scatter-adds back.
Dropless: each expert computes exactly the tokens it was given.

Dimension letters: T tokens, D d_model, E experts, F expert hidden size, A assignments.

Implementations (`impl`):
- "loop": in eager mode one autograd node (ExpertsSwiGLU) that runs each expert's whole SwiGLU on its rows,
  one expert at a time, forward and backward, its outputs added straight onto their tokens, so that no
  layer-sized intermediate is allocated (see its docstring for why); the counts go to the host once per
  layer. Under torch.compile, which cannot trace a loop whose length is data, the two projections are
  instead each one custom op (torch.library) running one matmul per expert, and the activation and gathers
  around them are compiled;
- "grouped": torch._grouped_mm, one call for all experts (CPU since torch 2.9; CUDA sm90+);
- "auto": "grouped" on CUDA where torch has it, "loop" on CPU, where `mixturelm bench moe` measured
  it faster (torch 2.13's CPU _grouped_mm runs its per-expert products about 30 % slower).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F_

from .ffn import swiglu_activation

IMPLS = ("auto", "grouped", "loop")


def has_grouped_mm(device: torch.device) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return device.type == "cpu"


def sort_by_expert(expert_A: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The permutation that groups assignments by expert (stable), and the count of each expert."""
    order_A = torch.argsort(expert_A, stable=True)
    # a scatter-add, not bincount: bincount's length depends on the data, which torch.compile cannot trace
    counts_E = torch.zeros(n_experts, dtype=torch.int64, device=expert_A.device).scatter_add_(
        0, expert_A, torch.ones_like(expert_A))
    return order_A, counts_E


# The "loop" grouped matmul is a custom op (torch.library), not an autograd.Function: its per-expert row
# ranges come from the counts on the host (.tolist()), a data-dependent step that torch.compile cannot trace
# (a graph break per call). As an op it is opaque to compile, which needs only the output shapes (fake).

@torch.library.custom_op("mixturelm::loop_grouped_mm", mutates_args=())
def loop_grouped_mm(x_AK: torch.Tensor, w_EKN: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """out[rows of e] = x[rows of e] @ w[e], one matmul per expert, each written in place (no cat/stack)."""
    out_AN = x_AK.new_empty(x_AK.shape[0], w_EKN.shape[-1])
    for e, (start, end) in _groups(counts_E.tolist()):
        torch.mm(x_AK[start:end], w_EKN[e], out=out_AN[start:end])
    return out_AN


@loop_grouped_mm.register_fake
def _(x_AK, w_EKN, counts_E):
    return x_AK.new_empty(x_AK.shape[0], w_EKN.shape[-1])


@torch.library.custom_op("mixturelm::loop_grouped_mm_backward", mutates_args=())
def loop_grouped_mm_backward(d_out_AN: torch.Tensor, x_AK: torch.Tensor, w_EKN: torch.Tensor,
                             counts_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d x, d w) of loop_grouped_mm, each expert's block written in place."""
    counts = counts_E.tolist()
    d_x, d_w = x_AK.new_empty(x_AK.shape), torch.empty_like(w_EKN)
    d_w[[e for e, n in enumerate(counts) if n == 0]] = 0  # only experts without tokens need zeros
    d_out_AN = d_out_AN.contiguous()
    for e, (start, end) in _groups(counts):
        torch.mm(d_out_AN[start:end], w_EKN[e].t(), out=d_x[start:end])
        torch.mm(x_AK[start:end].t(), d_out_AN[start:end], out=d_w[e])
    return d_x, d_w


@loop_grouped_mm_backward.register_fake
def _(d_out_AN, x_AK, w_EKN, counts_E):
    return x_AK.new_empty(x_AK.shape), torch.empty_like(w_EKN)


def _loop_grouped_mm_setup(ctx, inputs, output) -> None:
    x_AK, w_EKN, counts_E = inputs
    ctx.save_for_backward(x_AK, w_EKN, counts_E)


def _loop_grouped_mm_grad(ctx, d_out_AN):
    x_AK, w_EKN, counts_E = ctx.saved_tensors
    d_x, d_w = loop_grouped_mm_backward(d_out_AN, x_AK, w_EKN, counts_E)
    return d_x, d_w, None


loop_grouped_mm.register_autograd(_loop_grouped_mm_grad, setup_context=_loop_grouped_mm_setup)


class ExpertsSwiGLU(torch.autograd.Function):
    """sum over assignments a of token t: gate_a * SwiGLU_{expert_a}(x_t), one expert at a time: gather its
    tokens, gate-and-up projection, activation (times the gate, if given), down projection, and its rows added
    onto their tokens' outputs. The backward runs the same loop and adds each expert's input gradient onto its
    tokens the same way.

    Why one expert at a time: the whole layer's intermediates ((A, 2F) projections, (A, F) activations, their
    gradients, (A, D) gathered inputs and outputs) are tens of MB each, and glibc's malloc hands blocks over 32
    MiB to mmap, fresh and page-faulted 4 KiB at a time, on every call: a plain process spent up to a third of a
    MoE step in page faults. One expert's blocks are small enough to be reused from the heap, and they stay in
    cache between the two matmuls. Its outputs (and in the backward its input gradients) are added onto the
    (T, D) result at once, so that no (A, D) array exists: copied row by row into a fresh one, as before, each
    expert's rows were page-faulted as they landed (64 experts top-8: 431 MiB faulted per step, 236 without,
    benchmarks/moe/page_faults.py). Kept for the backward: the (A, 2F) projections, as with one big matmul."""

    @staticmethod
    def forward(ctx, x_TD, w_gate_up_ED2F, w_down_EFD, token_A, order_A, gate_A, counts: list[int]):
        F = w_down_EFD.shape[1]
        wide = torch.promote_types(x_TD.dtype, torch.float32)  # k rows summed onto each token: no bf16 sums
        y_TD = torch.zeros(x_TD.shape, dtype=wide, device=x_TD.device)
        keep = any(ctx.needs_input_grad)  # without a backward, each expert's projection is freed at once
        projections = []
        for e, rows in _expert_rows(counts, order_A):
            tokens = token_A[rows]
            h_N2F = torch.mm(x_TD.index_select(0, tokens), w_gate_up_ED2F[e])
            act_NF = F_.silu(h_N2F[:, :F]).mul_(h_N2F[:, F:])
            if gate_A is not None:
                act_NF.mul_(gate_A[rows, None].to(act_NF.dtype))
            y_TD.index_add_(0, tokens, torch.mm(act_NF, w_down_EFD[e]).to(wide))
            if keep:
                projections.append(h_N2F)
        ctx.save_for_backward(x_TD, w_gate_up_ED2F, w_down_EFD, token_A, order_A, gate_A)
        ctx.projections, ctx.counts = projections, counts
        return y_TD.to(x_TD.dtype)

    @staticmethod
    def backward(ctx, d_y_TD):
        x_TD, w_gate_up, w_down, token_A, order_A, gate_A = ctx.saved_tensors
        need_x, need_gate_up, need_down = ctx.needs_input_grad[:3]
        need_gate = gate_A is not None and ctx.needs_input_grad[5]
        F = w_down.shape[1]
        wide = torch.promote_types(x_TD.dtype, torch.float32)  # the sums over an expert's rows and over k
        d_x_TD = torch.zeros(x_TD.shape, dtype=wide, device=x_TD.device) if need_x else None
        d_gate_up, d_down = torch.empty_like(w_gate_up), torch.empty_like(w_down)
        idle = [e for e, n in enumerate(ctx.counts) if n == 0]  # only experts without tokens need zeros
        d_gate_up[idle], d_down[idle] = 0, 0
        d_gate_A = torch.zeros_like(gate_A) if need_gate else None
        d_y_TD = d_y_TD.contiguous()
        for (e, rows), h_N2F in zip(_expert_rows(ctx.counts, order_A), ctx.projections):
            tokens = token_A[rows]
            gate, up = h_N2F[:, :F], h_N2F[:, F:]
            silu_gate = F_.silu(gate)
            act_NF = silu_gate * up
            d_y_ND = d_y_TD.index_select(0, tokens)
            d_act_NF = torch.mm(d_y_ND, w_down[e].t())
            if gate_A is not None:
                gate_N1 = gate_A[rows, None].to(act_NF.dtype)
                if need_gate:
                    d_gate_A[rows] = (d_act_NF.to(wide) * act_NF.to(wide)).sum(-1).to(gate_A.dtype)
                d_act_NF.mul_(gate_N1)
                act_NF.mul_(gate_N1)
            if need_down:
                torch.mm(act_NF.t(), d_y_ND, out=d_down[e])
            d_h_N2F = torch.empty_like(h_N2F)
            torch.ops.aten.silu_backward.grad_input(d_act_NF * up, gate, grad_input=d_h_N2F[:, :F])
            torch.mul(silu_gate, d_act_NF, out=d_h_N2F[:, F:])
            if need_gate_up:
                torch.mm(x_TD.index_select(0, tokens).t(), d_h_N2F, out=d_gate_up[e])
            if need_x:
                d_x_TD.index_add_(0, tokens, torch.mm(d_h_N2F, w_gate_up[e].t()).to(wide))
        return (None if d_x_TD is None else d_x_TD.to(x_TD.dtype)), d_gate_up, d_down, None, None, d_gate_A, None


def _expert_rows(counts: list[int], order_A: torch.Tensor):
    """(expert, the ids of its assignments) for every expert with any."""
    for e, (start, end) in _groups(counts):
        yield e, order_A[start:end]


def _groups(counts: list[int]):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, (start, start + n)
        start += n


def resolve_impl(impl: str, x: torch.Tensor, w_EKN: torch.Tensor) -> str:
    if impl == "auto":
        return "grouped" if x.device.type == "cuda" and has_grouped_mm(x.device) and _aligned(x, w_EKN) else "loop"
    return impl


def grouped_matmul(x_AK: torch.Tensor, w_EKN: torch.Tensor, counts_E: torch.Tensor, impl: str) -> torch.Tensor:
    """Rows of x grouped by expert (counts_E rows each, in expert order) times their expert's matrix."""
    if resolve_impl(impl, x_AK, w_EKN) == "grouped":
        offsets_E = counts_E.cumsum(0).to(torch.int32)
        return torch._grouped_mm(x_AK, w_EKN, offs=offsets_E)
    return loop_grouped_mm(x_AK, w_EKN, counts_E)


def _aligned(x_AK: torch.Tensor, w_EKN: torch.Tensor) -> bool:
    """torch._grouped_mm takes float32/bf16/fp16 (not float64) with 16-byte aligned strides."""
    if x_AK.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    size = x_AK.element_size()
    return (x_AK.shape[-1] * size) % 16 == 0 and (w_EKN.shape[-1] * size) % 16 == 0


class GatherTopK(torch.autograd.Function):
    """Rows x[token] in expert order, when every token has exactly k assignments (token choice, no
    dropping). Its backward is a gather and a sum over k instead of a scatter-add (which costs as much
    as a matmul of the layer on CPU)."""

    @staticmethod
    def forward(ctx, x_TD, token_sorted_A, inverse_A, k: int):
        ctx.save_for_backward(inverse_A)
        ctx.k = k
        return x_TD.index_select(0, token_sorted_A)

    @staticmethod
    def backward(ctx, d_AD):
        (inverse_A,) = ctx.saved_tensors
        return d_AD.index_select(0, inverse_A).view(-1, ctx.k, d_AD.shape[-1]).sum(1), None, None, None


class SumTopK(torch.autograd.Function):
    """The adjoint of GatherTopK: rows in expert order summed back onto their tokens, each scaled by its
    gate when weight_TK is given (one batched matmul per token: sum_k w_tk y_tk)."""

    @staticmethod
    def forward(ctx, y_AD, weight_TK, order_A, inverse_A, k: int):
        y_TKD = y_AD.index_select(0, inverse_A).view(-1, k, y_AD.shape[-1])
        ctx.save_for_backward(order_A, weight_TK, y_TKD if weight_TK is not None else None)
        ctx.k = k
        if weight_TK is None:
            return y_TKD.sum(1)
        return torch.bmm(weight_TK.to(y_AD.dtype).unsqueeze(1), y_TKD).squeeze(1)

    @staticmethod
    def backward(ctx, d_TD):
        order_A, weight_TK, y_TKD = ctx.saved_tensors
        if weight_TK is None:
            return d_TD.index_select(0, order_A // ctx.k), None, None, None, None
        d_TKD = weight_TK.to(d_TD.dtype)[:, :, None] * d_TD[:, None, :]
        d_weight_TK = torch.bmm(y_TKD, d_TD.unsqueeze(2)).squeeze(2).to(weight_TK.dtype)
        return d_TKD.view(-1, d_TD.shape[-1]).index_select(0, order_A), d_weight_TK, None, None, None


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    device = x.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def rows_in_expert_order(x_TD: torch.Tensor, token_A: torch.Tensor, order_A: torch.Tensor,
                         k_per_token: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x's row of each assignment in expert order (order_A from sort_by_expert), with the sorted token ids and,
    when the assignments are token-major with exactly k per token, the inverse permutation that the combine
    (SumTopK) needs; then the gather's backward is a gather too (GatherTopK). Shared by the single-device and
    the expert-parallel dispatch."""
    token_sorted_A = token_A[order_A]
    if not k_per_token:
        return x_TD.index_select(0, token_sorted_A), token_sorted_A, None
    inverse_A = torch.empty_like(order_A)
    inverse_A[order_A] = torch.arange(order_A.numel(), device=order_A.device)
    return GatherTopK.apply(x_TD, token_sorted_A, inverse_A, k_per_token), token_sorted_A, inverse_A


def dispatch_swiglu(x_TD: torch.Tensor, token_A: torch.Tensor, expert_A: torch.Tensor, weight_A: torch.Tensor | None,
                    w_gate_up_ED2F: torch.Tensor, w_down_EFD: torch.Tensor, impl: str = "auto",
                    k_per_token: int | None = None) -> torch.Tensor:
    """sum over assignments a of token t: weight_a * SwiGLU_{expert_a}(x_t), for every token (zeros if none).

    k_per_token: set when the assignments are token-major with exactly k per token (token choice without
    dropping), which allows a gather-only permutation; otherwise a gather and a scatter-add.
    weight_A None: no gate (every weight 1), as for the rows an expert-parallel process computes for others."""
    order_A, counts_E = sort_by_expert(expert_A, w_gate_up_ED2F.shape[0])
    compute_dtype = _autocast_dtype(x_TD)  # our grouped matmuls are not autocast ops: cast as autocast would
    if compute_dtype is not None:
        x_TD = x_TD.to(compute_dtype)
        w_gate_up_ED2F, w_down_EFD = w_gate_up_ED2F.to(compute_dtype), w_down_EFD.to(compute_dtype)
    if resolve_impl(impl, x_TD, w_gate_up_ED2F) == "loop" and not torch.compiler.is_compiling():
        return ExpertsSwiGLU.apply(x_TD, w_gate_up_ED2F, w_down_EFD, token_A, order_A, weight_A, counts_E.tolist())
    D, F = x_TD.shape[-1], w_down_EFD.shape[1]
    # The gate multiplies either the hidden activation (A x F) or, in the combine, the output (A x D):
    # the same sum, done on the smaller of the two (fine-grained experts have F < D).
    gate_in_combine = bool(k_per_token) and D < F and weight_A is not None
    x_AD, token_sorted_A, inverse_A = rows_in_expert_order(x_TD, token_A, order_A, k_per_token)
    h_A2F = grouped_matmul(x_AD, w_gate_up_ED2F, counts_E, impl)
    act_AF = swiglu_activation(h_A2F, None if gate_in_combine or weight_A is None else weight_A[order_A])
    y_AD = grouped_matmul(act_AF, w_down_EFD, counts_E, impl).to(x_TD.dtype)
    if k_per_token:
        weight_TK = weight_A.view(-1, k_per_token) if gate_in_combine else None
        return SumTopK.apply(y_AD, weight_TK, order_A, inverse_A, k_per_token)
    return torch.zeros_like(x_TD).index_add_(0, token_sorted_A, y_AD)
