"""Mixture-of-Depths and MoDE against slow references written here, in float64.

The reference runs the block on EVERY token with an attention mask (token i may attend token j when
both entered the block and j <= i) and rotates by positions 0..T-1: no gathering, no compaction, no
cache. The layer under test gathers the entering tokens, runs the block on them alone and scatters
back, and with a cache keeps a ragged per-row KV cache.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mixturelm import MixtureLM, ModelConfig, UsageError
from mixturelm.config import BlockSpec
from mixturelm.layers import kernels
from mixturelm.layers.attention import apply_rope, rope_angles
from mixturelm.layers.mod import MoD, MoDAux, MoDConfig, capacity_tokens
from mixturelm.layers.moe import MoE
from mixturelm.presets import PRESETS
from mixturelm.model import Block

from conftest import assert_train_refuses, run_cli

D, HEADS, KV_HEADS, T = 32, 4, 2, 16
CFG = ModelConfig(vocab_size=50, d_model=D, n_layers=2, n_heads=HEADS, n_kv_heads=KV_HEADS, d_ffn=48, max_seq_len=64)


def make_mod(capacity: float = 0.25, causal: str = "aux_loss", seed: int = 0) -> MoD:
    torch.manual_seed(seed)
    mod = MoD(Block(BlockSpec(), CFG), D, capacity=capacity, causal=causal).double()
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_(0, 0.3)  # spread the router weights: no near-ties in the top-k
        mod.block.attn_norm.weight.fill_(1.0)
        mod.block.ffn_norm.weight.fill_(1.0)
    return mod


def topk_members(r_BT: torch.Tensor, capacity: float) -> torch.Tensor:
    """Top-C of each row by sorting in Python: the obviously right membership."""
    B, T = r_BT.shape
    member = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        for t in sorted(range(T), key=lambda t: -r_BT[b, t].item())[:capacity_tokens(capacity, T)]:
            member[b, t] = True
    return member


def masked_reference(mod: MoD, x_BTD: torch.Tensor, member_BT: torch.Tensor) -> torch.Tensor:
    """x + r * (attn + ffn) for members, x for the others, with the block run on all tokens under a mask."""
    blk, a = mod.block, mod.block.attn
    B, T, _ = x_BTD.shape
    H, G, K = a.n_heads, a.kv_heads, a.head_dim
    r_BT = x_BTD @ mod.router.weight[0]
    qkv = (F.rms_norm(x_BTD, (D,), blk.attn_norm.weight, CFG.norm_eps) @ a.qkv.weight.t()).view(B, T, H + 2 * G, K)
    q, k, v = (qkv[:, :, :H], qkv[:, :, H:H + G], qkv[:, :, H + G:])
    cos, sin = rope_angles(torch.arange(T), K, CFG.rope_theta)  # original positions
    q, k, v = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2)
    k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = (member_BT[:, None, :, None] & member_BT[:, None, None, :] & causal) | torch.eye(T, dtype=torch.bool)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(K)).masked_fill(~allowed, float("-inf"))
    attn = a.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * K))
    f = attn + blk.ffn(blk.ffn_norm(x_BTD + attn))[0]
    return torch.where(member_BT[..., None], x_BTD + r_BT[..., None] * f, x_BTD)


def rope_for(T: int):
    return rope_angles(torch.arange(T), D // HEADS, CFG.rope_theta)


def grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g, allow_unused=True)


@pytest.mark.parametrize("capacity", [0.125, 0.25, 0.6])
def test_topk_routing_matches_masked_reference_with_gradients(capacity):
    mod = make_mod(capacity)
    x = torch.randn(3, T, D, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, T, D, dtype=torch.float64)
    params = [p for n, p in mod.named_parameters()]
    got, _ = mod(x, rope_for(T))
    member = topk_members((x @ mod.router.weight[0]).detach(), capacity)
    want = masked_reference(mod, x, member)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for name, a, b in zip(["x", *dict(mod.named_parameters())], grads(got, [x, *params], g),
                          grads(want, [x, *params], g)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"gradient of {name}")
    assert member.sum(1).eq(capacity_tokens(capacity, T)).all()


def test_capacity_one_with_unit_weights_is_the_plain_block():
    mod = make_mod(1.0)
    mod.router_weights = lambda x: torch.ones(x.shape[:2], dtype=torch.float64)  # a stub router: r = 1
    x = torch.randn(2, T, D, dtype=torch.float64)
    got, _ = mod(x, rope_for(T))
    want, _ = mod.block(x, rope_for(T))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_skipped_tokens_pass_unchanged_and_r_scales_only_the_branch():
    mod = make_mod(0.25)
    x = torch.randn(2, T, D, dtype=torch.float64)
    got, _ = mod(x, rope_for(T))
    member = topk_members(x @ mod.router.weight[0].detach(), 0.25)
    torch.testing.assert_close(got[~member], x[~member], rtol=0, atol=0)
    doubled = copy.deepcopy(mod)
    doubled.router.weight.data *= 2  # same ranking, twice the weight: the change is r * f, not r * (x + f)
    got2, _ = doubled(x, rope_for(T))
    torch.testing.assert_close((got2 - x)[member], 2 * (got - x)[member], rtol=1e-10, atol=1e-12)


def test_bce_targets_are_per_row_topk_membership():
    mod = make_mod(0.25)
    x = torch.randn(4, T, D, dtype=torch.float64)
    _, aux = mod(x, rope_for(T))
    r = x @ mod.router.weight[0]
    want = F.binary_cross_entropy_with_logits(r, topk_members(r, 0.25).double())
    torch.testing.assert_close(aux[-1].losses["mod_bce"], want)


def test_predictor_learns_from_detached_inputs_only():
    mod = make_mod(0.25, causal="predictor")
    x = torch.randn(3, T, D, dtype=torch.float64, requires_grad=True)
    _, aux = mod(x, rope_for(T))
    r = x @ mod.router.weight[0]
    score = mod.predictor(x).squeeze(-1)
    want = F.binary_cross_entropy_with_logits(score, topk_members(r.detach(), 0.25).double())
    torch.testing.assert_close(aux[-1].losses["mod_predictor"], want)
    aux[-1].losses["mod_predictor"].backward()
    assert x.grad is None or x.grad.abs().max() == 0  # stop-gradient: the LM never feels the predictor
    assert all(p.grad is None for n, p in mod.named_parameters() if not n.startswith("predictor."))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.predictor.parameters())


def causal_inputs(mod: MoD, B: int = 3) -> torch.Tensor:
    """Inputs, and a threshold set so that rows enter in different numbers and none of the last row enters."""
    torch.manual_seed(1)
    x = torch.randn(B, T, D, dtype=torch.float64)
    x[1] *= 2.0  # wider scores: more of them above the threshold
    x[-1] *= 0.1
    with torch.no_grad():
        score = mod.causal_scores(x, x @ mod.router.weight[0])
        mod.threshold.fill_(max(score[-1].max().item(), score[0].quantile(0.6).item()) + 1e-6)
        count = (score > mod.threshold).sum(1)
    assert count[-1] == 0 and count[:-1].min() > 0 and count.unique().numel() == B, count
    return x


@pytest.mark.parametrize("causal", ["aux_loss", "predictor"])
def test_causal_routing_matches_masked_reference(causal):
    mod = make_mod(0.25, causal=causal)
    x = causal_inputs(mod).requires_grad_()
    member = mod.causal_scores(x, x @ mod.router.weight[0]).detach() > mod.threshold
    got, _ = mod(x, rope_for(T), causal_routing=True)
    want = masked_reference(mod, x, member)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(x)
    params = list(mod.block.parameters()) + [mod.router.weight]
    for a, b in zip(grads(got, [x, *params], g), grads(want, [x, *params], g)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_cached_prefill_and_decode_equal_the_uncached_causal_forward():
    mod = make_mod(0.25)
    x = causal_inputs(mod)
    rope = rope_for(T)
    want, _ = mod(x, rope, causal_routing=True)
    cache = mod.new_cache(3, T, x.device, x.dtype)
    outs = [mod(x[:, :5], (rope[0][:5], rope[1][:5]), cache)[0]]  # prefill of 5 tokens
    for t in range(5, T):
        outs.append(mod(x[:, t:t + 1], (rope[0][t:t + 1], rope[1][t:t + 1]), cache)[0])
    torch.testing.assert_close(torch.cat(outs, 1), want, rtol=1e-10, atol=1e-12)
    entered = (x @ mod.router.weight[0] > mod.threshold).sum(1)
    assert torch.equal(cache.length_B, entered)  # a skipping token wrote no key/value


def test_a_block_nobody_enters_costs_only_the_router():
    mod = make_mod(0.25)
    calls = []
    branch = mod.block.branch
    mod.block.branch = lambda *a, **k: calls.append(1) or branch(*a, **k)
    mod.threshold.fill_(float("inf"))
    x = torch.randn(4, 1, D, dtype=torch.float64)
    cache = mod.new_cache(4, 8, x.device, x.dtype)
    rope = rope_for(1)
    y, _ = mod(x, rope, cache)
    assert not calls and torch.equal(y, x) and cache.length_B.sum() == 0
    mod.threshold.fill_(float("-inf"))
    mod(x, rope, cache)
    assert calls == [1]


def model_cfg(preset: str, **mod_options) -> ModelConfig:
    fields = dict(PRESETS[preset].model)
    if mod_options:
        fields["blocks"] = [b | {"mod": b["mod"] | mod_options} if b.get("wrapper") == "mod" else b
                            for b in fields["blocks"]]
    return ModelConfig(**fields)


def calibrated_model(preset: str, **mod_options) -> MixtureLM:
    """A model whose MoD thresholds sit at the median score, so rows enter in different numbers."""
    torch.manual_seed(0)
    model = MixtureLM(model_cfg(preset, **mod_options)).double()
    idx = torch.randint(0, 257, (4, 48))
    model.train()
    for _ in range(3):
        model(idx, idx)
        for m in model.modules():
            if isinstance(m, MoD):
                m.after_optimizer_step()
    model.eval()
    return model


@pytest.mark.parametrize("preset", ["mod-debug", "mode-staged-debug"])
@pytest.mark.parametrize("causal", ["aux_loss", "predictor"])
def test_model_decode_with_ragged_cache_equals_recompute(preset, causal, kernel_path, monkeypatch):
    model = calibrated_model(preset, causal=causal, capacity=0.5)
    torch.manual_seed(2)
    idx = torch.randint(0, 257, (3, 24))
    kernel_calls = []
    step = kernels.ragged_decode_step
    monkeypatch.setattr(kernels, "ragged_decode_step", lambda *a, **k: kernel_calls.append(1) or step(*a, **k))
    with torch.no_grad():
        want = model(idx, causal_routing=True).logits
        cache = model.new_cache(3, 24)
        got = [model(idx[:, :7], cache=cache).logits]
        got += [model(idx[:, t:t + 1], cache=cache).logits for t in range(7, 24)]
    torch.testing.assert_close(torch.cat(got, 1), want, rtol=1e-9, atol=1e-10)
    lengths = [layer.length_B for layer in cache.layers if hasattr(layer, "length_B")]
    assert lengths and any(len(set(l.tolist())) > 1 for l in lengths)  # really ragged
    assert all((l < 24).all() and (l > 0).all() for l in lengths)
    assert bool(kernel_calls) == (kernel_path == "kernel")  # the path named is the path taken


def test_ragged_decode_kernel_equals_attention_written_out():
    """The fused decoding step of a ragged cache against the step written out per row and head, in float64:
    each row's new key and value stored at its length, the length grown by one, and softmax(q k / sqrt(K)) v
    over the row's tokens; rows in any order, from an empty row to one that fills the cache, two query heads
    per key/value head. A row with no free slot: an error, and nothing written."""
    if kernels.library() is None:
        pytest.skip("no C compiler: the CPU kernels are not built here")
    gen = torch.Generator().manual_seed(0)
    B, L, H, G, K = 6, 9, 4, 2, 8
    k_BLGK = torch.randn(B, L, G, K, generator=gen, dtype=torch.float64)
    v_BLGK = torch.randn(B, L, G, K, generator=gen, dtype=torch.float64)
    length_B = torch.tensor([3, 8, 0, 5, 2, 1])
    rows = torch.tensor([4, 0, 2, 1])  # row 2 empty before; row 1 takes the last slot
    q_RHK = torch.randn(4, H, K, generator=gen, dtype=torch.float64) * 3  # a sharp softmax
    k_new, v_new = (torch.randn(4, G, K, generator=gen, dtype=torch.float64) for _ in range(2))
    k_want, v_want, length_want = k_BLGK.clone(), v_BLGK.clone(), length_B.clone()
    for r, b in enumerate(rows.tolist()):
        k_want[b, length_B[b]], v_want[b, length_B[b]] = k_new[r], v_new[r]
        length_want[b] += 1
    k32, v32, length32 = k_BLGK.float(), v_BLGK.float(), length_B.clone()
    got = kernels.ragged_decode_step(q_RHK, k_new, v_new, k_BLGK, v_BLGK, length_B, rows)
    assert torch.equal(k_BLGK, k_want) and torch.equal(v_BLGK, v_want) and torch.equal(length_B, length_want)
    for r, b in enumerate(rows.tolist()):
        n = int(length_want[b])
        for h in range(H):
            keys, values = k_want[b, :n, h // (H // G)], v_want[b, :n, h // (H // G)]
            weights = torch.softmax(keys @ q_RHK[r, h] / math.sqrt(K), dim=0)
            torch.testing.assert_close(got[r, h], weights @ values, rtol=1e-12, atol=1e-12)
    got32 = kernels.ragged_decode_step(q_RHK.float(), k_new.float(), v_new.float(), k32, v32, length32, rows)
    torch.testing.assert_close(got32, got.float(), rtol=1e-5, atol=1e-5)
    before = k_BLGK.clone(), v_BLGK.clone(), length_B.clone()
    with pytest.raises(RuntimeError, match="KV cache holds 9 tokens"):  # row 1 is full now
        kernels.ragged_decode_step(q_RHK, k_new, v_new, k_BLGK, v_BLGK, length_B, rows)
    assert all(torch.equal(x, y) for x, y in zip((k_BLGK, v_BLGK, length_B), before))
    for bad in ([0, 0, 2, 3], [0, 6, 2, 3], [0, -1, 2, 3]):  # a row twice, past the batch, negative
        with pytest.raises(ValueError, match="distinct batch rows"):
            kernels.ragged_decode_step(q_RHK, k_new, v_new, k_BLGK, v_BLGK, length_B, torch.tensor(bad))
        assert all(torch.equal(x, y) for x, y in zip((k_BLGK, v_BLGK, length_B), before))
    with pytest.raises(ValueError, match="key/value heads"):
        kernels.ragged_decode_step(torch.zeros(4, 3, K, dtype=torch.float64), k_new, v_new, k_BLGK, v_BLGK,
                                   length_B, rows)
    with pytest.raises(ValueError, match="shapes do not agree"):
        kernels.ragged_decode_step(q_RHK, k_new[:3], v_new, k_BLGK, v_BLGK, length_B, rows)


@pytest.mark.skipif(kernels.library() is None, reason="no C compiler: the CPU kernels are not built here")
def test_ragged_decoding_takes_the_kernel_only_where_it_computes_the_same():
    """The fused step serves a float32/float64 cache without autograd and with no dispatch mode watching; a
    bfloat16 cache, a query that carries a gradient, or FlopCounterMode get the PyTorch ops."""
    from torch.utils.flop_counter import FlopCounterMode

    from mixturelm.layers.attention import RaggedKVCache, _decoding_kernel_fits

    q, k = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 1, 8)
    cache = RaggedKVCache(3, 2, 8, 16, "cpu", torch.float32)
    with torch.no_grad():
        assert _decoding_kernel_fits(q, k, k, cache)
        assert not _decoding_kernel_fits(q.bfloat16(), k.bfloat16(), k.bfloat16(),
                                         RaggedKVCache(3, 2, 8, 16, "cpu", torch.bfloat16))
        with FlopCounterMode(display=False):
            assert not _decoding_kernel_fits(q, k, k, cache)
        # shapes the cache does not hold: the PyTorch path, which raises as PyTorch does
        assert not _decoding_kernel_fits(q, torch.randn(2, 1, 1, 8), torch.randn(2, 1, 1, 8), cache)
        assert not _decoding_kernel_fits(q[..., :4], k[..., :4], k[..., :4], cache)
        assert not _decoding_kernel_fits(torch.randn(2, 4, 2, 8), torch.randn(2, 2, 2, 8), torch.randn(2, 2, 2, 8),
                                         cache)
    assert _decoding_kernel_fits(q, k, k, cache)  # gradients on, but nothing needs one
    assert not _decoding_kernel_fits(q.requires_grad_(), k, k, cache)


def test_sampling_decisions_never_depend_on_future_tokens():
    model = calibrated_model("mod-debug", capacity=0.25)
    torch.manual_seed(3)
    a = torch.randint(0, 257, (8, 48))
    b = a.clone()
    b[:, 20:] = torch.randint(0, 257, (8, 28))
    with torch.no_grad():
        causal_a, causal_b = model(a, causal_routing=True).logits, model(b, causal_routing=True).logits
        topk_a, topk_b = model(a).logits, model(b).logits
    torch.testing.assert_close(causal_a[:, :20], causal_b[:, :20], rtol=0, atol=0)
    # the same check catches top-k routing, whose membership looks at the future
    assert not torch.equal(topk_a[:, :20], topk_b[:, :20])


def test_threshold_calibration_brings_sampling_fraction_to_capacity_and_eval_leaves_it():
    torch.manual_seed(0)
    mod = MoD(Block(BlockSpec(), CFG), D, capacity=0.125)
    with torch.no_grad():
        mod.router.weight.normal_(0, 1.0)
    rope = rope_for(T)
    for _ in range(60):
        mod(torch.randn(8, T, D) + 0.5, rope)  # scores mostly above the paper's fixed threshold 0
        mod.after_optimizer_step()
    threshold = mod.threshold.clone()
    mod.eval()
    fresh = torch.randn(64, T, D) + 0.5
    _, aux = mod(fresh, rope, causal_routing=True)
    assert isinstance(aux[-1], MoDAux)
    assert aux[-1].causal_fraction.item() == pytest.approx(0.125, abs=0.03)
    mod(fresh, rope)
    mod.after_optimizer_step()
    assert torch.equal(mod.threshold, threshold)
    uncalibrated = (fresh @ mod.router.weight[0] > 0).float().mean().item()
    assert uncalibrated > 0.5  # what sigmoid > 0.5 would have done here


def test_integrated_mode_noop_experts_match_reference():
    torch.manual_seed(0)
    E, Z, k, F_ = 4, 3, 2, 24
    moe = MoE(D, n_experts=E, top_k=k, d_expert=F_, n_noop=Z).double()
    with torch.no_grad():
        moe.router.gate.weight.normal_(0, 1.0)
    x = torch.randn(20, D, dtype=torch.float64, requires_grad=True)
    y, aux = moe(x.view(4, 5, D))
    rows = []
    for t in range(20):
        p = (moe.router.gate.weight @ x[t]).softmax(0)
        chosen = sorted(range(E + Z), key=lambda e: -p[e].item())[:k]
        total = sum(p[e] for e in chosen)
        out = torch.zeros(D, dtype=torch.float64)
        for e in chosen:
            if e < E:  # a no-op expert adds nothing
                gu = x[t] @ moe.w_gate_up[e]
                out = out + p[e] / total * ((F.silu(gu[:F_]) * gu[F_:]) @ moe.w_down[e])
        rows.append(out)
    want = torch.stack(rows)
    torch.testing.assert_close(y.view(20, D), want, rtol=1e-10, atol=1e-12)
    g = torch.randn(20, D, dtype=torch.float64)
    params = [x, moe.w_gate_up, moe.w_down, moe.router.gate.weight]
    for a, b in zip(grads(y.view(20, D), params, g), grads(want, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert 0 < aux.scalars()["noop_fraction"] < 1


def test_mod_and_mode_models_train_one_step():
    for preset in ("mod-debug", "mode-debug", "mode-staged-debug"):
        torch.manual_seed(0)
        model = MixtureLM(ModelConfig(**PRESETS[preset].model))
        idx = torch.randint(0, 257, (2, 33))
        out = model(idx[:, :-1], idx[:, 1:])
        (out.loss + out.aux_loss).backward()
        assert all(p.grad is not None for p in model.parameters()), preset


@pytest.mark.parametrize("fields, message", [
    (dict(capacity=0.0), "capacity"),
    (dict(capacity=1.5), "capacity"),
    (dict(causal="oracle"), "causal"),
    (dict(threshold_momentum=0.0), "threshold_momentum"),
])
def test_bad_mod_config_names_the_field(fields, message):
    with pytest.raises(UsageError, match=message):
        MoDConfig(**fields)


def test_mod_wrapper_needs_its_config():
    with pytest.raises(UsageError, match="MoDConfig"):
        BlockSpec(wrapper="mod")


def test_mod_wraps_a_users_own_block():
    """Any residual block x -> x + f(x): the entering tokens get x + r f(x), the others pass unchanged."""
    torch.manual_seed(0)
    f = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.Tanh()).double()

    class Residual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.f = f

        def forward(self, x):
            return x + self.f(x)

    mod = MoD(Residual(), D, capacity=0.25).double()
    with torch.no_grad():
        mod.router.weight.normal_(0, 1.0)
    x = torch.randn(2, T, D, dtype=torch.float64)
    y, aux = mod(x)
    r = x @ mod.router.weight[0]
    member = topk_members(r, 0.25)
    want = torch.where(member[..., None], x + r[..., None] * f(x), x)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-12)
    assert "mod_bce" in aux[-1].losses


@pytest.mark.parametrize("args, message", [
    (["--preset", "mod-debug", "--capacity", "0"], "capacity"),
    (["--preset", "mod-debug", "--mod-causal", "oracle"], "causal"),
    (["--preset", "dense-debug", "--capacity", "0.25"], "mod-"),
    (["--preset", "mod-debug", "--capacity", "nan"], "--capacity must be in (0, 1]"),
])
def test_cli_bad_mod_options_exit_2_with_one_line(tmp_path, args, message):
    assert_train_refuses(tmp_path, args, message)


def test_train_and_generate_a_mod_model_from_the_cli(tmp_path, corpus_dir):
    out = tmp_path / "run"
    run_cli("train", "--preset", "mod-debug", "--data", str(corpus_dir), "--max-steps", "4", "--out", str(out),
            "--mod-causal", "predictor", "--no-progress", check=True)
    import json
    results = json.loads((out / "results.json").read_text())
    assert results["val_loss_causal"] > 0 and "layer1.mod_causal_accuracy" in results["mod_causal"]
    proc = run_cli("generate", "--ckpt", str(out), "--prompt", "def ", "--max-new-tokens", "8",
                   "--num-samples", "2", check=True)
    assert "fraction of tokens that entered" in proc.stderr


def test_batch_one_prefill_and_decode_equal_recompute():
    """One row takes the plain causal kernel when nothing is cached; afterwards a mask with an offset."""
    model = calibrated_model("mod-debug", capacity=0.5)
    torch.manual_seed(4)
    idx = torch.randint(0, 257, (1, 30))
    with torch.no_grad():
        want = model(idx, causal_routing=True).logits
        cache = model.new_cache(1, 30)
        got = [model(idx[:, :12], cache=cache).logits, model(idx[:, 12:20], cache=cache).logits]
        got += [model(idx[:, t:t + 1], cache=cache).logits for t in range(20, 30)]
    torch.testing.assert_close(torch.cat(got, 1), want, rtol=1e-9, atol=1e-10)


def test_predictor_gradient_takes_no_share_of_the_model_clipping(tmp_path, corpus_dir):
    """The predictor trains on stop-gradient inputs, so it is clipped apart: however large its gradient,
    the rest of the model reaches the optimizer with the same clipped gradient."""
    from mixturelm.training import Trainer, new_run_config

    seen = []
    for scale in (1.0, 1000.0):
        cfg = new_run_config("mod-debug", {"data": str(corpus_dir), "max_steps": 1, "grad_clip": 0.05},
                             block_overrides={"mod": {"causal": "predictor"}})
        trainer = Trainer(cfg, tmp_path / f"run{scale:g}", overwrite=True, progress=False, device="cpu")
        trainer._build()
        predictor = [p for n, p in trainer.model.named_parameters() if ".predictor." in n]
        assert {id(p) for p in trainer.optim.side_params} == {id(p) for p in predictor} != set()
        for p in predictor:
            p.register_hook(lambda g, s=scale: g * s)
        grads = {}
        trainer.optim.opt.register_step_pre_hook(lambda opt, args, kwargs: grads.update(
            {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}))
        trainer._train_step(0)
        seen.append(grads)
    model_names = [n for n in seen[0] if ".predictor." not in n]
    assert model_names and all(torch.equal(seen[0][n], seen[1][n]) for n in model_names)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(seen[0][n]) for n in model_names]))
    assert norm == pytest.approx(0.05, rel=1e-3)  # the model's own norm was clipped to the limit
    for grads in seen:  # and the predictor's, apart, to the same limit
        pred = [g for n, g in grads.items() if ".predictor." in n]
        assert torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in pred])) <= 0.05 * 1.001


def test_evaluation_reports_the_share_the_causal_rule_lets_in(corpus_dir):
    """layer{i}.mod_val_causal_fraction equals a direct count of causal_enter over the validation windows."""
    from mixturelm.data import prepare
    from mixturelm.data.tokens import val_windows
    from mixturelm.presets import get_preset
    from mixturelm.training.evaluation import evaluate

    torch.manual_seed(0)
    model = MixtureLM(ModelConfig(**get_preset("mod-debug").model)).eval()
    mods = {i: b for i, b in enumerate(model.blocks) if isinstance(b, MoD)}
    for m in mods.values():
        m.threshold.fill_(0.0)  # scores at init lie around 0: some in, some out
    data = prepare(str(corpus_dir), "bytes", 0.1, log=lambda m: None)
    res = evaluate(model, data, 32, 32 * 7, 3, "cpu")
    entered = {i: [] for i in mods}
    hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: entered[i].append(
        mod.causal_enter(args[0], mod.router_weights(args[0])))) for i, m in mods.items()]
    with torch.no_grad():
        w = val_windows(data.val, 32, 32 * 7)
        model(w[:, :-1], causal_routing=True)
    for h in hooks:
        h.remove()
    for i in mods:
        want = torch.cat([e.flatten() for e in entered[i]]).double().mean().item()
        assert 0 < want < 1 and res[f"layer{i}.mod_val_causal_fraction"] == pytest.approx(want, abs=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Thresholds calibrated on decoding

def tiny_mod_lm(capacity: float = 0.125):
    from mixturelm import MixtureLM, ModelConfig

    blocks = [BlockSpec(wrapper="mod", mod=MoDConfig(capacity=capacity)) if i % 2 else BlockSpec() for i in range(4)]
    torch.manual_seed(0)
    return MixtureLM(ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=2, d_ffn=64, max_seq_len=64,
                                 blocks=blocks)).eval()


def decoded_shares(model, prompt_BT: torch.Tensor, feed_BT: torch.Tensor) -> list[float]:
    """Per routed block, the share of the fed tokens that entered it."""
    with torch.no_grad():
        cache = model.new_cache(prompt_BT.shape[0], prompt_BT.shape[1] + feed_BT.shape[1])
        model(prompt_BT, cache=cache, last_only=True)
        ragged = [layer for layer in cache.layers if hasattr(layer, "length_B")]
        before = [layer.length_B.clone() for layer in ragged]
        for i in range(feed_BT.shape[1]):
            model(feed_BT[:, i:i + 1], cache=cache)
    return [float((layer.length_B - b).sum()) / feed_BT.numel() for layer, b in zip(ragged, before)]


def test_calibration_on_decoding_lets_in_the_capacity():
    """On the decoding it was calibrated on, every routed block lets in exactly the capacity's share (the
    layers are calibrated first to last, so a later threshold does not move an earlier layer's scores);
    on other prompts, close to it."""
    from mixturelm.mechanisms.mod import calibrate_on_decoding

    model = tiny_mod_lm()
    g = torch.Generator().manual_seed(3)
    prompt, feed = torch.randint(0, 64, (32, 24), generator=g), torch.randint(0, 64, (32, 16), generator=g)
    thresholds = calibrate_on_decoding(model, prompt, feed)
    assert len(thresholds) == 2 and not model.training
    assert decoded_shares(model, prompt, feed) == [64 / 512] * 2  # 12.5 % of 32 x 16 fed tokens
    other = torch.randint(0, 64, (64, 24), generator=g), torch.randint(0, 64, (64, 16), generator=g)
    assert all(abs(share - 0.125) < 0.03 for share in decoded_shares(model, *other))


def test_calibrated_threshold_sits_between_two_scores():
    """Halfway between the k-th score and the next, so that a score computed in another order of summation does
    not cross it by rounding; on the k-th score where nothing lies between (ties, adjacent floats, infinities)."""
    mod = MoD(torch.nn.Identity(), 4, capacity=0.25)
    cases = [([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], 6.5),  # the top 2 of 8 above it
             ([1.0, 2.0, 3.0, 3.0, 3.0, 3.0, 3.0, 9.0], 3.0),  # tied: the k-th score itself
             ([0.0] * 5 + [1.0, float(torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))), 5.0], 1.0),
             ([0.0] * 5 + [1.0, float("inf"), float("inf")], 1.0),
             ([0.0] * 5 + [3e38, 3.4e38, 3.4e38], 3.2e38)]  # no overflow on the way
    for scores, want in cases:
        mod.set_threshold_from(torch.tensor(scores))
        assert float(mod.threshold) == pytest.approx(want, rel=1e-6)
        score = torch.tensor(scores)
        assert int((score > mod.threshold).sum()) <= 2

def test_causal_routing_of_empty_batches_and_sequences():
    """Nothing to route: no error, and no token counted as let in."""
    model = calibrated_model("mod-debug")
    with torch.no_grad():
        for shape in ((0, 1), (2, 0)):
            out = model(torch.zeros(shape, dtype=torch.long), causal_routing=True)
            assert out.logits.shape[:2] == shape
            counts = [a.causal_counts for _, a in out.aux if isinstance(a, MoDAux)]
            assert counts and all(float(c[0]) == 0 for c in counts)
