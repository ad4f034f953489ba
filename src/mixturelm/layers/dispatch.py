"""Permute tokens to their experts, run the experts on contiguous groups, combine back with the gates.

Every routed computation goes through here: given assignments (token, expert, weight) from any
router, `dispatch_swiglu` sorts them by expert (stable, so token order is kept within an expert),
gathers the rows, runs all experts as grouped matmuls, scales by the gate and scatter-adds back.
Dropless: each expert computes exactly the tokens it was given.

Dimension letters: T tokens, D d_model, E experts, F expert hidden size, A assignments.

Implementations of the grouped matmul (`impl`):
- "grouped": torch._grouped_mm, one call for all experts (CPU since torch 2.9; CUDA sm90+);
- "loop": one matmul per expert that has tokens (the counts go to the host once per layer);
- "auto": "grouped" where torch has it, else "loop".
On 2 CPU cores `mixturelm bench moe` measures them; "grouped" wins from 8 experts up.
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
    counts_E = torch.bincount(expert_A, minlength=n_experts)
    return order_A, counts_E


def grouped_matmul(x_AK: torch.Tensor, w_EKN: torch.Tensor, counts_E: torch.Tensor, impl: str) -> torch.Tensor:
    """Rows of x grouped by expert (counts_E rows each, in expert order) times their expert's matrix."""
    if impl == "auto":
        impl = "grouped" if has_grouped_mm(x_AK.device) and _aligned(x_AK, w_EKN) else "loop"
    if impl == "grouped":
        offsets_E = counts_E.cumsum(0).to(torch.int32)
        return torch._grouped_mm(x_AK, w_EKN, offs=offsets_E)
    outs = [x @ w for x, w, n in zip(x_AK.split(counts_E.tolist()), w_EKN.unbind(0), counts_E.tolist()) if n]
    return torch.cat(outs) if outs else x_AK.new_zeros(0, w_EKN.shape[-1])


def _aligned(x_AK: torch.Tensor, w_EKN: torch.Tensor) -> bool:
    """torch._grouped_mm takes float32/bf16/fp16 (not float64) with 16-byte aligned strides."""
    if x_AK.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    size = x_AK.element_size()
    return (x_AK.shape[-1] * size) % 16 == 0 and (w_EKN.shape[-1] * size) % 16 == 0


def dispatch_swiglu(x_TD: torch.Tensor, token_A: torch.Tensor, expert_A: torch.Tensor, weight_A: torch.Tensor,
                    w_gate_up_ED2F: torch.Tensor, w_down_EFD: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """sum over assignments a of token t: weight_a * SwiGLU_{expert_a}(x_t), for every token (zeros if none)."""
    order_A, counts_E = sort_by_expert(expert_A, w_gate_up_ED2F.shape[0])
    token_A, weight_A = token_A[order_A], weight_A[order_A]
    h_A2F = grouped_matmul(x_TD[token_A], w_gate_up_ED2F, counts_E, impl)
    # the gate scales the hidden activation: the same as scaling the output, and F <= D in fine-grained MoE
    act_AF = swiglu_activation(h_A2F, weight_A)
    y_AD = grouped_matmul(act_AF, w_down_EFD, counts_E, impl)
    return torch.zeros_like(x_TD).index_add_(0, token_A, y_AD.to(x_TD.dtype))
