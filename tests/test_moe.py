"""MoE against a slow reference written here (loops over tokens and experts), in float64:
outputs and gradients for every router, with shared experts and with capacity dropping; the balance
losses on hand-made routings; the balancing bias; padding; the dispatch implementations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mixturelm.layers.moe import MoE, MoEConfig


def make_moe(d_model, d_expert, n_experts, top_k, router="softmax", **options) -> MoE:
    """The layer from its config's fields, positionally as the tests read best."""
    return MoE(d_model, n_experts=n_experts, top_k=top_k, d_expert=d_expert, router=router, **options)
from mixturelm.layers.routing import SigmoidBias, switch_balance_loss

D, H, E = 16, 12, 6


def swiglu(x, w_gate_up, w_down):
    g, u = (x @ w_gate_up).chunk(2, -1)
    return (F.silu(g) * u) @ w_down


def reference_assignments(moe: MoE, x_TD: torch.Tensor) -> list[dict[int, torch.Tensor]]:
    """For each token, {expert: gate}, computed token by token (expert choice needs all tokens)."""
    logits = x_TD @ moe.router.gate.weight.t()
    T, kind, k = x_TD.shape[0], moe.router_kind, moe.top_k
    out: list[dict[int, torch.Tensor]] = [{} for _ in range(T)]
    if kind == "expert_choice":
        p = logits.softmax(-1)
        cap = max(1, min(T, math.ceil(moe.router.capacity_factor * T / E)))
        for e in range(E):
            for t in sorted(range(T), key=lambda t: -p[t, e].item())[:cap]:
                out[t][e] = p[t, e]
        return out
    for t in range(T):
        if kind == "sigmoid_bias":
            s = logits[t].sigmoid()
            chosen = sorted(range(E), key=lambda e: -(s[e] + moe.router.bias_E[e]).item())[:k]
            total = sum(s[e] for e in chosen)
            out[t] = {e: moe.router.route_scale * s[e] / total for e in chosen}
        elif kind == "noisy":  # eval: no noise; softmax over the top-k logits
            chosen = sorted(range(E), key=lambda e: -logits[t, e].item())[:k]
            z = torch.stack([logits[t, e] for e in chosen]).softmax(0)
            out[t] = dict(zip(chosen, z))
        else:
            p = logits[t].softmax(0)
            chosen = sorted(range(E), key=lambda e: -p[e].item())[:k]
            norm = sum(p[e] for e in chosen) if (kind == "softmax" and moe.router.renormalize and k > 1) else 1.0
            out[t] = {e: p[e] / norm for e in chosen}
    if moe.capacity_factor is not None:  # each expert keeps its first C: all first choices, then second ...
        cap = math.ceil(moe.capacity_factor * T * k / E)
        seen = [0] * E
        for rank in range(k):
            for t in range(T):
                e = list(out[t])[rank] if rank < len(out[t]) else None  # out[t] is in choice order
                if e is None or e not in out[t]:
                    continue
                seen[e] += 1
                if seen[e] > cap:
                    out[t][e] = None
        out = [{e: g for e, g in gates.items() if g is not None} for gates in out]
    return out


def reference_moe(moe: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    rows = []
    for t, gates in enumerate(reference_assignments(moe, x_TD)):
        y = torch.zeros(D, dtype=x_TD.dtype)
        for e, g in gates.items():
            y = y + g * swiglu(x_TD[t], moe.w_gate_up[e], moe.w_down[e])
        if moe.shared is not None:
            y = y + moe.shared(x_TD[t])[0]
        rows.append(y)
    return torch.stack(rows)


CASES = {
    "softmax": dict(router="softmax", top_k=2),
    "softmax-raw-probs": dict(router="softmax", top_k=3, renormalize=False),
    "softmax-wide-experts": dict(router="softmax", top_k=2, d_hidden=24),  # F > D: the gate goes in the combine
    "noisy-eval": dict(router="noisy", top_k=2),
    "switch-capacity": dict(router="switch", top_k=1, capacity_factor=1.0),
    "softmax-top1-gets-gradient": dict(router="softmax", top_k=1),
    "softmax-capacity-shared": dict(router="softmax", top_k=2, capacity_factor=0.75, n_shared=2),
    "sigmoid_bias": dict(router="sigmoid_bias", top_k=2, route_scale=2.5),
    "expert_choice": dict(router="expert_choice", top_k=2, capacity_factor=1.5),
}


@pytest.mark.parametrize("impl", ["loop", "grouped"])
@pytest.mark.parametrize("case", CASES)
def test_output_and_gradients_match_the_reference(case, impl):
    """float64 for the loop; torch._grouped_mm has no float64, so it runs in float32 against the float64 reference."""
    torch.manual_seed(0)
    opts = dict(CASES[case])
    dtype = torch.float64 if impl == "loop" else torch.float32
    tol = dict(rtol=1e-9, atol=1e-10) if impl == "loop" else dict(rtol=1e-4, atol=1e-5)
    moe = make_moe(D, opts.pop("d_hidden", H), E, opts.pop("top_k"), opts.pop("router"), impl=impl, **opts).to(dtype)
    with torch.no_grad():
        moe.router.gate.weight.normal_(0, 1.0)  # spread scores so the top-k has no near-ties
        if isinstance(moe.router, SigmoidBias):
            moe.router.bias_E.copy_(torch.linspace(-0.3, 0.3, E))
    moe.eval() if case == "noisy-eval" else moe.train()
    ref = copy.deepcopy(moe).double()
    x = torch.randn(24, D, dtype=torch.float64, requires_grad=True)
    g_out = torch.randn(24, D, dtype=torch.float64)
    names = [n for n, _ in moe.named_parameters() if "noise" not in n]  # the noise net has no role in eval
    got = moe(x.to(dtype).view(3, 8, D))[0].reshape(-1, D)
    got_grads = torch.autograd.grad(got, [x, *(p for n, p in moe.named_parameters() if n in names)], g_out.to(dtype))
    want = reference_moe(ref, x)
    want_grads = torch.autograd.grad(want, [x, *(p for n, p in ref.named_parameters() if n in names)], g_out,
                                     allow_unused=True)
    torch.testing.assert_close(got.double(), want, **tol)
    for name, a, b in zip(["x", *names], got_grads, want_grads):
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a.double(), b.double(), **tol, msg=f"gradient of {name}")


def test_capacity_drops_and_reports_it():
    torch.manual_seed(0)
    moe = make_moe(D, H, E, 1, "switch", capacity_factor=0.5)
    with torch.no_grad():
        moe.router.gate.weight[0] += 5 * moe.router.gate.weight[0].sign()  # most tokens want expert 0
    y, aux = moe(torch.randn(64, 1, D))
    tokens = aux.tokens_per_expert
    assert tokens.max() <= math.ceil(0.5 * 64 / E) and aux.scalars()["dropped_fraction"] > 0
    assert tokens.sum() == pytest.approx(64 * (1 - aux.scalars()["dropped_fraction"].item()))


def test_balance_loss_on_hand_made_routings():
    T = 12
    uniform_scores = torch.full((T, E), 1 / E)
    round_robin = torch.zeros(T, E, dtype=torch.bool)
    round_robin[torch.arange(T), torch.arange(T) % E] = True
    assert switch_balance_loss(uniform_scores, round_robin).item() == pytest.approx(1.0)  # the known minimum
    collapsed_scores = torch.zeros(T, E)
    collapsed_scores[:, 0] = 1.0
    collapsed = torch.zeros(T, E, dtype=torch.bool)
    collapsed[:, 0] = True
    assert switch_balance_loss(collapsed_scores, collapsed).item() == pytest.approx(E)  # the maximum
    # padding is left out: the loss over valid tokens equals the loss of the valid tokens alone
    valid = torch.arange(T) < 7
    scores = torch.rand(T, E).softmax(-1)
    assert switch_balance_loss(scores, round_robin, valid) == pytest.approx(
        switch_balance_loss(scores[:7], round_robin[:7]).item())


def test_padding_is_not_counted():
    torch.manual_seed(0)
    moe = make_moe(D, H, E, 2)
    x = torch.randn(2, 10, D)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 6:] = False
    _, aux = moe(x, valid)
    _, aux_real = moe(torch.cat([x[0], x[1, :6]])[None])
    for k in ("balance", "z"):
        torch.testing.assert_close(aux.losses[k], aux_real.losses[k])
    torch.testing.assert_close(aux.tokens_per_expert, aux_real.tokens_per_expert)
    torch.testing.assert_close(aux.scalars()["router_entropy"], aux_real.scalars()["router_entropy"])


def test_bias_update_moves_load_toward_uniform():
    torch.manual_seed(0)
    moe = make_moe(D, H, E, 2, "sigmoid_bias", bias_rate=0.005)
    with torch.no_grad():
        moe.router.gate.weight.normal_(0, 0.3)
        moe.router.gate.weight[0].copy_(torch.randn(D).sign() * 0.5)  # expert 0 is everyone's favourite
    x = torch.randn(256, D) + 0.5 * moe.router.gate.weight[0].detach()  # skew the inputs toward it
    loads = []
    for _ in range(200):
        loads.append(moe(x[None])[1].scalars()["load_max_over_mean"].item())
        moe.after_optimizer_step()
    assert loads[0] > 2.0, loads[0]
    assert max(loads[-50:]) < 1.15, max(loads[-50:])  # near uniform and staying there
    assert abs(moe.router.bias_E.sum().item()) < 1e-5  # centred updates


def test_eval_leaves_the_balancing_state_alone():
    moe = make_moe(D, H, E, 2, "sigmoid_bias").eval()
    bias = moe.router.bias_E.clone()
    moe(torch.randn(1, 5, D))
    assert moe.router.load_E.sum() == 0
    moe.after_optimizer_step()
    assert torch.equal(moe.router.bias_E, bias)


def test_noisy_router_has_its_losses_and_noise_only_in_training():
    torch.manual_seed(0)
    moe = make_moe(D, H, E, 2, "noisy")
    x = torch.randn(1, 32, D)
    _, aux = moe(x)
    assert {"importance", "load"} <= set(aux.losses)
    (aux.losses["importance"] + aux.losses["load"]).backward()
    assert moe.router.noise.weight.grad.abs().sum() > 0  # the noise network trains through the load loss
    moe.eval()
    assert torch.equal(moe(x)[0], moe(x)[0])


def test_batch_size_one_decoding_and_empty_experts():
    torch.manual_seed(0)
    for impl in ("grouped", "loop"):
        moe = make_moe(D, H, 64, 8, impl=impl)
        x = torch.randn(1, 1, D)
        torch.testing.assert_close(moe(x)[0].double(), reference_moe_any(copy.deepcopy(moe).double(), x.double()))


def reference_moe_any(moe, x):
    global E
    saved, E = E, moe.n_experts
    try:
        return reference_moe(moe, x.reshape(-1, D)).reshape(x.shape)
    finally:
        E = saved


def test_bad_arguments():
    with pytest.raises(ValueError, match="MoEConfig.router='nope' is unknown"):
        make_moe(D, H, E, 2, "nope")
    with pytest.raises(ValueError, match="MoEConfig.top_k=7 exceeds"):
        make_moe(D, H, E, 7)
    with pytest.raises(ValueError, match="not both"):
        MoE(D, MoEConfig(), top_k=1)


# ----------------------------------------------------------------------------------------------
# MoE inside the model

def moe_model(router="softmax", **moe):
    from mixturelm import MixtureLM, ModelConfig

    spec = {"n_experts": 4, "top_k": 2, "d_expert": 16, "router": router} | moe
    return MixtureLM(ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, d_ffn=32, max_seq_len=32,
                                 blocks=[{"ffn": "dense"}, {"ffn": "moe", "moe": spec}]))


@pytest.mark.parametrize("router", ["softmax", "sigmoid_bias", "noisy"])
def test_cached_decoding_of_a_moe_model_equals_full_recompute(router):
    """Token-choice routing decides per token, so it is causal and the KV cache applies unchanged."""
    torch.manual_seed(0)
    model = moe_model(router).double().eval()
    idx = torch.randint(0, 40, (2, 20))
    cache = model.new_cache(2, 20)
    pieces = [model(idx[:, :7], cache=cache).logits] + [model(idx[:, t:t + 1], cache=cache).logits for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(pieces, 1), model(idx).logits, rtol=1e-10, atol=1e-10)


def test_model_returns_each_aux_loss_and_weights_them():
    torch.manual_seed(0)
    model = moe_model()
    idx = torch.randint(0, 40, (2, 12))
    out = model(idx, idx)
    assert set(out.aux_losses) == {"layer1.balance", "layer1.z"}
    w = model.config.aux_loss_weights
    torch.testing.assert_close(out.aux_loss, w["balance"] * out.aux_losses["layer1.balance"]
                               + w["z"] * out.aux_losses["layer1.z"])
    assert out.aux[-1][1].tokens_per_expert.sum() == 2 * 12 * 2
    assert set(out.stats()) == {"layer1.load_max_over_mean", "layer1.dropped_fraction", "layer1.router_entropy"}


def test_training_steps_the_bias_and_logs_the_load(corpus_dir, tmp_path):
    import json

    from mixturelm.training import Trainer, new_run_config

    cfg = new_run_config("moe-debug", {"data": str(corpus_dir), "max_steps": 5},
                         block_overrides={"moe": {"router": "sigmoid_bias", "bias_rate": 0.01}})
    trainer = Trainer(cfg, tmp_path / "run", progress=False, log=lambda m: None)
    summary = trainer.run()
    biases = [m.router.bias_E for m in trainer.model.modules() if isinstance(m, MoE)]
    assert all(b.abs().sum() > 0 for b in biases)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "train"][-1]
    assert "stat/layer0.load_max_over_mean" in last and "aux/layer1.complementary_balance" in last
    assert set(summary["load_max_over_mean"]) == {"layer0.load_max_over_mean", "layer1.load_max_over_mean"}


def test_sampling_warns_only_for_expert_choice():
    """Expert choice picks tokens among all of a call: generate warns that one token at a time it routes
    otherwise than in training; token-choice routers are causal and get no warning."""
    from mixturelm.mechanisms import get

    moe = get("moe")
    assert "not causal" in moe.sampling_warning(make_moe(D, H, E, 2, "expert_choice"))
    assert moe.sampling_warning(make_moe(D, H, E, 2, "softmax")) is None


def test_dispatch_sums_any_assignments_onto_their_tokens():
    """dispatch_swiglu on hand-made assignments, in float64 against the sum written out: a token sent twice to one
    expert, a token sent nowhere (zeros), an expert with no tokens; the gates, the inputs and both weights get
    their gradients."""
    from mixturelm.layers.dispatch import dispatch_swiglu

    torch.manual_seed(0)
    T, n_experts = 5, 4
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    w_gate_up = torch.randn(n_experts, D, 2 * H, dtype=torch.float64, requires_grad=True)
    w_down = torch.randn(n_experts, H, D, dtype=torch.float64, requires_grad=True)
    token_A = torch.tensor([0, 0, 2, 1, 3, 0, 2])
    expert_A = torch.tensor([1, 1, 3, 0, 1, 3, 0])  # token 0 twice to expert 1; token 4 nowhere; expert 2 idle
    gate_A = torch.rand(7, dtype=torch.float64, requires_grad=True)
    got = dispatch_swiglu(x, token_A, expert_A, gate_A, w_gate_up, w_down, impl="loop")
    want = torch.zeros(T, D, dtype=torch.float64)
    for t, e, g in zip(token_A.tolist(), expert_A.tolist(), gate_A):
        want = want.index_add(0, torch.tensor([t]), (g * swiglu(x[t], w_gate_up[e], w_down[e]))[None])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[4], torch.zeros(D, dtype=torch.float64))
    g_out = torch.randn(T, D, dtype=torch.float64)
    inputs = [x, w_gate_up, w_down, gate_A]
    for a, b in zip(torch.autograd.grad(got, inputs, g_out), torch.autograd.grad(want, inputs, g_out)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
