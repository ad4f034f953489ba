"""Causal self-attention with rotary position embeddings and a per-layer KV cache.

Dimension letters: B batch, T new tokens, L tokens in the cache (past + new), H query heads,
G key/value heads (G divides H), K head size, D d_model.

Positions are explicit, not implied by the index in the sequence: a routing wrapper (MoD) runs a
block on a subset of the tokens and must rotate them by their ORIGINAL positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .linear import Linear


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float,
                scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, shape positions.shape + (head_dim/2,), in float32. scaling: None, or
    transformers' rope_parameters form (ModelConfig.rope_scaling), as long-context Llama checkpoints use."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    if scaling is not None:
        inv_freq = scaled_inv_freq(inv_freq, scaling)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def scaled_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """"linear": every frequency divided by `factor` (positions interpolated). "llama3" (Llama 3.1): low
    frequencies (wavelength above original_len / low_freq_factor) divided by `factor`, high ones (below
    original_len / high_freq_factor) kept, and a smooth blend between the two."""
    kind = scaling["rope_type"]
    if kind == "default":
        return inv_freq
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, blended, scaled)


def apply_rope(x_BHTK: torch.Tensor, cos_BTk: torch.Tensor, sin_BTk: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + K/2) of each head by the token's angle (the "rotate half" layout of Llama).
    The plain form; the attention layer uses the fused QKVRope below, which a test checks against it."""
    half = x_BHTK.shape[-1] // 2
    x1, x2 = x_BHTK[..., :half], x_BHTK[..., half:]
    cos, sin = cos_BTk.unsqueeze(-3).to(x_BHTK.dtype), sin_BTk.unsqueeze(-3).to(x_BHTK.dtype)  # broadcast over H
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _rotate_into(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = x rotated by (cos, sin), written in place: no torch.cat, no temporaries of x's size."""
    half = x.shape[-1] // 2
    x1, x2, o1, o2 = x[..., :half], x[..., half:], out[..., :half], out[..., half:]
    if torch.compiler.is_compiling():  # torch.compile refuses out= into a strided view (a graph break);
        o1.copy_(x1 * cos - x2 * sin)  # it fuses these into one kernel anyway
        o2.copy_(x2 * cos + x1 * sin)
        return out
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
    return out


class QKVRope(torch.autograd.Function):
    """From the fused projection qkv_BTNK (N = H + 2G heads), q and k rotated and v, in (B, T, heads, K).

    One autograd node instead of split + transposes + two cat-based rotations: the backward rotates by
    -angle straight into one gradient buffer for qkv (profiling showed cat and copies at ~15 % of a
    CPU training step)."""

    @staticmethod
    def forward(ctx, qkv_BTNK, cos_Tk, sin_Tk, n_heads: int, kv_heads: int):
        H, G = n_heads, kv_heads
        cos, sin = cos_Tk.unsqueeze(-2).to(qkv_BTNK.dtype), sin_Tk.unsqueeze(-2).to(qkv_BTNK.dtype)  # over heads
        ctx.save_for_backward(cos, sin)
        ctx.heads = (H, G)
        qk = _rotate_into(qkv_BTNK[:, :, :H + G], cos, sin, qkv_BTNK.new_empty(qkv_BTNK[:, :, :H + G].shape))
        return qk[:, :, :H], qk[:, :, H:], qkv_BTNK[:, :, H + G:]

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        H, G = ctx.heads
        B, T, _, K = dq.shape
        grad = dq.new_empty(B, T, H + 2 * G, K)
        _rotate_into(dq, cos, -sin, grad[:, :, :H])
        _rotate_into(dk, cos, -sin, grad[:, :, H:H + G])
        grad[:, :, H + G:].copy_(dv)
        return grad, None, None, None, None


def rotate_qkv(qkv_BTNK: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int,
               kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q and k rotated, and v, from the fused projection (B, T, N, K): QKVRope, or in inference (no gradient, CPU
    float32) the rotation written in place into the projection's own buffer by one kernel call."""
    B, T, N, K = qkv_BTNK.shape
    if (kernels.inference_ready(qkv_BTNK, cos, sin) and qkv_BTNK.is_contiguous() and K % 2 == 0
            and cos.shape == sin.shape and cos.shape[-1] == K // 2 and cos.shape[:-1] in ((T,), (B, T))):
        kernels.rope_rows_(qkv_BTNK, cos, sin, n_heads + kv_heads)
        H, G = n_heads, kv_heads
        return qkv_BTNK[:, :, :H], qkv_BTNK[:, :, H:H + G], qkv_BTNK[:, :, H + G:]
    return QKVRope.apply(qkv_BTNK, cos, sin, n_heads, kv_heads)


class LayerKVCache:
    """Keys and values of one attention layer, preallocated for `capacity` tokens per sequence; every
    sequence of the batch has the same length (all tokens enter every plain block)."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, capacity: int, device, dtype) -> None:
        self.k_BGLK = torch.empty(batch, kv_heads, capacity, head_dim, device=device, dtype=dtype)
        self.v_BGLK = torch.empty_like(self.k_BGLK)
        self.length = 0

    def append(self, k_BGTK: torch.Tensor, v_BGTK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k_BGTK.shape[2]
        if end > self.k_BGLK.shape[2]:
            raise RuntimeError(f"KV cache holds {self.k_BGLK.shape[2]} tokens; {end} were asked for")
        self.k_BGLK[:, :, self.length:end] = k_BGTK
        self.v_BGLK[:, :, self.length:end] = v_BGTK
        self.length = end
        return self.k_BGLK[:, :, :end], self.v_BGLK[:, :, :end]

    def attend(self, q_BHTK: torch.Tensor, k_BGTK: torch.Tensor, v_BGTK: torch.Tensor) -> torch.Tensor:
        """Store the new keys and values, then attend causally over everything cached."""
        past, T = self.length, q_BHTK.shape[2]
        k, v = self.append(k_BGTK, v_BGTK)
        gqa = q_BHTK.shape[1] != k.shape[1]
        if past == 0:  # the new tokens only: plain causal attention
            return F.scaled_dot_product_attention(q_BHTK, k, v, is_causal=True, enable_gqa=gqa)
        if T == 1:  # one new token attends to everything cached
            return F.scaled_dot_product_attention(q_BHTK, k, v, enable_gqa=gqa)
        allowed_TL = torch.ones(T, past + T, dtype=torch.bool, device=q_BHTK.device).tril(past)
        return F.scaled_dot_product_attention(q_BHTK, k, v, attn_mask=allowed_TL, enable_gqa=gqa)


class RaggedKVCache:
    """Keys and values of a routed block (Mixture-of-Depths): each sequence stores only the tokens that
    entered the block, so every row has its own length. A token that skips the block writes nothing,
    and later tokens cannot attend to it there (Raposo et al. 2024, section 5).

    Zero-initialised on purpose: a row shorter than the longest one reads zeros (masked) past its end,
    and masked garbage could hold NaN, which a mask does not remove (NaN + -inf is NaN)."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, capacity: int, device, dtype) -> None:
        self.k_BLGK = torch.zeros(batch, capacity, kv_heads, head_dim, device=device, dtype=dtype)
        self.v_BLGK = torch.zeros_like(self.k_BLGK)
        self.length_B = torch.zeros(batch, dtype=torch.long, device=device)

    def rows(self, rows_R: torch.Tensor, count_R: torch.Tensor | int) -> RaggedRows:
        """The view a block call writes through: batch rows rows_R, of which row r brings count_R[r] tokens
        (an int: that many from every row)."""
        return RaggedRows(self, rows_R, count_R)


# The most tokens per row for which RaggedRows takes the fused kernel. It walks each token's (key, head) pairs one
# by one, which serves decoding and short prefills; torch's flash attention shares each key among a block of
# queries. In the prefills of `bench mod`'s model (benchmarks/mod/routed_prefill_time.py) the kernel took 0.2-0.3
# ms less per routed block up to about 100 tokens, the two were even around 110-140, and from 200 tokens torch's was
# 0.6-2 ms faster.
FUSED_ATTENTION_MOST_TOKENS = 96


class RaggedRows:
    """Rows of a RaggedKVCache for one block call. The call's C tokens per row are compacted: row r's
    count_R[r] real tokens come first, in order, then padding. Padding is written past the row's end
    (the next real token overwrites it) and, coming after every real token, is never attended by one."""

    def __init__(self, cache: RaggedKVCache, rows_R: torch.Tensor, count_R: torch.Tensor | int) -> None:
        self.cache, self.rows_R, self.count_R = cache, rows_R, count_R

    def attend(self, q_RHCK: torch.Tensor, k_RGCK: torch.Tensor, v_RGCK: torch.Tensor) -> torch.Tensor:
        c, rows = self.cache, self.rows_R
        R, C = q_RHCK.shape[0], q_RHCK.shape[2]
        if C == 1 and _decoding_kernel_fits(q_RHCK, k_RGCK, v_RGCK, c):  # store, grow, attend in one call
            return kernels.ragged_decode_step(q_RHCK[:, :, 0], k_RGCK[:, :, 0], v_RGCK[:, :, 0], c.k_BLGK, c.v_BLGK,
                                              c.length_B, rows, check=False)[:, :, None]
        start_R = c.length_B[rows]
        slot_RC = start_R[:, None] + torch.arange(C, device=rows.device)
        end = int(slot_RC[:, -1].max()) + 1
        if end > c.k_BLGK.shape[1]:
            raise RuntimeError(f"KV cache holds {c.k_BLGK.shape[1]} tokens; {end} were asked for")
        c.k_BLGK[rows[:, None], slot_RC] = k_RGCK.transpose(1, 2)
        c.v_BLGK[rows[:, None], slot_RC] = v_RGCK.transpose(1, 2)
        if C == 1 and R < c.k_BLGK.shape[0]:  # decoding, some rows: each attends to its own tokens in place
            y = self._attend_row_by_row(q_RHCK, (start_R + 1).tolist())
            c.length_B[rows] += self.count_R
            return y
        if R == c.k_BLGK.shape[0]:  # every row: views, no copy
            k_RLGK, v_RLGK = c.k_BLGK[:, :end], c.v_BLGK[:, :end]
        else:  # copy only the first `end` slots of each row: advanced indexing k[rows, :end] (and
            # index_select) copied whole rows first: far slower at decode in a micro-benchmark
            live = rows.tolist()
            k_RLGK = torch.stack([c.k_BLGK[r, :end] for r in live])
            v_RLGK = torch.stack([c.v_BLGK[r, :end] for r in live])
        # token j of row r sees the row's past and the call's tokens up to itself
        mask, causal = None, False
        if R == 1 and end == C and C > 1:  # one row, nothing cached: the plain causal kernel, no mask
            causal = True
        elif R > 1 or C > 1:
            mask = (torch.arange(end, device=rows.device) <= slot_RC[:, :, None])[:, None]
        y = F.scaled_dot_product_attention(q_RHCK, k_RLGK.transpose(1, 2), v_RLGK.transpose(1, 2), attn_mask=mask,
                                           is_causal=causal, enable_gqa=q_RHCK.shape[1] != k_RLGK.shape[2])
        c.length_B[rows] += self.count_R
        return y

    def attend_projection(self, qkv_RCNK: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          n_heads: int) -> torch.Tensor | None:
        """This call's attention from the fused projection (R rows, C tokens each) in one kernel call: rotary
        embedding, store, attention over each row's tokens up to each token's own, and the output laid out
        (R, C, H * K) for the output projection; decoding (C = 1) and short prefills (C up to
        FUSED_ATTENTION_MOST_TOKENS). None where the kernel cannot serve it (not CPU float32 inference, more tokens,
        shapes it does not take): the caller then takes the unfused path."""
        c, rows, count = self.cache, self.rows_R, self.count_R
        k = c.k_BLGK
        (R, C, N, K), (G, K_cache) = qkv_RCNK.shape, k.shape[2:]
        H = n_heads
        angles = ((C, K // 2), (R, C, K // 2))  # shared by the rows, or one per row
        if (C == 0 or C > FUSED_ATTENTION_MOST_TOKENS or K != K_cache or K % 2 or G == 0 or H % G
                or N != H + 2 * G or rows.shape != (R,) or cos.shape != sin.shape or cos.shape not in angles):
            return None
        if isinstance(count, torch.Tensor):
            if count.shape != (R,) or count.dtype != torch.int64 or not count.is_contiguous():
                return None
        elif count != C:
            return None
        if not (kernels.inference_ready(qkv_RCNK, cos, sin, k, c.v_BLGK) and qkv_RCNK.is_contiguous()
                and cos.is_contiguous() and sin.is_contiguous() and k.is_contiguous() and c.v_BLGK.is_contiguous()
                and c.length_B.dtype == torch.int64 and rows.dtype == torch.int64 and rows.is_contiguous()):
            return None
        return kernels.ragged_attend_qkv(qkv_RCNK, cos, sin, k, c.v_BLGK, c.length_B, rows,
                                         count if isinstance(count, torch.Tensor) else None, H)

    def _attend_row_by_row(self, q_RH1K: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """One new token per row, each against its row's cached tokens (its own included), read where they
        lie: no copy and no mask. Gathering the rows into one padded batch copied every row up to the longest
        one, and that copy cost more than the attention (8 rows entering: 2-3x slower,
        benchmarks/mod/ragged_decode_attention.py)."""
        c, gqa = self.cache, q_RH1K.shape[1] != self.cache.k_BLGK.shape[2]
        ys = [F.scaled_dot_product_attention(q_RH1K[i:i + 1], c.k_BLGK[r, :n].transpose(0, 1)[None],
                                             c.v_BLGK[r, :n].transpose(0, 1)[None], enable_gqa=gqa)
              for i, (r, n) in enumerate(zip(self.rows_R.tolist(), lengths))]
        return torch.cat(ys)


def _decoding_kernel_fits(q_RHCK: torch.Tensor, k_RGCK: torch.Tensor, v_RGCK: torch.Tensor,
                          cache: RaggedKVCache) -> bool:
    """Whether the fused ragged decoding kernel (layers/kernels.py) can serve this call: one token per row, shapes
    that agree with the cache (the kernel is called without its own checks), CPU, float32 or float64, a
    contiguous cache with int64 lengths, no gradient to carry, no dispatch mode watching the ops."""
    k = cache.k_BLGK
    (R, H, C, K), (G, K_cache) = q_RHCK.shape, k.shape[2:]
    if C != 1 or K != K_cache or G == 0 or H % G or k_RGCK.shape != (R, G, 1, K) or v_RGCK.shape != k_RGCK.shape:
        return False
    needs_grad = torch.is_grad_enabled() and (q_RHCK.requires_grad or k.requires_grad)
    return (not needs_grad and q_RHCK.dtype == k.dtype and k.is_contiguous() and cache.v_BLGK.is_contiguous()
            and cache.length_B.dtype == torch.int64 and kernels.plain_dispatch()
            and kernels.usable(k, q_RHCK, cache.length_B))


class Attention(nn.Module):
    """qk_norm: "head" normalises each query and key head by its own RMSNorm of size K (Qwen3), "full" the
    whole query and key projections (OLMoE); both before RoPE. qkv_bias: a bias on the projection (Qwen2)."""

    def __init__(self, d_model: int, n_heads: int, kv_heads: int, head_dim: int | None = None,
                 qk_norm: str = "none", qkv_bias: bool = False, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = n_heads, kv_heads, head_dim or d_model // n_heads
        # One fused projection for q, k and v: one matmul instead of three.
        self.qkv = Linear(d_model, (n_heads + 2 * kv_heads) * self.head_dim, bias=qkv_bias)
        self.out = Linear(n_heads * self.head_dim, d_model, bias=False)
        self.qk_norm = qk_norm
        if qk_norm != "none":
            per_head = qk_norm == "head"
            self.q_norm = nn.RMSNorm(self.head_dim if per_head else n_heads * self.head_dim, eps=norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim if per_head else kv_heads * self.head_dim, eps=norm_eps)

    def _normalise_qk(self, qkv_BTNK: torch.Tensor) -> torch.Tensor:
        B, T, _, K = qkv_BTNK.shape
        H, G = self.n_heads, self.kv_heads
        q, k, v = qkv_BTNK[:, :, :H], qkv_BTNK[:, :, H:H + G], qkv_BTNK[:, :, H + G:]
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        else:
            q = self.q_norm(q.reshape(B, T, H * K)).view(B, T, H, K)
            k = self.k_norm(k.reshape(B, T, G * K)).view(B, T, G, K)
        return torch.cat((q, k, v), dim=2)

    def forward(self, x_BTD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: LayerKVCache | RaggedRows | None = None) -> torch.Tensor:
        """rope: cos and sin of each token's angles, (T, K/2) shared by the batch or (B, T, K/2) per row."""
        B, T, _ = x_BTD.shape
        H, G, K = self.n_heads, self.kv_heads, self.head_dim
        qkv = self.qkv(x_BTD).view(B, T, H + 2 * G, K)
        if self.qk_norm != "none":
            qkv = self._normalise_qk(qkv)
        if isinstance(cache, RaggedRows):  # a routed block's tokens: one kernel call where it can
            y = cache.attend_projection(qkv, *rope, H)
            if y is not None:
                return self.out(y)
        q, k, v = rotate_qkv(qkv, *rope, H, G)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is None:  # a whole sequence, or the tokens a router chose, in order: plain causal
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=G != H)
        else:
            y = cache.attend(q, k, v)
        return self.out(y.transpose(1, 2).reshape(B, T, H * K))
