"""The analytic FLOP count against torch's FlopCounterMode (within 2 %), forward and training."""

from __future__ import annotations

import math

import pytest
import torch

from mixturelm import MixtureLM, ModelConfig
from mixturelm.presets import PRESETS, get_preset
from mixturelm.flops import flop_counter, forward_flops_breakdown, forward_flops_per_token, train_flops_per_token

CONFIGS = {
    "debug": ModelConfig(**PRESETS["dense-debug"].model),
    "gqa-untied": ModelConfig(vocab_size=300, d_model=64, n_layers=3, n_heads=8, n_kv_heads=2, d_ffn=160,
                              max_seq_len=96, tie_embeddings=False),
    "moe": ModelConfig(**PRESETS["moe-debug"].model),
    "moe-fine-grained-shared": ModelConfig(**PRESETS["moe-fg-debug"].model),
    "moe-noisy-expert-choice": ModelConfig(
        vocab_size=257, d_model=32, n_layers=2, n_heads=4, d_ffn=64, max_seq_len=32,
                                           blocks=[{"ffn": "moe", "moe": {"router": "noisy", "d_expert": 32}},
                                                   {"ffn": "moe", "moe": {"router": "expert_choice", "d_expert": 32,
                                                                          "capacity_factor": 2.0}}]),
    "mod": ModelConfig(**PRESETS["mod-debug"].model),
    "mod-predictor-gqa": ModelConfig(vocab_size=257, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ffn=96,
                                     max_seq_len=64, blocks=[{}, {"wrapper": "mod",
                                                                   "mod": {"capacity": 0.3, "causal": "predictor"}}]),
    "mode-staged": ModelConfig(**PRESETS["mode-staged-debug"].model),
    "peer": ModelConfig(**PRESETS["peer-debug"].model),
    "peer-glu-per-head-keys-beside": ModelConfig(
        vocab_size=257, d_model=32, n_layers=2, n_heads=4, d_ffn=64, max_seq_len=32,
        blocks=[{"ffn": "dense", "peer_beside": True, "peer": {"n_experts": 256, "n_heads": 2, "top_k": 4, "d_key": 8,
                                                               "glu": True, "per_head_keys": True}},
                {"ffn": "peer", "peer": {"n_experts": 100, "n_heads": 3, "top_k": 5, "d_key": 6,
                                         "query_norm": "layer"}}]),
    "peer-whitened": ModelConfig(vocab_size=257, d_model=32, n_layers=1, n_heads=4, d_ffn=64, max_seq_len=128,
                                 blocks=[{"ffn": "peer", "peer": {"n_experts": 256, "n_heads": 4, "top_k": 4,
                                                                  "d_key": 32, "query_norm": "whiten"}}]),
    "mixed-ffn": ModelConfig(vocab_size=257, d_model=48, n_layers=2, n_heads=4, d_ffn=96, max_seq_len=32,
                             blocks=[{"ffn": "dense"}, {"ffn": "dense", "ffn_hidden": 200}]),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_analytic_flops_match_flop_counter(name):
    cfg = CONFIGS[name]
    B, T = 2, cfg.max_seq_len
    model = MixtureLM(cfg)
    idx = torch.randint(0, cfg.vocab_size, (B, T))
    # the forward count is inference's; in training, whitened queries also compute the batch covariance
    # (2*Q*Q*H a token, no backward), which the training count's 3x of the whitening matmul covers; at
    # eval their matrix is computed once (the warm-up call) and kept
    model.train("whitened" not in name)
    if "whitened" in name:
        model(idx)
    with flop_counter() as fc:
        model(idx)
    measured_fwd = fc.get_total_flops() / (B * T)
    model.train()
    with flop_counter() as fc:
        out = model(idx, idx)
        (out.loss if out.aux_loss is None else out.loss + out.aux_loss).backward()
    measured_train = fc.get_total_flops() / (B * T)
    assert measured_fwd == pytest.approx(forward_flops_per_token(cfg, T), rel=0.02)
    assert measured_train == pytest.approx(train_flops_per_token(cfg, T), rel=0.02)


def test_attention_scores_grow_with_sequence_and_the_rest_does_not():
    cfg = CONFIGS["debug"]
    a, b = forward_flops_breakdown(cfg, 64), forward_flops_breakdown(cfg, 128)
    assert b["attn_scores"] == 2 * a["attn_scores"]
    assert all(a[k] == b[k] for k in a if k != "attn_scores")
    assert a["ffn"] == cfg.n_layers * 6 * cfg.d_model * cfg.d_ffn


def test_mod_block_costs_capacity_times_linear_and_capacity_squared_scores():
    dense, mod = ModelConfig(**PRESETS["dense-debug"].model), ModelConfig(**PRESETS["mod-debug"].model)
    T = 64  # capacity 12.5 %: 8 tokens enter
    a, b = forward_flops_breakdown(dense, T), forward_flops_breakdown(mod, T)
    # layer 1 of 2 is routed
    assert b["attn_scores"] == pytest.approx(a["attn_scores"] / 2 * (1 + (8 / 64) ** 2))
    assert b["ffn"] == pytest.approx(a["ffn"] / 2 * (1 + 8 / 64))
    assert b["mod_router"] == 2 * mod.d_model


def test_integrated_mode_counts_the_real_share_of_expert_slots():
    """No-op experts: the analytic count assumes balanced routing (k E / (E + Z) real experts per token);
    FlopCounterMode sees the realised share, which the layer reports as noop_fraction."""
    cfg = ModelConfig(**PRESETS["mode-debug"].model)
    torch.manual_seed(0)
    model = MixtureLM(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len))
    with flop_counter() as fc:
        out = model(idx)
    m = cfg.blocks[0].moe
    real_share = torch.stack([v for k, v in out.stats().items() if k.endswith("noop_fraction")]).mean().item()
    analytic = forward_flops_breakdown(cfg, cfg.max_seq_len)
    expected = analytic["experts"] * (1 - real_share) / (m.n_experts / (m.n_experts + m.n_noop))
    measured = fc.get_total_flops() / idx.numel() - (sum(analytic.values()) - analytic["experts"])
    assert measured == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("preset", ["dense-debug", "moe-debug", "mod-debug", "mode-debug", "peer-debug"])
def test_active_params_by_hand(preset):
    """Parameters one token uses: counted here from the parameter names and the configs, by hand."""
    from mixturelm.flops import active_params

    cfg = ModelConfig(**get_preset(preset).model)
    model = MixtureLM(cfg)
    T = 64
    expected = 0.0
    for name, p in model.named_parameters():
        share = 1.0
        if name.startswith("blocks."):
            spec = cfg.block_spec(int(name.split(".")[1]))
            if spec.wrapper == "mod" and ".block." in name:
                share *= math.ceil(spec.mod.capacity * T) / T
            if spec.ffn == "moe" and name.endswith(("ffn.w_gate_up", "ffn.w_down")):
                share *= spec.moe.top_k * spec.moe.n_experts / (spec.moe.n_experts + spec.moe.n_noop) / spec.moe.n_experts
            if spec.ffn == "peer" and name.endswith(("ffn.w_down", "ffn.w_up")):
                share *= spec.peer.n_heads * spec.peer.top_k / spec.peer.n_experts
        expected += share * p.numel()
    assert active_params(model, cfg, T) == pytest.approx(expected, rel=1e-12)
    assert (active_params(model, cfg, T) < model.num_params()) == (preset != "dense-debug")
