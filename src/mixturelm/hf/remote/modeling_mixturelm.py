"""mixturelm models as Hugging Face remote code: one self-contained file (torch and transformers only).

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

Written by `mixturelm.hf.remote.save_remote` next to `config.json` and `model.safetensors`. It serves the
models transformers has no architecture for: Mixture-of-Depths (MoD), staged and integrated MoDE, PEER, and
Mixture-of-Experts with any of mixturelm's causal routers. The module tree mirrors mixturelm's `MixtureLM`
under the prefix `model.` (`model.embed.weight`, `model.blocks.0.attn.qkv.weight`, ...), so the weights are
mixturelm's state dict with `model.` prepended, loaded without renaming.

What it computes is what mixturelm's `MixtureLM.forward(ids, causal_routing=True)` computes in eval mode:
pre-norm RMSNorm blocks, attention with RoPE (rotate-half layout; linear or llama3 frequency scaling) over a
fused q/k/v projection laid out [q heads | k heads | v heads], grouped-query attention, optional q/k norms
and qkv bias; SwiGLU FFNs (fused [gate | up] projection); MoE with the softmax (renormalised or not), noisy
(evaluated without noise), switch and sigmoid_bias routers, shared experts (optionally gated) and no-op
experts (integrated MoDE); MoD around a block with its causal rule (a token enters when its causal score is
above the block's threshold); PEER in place of or beside the FFN (product keys, heads, top-k, GLU, per-head
keys, batch / layer / whitening / no query norm, with their running statistics).

Refused when the model is built (a clear error, never a silently different model): expert-choice MoE and
MoE with a capacity factor (whether a token is computed depends on the other tokens of the call, later
ones included, so neither is causal), and any mechanism or option this file does not know.

No KV cache. MoD's causal routing decides token by token and a skipped token writes no key there, so the
cache of a MoD block is ragged; instead of reproducing it, generation recomputes the whole sequence at
every step (`use_cache=False` in the config and the generation config; `prepare_inputs_for_generation`
passes the full ids). Each token's routing depends only on itself and the tokens before it, so the
recomputation gives the same tokens as mixturelm's cached decoding, at the cost of quadratic time.

`attention_mask` (2-D, 1 for real tokens) may pad rows on either side: padding never enters a MoD block,
is never attended to, and positions count real tokens only, so a padded row computes what it would alone.

Inference only: query norms always use their running statistics, routers never add noise, and no
auxiliary loss is computed; `labels` give the language-model loss only.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

# ----------------------------------------------------------------------------------------------
# What this file knows of mixturelm's config. Any other key is refused: mixturelm may have gained an
# option that changes the computation, and ignoring it would give a different model without a word.

MODEL_KEYS = {"vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ffn", "max_seq_len", "rope_theta",
              "norm_eps", "tie_embeddings", "init_std", "d_head", "qk_norm", "qkv_bias", "rope_scaling", "blocks",
              "aux_loss_weights"}
BLOCK_KEYS = {"ffn", "ffn_hidden", "beside", "wrapper"}
MECHANISM_KEYS = {
    "moe": {"n_experts", "top_k", "d_expert", "router", "n_shared", "d_shared", "shared_gate", "capacity_factor",
            "renormalize", "route_scale", "bias_rate", "impl", "n_noop"},
    "peer": {"n_experts", "n_heads", "top_k", "d_key", "activation", "glu", "per_head_keys", "query_norm",
             "sparse_grad"},
    "mod": {"capacity", "causal", "predictor_hidden", "calibrate", "threshold_momentum", "gate"},
}
FFN_KINDS = ("dense", "moe", "peer")
WRAPPERS = ("none", "mod")
CAUSAL_ROUTERS = ("softmax", "noisy", "switch", "sigmoid_bias")
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}
QUERY_NORMS = ("batch", "layer", "none", "whiten")
ROPE_TYPES = ("default", "linear", "llama3")


def _unknown(where: str, given, known) -> None:
    extra = sorted(set(given) - set(known))
    if extra:
        raise ValueError(f"mixturelm remote code: {where} has option(s) {', '.join(extra)} that this modeling file "
                         "does not implement; export with a mixturelm whose modeling_mixturelm.py knows them")


def check_supported(cfg: dict) -> None:
    """Raise ValueError, naming the block and the reason, for a mixturelm config this file cannot compute
    exactly (see the module docstring)."""
    if not cfg:
        raise ValueError("MixtureLMConfig has no `mixturelm` model config; it is written by mixturelm's save_remote")
    _unknown("ModelConfig", cfg, MODEL_KEYS)
    if cfg.get("qk_norm", "none") not in ("none", "head", "full"):
        raise ValueError(f"mixturelm remote code: ModelConfig.qk_norm={cfg['qk_norm']!r} is not implemented")
    if _rope_type(cfg.get("rope_scaling")) not in ROPE_TYPES:
        raise ValueError(f"mixturelm remote code: ModelConfig.rope_scaling={cfg['rope_scaling']!r} is not implemented; "
                         f"rope_type must be one of {', '.join(ROPE_TYPES)}")
    blocks = cfg.get("blocks") or []
    if blocks and len(blocks) != cfg["n_layers"]:
        raise ValueError(f"mixturelm remote code: {len(blocks)} block specs for n_layers={cfg['n_layers']}")
    for i, spec in enumerate(blocks):
        where = f"block {i}"
        kinds = [spec.get("ffn", "dense"), *spec.get("beside", [])]
        wrapper = spec.get("wrapper", "none")
        for kind in kinds:
            if kind not in FFN_KINDS:
                raise ValueError(f"mixturelm remote code: {where} uses the mechanism {kind!r}, which this modeling "
                                 f"file does not implement (it knows {', '.join(FFN_KINDS)})")
        if wrapper not in WRAPPERS:
            raise ValueError(f"mixturelm remote code: {where} is wrapped by {wrapper!r}, which this modeling file "
                             "does not implement (it knows mod)")
        used = [k for k in (*kinds, wrapper) if k in MECHANISM_KEYS]
        _unknown(f"{where}'s BlockSpec", [k for k in spec if k not in used], BLOCK_KEYS)
        for kind in used:
            if not isinstance(spec.get(kind), dict):
                raise ValueError(f"mixturelm remote code: {where} uses {kind!r} but gives no config for it")
            _unknown(f"{where}'s {kind} config", spec[kind], MECHANISM_KEYS[kind])
        moe, peer, mod = spec.get("moe") or {}, spec.get("peer") or {}, spec.get("mod") or {}
        if moe.get("router") == "expert_choice":
            raise ValueError(f"mixturelm remote code: {where}'s MoE uses expert-choice routing, which is not causal "
                             "(each expert picks among all tokens of a call, later ones included), so a model that "
                             "generates token by token cannot reproduce it; routers supported: "
                             + ", ".join(CAUSAL_ROUTERS))
        if moe.get("router", "softmax") not in CAUSAL_ROUTERS:
            raise ValueError(f"mixturelm remote code: {where}'s MoE router {moe['router']!r} is not implemented")
        if moe.get("capacity_factor") is not None:
            raise ValueError(f"mixturelm remote code: {where}'s MoE drops tokens above capacity_factor="
                             f"{moe['capacity_factor']}, by their rank among all tokens of a call (later ones "
                             "included): not causal, so it cannot be reproduced token by token; only dropless "
                             "MoE (capacity_factor None) is supported")
        if peer.get("query_norm", "batch") not in QUERY_NORMS or peer.get("activation", "gelu") not in ACTIVATIONS:
            raise ValueError(f"mixturelm remote code: {where}'s PEER query_norm={peer['query_norm']!r} "
                             f"activation={peer['activation']!r} is not implemented")
        if mod.get("causal", "aux_loss") not in ("aux_loss", "predictor") or mod.get("gate", "linear") not in (
                "linear", "sigmoid"):
            raise ValueError(f"mixturelm remote code: {where}'s MoD causal={mod['causal']!r} gate={mod['gate']!r} "
                             "is not implemented")


def _rope_type(scaling: dict | None) -> str:
    if scaling is None:
        return "default"
    return scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else repr(scaling)


# ----------------------------------------------------------------------------------------------
# Config

class MixtureLMConfig(PretrainedConfig):
    """The mixturelm model config (`ModelConfig.to_dict()`) under the key `mixturelm`, and what transformers
    reads at the top level (vocabulary, special tokens, tying, no cache), derived from it."""

    model_type = "mixturelm"

    def __init__(self, mixturelm: dict | None = None, bos_token_id: int | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None, **kwargs: Any) -> None:
        # derived from the mixturelm config, never given apart (a saved config.json holds them: dropped here)
        for key in ("vocab_size", "tie_word_embeddings", "use_cache", "hidden_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            kwargs.pop(key, None)
        self.mixturelm = dict(mixturelm) if mixturelm else {}
        super().__init__(**kwargs)
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id
        m = self.mixturelm
        self.vocab_size = m.get("vocab_size")
        # the output layer is the embedding itself when tied: the model has no lm_head to tie
        self.tie_word_embeddings = bool(m.get("tie_embeddings", True))
        self.use_cache = False  # no KV cache: generation recomputes the sequence (module docstring)
        if m:  # the usual names, for tools that read them
            self.hidden_size, self.num_hidden_layers = m["d_model"], m["n_layers"]
            self.num_attention_heads = m["n_heads"]
            self.num_key_value_heads = m.get("n_kv_heads") or m["n_heads"]
            self.head_dim = m.get("d_head") or m["d_model"] // m["n_heads"]
            self.max_position_embeddings = m["max_seq_len"]


# ----------------------------------------------------------------------------------------------
# Pieces

def fp32_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x W^T in float32 at least: mixturelm computes every router (MoE, MoD) so, whatever the weights' dtype."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return F.linear(x.to(dtype), weight.to(dtype))


class MixtureLMRMSNorm(nn.Module):
    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None, device) -> torch.Tensor:
    """Rotary frequencies in float32, as mixturelm computes them; scaling in transformers' rope_parameters form:
    "linear" divides them by factor, "llama3" divides the low ones by factor, keeps the high ones and blends
    between (transformers' _compute_llama3_parameters)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    kind = _rope_type(scaling)
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
    """Rotate pairs (i, i + K/2) of each head by its token's angle (the "rotate half" layout of Llama)."""
    half = x_BHTK.shape[-1] // 2
    x1, x2 = x_BHTK[..., :half], x_BHTK[..., half:]
    cos, sin = cos_BTk[:, None].to(x_BHTK.dtype), sin_BTk[:, None].to(x_BHTK.dtype)  # broadcast over heads
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class MixtureLMAttention(nn.Module):
    """Attention over a fused projection [q heads | k heads | v heads]; each query head h reads key/value
    head h // (H / G). q_norm / k_norm: "head" one RMSNorm of the head size for every head (Qwen3), "full"
    one over all heads together (OLMoE); both before RoPE."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.n_heads = cfg["n_heads"]
        self.kv_heads = cfg.get("n_kv_heads") or cfg["n_heads"]
        self.head_dim = cfg.get("d_head") or cfg["d_model"] // cfg["n_heads"]
        H, G, K = self.n_heads, self.kv_heads, self.head_dim
        self.qkv = nn.Linear(cfg["d_model"], (H + 2 * G) * K, bias=bool(cfg.get("qkv_bias", False)))
        self.out = nn.Linear(H * K, cfg["d_model"], bias=False)
        self.qk_norm = cfg.get("qk_norm", "none")
        if self.qk_norm != "none":
            per_head = self.qk_norm == "head"
            self.q_norm = MixtureLMRMSNorm(K if per_head else H * K, cfg["norm_eps"])
            self.k_norm = MixtureLMRMSNorm(K if per_head else G * K, cfg["norm_eps"])

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                allowed_BTT: torch.Tensor) -> torch.Tensor:
        """allowed_BTT[b, i, j]: query i of row b may attend key j."""
        B, T, _ = x_BTD.shape
        H, G, K = self.n_heads, self.kv_heads, self.head_dim
        qkv = self.qkv(x_BTD).view(B, T, H + 2 * G, K)
        q, k, v = qkv[:, :, :H], qkv[:, :, H:H + G], qkv[:, :, H + G:]
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        elif self.qk_norm == "full":
            q = self.q_norm(q.reshape(B, T, H * K)).view(B, T, H, K)
            k = self.k_norm(k.reshape(B, T, G * K)).view(B, T, G, K)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed_BTT[:, None])
        return self.out(y.transpose(1, 2).reshape(B, T, H * K))


class MixtureLMSwiGLU(nn.Module):
    """down(silu(gate x) * up x), gate and up fused as gate_up = [gate | up]."""

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * d_hidden, bias=False)
        self.down = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


# ----------------------------------------------------------------------------------------------
# Mixture-of-Experts

class MixtureLMRouter(nn.Module):
    """A linear gate over the real and no-op experts (and the noisy router's unused noise projection, the
    sigmoid_bias router's balancing bias: both are in the state dict)."""

    def __init__(self, d_model: int, n_choices: int, kind: str) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, n_choices, bias=False)
        if kind == "noisy":
            self.noise = nn.Linear(d_model, n_choices, bias=False)  # training noise only: never used here
        if kind == "sigmoid_bias":
            self.register_buffer("bias_E", torch.zeros(n_choices))


class MixtureLMMoE(nn.Module):
    """Token-choice MoE: each token's top-k experts by its router, each expert's SwiGLU output scaled by the
    token's gate, plus the shared experts. A no-op expert (id >= n_experts) computes nothing: its gate still
    counts in the renormalisation, as in mixturelm, and the token keeps only its residual there."""

    def __init__(self, d_model: int, c: dict) -> None:
        super().__init__()
        self.n_experts, self.top_k, self.kind = c["n_experts"], c["top_k"], c["router"]
        # with k = 1 mixturelm never renormalises (the gate would always be 1); switch never does
        self.renormalize = self.kind == "softmax" and c.get("renormalize", True) and self.top_k > 1
        self.route_scale = c.get("route_scale", 1.0)
        self.router = MixtureLMRouter(d_model, c["n_experts"] + c.get("n_noop", 0), self.kind)
        F_ = c["d_expert"]
        self.w_gate_up = nn.Parameter(torch.empty(c["n_experts"], d_model, 2 * F_))  # x @ W, [gate | up]
        self.w_down = nn.Parameter(torch.empty(c["n_experts"], F_, d_model))
        n_shared = c.get("n_shared", 0)
        hidden = (c.get("d_shared") or n_shared * F_) if n_shared else 0
        self.shared = MixtureLMSwiGLU(d_model, hidden) if n_shared else None
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if c.get("shared_gate") else None

    def route(self, x_TD: torch.Tensor) -> tuple:
        """(T, K) chosen expert ids and their float32 gates, as mixturelm's router computes them in eval."""
        logits = fp32_linear(x_TD, self.router.gate.weight)
        if self.kind == "noisy":  # no noise at inference: top k of the clean logits, softmax over those k
            top, chosen = logits.topk(self.top_k, dim=-1)
            return chosen, top.softmax(-1)
        if self.kind == "sigmoid_bias":  # the bias chooses; the unbiased scores of the chosen are the gates
            scores = logits.sigmoid()
            chosen = (scores + self.router.bias_E).topk(self.top_k, dim=-1).indices
            gates = scores.gather(1, chosen)
            return chosen, self.route_scale * gates / gates.sum(-1, keepdim=True)
        gates, chosen = logits.softmax(-1).topk(self.top_k, dim=-1)  # softmax and switch
        if self.renormalize:
            gates = gates / gates.sum(-1, keepdim=True)
        return chosen, gates

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
        chosen_TK, gates_TK = self.route(x_TD)
        y_TD = torch.zeros_like(x_TD)
        F_ = self.w_down.shape[1]
        for e in range(self.n_experts):  # a loop over experts: a reference, not a fast path
            token, slot = (chosen_TK == e).nonzero(as_tuple=True)
            if token.numel() == 0:
                continue
            h = x_TD[token] @ self.w_gate_up[e]
            out = (F.silu(h[:, :F_]) * h[:, F_:]) @ self.w_down[e]
            y_TD.index_add_(0, token, out * gates_TK[token, slot, None].to(out.dtype))
        if self.shared is not None:
            shared = self.shared(x_TD)
            if self.shared_gate is not None:  # Qwen2-MoE: a scalar gate per token on the shared experts
                shared = shared * torch.sigmoid(self.shared_gate(x_TD))
            y_TD = y_TD + shared
        return y_TD.reshape(x_BTD.shape)


# ----------------------------------------------------------------------------------------------
# PEER

class MixtureLMQueryWhitening(nn.Module):
    """mixturelm's query whitening at inference: q' = W_h (q - m_h) * weight + bias per head, with m_h the
    running mean and W_h = (C_h + eps * max eig(C_h) * I)^(-1/2) of the running covariance, in float64."""

    def __init__(self, n_heads: int, d_key: int, eps: float = 1e-4) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_heads * d_key))
        self.bias = nn.Parameter(torch.zeros(n_heads * d_key))
        self.register_buffer("running_mean", torch.zeros(n_heads, d_key))
        self.register_buffer("running_cov", torch.eye(d_key).repeat(n_heads, 1, 1))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, q_THQ: torch.Tensor) -> torch.Tensor:
        _, H, Q = q_THQ.shape
        e_HQ, V_HQQ = torch.linalg.eigh(self.running_cov.double())
        e_HQ = e_HQ.clamp_min(0) + self.eps * e_HQ[:, -1:].clamp_min(1e-30)
        W_HQQ = (V_HQQ * e_HQ.rsqrt()[:, None, :]) @ V_HQQ.transpose(1, 2)
        dtype = torch.promote_types(q_THQ.dtype, torch.float32)
        white = torch.einsum("thp,hpq->thq", q_THQ.to(dtype) - self.running_mean.to(dtype), W_HQQ.to(dtype))
        return (white * self.weight.view(H, Q).to(dtype) + self.bias.view(H, Q).to(dtype)).to(q_THQ.dtype)


class MixtureLMPEER(nn.Module):
    """PEER (He 2024): each of H heads retrieves its top-k of N = S*S single-neuron experts by product keys
    and sums act(u_i . x) v_i (GLU: act(g_i . x) (u_i . x) v_i) weighted by the softmax of the k scores."""

    def __init__(self, d_model: int, c: dict) -> None:
        super().__init__()
        self.n_heads, self.top_k, self.d_key = c["n_heads"], c["top_k"], c["d_key"]
        self.n_sub_keys = math.isqrt(c["n_experts"])
        self.activation, self.query_norm_kind = ACTIVATIONS[c["activation"]], c["query_norm"]
        H, Q = self.n_heads, self.d_key
        self.query = nn.Linear(d_model, H * Q, bias=False)
        self.query_norm = {"batch": lambda: nn.BatchNorm1d(H * Q), "layer": lambda: nn.LayerNorm(Q),
                           "none": nn.Identity, "whiten": lambda: MixtureLMQueryWhitening(H, Q)}[self.query_norm_kind]()
        self.sub_keys = nn.Parameter(torch.empty(2, H if c.get("per_head_keys") else 1, self.n_sub_keys, Q // 2))
        self.w_down = nn.Parameter(torch.empty(c["n_experts"], d_model))  # u_i
        self.w_up = nn.Parameter(torch.empty(c["n_experts"], d_model))  # v_i
        self.w_gate = nn.Parameter(torch.empty(c["n_experts"], d_model)) if c.get("glu") else None  # g_i

    def queries(self, x_TD: torch.Tensor) -> torch.Tensor:
        """(T, H, Q) normalised queries; batch norm always with its running statistics (eval)."""
        q = self.query(x_TD)
        norm = self.query_norm
        if self.query_norm_kind == "batch":
            q = F.batch_norm(q, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)
        q_THQ = q.view(x_TD.shape[0], self.n_heads, self.d_key)
        return norm(q_THQ) if self.query_norm_kind in ("layer", "whiten") else q_THQ

    def retrieve(self, q_THQ: torch.Tensor) -> tuple:
        """Expert ids (T, H, K) and their scores q . [c_a; c'_b], exactly the top k of all N: the top k of
        each half's sub-key scores, then the top k of their k x k sums (Lample et al. 2019)."""
        T, H, Q = q_THQ.shape
        K, S, P = self.top_k, self.n_sub_keys, Q // 2
        keys = self.sub_keys.expand(2, H, S, P)  # shared sub-keys: the same for every head
        s1 = torch.einsum("thp,hsp->ths", q_THQ[..., :P], keys[0])
        s2 = torch.einsum("thp,hsp->ths", q_THQ[..., P:], keys[1])
        v1, a = s1.topk(K, dim=-1)
        v2, b = s2.topk(K, dim=-1)
        best, pos = (v1[..., :, None] + v2[..., None, :]).reshape(T, H, K * K).topk(K, dim=-1)
        ids = a.gather(-1, pos // K) * S + b.gather(-1, pos % K)
        return ids, best

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
        ids_THK, score_THK = self.retrieve(self.queries(x_TD))
        T = x_TD.shape[0]
        ids_TJ = ids_THK.reshape(T, -1)
        g_TJ = score_THK.to(torch.promote_types(score_THK.dtype, torch.float32)).softmax(-1).reshape(T, -1)
        h_TJ = torch.einsum("tjd,td->tj", self.w_down[ids_TJ], x_TD)  # u_i . x
        if self.w_gate is not None:
            a_TJ = self.activation(torch.einsum("tjd,td->tj", self.w_gate[ids_TJ], x_TD)) * h_TJ
        else:
            a_TJ = self.activation(h_TJ)
        w_TJ = a_TJ * g_TJ.to(a_TJ.dtype)
        return torch.einsum("tj,tjd->td", w_TJ, self.w_up[ids_TJ]).reshape(x_BTD.shape)


# ----------------------------------------------------------------------------------------------
# Blocks

def build_ffn(kind: str, spec: dict, cfg: dict) -> nn.Module:
    if kind == "moe":
        return MixtureLMMoE(cfg["d_model"], spec["moe"])
    if kind == "peer":
        return MixtureLMPEER(cfg["d_model"], spec["peer"])
    return MixtureLMSwiGLU(cfg["d_model"], spec.get("ffn_hidden") or cfg["d_ffn"])


class MixtureLMBlock(nn.Module):
    """x + attn(norm(x)), then + ffn(norm(x)), with the mechanisms beside the FFN added to its output."""

    def __init__(self, spec: dict, cfg: dict) -> None:
        super().__init__()
        self.attn_norm = MixtureLMRMSNorm(cfg["d_model"], cfg["norm_eps"])
        self.attn = MixtureLMAttention(cfg)
        self.ffn_norm = MixtureLMRMSNorm(cfg["d_model"], cfg["norm_eps"])
        self.ffn = build_ffn(spec.get("ffn", "dense"), spec, cfg)
        self.beside = nn.ModuleList(build_ffn(kind, spec, cfg) for kind in spec.get("beside", []))

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        y = self.ffn(h)
        for extra in self.beside:
            y = y + extra(h)
        return y

    def forward(self, x: torch.Tensor, cos, sin, allowed_BTT, valid_BT) -> torch.Tensor:
        h = x + self.attn(self.attn_norm(x), cos, sin, allowed_BTT)
        return h + self.mlp(self.ffn_norm(h))

    def branch(self, x: torch.Tensor, cos, sin, allowed_BTT) -> torch.Tensor:
        """f with forward(x) = x + f(x): what Mixture-of-Depths scales by the router weight."""
        a = self.attn(self.attn_norm(x), cos, sin, allowed_BTT)
        return a + self.mlp(self.ffn_norm(x + a))


class MixtureLMMoD(nn.Module):
    """Mixture-of-Depths around a block with mixturelm's causal rule: a token enters when its causal score (the
    router weight r = w . x, or the predictor's logit) is above the threshold. Entering tokens attend only to
    the entering tokens before them (a skipped token writes no key in the block) and become x + g(r) f(x),
    g(r) = r or sigmoid(r); the others pass unchanged. Running the block on every token under that mask gives
    the entering tokens what mixturelm computes on them gathered; the others' results are dropped."""

    def __init__(self, spec: dict, cfg: dict) -> None:
        super().__init__()
        c = spec["mod"]
        d = cfg["d_model"]
        self.gate = c.get("gate", "linear")
        self.block = MixtureLMBlock(spec, cfg)
        self.router = nn.Linear(d, 1, bias=False)
        self.predictor = None
        if c["causal"] == "predictor":
            hidden = c.get("predictor_hidden") or max(1, d // 2)
            self.predictor = nn.Sequential(nn.Linear(d, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        # the sampling threshold (0, or calibrated in training) and its running state: all in the state dict
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_ema", torch.zeros(()))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor, cos, sin, allowed_BTT, valid_BT) -> torch.Tensor:
        r_BT = fp32_linear(x, self.router.weight).squeeze(-1)
        score_BT = r_BT if self.predictor is None else \
            self.predictor(x.to(self.predictor[0].weight.dtype)).squeeze(-1).float()
        enter_BT = (score_BT > self.threshold) & valid_BT  # padding never enters
        T = x.shape[1]
        # each token may always see itself, so no softmax row is empty (a skipped token's result is dropped)
        allowed = (allowed_BTT & enter_BT[:, :, None] & enter_BT[:, None, :]) | torch.eye(
            T, dtype=torch.bool, device=x.device)
        f = self.block.branch(x, cos, sin, allowed)
        w_BT = r_BT if self.gate == "linear" else torch.sigmoid(r_BT)
        return torch.where(enter_BT[..., None], x + w_BT[..., None].to(f.dtype) * f, x)


class MixtureLMModel(nn.Module):
    """mixturelm's MixtureLM at inference: embed, blocks, final norm, logits (the embedding when tied)."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg["vocab_size"], cfg["d_model"])
        specs = cfg.get("blocks") or [{}] * cfg["n_layers"]
        self.blocks = nn.ModuleList(MixtureLMMoD(s, cfg) if s.get("wrapper", "none") == "mod"
                                    else MixtureLMBlock(s, cfg) for s in specs)
        self.norm = MixtureLMRMSNorm(cfg["d_model"], cfg["norm_eps"])
        tied = cfg.get("tie_embeddings", True)
        self.head = None if tied else nn.Linear(cfg["d_model"], cfg["vocab_size"], bias=False)

    def forward(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        if attention_mask is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=x.device)
        elif attention_mask.dim() != 2:
            raise ValueError("mixturelm remote code takes a 2-D attention_mask (batch, tokens) of 1 for real tokens "
                             f"and 0 for padding, got shape {tuple(attention_mask.shape)}")
        else:
            valid = attention_mask.to(device=x.device).bool()
        # positions count real tokens only, so a left-padded row is rotated as it would be alone
        positions = (valid.long().cumsum(-1) - 1).clamp_min(0)
        c = self.cfg
        head_dim = c.get("d_head") or c["d_model"] // c["n_heads"]
        inv_freq = rope_inv_freq(head_dim, c["rope_theta"], c.get("rope_scaling"), x.device)
        angles = positions.to(torch.float32)[..., None] * inv_freq
        cos, sin = angles.cos(), angles.sin()
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        eye = torch.eye(T, dtype=torch.bool, device=x.device)
        allowed = (causal & valid[:, None, :]) | eye  # padding is never attended to (it sees itself)
        for block in self.blocks:
            x = block(x, cos, sin, allowed, valid)
        x = self.norm(x)
        return F.linear(x, self.embed.weight) if self.head is None else self.head(x)


# ----------------------------------------------------------------------------------------------
# The transformers model

class MixtureLMForCausalLM(PreTrainedModel, GenerationMixin):
    """A mixturelm model for transformers (see the module docstring): logits, the LM loss given labels, and
    generation by recomputing the whole sequence at every step (no KV cache)."""

    config_class = MixtureLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["MixtureLMBlock", "MixtureLMMoD"]
    _tied_weights_keys = None  # tied: the logits are computed with the embedding itself, no lm_head exists
    supports_gradient_checkpointing = False

    def __init__(self, config: MixtureLMConfig) -> None:
        super().__init__(config)
        check_supported(config.mixturelm)
        self.model = MixtureLMModel(config.mixturelm)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Parameters for a model built from its config alone (loading overwrites them); mixturelm's init
        std. Buffers (thresholds, biases, running statistics) start as each module's constructor sets them."""
        std = self.config.mixturelm.get("init_std", 0.02)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (MixtureLMRMSNorm, nn.LayerNorm, nn.BatchNorm1d, MixtureLMQueryWhitening)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, MixtureLMMoE):
            nn.init.normal_(module.w_gate_up, 0.0, std)
            nn.init.normal_(module.w_down, 0.0, std)
        elif isinstance(module, MixtureLMPEER):
            bound = (module.d_key // 2) ** -0.5
            nn.init.uniform_(module.sub_keys, -bound, bound)
            for table in (module.w_down, module.w_up, module.w_gate):
                if table is not None:
                    nn.init.normal_(table, 0.0, std)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Module | None:
        return self.model.head

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, past_key_values: Any = None,
                use_cache: bool | None = None, inputs_embeds: torch.Tensor | None = None,
                return_dict: bool | None = None, **kwargs: Any) -> CausalLMOutputWithPast:
        """The whole sequence every call: past_key_values and use_cache are accepted and ignored (no cache);
        other keyword arguments of transformers' generation (position_ids, cache_position, ...) likewise."""
        logits = self.model(input_ids, attention_mask, inputs_embeds)
        loss = None
        if labels is not None:  # next-token loss: logits at i predict labels at i + 1; -100 is ignored
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        out = CausalLMOutputWithPast(loss=loss, logits=logits)  # no cache to return
        return out if return_dict is not False else out.to_tuple()

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                                      **kwargs: Any) -> dict:
        """Every step gets the full ids (no cache to continue from)."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}


__all__ = ["MixtureLMConfig", "MixtureLMForCausalLM", "check_supported"]
