"""Permute tokens to their experts, run the experts on contiguous groups, combine back with the gates.

Every routed computation goes through here: given assignments (token, expert, weight) from any
router, `dispatch_swiglu` sorts them by expert (stable, so token order is kept within an expert),
gathers the rows, runs all experts as grouped matmuls, scales by the gate and scatter-adds back.
Dropless: each expert computes exactly the tokens it was given.

Dimension letters: T tokens, D d_model, E experts, F expert hidden size, A assignments.

Implementations of the grouped matmul (`impl`):
- "loop": one custom op (torch.library, so torch.compile sees it whole) that runs one matmul per expert
  with tokens, writing into preallocated outputs (forward and backward), so no cat/stack copies; the
  counts go to the host in each call;
- "grouped": torch._grouped_mm, one call for all experts (CPU since torch 2.9; CUDA sm90+);
- "auto": "grouped" on CUDA where torch has it, "loop" on CPU, where `mixturelm bench moe` measured
  it faster (torch 2.13's CPU _grouped_mm runs its per-expert products about 30 % slower).
"""

from __future__ import annotations

import torch

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


def _groups(counts: list[int]):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, (start, start + n)
        start += n


def grouped_matmul(x_AK: torch.Tensor, w_EKN: torch.Tensor, counts_E: torch.Tensor, impl: str) -> torch.Tensor:
    """Rows of x grouped by expert (counts_E rows each, in expert order) times their expert's matrix."""
    if impl == "auto":
        impl = "grouped" if x_AK.device.type == "cuda" and has_grouped_mm(x_AK.device) and _aligned(x_AK, w_EKN) \
            else "loop"
    if impl == "grouped":
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


def dispatch_swiglu(x_TD: torch.Tensor, token_A: torch.Tensor, expert_A: torch.Tensor, weight_A: torch.Tensor,
                    w_gate_up_ED2F: torch.Tensor, w_down_EFD: torch.Tensor, impl: str = "auto",
                    k_per_token: int | None = None) -> torch.Tensor:
    """sum over assignments a of token t: weight_a * SwiGLU_{expert_a}(x_t), for every token (zeros if none).

    k_per_token: set when the assignments are token-major with exactly k per token (token choice without
    dropping), which allows a gather-only permutation; otherwise a gather and a scatter-add."""
    order_A, counts_E = sort_by_expert(expert_A, w_gate_up_ED2F.shape[0])
    token_sorted_A = token_A[order_A]
    compute_dtype = _autocast_dtype(x_TD)  # our grouped matmuls are not autocast ops: cast as autocast would
    if compute_dtype is not None:
        x_TD = x_TD.to(compute_dtype)
        w_gate_up_ED2F, w_down_EFD = w_gate_up_ED2F.to(compute_dtype), w_down_EFD.to(compute_dtype)
    D, F = x_TD.shape[-1], w_down_EFD.shape[1]
    # The gate multiplies either the hidden activation (A x F) or, in the combine, the output (A x D):
    # the same sum, done on the smaller of the two (fine-grained experts have F < D).
    gate_in_combine = bool(k_per_token) and D < F
    if k_per_token:
        inverse_A = torch.empty_like(order_A)
        inverse_A[order_A] = torch.arange(order_A.numel(), device=order_A.device)
        x_AD = GatherTopK.apply(x_TD, token_sorted_A, inverse_A, k_per_token)
    else:
        x_AD = x_TD.index_select(0, token_sorted_A)
    h_A2F = grouped_matmul(x_AD, w_gate_up_ED2F, counts_E, impl)
    act_AF = swiglu_activation(h_A2F, None if gate_in_combine else weight_A[order_A])
    y_AD = grouped_matmul(act_AF, w_down_EFD, counts_E, impl).to(x_TD.dtype)
    if k_per_token:
        weight_TK = weight_A.view(-1, k_per_token) if gate_in_combine else None
        return SumTopK.apply(y_AD, weight_TK, order_A, inverse_A, k_per_token)
    return torch.zeros_like(x_TD).index_add_(0, token_sorted_A, y_AD)
