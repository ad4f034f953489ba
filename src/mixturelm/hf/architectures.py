"""How each Hugging Face architecture maps onto mixturelm's model: its config, and its weights name by name.

One table per direction would drift apart, so each architecture is described once: `model_config()` reads a
transformers config into a ModelConfig, `hf_config()` writes one back, and `weight_parts()` lists, for every
tensor of mixturelm's state dict, the Hugging Face tensors it is made of and how (one for one, concatenated
along the output dimension, or the experts stacked and transposed). Import and export both walk that list.

Names are those of checkpoints on the Hub (what `save_pretrained` writes): Mixtral's experts as
`block_sparse_moe.experts.{e}.w1/w3/w2`, the others' as `mlp.experts.{e}.gate_proj/up_proj/down_proj`.
transformers 5 holds experts fused in memory (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`); a
folder saved in that form is read too (weights.HFWeights).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import BlockSpec, ModelConfig
from ..errors import UsageError
from ..layers.moe import MoEConfig
from ..mechanisms import registry


@dataclass(frozen=True)
class Architecture:
    model_type: str  # transformers' config.model_type
    causal_lm: str  # its *ForCausalLM class
    config_class: str  # its config class
    moe_prefix: str = "mlp"  # where the MoE block sits in a layer, as saved on the Hub
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # an expert's gate, up, down
    qk_norm: str = "none"
    qkv_bias: bool = False
    shared_expert: bool = False


ARCHITECTURES = {a.model_type: a for a in (
    Architecture("llama", "LlamaForCausalLM", "LlamaConfig"),
    Architecture("mixtral", "MixtralForCausalLM", "MixtralConfig", moe_prefix="block_sparse_moe",
                 expert_names=("w1", "w3", "w2")),
    Architecture("qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3MoeConfig", qk_norm="head"),
    Architecture("olmoe", "OlmoeForCausalLM", "OlmoeConfig", qk_norm="full"),
    Architecture("qwen2_moe", "Qwen2MoeForCausalLM", "Qwen2MoeConfig", qkv_bias=True, shared_expert=True),
)}
NOT_YET = {"deepseek_v3": "its multi-head latent attention (MLA) is not implemented in mixturelm",
           "deepseek_v2": "its multi-head latent attention (MLA) is not implemented in mixturelm"}


def architecture(model_type: str | None, where: str) -> Architecture:
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    why = f" ({NOT_YET[model_type]})" if model_type in NOT_YET else ""
    raise UsageError(f"{where}: architecture {model_type!r} is not supported{why}; mixturelm imports "
                     f"{', '.join(ARCHITECTURES)}")


# ----------------------------------------------------------------------------------------------
# configs

def _refuse(where: str, what: str) -> None:
    raise UsageError(f"{where}: {what}; mixturelm's model has no such option, so it cannot compute the same "
                     "function: convert another checkpoint")


def model_config(hf, arch: Architecture, where: str) -> ModelConfig:
    """The ModelConfig computing what the transformers config `hf` describes; options ours lacks refused."""
    g = lambda name, default=None: getattr(hf, name, default)  # noqa: E731
    if g("hidden_act", "silu") != "silu":
        _refuse(where, f"hidden_act={g('hidden_act')!r} (mixturelm's FFNs are SwiGLU: silu)")
    if g("attention_bias", False):
        _refuse(where, "attention_bias=true (biases on every attention projection)")
    if g("mlp_bias", False):
        _refuse(where, "mlp_bias=true")
    if g("quantization_config") is not None:
        quant = g("quantization_config")
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", "?")
        raise UsageError(f"{where}: the checkpoint is quantized ({method}); mixturelm imports float16, bfloat16 and "
                         "float32 weights: dequantize it with transformers first (or use the unquantized release)")
    if g("clip_qkv") is not None:
        _refuse(where, f"clip_qkv={g('clip_qkv')}")
    if g("use_sliding_window", False) or (arch.model_type == "mixtral" and g("sliding_window") is not None):
        _refuse(where, f"sliding-window attention (sliding_window={g('sliding_window')})")
    rope = dict(g("rope_parameters") or {})
    theta = float(rope.pop("rope_theta", g("rope_theta", 10000.0)))
    scaling = rope if rope.get("rope_type", "default") != "default" else None
    if rope.pop("partial_rotary_factor", 1.0) != 1.0 or g("partial_rotary_factor", 1.0) != 1.0:
        _refuse(where, "partial rotary embeddings (partial_rotary_factor)")
    if scaling is not None:
        if scaling.get("rope_type") not in ("linear", "llama3"):
            _refuse(where, f"rope scaling {scaling.get('rope_type')!r} (mixturelm has linear and llama3)")
    d, heads = hf.hidden_size, hf.num_attention_heads
    head_dim = g("head_dim") or d // heads
    kv = g("num_key_value_heads") or heads
    cfg = dict(vocab_size=hf.vocab_size, d_model=d, n_layers=hf.num_hidden_layers, n_heads=heads,
               n_kv_heads=None if kv == heads else kv, d_ffn=hf.intermediate_size,
               max_seq_len=g("max_position_embeddings", 2048), rope_theta=theta, norm_eps=float(g("rms_norm_eps", 1e-6)),
               tie_embeddings=bool(g("tie_word_embeddings", False)), d_head=None if head_dim * heads == d else head_dim,
               qk_norm=arch.qk_norm, qkv_bias=bool(g("qkv_bias", True)) if arch.qkv_bias else False,
               rope_scaling=scaling,
               # the checkpoint's own balance coefficient for further training; transformers' MoEs have no z-loss
               aux_loss_weights=registry.default_loss_weights() | {
                   "balance": float(g("router_aux_loss_coef", 0.0) or 0.0), "z": 0.0})
    if arch.model_type != "llama":
        cfg["blocks"] = [_block(hf, arch, i) for i in range(hf.num_hidden_layers)]
    return ModelConfig(**cfg)


def _is_moe_layer(hf, arch: Architecture, i: int) -> bool:
    """Qwen's MoE models may keep some layers dense (mlp_only_layers, decoder_sparse_step)."""
    if arch.model_type in ("mixtral", "olmoe"):
        return True
    step = getattr(hf, "decoder_sparse_step", 1) or 1
    return i not in (getattr(hf, "mlp_only_layers", None) or []) and hf.num_experts > 0 and (i + 1) % step == 0


def _block(hf, arch: Architecture, i: int) -> BlockSpec:
    if not _is_moe_layer(hf, arch, i):
        return BlockSpec("dense")
    n_experts = hf.num_local_experts if arch.model_type == "mixtral" else hf.num_experts
    d_expert = hf.intermediate_size if arch.model_type in ("mixtral", "olmoe") else hf.moe_intermediate_size
    renormalize = arch.model_type == "mixtral" or bool(getattr(hf, "norm_topk_prob", False))
    if renormalize and hf.num_experts_per_tok == 1:
        _refuse(f"layer {i}", "top-1 routing with a renormalised gate (always 1.0; mixturelm keeps the probability)")
    moe = MoEConfig(n_experts=n_experts, top_k=hf.num_experts_per_tok, d_expert=d_expert, router="softmax",
                    renormalize=renormalize)
    if arch.shared_expert and hf.shared_expert_intermediate_size:
        moe = MoEConfig(**{**moe.__dict__, "n_shared": 1, "d_shared": hf.shared_expert_intermediate_size,
                           "shared_gate": True})
    return BlockSpec("moe", moe=moe)


# MoE fields that change what a layer computes (impl, bias_rate, ... do not)
_MOE_FUNCTION = ("n_experts", "top_k", "d_expert", "router", "renormalize", "n_shared", "d_shared", "shared_gate",
                 "capacity_factor", "n_noop", "route_scale")


class NotNative(Exception):
    """Why no transformers architecture computes a model exactly."""


def export_architecture(cfg: ModelConfig) -> Architecture | str:
    """The native architecture that computes exactly what `cfg` does, or the reason there is none."""
    try:
        return _native(cfg)
    except NotNative as e:
        return str(e)


def _native(cfg: ModelConfig) -> Architecture:
    specs = [cfg.block_spec(i) for i in range(cfg.n_layers)]
    others = sorted({k for s in specs for k in s.kinds() if k not in ("dense", "moe")})
    if others or any(s.beside for s in specs):
        raise NotNative(f"it uses {', '.join(others)}, which no transformers architecture has")
    dense_sizes = {s.ffn_hidden or cfg.d_ffn for s in specs if s.ffn == "dense"}
    if len(dense_sizes) > 1:
        raise NotNative("its dense layers differ in size (transformers' configs have one intermediate_size)")
    moes = [s.moe for s in specs if s.ffn == "moe"]
    if not moes:
        if cfg.qk_norm != "none" or cfg.qkv_bias:
            raise NotNative("Llama has no query/key norm and no qkv bias")
        return ARCHITECTURES["llama"]
    first = moes[0]
    if any(_moe_function(m) != _moe_function(first) for m in moes):
        raise NotNative("its MoE layers differ from each other")
    _check_router(first)
    has_dense = bool(dense_sizes)
    if first.n_shared:
        if not first.shared_gate or cfg.qk_norm != "none" or not cfg.qkv_bias:
            raise NotNative("shared experts exist natively only in Qwen2-MoE, with a sigmoid gate on them and a qkv "
                            "bias (shared_gate=true, qkv_bias=true)")
        return ARCHITECTURES["qwen2_moe"]
    if cfg.qkv_bias:
        raise NotNative("a qkv bias without shared experts (Qwen2-MoE has both)")
    if cfg.qk_norm == "head":
        return ARCHITECTURES["qwen3_moe"]
    if cfg.qk_norm == "full":
        if has_dense or cfg.head_dim * cfg.n_heads != cfg.d_model:
            raise NotNative("OLMoE keeps every layer MoE and sizes its query/key norms by d_model")
        return ARCHITECTURES["olmoe"]
    if not first.renormalize or first.top_k == 1:
        raise NotNative("unnormalised or top-1 gates without a query/key norm (Mixtral renormalises the top-k gates, "
                        "to 1.0 at top-1; Qwen3-MoE and OLMoE, which do not have to, normalise queries and keys)")
    if has_dense:
        raise NotNative("Mixtral keeps every layer MoE")
    return ARCHITECTURES["mixtral"]


def _moe_function(m: MoEConfig) -> tuple:
    return tuple(getattr(m, f) for f in _MOE_FUNCTION)


def _check_router(m: MoEConfig) -> None:
    if m.router != "softmax":
        raise NotNative(f"its router {m.router!r}: transformers' MoE models use a softmax top-k router")
    if m.capacity_factor is not None:
        raise NotNative("token dropping (capacity_factor): transformers' MoE models are dropless")
    if m.n_noop:
        raise NotNative("no-op experts (integrated MoDE)")


def _norm_topk_prob(m: MoEConfig) -> bool:
    """mixturelm keeps a top-1 gate's probability (a renormalised one would be 1.0 and the router would get
    no gradient), as transformers does with norm_topk_prob=False."""
    return m.renormalize and m.top_k > 1


def hf_config(cfg: ModelConfig, arch: Architecture, eos_id: int | None, bos_id: int | None):
    """The transformers config of `arch` describing `cfg` (export)."""
    import transformers

    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    specs = [cfg.block_spec(i) for i in range(cfg.n_layers)]
    dense_size = next((s.ffn_hidden or cfg.d_ffn for s in specs if s.ffn == "dense"), cfg.d_ffn)
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                  num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                  intermediate_size=dense_size, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                  rope_parameters=rope, tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu",
                  eos_token_id=eos_id, bos_token_id=bos_id, pad_token_id=None, attention_bias=False)
    moe = next((s.moe for s in specs if s.ffn == "moe"), None)
    if moe is not None:
        common |= dict(num_experts_per_tok=moe.top_k, router_aux_loss_coef=cfg.aux_loss_weights.get("balance", 0.0))
    if arch.model_type == "mixtral":
        common |= dict(num_local_experts=moe.n_experts, intermediate_size=moe.d_expert, sliding_window=None)
    elif arch.model_type == "olmoe":
        common |= dict(num_experts=moe.n_experts, intermediate_size=moe.d_expert, norm_topk_prob=_norm_topk_prob(moe),
                       clip_qkv=None)
    elif arch.model_type in ("qwen3_moe", "qwen2_moe"):
        common |= dict(num_experts=moe.n_experts, moe_intermediate_size=moe.d_expert, norm_topk_prob=_norm_topk_prob(moe),
                       decoder_sparse_step=1, mlp_only_layers=[i for i, s in enumerate(specs) if s.ffn == "dense"],
                       use_sliding_window=False)
        if arch.model_type == "qwen2_moe":
            common |= dict(shared_expert_intermediate_size=moe.shared_hidden, qkv_bias=True)
    return getattr(transformers, arch.config_class)(**common)


# ----------------------------------------------------------------------------------------------
# weights

@dataclass(frozen=True)
class Part:
    """One tensor of mixturelm's state dict and the Hugging Face tensors it is made of.

    how: "same" (one tensor, same layout), "rows" (the HF tensors concatenated along dim 0: q, k, v into
    the fused qkv; gate and up into the fused gate_up), "experts_gate_up" (per expert [gate; up] (2F, D),
    stacked and transposed to (E, D, 2F)), "experts_down" (per expert (D, F) -> (E, F, D))."""

    ours: str
    hf: tuple[str, ...]
    how: str = "same"


def weight_parts(cfg: ModelConfig, arch: Architecture) -> list[Part]:
    parts = [Part("embed.weight", ("model.embed_tokens.weight",)), Part("norm.weight", ("model.norm.weight",))]
    if not cfg.tie_embeddings:
        parts.append(Part("head.weight", ("lm_head.weight",)))
    for i in range(cfg.n_layers):
        parts += _layer_parts(cfg, arch, i)
    return parts


def _layer_parts(cfg: ModelConfig, arch: Architecture, i: int) -> list[Part]:
    ours, hf = f"blocks.{i}.", f"model.layers.{i}."
    a = hf + "self_attn."
    parts = [Part(ours + "attn_norm.weight", (hf + "input_layernorm.weight",)),
             Part(ours + "ffn_norm.weight", (hf + "post_attention_layernorm.weight",)),
             Part(ours + "attn.qkv.weight", (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"), "rows"),
             Part(ours + "attn.out.weight", (a + "o_proj.weight",))]
    if cfg.qkv_bias:
        parts.append(Part(ours + "attn.qkv.bias", (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"), "rows"))
    if cfg.qk_norm != "none":
        parts += [Part(ours + "attn.q_norm.weight", (a + "q_norm.weight",)),
                  Part(ours + "attn.k_norm.weight", (a + "k_norm.weight",))]
    spec = cfg.block_spec(i)
    if spec.ffn == "dense":
        m = hf + "mlp."
        return parts + [Part(ours + "ffn.gate_up.weight", (m + "gate_proj.weight", m + "up_proj.weight"), "rows"),
                        Part(ours + "ffn.down.weight", (m + "down_proj.weight",))]
    moe, m = spec.moe, hf + arch.moe_prefix + "."
    gate, up, down = arch.expert_names
    experts = range(moe.n_experts)
    parts += [Part(ours + "ffn.router.gate.weight", (m + "gate.weight",)),
              Part(ours + "ffn.w_gate_up", tuple(f"{m}experts.{e}.{n}.weight" for e in experts for n in (gate, up)),
                   "experts_gate_up"),
              Part(ours + "ffn.w_down", tuple(f"{m}experts.{e}.{down}.weight" for e in experts), "experts_down")]
    if moe.n_shared:
        s = m + "shared_expert."
        parts += [Part(ours + "ffn.shared.gate_up.weight", (s + "gate_proj.weight", s + "up_proj.weight"), "rows"),
                  Part(ours + "ffn.shared.down.weight", (s + "down_proj.weight",)),
                  Part(ours + "ffn.shared_gate.weight", (m + "shared_expert_gate.weight",))]
    return parts
