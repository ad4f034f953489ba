"""The model against slow references: attention, RoPE, causality, the KV cache, weight tying."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mixturelm import MixtureLM, ModelConfig, UsageError
from mixturelm.config import BlockSpec
from mixturelm.flops import forward_flops_breakdown
from mixturelm.layers.attention import Attention, apply_rope, rope_angles


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**({"vocab_size": 61, "d_model": 32, "n_layers": 2, "n_heads": 4, "d_ffn": 48,
                           "max_seq_len": 64} | kw))


def test_rope_matches_complex_rotation():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)  # B H T K
    pos = torch.tensor([0, 1, 7, 100, 3])
    cos, sin = rope_angles(pos, 8, 10000.0)
    got = apply_rope(x, cos.double(), sin.double())
    # reference: pair (i, i + K/2) as a complex number, rotated by pos * theta^(-2i/K)
    z = torch.complex(x[..., :4], x[..., 4:])
    freq = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    rot = torch.polar(torch.ones(5, 4, dtype=torch.float64), pos[:, None].double() * freq)
    want = torch.cat([(z * rot).real, (z * rot).imag], dim=-1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # angles are computed in float32


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attention_matches_naive_reference(kv_heads):
    torch.manual_seed(0)
    attn = Attention(32, 4, kv_heads).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    rope = tuple(t.double() for t in rope_angles(torch.arange(9), 8, 10000.0))
    got = attn(x, rope)
    q, k, v = attn.qkv(x).view(2, 9, 4 + 2 * kv_heads, 8).transpose(1, 2).split((4, kv_heads, kv_heads), 1)
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    k, v = k.repeat_interleave(4 // kv_heads, 1), v.repeat_interleave(4 // kv_heads, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    scores = scores.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
    want = attn.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 9, 32))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("cfg", [tiny(), tiny(n_kv_heads=2, tie_embeddings=False)], ids=["mha-tied", "gqa-untied"])
def test_cached_decoding_equals_full_recompute(cfg):
    torch.manual_seed(0)
    model = MixtureLM(cfg).double().eval()
    idx = torch.randint(0, cfg.vocab_size, (3, 40))
    full = model(idx).logits
    cache = model.new_cache(3, 40)
    pieces = [model(idx[:, :17], cache=cache).logits]  # prefill
    pieces += [model(idx[:, t:t + 1], cache=cache).logits for t in range(17, 30)]  # one token at a time
    pieces.append(model(idx[:, 30:], cache=cache).logits)  # a chunk after a cached prefix
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-10)
    assert cache.length == 40


def test_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = MixtureLM(tiny()).double()
    a = torch.randint(0, 61, (2, 20))
    b = a.clone()
    b[:, 12:] = torch.randint(0, 61, (2, 8))
    torch.testing.assert_close(model(a).logits[:, :12], model(b).logits[:, :12])
    assert not torch.allclose(model(a).logits[:, 12:], model(b).logits[:, 12:])


def test_weight_tying_and_param_counts():
    tied, untied = MixtureLM(tiny()), MixtureLM(tiny(tie_embeddings=False))
    assert tied.head is None and untied.head is not None
    assert untied.num_params() - tied.num_params() == 61 * 32
    idx = torch.tensor([[1, 2, 3]])
    h = tied.embed(idx)
    for block in tied.blocks:
        h, _ = block(h, rope_angles(torch.arange(3), 8, 10000.0))
    torch.testing.assert_close(tied(idx).logits, F.linear(tied.norm(h), tied.embed.weight))


def test_loss_is_mean_cross_entropy():
    torch.manual_seed(0)
    model = MixtureLM(tiny()).double()
    idx, tgt = torch.randint(0, 61, (2, 10)), torch.randint(0, 61, (2, 10))
    out = model(idx, tgt)
    logp = out.logits.log_softmax(-1)
    want = -logp.gather(-1, tgt[..., None]).mean()
    torch.testing.assert_close(out.loss, want.float() if out.loss.dtype == torch.float32 else want)


@pytest.mark.parametrize("kw,needle", [
    ({"d_model": 30, "n_heads": 4}, "not divisible by n_heads"),
    ({"n_layers": 0}, "n_layers must be a positive integer"),
    ({"d_ffn": -1}, "d_ffn must be a positive integer"),
    ({"n_kv_heads": 3}, "not divisible by n_kv_heads"),
    ({"d_model": 30, "n_heads": 6}, "odd"),
    ({"blocks": [{"ffn": "dense"}]}, "one BlockSpec per layer"),
    ({"blocks": [{"ffn": "nope"}, {"ffn": "dense"}]}, "BlockSpec.ffn='nope' is unknown"),
])
def test_config_errors_name_the_field(kw, needle):
    with pytest.raises(UsageError, match=needle):
        tiny(**kw)


def test_config_round_trips_through_dict():
    cfg = tiny(blocks=[{"ffn": "dense"}, {"ffn": "dense", "ffn_hidden": 20}])
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.block_spec(1).ffn_hidden == 20
    assert MixtureLM(again).blocks[1].ffn.d_hidden == 20


def test_fused_autograd_functions_pass_gradcheck():
    from mixturelm.layers.attention import QKVRope
    from mixturelm.layers.ffn import swiglu_activation

    torch.manual_seed(0)
    gu = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu_activation, (gu,))
    assert torch.autograd.gradcheck(swiglu_activation, (gu, scale))
    qkv = torch.randn(2, 5, 4 + 2 * 2, 6, dtype=torch.float64, requires_grad=True)
    cos, sin = (t.double() for t in rope_angles(torch.arange(5), 6, 100.0))
    assert torch.autograd.gradcheck(lambda t: QKVRope.apply(t, cos, sin, 4, 2), (qkv,))
    q, k, v = QKVRope.apply(qkv, cos, sin, 4, 2)  # and it is the plain rotation
    torch.testing.assert_close(q.transpose(1, 2), apply_rope(qkv[:, :, :4].transpose(1, 2), cos, sin))
    torch.testing.assert_close(k.transpose(1, 2), apply_rope(qkv[:, :, 4:6].transpose(1, 2), cos, sin))
    assert torch.equal(v, qkv[:, :, 6:])


# ----------------------------------------------------------------------------------------------
# Any block any mechanism can describe survives the trip through JSON, and is counted

MOE = st.builds(dict, n_experts=st.integers(2, 16), top_k=st.integers(1, 2), d_expert=st.integers(1, 64),
                router=st.sampled_from(["softmax", "noisy", "sigmoid_bias", "expert_choice"]),
                n_shared=st.integers(0, 2))
MOD = st.builds(dict, capacity=st.floats(0.01, 1.0), causal=st.sampled_from(["aux_loss", "predictor"]),
                gate=st.sampled_from(["linear", "sigmoid"]))
PEER_ = st.builds(dict, n_experts=st.sampled_from([16, 64, 256]), n_heads=st.integers(1, 4), top_k=st.integers(1, 4),
                  d_key=st.sampled_from([4, 8]), query_norm=st.sampled_from(["batch", "layer", "none", "whiten"]))


@st.composite
def block_dicts(draw) -> dict:
    ffn = draw(st.sampled_from(["dense", "moe", "peer"]))
    block = {"ffn": ffn, "wrapper": draw(st.sampled_from(["none", "mod"]))}
    if ffn == "moe":
        block["moe"] = draw(MOE)
    if ffn == "peer" or (ffn != "peer" and draw(st.booleans())):
        block["peer"] = draw(PEER_)
        if ffn != "peer":
            block["beside"] = ["peer"]
    if block["wrapper"] == "mod":
        block["mod"] = draw(MOD)
    return block


@settings(max_examples=40, deadline=None)
@given(st.lists(block_dicts(), min_size=1, max_size=3))
def test_any_block_spec_round_trips_and_is_counted(blocks):
    cfg = ModelConfig(d_model=16, n_layers=len(blocks), n_heads=2, d_ffn=32, max_seq_len=32, blocks=blocks)
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and [b.kinds() for b in again.blocks] == [BlockSpec.from_dict(b).kinds() for b in blocks]
    parts = forward_flops_breakdown(cfg, 32)
    assert all(v > 0 for v in parts.values())
    with torch.device("meta"):
        model = MixtureLM(cfg)
    assert len(model.blocks) == len(blocks)
