"""The audit of the released NIFTY output: the look-ahead (NOT causal) runner against literal loops on a hand-made
stream, the conditional permutation test on columns with known answers, and the command's bad input."""

from __future__ import annotations

import numpy as np
import pytest

from mixturelm.cli import main
from mixturelm.ensemble import aggregators as ag
from mixturelm.ensemble import audit, nifty

# 3 experts, 6 days; labels 0 Fall, 1 Neutral, 2 Rise. On day 4 no expert is right.
Y = np.array([0, 1, 2, 2, 1, 0])
P = np.array([[0, 1, 2], [1, 1, 0], [2, 0, 2], [0, 1, 0], [1, 2, 2], [2, 0, 0]])


def direct_lookahead(y, preds, weights_after):
    """Literal loop: reveal day t's losses and label, then take the weights and the vote of day t."""
    state, counts, out = None, np.zeros(3), []
    for t in range(len(y)):
        losses = (preds[t] != y[t]).astype(float)
        counts[y[t]] += 1
        state, w = weights_after(state, losses, t)
        votes = np.zeros(3)
        for i in range(preds.shape[1]):
            votes[preds[t, i]] += w[i]
        top = [k for k in range(3) if abs(votes[k] - votes.max()) <= 1e-12]
        out.append(max(top, key=lambda k: (counts[k], -k)))  # ties: most seen so far (day t included), then lowest
    return np.array(out)


def hedge_step(eta):
    def step(cum, losses, t):
        cum = losses if cum is None else cum + losses
        w = np.exp(-eta * cum)
        return cum, w / w.sum()
    return step


def fixed_share_step(eta, alpha):
    def step(w, losses, t):
        w = np.full(3, 1 / 3) if w is None else w
        v = w * np.exp(-eta * losses)
        v /= v.sum()
        w = (1 - alpha) * v + alpha / 3
        return w, w
    return step


@pytest.mark.parametrize("make,step", [
    (lambda: ag.Hedge(3, eta=1.0), hedge_step(1.0)),
    (lambda: ag.Hedge(3, eta=0.3), hedge_step(0.3)),
    (lambda: ag.FixedShare(3, eta=2.0, alpha=0.1), fixed_share_step(2.0, 0.1)),
])
def test_lookahead_matches_a_literal_loop(make, step):
    pred, w_TN = nifty.run_labels(make(), Y, P, lookahead=True)
    assert pred.tolist() == direct_lookahead(Y, P, step).tolist()
    # the weights of day t already hold day t's losses: for Hedge, exp(-eta * losses of days <= t)
    if isinstance(make(), ag.Hedge):
        eta = make().eta
        cum = np.cumsum(P != Y[:, None], 0)
        w = np.exp(-eta * cum)
        np.testing.assert_allclose(w_TN, w / w.sum(1, keepdims=True), atol=1e-12)


def test_lookahead_window_one_copies_the_label_whenever_an_expert_has_it():
    """A 1-day window with a steep soft-min and look-ahead puts its weight on the experts right today: it outputs
    the day's label whenever some expert called it, and the plain majority when none did (day 4)."""
    pred = nifty.run_labels(ag.WindowSoftmin(3, window=1, lam=20.0), Y, P, lookahead=True)[0]
    assert pred.tolist() == [0, 1, 2, 0, 1, 0]
    causal = nifty.run_labels(ag.WindowSoftmin(3, window=1, lam=20.0), Y, P)[0]
    # causal: day 1 is the uniform vote (a three-way tie -> Fall), then the experts right yesterday
    assert causal.tolist() == [0, 1, 2, 0, 2, 2]


def _stream(seed, T=200, n=5):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 3, T), rng.integers(0, 3, (T, n))


def test_permutation_test_is_calibrated_for_a_function_of_the_experts_and_finds_a_copy_of_the_label():
    ps = []
    for seed in range(30):
        y, preds = _stream(seed)
        s = audit.strata(y, preds)
        x = (preds[:, 0] + preds[:, 1]) % 3  # a function of the experts only; here the experts know nothing
        ps.append(audit.permutation_test(x, y, s, permutations=199, seed=seed)["p_value"])
    ps = np.array(ps)
    assert 0.3 < ps.mean() < 0.7 and np.mean(ps < 0.05) <= 0.15, ps
    y, preds = _stream(99)
    s = audit.strata(y, preds)
    res = audit.permutation_test(y, y, s, permutations=199, seed=0)
    assert res["p_value"] == pytest.approx(1 / 200) and res["permutations"] == 199
    noisy = np.where(np.random.default_rng(1).random(len(y)) < 0.5, y, preds[:, 2])  # half the days copy y
    assert audit.permutation_test(noisy, y, s, permutations=199, seed=0)["p_value"] < 0.01


def test_permutation_test_is_seeded_and_blind_to_a_function_of_the_strata():
    y, preds = _stream(3, T=60)
    s = audit.strata(y, preds)
    x = np.arange(60) % 3
    assert audit.permutation_test(x, y, s, permutations=50, seed=7) == audit.permutation_test(x, y, s, 50, seed=7)
    known = audit.permutation_test(s % 3, y, s, permutations=50, seed=0)  # nothing beyond the strata themselves
    assert known["statistic_bits"] == pytest.approx(0.0, abs=1e-12) and known["p_value"] == 1.0


@pytest.mark.parametrize("args,message", [
    (["--permutations", "5"], "--permutations must be >= 100"),
    (["--audit", "maybe"], "invalid choice"),
])
def test_cli_audit_bad_input(tmp_path, capsys, args, message):
    argv = ["ensemble", "nifty", "--out", str(tmp_path / "o"), *args]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()
