"""`mixturelm bench parallel` at the tiniest size: it launches 1 and 2 processes, writes results.json, and the
bytes its exchanges send equal the formula of docs/parallel.md exactly (no timing is asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from mixturelm.cli import main

T, D, E, K, LAYERS, STEPS = 16, 8, 4, 2, 2, 2
TINY = ["--tokens", str(T), "--d-model", str(D), "--n-experts", str(E), "--top-k", str(K), "--d-expert", "8",
        "--layers", str(LAYERS), "--steps", str(STEPS), "--rounds", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "parallel"
    assert main(["bench", "parallel", "--procs", "1,2", *TINY, "--out", str(out)]) == 0
    return json.loads((out / "results.json").read_text())


def test_records_every_field(results):
    assert list(results["procs"]) == ["1", "2"] and results["backend"] == "gloo"
    assert results["command"].startswith("mixturelm bench parallel --procs 1,2")
    for p, s in results["procs"].items():
        assert s["tokens_per_s"] > 0 and s["step_s_min"] <= s["step_s"] <= s["step_s_max"]
        assert len(s["ranks"]) == int(p) and len(s["all_rounds"]) == 1
        for rank in s["ranks"]:
            assert rank["peak_rss_bytes"] > 0 and "peak_rss_growth_bytes" in rank
            assert set(rank["exchange_s"]) == {"counts", "dispatch", "combine", "dispatch backward",
                                               "combine backward"}
            assert 0 <= rank["exchange_share"] <= 1
    assert results["procs"]["1"]["x_one_process"] == pytest.approx(1.0)
    # the plain layer exchanges nothing
    assert results["procs"]["1"]["all_rounds"][0][0]["exchanges"] == {}
    assert results["procs"]["1"]["formula"]["sent"] == 0


def test_measured_bytes_equal_the_formula(results):
    """Dropless top-k: each process's A = T x k assignment rows go out in the dispatch and their gradients in the
    combine's backward; the rows its experts received (R) go back in the combine and the dispatch's backward.
    Over the processes R sums to A, so the bytes sent (own experts' rows included) sum to P x the formula."""
    s = results["procs"]["2"]
    row_bytes = D * 4  # fp32
    ranks = s["all_rounds"][0]
    for rank in ranks:
        ex = rank["exchanges"]
        assert ex["dispatch"]["sent"] == ex["combine backward"]["sent"] == STEPS * LAYERS * T * K * row_bytes
        assert ex["combine"]["received"] == ex["dispatch backward"]["received"] == STEPS * LAYERS * T * K * row_bytes
        assert ex["counts"]["sent"] == ex["counts"]["received"] == STEPS * LAYERS * E * 8
        assert ex["dispatch"]["calls"] == ex["dispatch backward"]["calls"] == STEPS * LAYERS
        # the rows a process's experts received come back to their tokens' processes, both ways
        assert ex["combine"]["sent"] == ex["dispatch"]["received"] == ex["dispatch backward"]["sent"]
    assert s["formula"]["sent"] == 4 * LAYERS * T * K * row_bytes + LAYERS * E * 8
    sent = sum(t["sent"] for rank in ranks for t in rank["exchanges"].values())
    received = sum(t["received"] for rank in ranks for t in rank["exchanges"].values())
    assert sent == received == 2 * STEPS * s["formula"]["sent"]
    assert s["bytes_sent_mean"] == pytest.approx(s["formula"]["sent"])
    assert 0 < s["bytes_sent_to_others_mean"] < s["bytes_sent_mean"]


@pytest.mark.parametrize("args, words", [
    (["--procs", "1,3"], "--procs has 3, which does not divide n_experts=8"),
    (["--procs", "1,0"], "--procs must be positive integers"),
    (["--procs", "two"], "--procs must be positive integers"),
    (["--tokens", "0"], "--tokens must be a positive integer"),
    (["--d-model", "-4"], "--d-model must be a positive integer"),
    (["--layers", "0"], "--layers must be a positive integer"),
    (["--top-k", "9"], "--top-k=9 exceeds n_experts=8"),
    (["--device", "tpu"], "--device must be cpu or cuda"),
    (["--device", "cuda"], "sees no CUDA device"),
])
def test_bad_input_exits_2_before_anything_runs(args, words, capsys, monkeypatch, tmp_path):
    if args == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    import mixturelm.bench.parallel as bench

    monkeypatch.setattr(bench, "launch", lambda *a: pytest.fail("a process was launched"))
    assert main(["bench", "parallel", *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "out").exists()


def test_the_recorder_is_off_outside_its_block():
    from mixturelm.parallel import expert

    assert expert._recorder is None
    with expert.record_exchanges() as stats:
        assert expert._recorder is stats
        with expert.record_exchanges() as inner:
            assert expert._recorder is inner
        assert expert._recorder is stats
    assert expert._recorder is None
