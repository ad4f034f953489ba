"""Online aggregation and MoE-F: switching experts, Fixed-Share = HMM forward, Hedge's regret bound, no look-ahead,
metrics against scikit-learn, the NIFTY and LM-stream commands and their errors."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
from scipy.linalg import expm, logm

from conftest import run_cli, tree_digest
from mixturelm import UsageError
from mixturelm.ensemble import aggregators as ag
from mixturelm.ensemble import lm_stream, nifty
from mixturelm.ensemble.losses import CrossEntropy, LogLoss, Squared, ZeroOne
from mixturelm.ensemble.metrics import bootstrap, confusion_metrics, point_metrics


def switching_stream(T=300, n=3, k=3, switches=(100, 200), seed=0):
    """Class forecasts where the best expert (right 90 % of days; the others guess) changes at `switches`."""
    rng = np.random.default_rng(seed)
    best = np.zeros(T, dtype=int)
    for j, s in enumerate(switches):
        best[s:] = j + 1
    y = rng.integers(0, k, T)
    preds = rng.integers(0, k, (T, n))
    right = rng.random(T) < 0.9
    preds[np.arange(T), best] = np.where(right, y, (y + 1) % k)
    loss = ZeroOne(k)
    losses = np.stack([loss.loss(preds[t], y[t]) for t in range(T)])
    sig = [loss.signal(preds[t]) for t in range(T)]
    return best, losses, (np.stack([s[0] for s in sig]), np.stack([s[1] for s in sig]))


def test_moef_filters_find_the_switching_best_expert():
    best, losses, signals = switching_stream()
    agg = ag.MoEF(3, alpha=0.9)
    w, posterior = [], []
    for t in range(len(losses)):
        w.append(agg.weights())
        posterior.append(agg.pi_NN.mean(0))  # the filters' own posteriors, before the Gibbs weighting
        agg.update(losses[t], (signals[0][t], signals[1][t]))
    w, posterior = np.array(w), np.array(posterior)
    for start, end in ((0, 100), (100, 200), (200, 300)):
        settled = slice(start + 15, end)  # a few days after each switch
        assert np.mean(w[settled].argmax(1) == best[settled]) > 0.9
        assert np.mean(posterior[settled].argmax(1) == best[settled]) > 0.9
    # and Fixed-Share too, for comparison
    fs = ag.run(ag.FixedShare(3, alpha=0.05), losses)
    assert np.mean(fs[215:].argmax(1) == 2) > 0.9


def test_fixed_share_is_the_hmm_forward_recursion():
    rng = np.random.default_rng(1)
    n, T, eta, alpha = 4, 50, 0.7, 0.08
    losses = rng.random((T, n))
    got = ag.run(ag.FixedShare(n, eta=eta, alpha=alpha), losses)
    trans = (1 - alpha) * np.eye(n) + alpha / n * np.ones((n, n))  # P(s_{t+1} = j | s_t = i)
    pred = np.full(n, 1 / n)  # p(s_1)
    for t in range(T):
        np.testing.assert_allclose(got[t], pred, rtol=1e-12, atol=1e-14)
        post = pred * np.exp(-eta * losses[t])  # emission exp(-eta l)
        post /= post.sum()
        pred = post @ trans


def test_hedge_anytime_regret_bound_on_adversarial_losses():
    n, T = 5, 3000
    agg = ag.Hedge(n)
    cum, mix = np.zeros(n), 0.0
    rng = np.random.default_rng(2)
    for t in range(1, T + 1):
        w = agg.weights()
        loss = np.zeros(n)
        loss[np.argmax(w + 1e-9 * rng.random(n))] = 1.0  # the adversary hits the favourite
        loss[rng.integers(n)] = max(loss[rng.integers(n)], rng.random() < 0.3)
        mix += w @ loss
        cum += loss
        agg.update(loss)
        bound = 2 * math.sqrt(t / 2 * math.log(n)) + math.sqrt(math.log(n) / 8)  # Cesa-Bianchi & Lugosi Thm 2.3
        assert mix - cum.min() <= bound + 1e-9, t


def _all_factories():
    yield from nifty.label_aggregators(3).items()
    yield from lm_stream.lm_aggregators(3).items()


@pytest.mark.parametrize("name,make", list(_all_factories()), ids=[f"{i}-{k}" for i, (k, _) in enumerate(_all_factories())])
def test_no_aggregator_reads_a_loss_before_it_is_revealed(name, make):
    rng = np.random.default_rng(3)
    T, t0 = 40, 25
    base = rng.random((T, 3))
    other = base.copy()
    other[t0:] = rng.random((T - t0, 3)) * 3  # the future (from step t0 on) differs
    sig = rng.random((T, 3, 3)), rng.random((T, 3, 3))
    sig2 = tuple(s.copy() for s in sig)
    for s in sig2:
        s[t0:] = rng.random(s[t0:].shape)
    w1 = ag.run(make(), base, sig)
    w2 = ag.run(make(), other, sig2)
    np.testing.assert_array_equal(w1[:t0 + 1], w2[:t0 + 1])  # weights of step t0 come before its losses
    assert not np.allclose(w1[t0 + 1:], w2[t0 + 1:]) or name == "uniform"


def test_nifty_pipeline_has_no_look_ahead():
    pool = nifty.load_pool(nifty.data_root(), "llama2-7b", 42)
    preds = np.stack(list(pool.experts.values()), 1)
    t0 = 120
    y2 = pool.y.copy()
    y2[t0:] = (y2[t0:] + 1) % 3
    for make in nifty.label_aggregators(preds.shape[1]).values():
        p1, _ = nifty.run_labels(make(), pool.y, preds)
        p2, _ = nifty.run_labels(make(), y2, preds)
        np.testing.assert_array_equal(p1[:t0 + 1], p2[:t0 + 1])
    for window in (1, 10, None):
        h1, h2 = nifty.history_forecasts(pool.y, 1, window), nifty.history_forecasts(y2, 1, window)
        np.testing.assert_array_equal(h1[:t0 + 1], h2[:t0 + 1])
    assert nifty.history_forecasts(np.array([2, 0, 0, 1]), 1, 1).tolist() == [1, 2, 0, 0]
    assert nifty.history_forecasts(np.array([2, 0, 2, 0, 1]), 1, 3).tolist() == [1, 2, 0, 2, 0]


def test_moef_pieces():
    pibar = np.array([0.5, 0.3, 0.2])
    alpha = 0.7
    q = ag.moef_generator(pibar, alpha)
    p_alpha = (1 - alpha) * np.outer(np.ones(3), pibar) + alpha * np.eye(3)
    ref = np.real(logm(p_alpha))
    ref_q = np.maximum(ref, 0) * (1 - np.eye(3))
    ref_q -= np.diag(ref_q.sum(1))
    np.testing.assert_allclose(q, ref_q, atol=1e-10)  # the closed form is the paper's ReLU(log P_alpha)
    np.testing.assert_allclose(expm(q), p_alpha, atol=1e-10)
    for dt in (0.3, 1.0, 2.5):
        np.testing.assert_allclose(ag.moef_transition(pibar, alpha, dt), expm(q * dt), atol=1e-10)
    # without filters and with Hedge's rate, MoE-F's Gibbs step is Hedge
    rng = np.random.default_rng(4)
    losses = rng.random((30, 3))
    np.testing.assert_allclose(ag.run(ag.MoEF(3, use_filter=False), losses), ag.run(ag.Hedge(3), losses), atol=1e-12)
    with pytest.raises(UsageError, match="signal"):
        ag.MoEF(3).update([0.0, 1.0, 0.0])


def test_clear_errors_for_bad_losses_and_labels():
    agg = ag.FixedShare(3)
    with pytest.raises(UsageError, match="2 losses for 3 experts"):
        agg.update([0.1, 0.2])
    with pytest.raises(UsageError, match="expert 1 at step 1 is nan"):
        agg.update([0.1, float("nan"), 0.3])
    with pytest.raises(UsageError, match="not one of the 3 classes"):
        ZeroOne(3).loss(np.array([0, 1, 2]), 3)
    with pytest.raises(UsageError, match="forecast label 5"):
        ZeroOne(3).loss(np.array([0, 5, 2]), 1)
    with pytest.raises(UsageError, match="NaN"):
        Squared().loss([1.0, float("nan")], 0.5)
    with pytest.raises(UsageError, match="sum to 1"):
        CrossEntropy(2).loss(np.array([[0.5, 0.6], [0.5, 0.5]]), 0)


def test_losses_and_their_signals():
    assert ZeroOne(3).loss(np.array([0, 1, 1]), 1).tolist() == [1, 0, 0]
    a, v = ZeroOne(3).signal(np.array([0, 1, 1]))
    np.testing.assert_array_equal(a, [[0, 1, 1], [1, 0, 0], [1, 0, 0]])
    assert not v.any()
    ce = CrossEntropy(3, smoothing=0.0)
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    np.testing.assert_allclose(ce.loss(p, 2), -np.log([0.1, 0.8]))
    a, _ = ce.signal(p)
    np.testing.assert_allclose(a[0, 1], -(0.1 * np.log(0.7) + 0.1 * np.log(0.2) + 0.8 * np.log(0.1)))
    np.testing.assert_allclose(Squared().loss([1.0, 3.0], 2.0), [1.0, 1.0])
    logp = np.log(p)
    np.testing.assert_allclose(LogLoss().loss(logp, 0), -logp[:, 0])
    # the mixture of probabilities under log loss
    w = np.array([0.25, 0.75])
    np.testing.assert_allclose(ag.mixture_loss(w[None], -logp[:, 0], "log"), [-np.log(w @ p[:, 0])])


def test_metrics_match_scikit_learn_and_bootstrap():
    from sklearn.metrics import confusion_matrix

    rng = np.random.default_rng(5)
    for trial in range(5):
        y = rng.integers(0, 3, 60)
        pred = np.where(rng.random(60) < 0.5, y, rng.integers(0, 3 - (trial == 0), 60))
        ref = point_metrics(y, pred, 3)
        got = confusion_metrics(confusion_matrix(y, pred, labels=[0, 1, 2])[None])
        for m, v in ref.items():
            assert got[m][0] == pytest.approx(v, abs=1e-12), m
    # a hand computation: 2 classes, TP=3 FN=1 FP=2 TN=4
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    p = np.array([1, 1, 1, 0, 1, 1, 0, 0, 0, 0])
    ref = point_metrics(y, p, 2)
    assert ref["accuracy"] == pytest.approx(0.7)
    assert ref["mcc"] == pytest.approx((3 * 4 - 2 * 1) / math.sqrt(5 * 4 * 6 * 5))
    f1_pos, f1_neg = 2 * 3 / (2 * 3 + 1 + 2), 2 * 4 / (2 * 4 + 1 + 2)
    assert ref["weighted_f1"] == pytest.approx((4 * f1_pos + 6 * f1_neg) / 10)
    b = bootstrap(y, p, 2, resamples=200)
    for m in b.values():
        assert m["lo"] <= m["value"] <= m["hi"]


# ---- the command line ----

def test_cli_nifty_small(tmp_path):
    out = tmp_path / "nifty"
    run_cli("ensemble", "nifty", "--out", str(out), "--seeds", "42", "--pools", "llama2-7b", "--resamples", "50",
            "--no-history", check=True)
    res = json.loads((out / "results.json").read_text())
    kinds = {r["kind"] for r in res["rows"]}
    assert kinds == {"expert", "history", "aggregator", "hindsight", "reference"}
    assert {r.get("members") for r in res["rows"] if r["kind"] == "aggregator"} == {"experts"}
    names = {r["name"] for r in res["rows"]}
    assert {"moe-f", "fixed-share", "hedge", "uniform", "majority of last 10 labels"} <= names
    ref = next(r for r in res["rows"] if r["kind"] == "reference")
    assert ref["metrics"]["weighted_f1"]["value"] == pytest.approx(0.4187, abs=0.02)
    assert (out / "report.md").is_file() and (out / "weights_llama2-7b_seed42.png").stat().st_size > 10_000


def _copy_pool(tmp_path):
    root = tmp_path / "data"
    shutil.copytree(nifty.data_root() / "all-experts_seed-13", root / "all-experts_seed-13")
    return root, root / "all-experts_seed-13" / "df_dbrx-instruct.csv"


def _edit(path, fn):
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows = fn(rows)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@pytest.mark.parametrize("damage,message", [
    (lambda rows: rows[:-1], "316 days but"),
    (lambda rows: [r | {"predicted_label": "Up"} if i == 5 else r for i, r in enumerate(rows)], "unknown predicted_label 'Up'"),
    (lambda rows: [r | {"predicted_label": "nan"} if i == 7 else r for i, r in enumerate(rows)], "unknown predicted_label 'nan'"),
    (lambda rows: [r | {"label": ""} if i == 0 else r for i, r in enumerate(rows)], "unknown label ''"),
])
def test_cli_nifty_bad_input(tmp_path, damage, message):
    root, f = _copy_pool(tmp_path)
    _edit(f, damage)
    out = tmp_path / "out"  # an earlier report, to be replaced: the bad input is found before it is touched
    out.mkdir()
    (out / "results.json").write_text('{"benchmark": "nifty", "rows": []}')
    (out / "report.md").write_text("# an earlier report\n")
    before = tree_digest(out)
    proc = run_cli("ensemble", "nifty", "--data", str(root), "--seeds", "13", "--pools", "all", "--out", str(out),
                   "--overwrite")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
    assert tree_digest(out) == before


def test_cli_ensemble_usage_errors(tmp_path):
    for args, message in [
        (["nifty", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "no such folder"),
        (["nifty", "--seeds", "7", "--out", str(tmp_path / "o")], "no df_*.csv"),
        (["nifty", "--pools", "gpt5", "--out", str(tmp_path / "o")], "unknown pool"),
        (["lm", "--experts", str(tmp_path / "missing"), str(tmp_path / "m2"), "--data", "a,b", "--out",
          str(tmp_path / "o")], "no such file or folder"),
    ]:
        proc = run_cli("ensemble", *args)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert message in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()


def _code_corpus(path):
    path.mkdir()
    for i in range(30):
        lines = [f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(60)]
        (path / f"m{i:02d}.py").write_text("".join(lines))
    return path


def test_cli_lm_stream_end_to_end(corpus_dir, tmp_path):
    from mixturelm.training import Trainer, new_run_config

    code = _code_corpus(tmp_path / "code")
    runs = {}
    for name, data, extra in [("prose", corpus_dir, {}), ("code", code, {}), ("bpe", code, {"tokenizer": "bpe:300"})]:
        cfg = new_run_config("dense-debug", {"data": str(data), "max_steps": 6, "val_fraction": 0.2} | extra)
        Trainer(cfg, tmp_path / f"run-{name}", progress=False, log=lambda m: None).run()
        runs[name] = str(tmp_path / f"run-{name}")
    out = tmp_path / "lm"
    run_cli("ensemble", "lm", "--experts", runs["prose"], runs["code"], "--data", f"{corpus_dir},{code}",
            "--segments", "4", "--segment-len", "80", "--resamples", "50", "--out", str(out), check=True)
    res = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in res["rows"]}
    assert [s["source"] for s in res["segments"]] == [str(corpus_dir), str(code)] * 2
    assert res["tokens"] == 4 * 80
    oracle = next(r for r in res["rows"] if r["kind"] == "oracle")["bits_per_byte"]["value"]
    experts = [r["bits_per_byte"]["value"] for r in res["rows"] if r["kind"] == "expert"]
    assert oracle <= min(experts) + 1e-9
    # a Bayes mixture is never worse than its worst expert, and within ln N nats of the best in total
    hedge = rows["hedge (Bayes mixture)"]["bits_per_byte"]["value"]
    assert hedge <= max(experts)
    assert hedge * res["bytes"] <= min(experts) * res["bytes"] + math.log2(2) + 1e-6
    assert (out / "weights.png").stat().st_size > 10_000
    with pytest.raises(UsageError, match="do not share a tokenizer"):
        lm_stream.load_experts([runs["prose"], runs["bpe"]], "cpu")
    from mixturelm.data.tokenizer import ByteTokenizer

    with pytest.raises(UsageError, match="held-out tokens, fewer than the 200 segments"):
        lm_stream.build_stream([str(corpus_dir), str(code)], ByteTokenizer(), "bytes", 0.2, "text", 80, 400, log=print)
