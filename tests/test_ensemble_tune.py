"""Tuning aggregators honestly: development and test streams never share a document, the choice uses only the
development streams, and MoE-F's variants (discounted Gibbs scores, the joint posterior) against loops by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import make_text
from mixturelm import UsageError
from mixturelm.data.corpus import is_validation
from mixturelm.data.tokenizer import ByteTokenizer
from mixturelm.ensemble import aggregators as ag
from mixturelm.ensemble import lm_stream, tune


def _two_sources(root):
    """120 small documents of code-like text and 120 of prose, in two folders."""
    (root / "code").mkdir(parents=True)
    (root / "prose").mkdir()
    for i in range(120):
        (root / "code" / f"m{i:03d}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x * {j}\n" for j in range(8)))
        (root / "prose" / f"p{i:03d}.txt").write_text(make_text(40, i))
    return str(root / "code"), str(root / "prose")


def test_dev_and_test_streams_never_share_a_document(tmp_path):
    code, prose = _two_sources(tmp_path / "data")
    vf, tok = 0.5, ByteTokenizer()
    streams = {part: lm_stream.build_stream([code, prose], tok, "bytes", vf, "text", 60, 8, part=part)
               for part in ("dev", "test")}
    docs = {part: {d for s in segs for d in s.documents} for part, segs in streams.items()}
    assert docs["dev"] and docs["test"] and not docs["dev"] & docs["test"]
    for part, names in docs.items():
        for d in names:  # every document of every stream is held out from an expert trained at vf
            name = d.split("/")[-1]
            assert is_validation(name, vf) and lm_stream.dev_or_test(name) == part
    # the whole halves, not only the documents the segments happen to cover, are disjoint
    halves = {p: {i for i, _ in lm_stream.held_out_documents(src, vf, p)} for p in ("dev", "test") for src in [code]}
    assert halves["dev"] and halves["test"] and not halves["dev"] & halves["test"]
    # the second hash is not the first: about half of the held-out documents go each way
    names = [f"doc{i}" for i in range(2000)]
    held = [n for n in names if is_validation(n, 0.1)]
    assert 0.4 < np.mean([lm_stream.dev_or_test(n) == "dev" for n in held]) < 0.6
    # a source given twice under two names (its folder, and the folder above it) is caught
    with pytest.raises(UsageError, match="share .* document"):
        tune.check_disjoint([[code, prose]], [[str(tmp_path / "data"), prose]], vf)
    tune.check_disjoint([[code, prose]], [[prose, code]], vf)


def _signals(rng, T, n):
    a = rng.uniform(0.5, 4, size=(T, n, n))
    return a, rng.uniform(0, 2, size=(T, n, n))


def test_discounted_gibbs_scores_against_a_hand_loop():
    rng = np.random.default_rng(0)
    T, n, gamma = 40, 3, 0.8
    losses = rng.exponential(2.0, size=(T, n))
    # without filters each proposal is its own expert: the Gibbs weights are a soft-min of discounted losses
    agg = ag.MoEF(n, alpha=0.9, lam=1.0, mix="log", use_filter=False, use_q_update=False, score_discount=gamma)
    scores = np.zeros(n)
    for t in range(T):
        w = np.exp(-(scores - scores.min()))
        np.testing.assert_allclose(agg.weights(), w / w.sum(), rtol=1e-12)
        agg.update(losses[t])
        scores = gamma * scores + losses[t]
    # with the filters: the scores are the proposals' log-mixture losses, discounted
    a, v = _signals(rng, T, n)
    agg = ag.MoEF(n, alpha=0.9, lam=1.0, mix="log", noise=1.0, score_discount=gamma)
    scores = np.zeros(n)
    for t in range(T):
        props = agg.proposals().copy()
        agg.update(losses[t], (a[t], v[t]))
        scores = gamma * scores + (-np.log(props @ np.exp(-losses[t])))
        np.testing.assert_allclose(agg.scores, scores, rtol=1e-10)
    # a discount of 1 is the paper's cumulative score, bit for bit
    w1 = ag.run(ag.MoEF(n, alpha=0.9, mix="log", noise=1.0, score_discount=1.0), losses, (a, v))
    w0 = ag.run(ag.MoEF(n, alpha=0.9, mix="log", noise=1.0), losses, (a, v))
    assert np.array_equal(w0, w1)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(UsageError, match="score_discount"):
            ag.MoEF(n, score_discount=bad)


def _normal(x, mean, var):
    return math.exp(-0.5 * (x - mean) ** 2 / var) / math.sqrt(var)  # the constant 2 pi cancels


def test_joint_posterior_mixture_by_hand():
    # two experts, two steps, every number written out
    alpha, noise = 0.9, 1.0
    a = [np.array([[1.0, 2.5], [3.0, 0.5]]), np.array([[2.0, 1.0], [0.7, 2.2]])]
    v = [np.array([[0.2, 0.4], [0.1, 0.3]]), np.array([[0.5, 0.1], [0.2, 0.2]])]
    losses = [np.array([1.2, 0.6]), np.array([2.1, 0.9])]
    agg = ag.MoEF(2, alpha=alpha, noise=noise, mix="log", mixture="posterior")
    assert np.allclose(agg.weights(), [0.5, 0.5])
    prior = np.array([0.5, 0.5])
    transition = np.array([[alpha + (1 - alpha) / 2, (1 - alpha) / 2], [(1 - alpha) / 2, alpha + (1 - alpha) / 2]])
    for t in range(2):
        lik = np.array([_normal(losses[t][0], a[t][0, i], v[t][0, i] + noise ** 2)
                        * _normal(losses[t][1], a[t][1, i], v[t][1, i] + noise ** 2) for i in range(2)])
        post = prior * lik / (prior * lik).sum()
        if t == 0:
            # one step, no move yet: the product of the two single-loss filters' posteriors over the prior
            single = [prior * np.array([_normal(losses[0][m], a[0][m, i], v[0][m, i] + noise ** 2)
                                        for i in range(2)]) for m in range(2)]
            single = [s / s.sum() for s in single]
            prod = single[0] * single[1] / prior
            np.testing.assert_allclose(prod / prod.sum(), post, rtol=1e-12)
        agg.update(losses[t], (a[t], v[t]))
        prior = post @ transition
        np.testing.assert_allclose(agg.weights(), prior, rtol=1e-12)


def _scored(losses_TN, seg_len):
    T, n = losses_TN.shape
    segs = [lm_stream.Segment(0, np.zeros(seg_len + 1, dtype=np.int64), seg_len) for _ in range(T // seg_len)]
    z = np.zeros((T, n, n))
    return tune.Scored(["a", "b"], segs, losses_TN, z, z)


def test_the_choice_uses_only_the_development_streams():
    rng = np.random.default_rng(1)
    T = 400
    # development: expert 0 is always best (switching costs); test: the best expert flips every 10 tokens
    dev = np.column_stack([rng.uniform(0.5, 1.0, T), rng.uniform(2.0, 3.0, T)])
    flips = (np.arange(T) // 10) % 2 == 1
    test = dev.copy()
    test[flips] = test[flips][:, ::-1]
    variant = tune.Variant("fixed-share", lambda n, switch: ag.FixedShare(n, eta=1.0, alpha=switch),
                           {"switch": (0.3, 1e-4)})
    params, tried = tune.choose(variant, [_scored(dev, 40)], 2)
    assert params == {"switch": 1e-4} and len(tried) == 2
    on_test = {s: _scored(test, 40).mix(variant.make(2, switch=s)).sum() for s in (0.3, 1e-4)}
    assert on_test[0.3] < on_test[1e-4]  # the other point is better on test, and was not chosen


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    from mixturelm.training import Trainer, new_run_config

    root = tmp_path_factory.mktemp("tune")
    code, prose = _two_sources(root / "data")
    runs = []
    for name, data in (("code", code), ("prose", prose)):
        cfg = new_run_config("dense-debug", {"data": data, "max_steps": 2, "val_fraction": 0.5})
        Trainer(cfg, root / f"run-{name}", progress=False, log=lambda m: None).run()
        runs.append(str(root / f"run-{name}"))
    return root, code, prose, runs


GRID = ["--switch-rates", "0.01,0.1", "--noises", "1", "--discounts", "0.9,1", "--windows", "8",
        "--segments", "4", "--segment-len", "40", "--resamples", "20"]


def test_cli_tune_end_to_end(experts):
    root, code, prose, runs = experts
    out = root / "out"
    from mixturelm.cli import main

    assert main(["ensemble", "tune", "--experts", *runs, "--dev-data", f"{code},{prose}", "--test-data",
                 f"{code},{prose};{prose},{code}", "--out", str(out), *GRID]) == 0
    res = json.loads((out / "results.json").read_text())
    assert len(res["test"]) == 2 and res["test_pooled"] is not None
    dev_docs = {d for s in res["dev"]["streams"] for g in s["segments"] for d in g["documents"]}
    test_docs = {d for s in res["test"] for g in s["segments"] for d in g["documents"]}
    assert dev_docs and test_docs and not dev_docs & test_docs
    assert res["dev"]["chosen"]["fixed-share"]["switch"] in (0.01, 0.1)
    assert len(res["dev"]["tried"]["moe-f, discounted Gibbs scores"]) == 4
    rows = {r["name"]: r for r in res["test"][0]["result"]["rows"]}
    assert rows["fixed-share"]["minus_fixed_share"]["value"] == 0
    assert "moe-f, joint posterior as the mixture" in rows
    assert "Test stream" in (out / "report.md").read_text()


@pytest.mark.parametrize("change, message", [
    (lambda c, p, r: ["--dev-data", f"{c},{r}/missing"], "no such file or folder"),
    (lambda c, p, r: ["--test-data", f"{r},{p}"], "share"),
    (lambda c, p, r: ["--discounts", "0.9,1.5"], "must be in (0, 1]"),
    (lambda c, p, r: ["--switch-rates", "0"], "must be in (0, 1)"),
    (lambda c, p, r: ["--dev-data", c], "has 1 source"),
])
def test_cli_tune_bad_input(experts, change, message, capsys):
    from mixturelm.cli import main

    root, code, prose, runs = experts
    out = root / "refused"
    args = {"--dev-data": f"{code},{prose}", "--test-data": f"{prose},{code}"}
    extra = change(code, prose, str(root / "data"))
    args.update(zip(extra[::2], extra[1::2]))
    code_ = main(["ensemble", "tune", "--experts", *runs, "--out", str(out), *GRID, *[x for kv in args.items() for x in kv]])
    err = capsys.readouterr().err
    assert code_ == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not out.exists() or not any(p.name != ".mixturelm-lock" for p in out.iterdir())


def test_streams_leave_out_the_stdlib_copy_of_the_pydoc_topics():
    from mixturelm.ensemble.lm_stream import held_out_documents

    names = [d.name for part in ("dev", "test") for _, d in held_out_documents("stdlib", 0.1, part)]
    assert names and not [n for n in names if n.startswith("pydoc_data/")]
