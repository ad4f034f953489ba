"""The benchmarks run end to end and record what they measured (no timing is asserted: machines are noisy)."""

from __future__ import annotations

import json

import pytest

from mixturelm.bench import (MoDBenchConfig, MoEBenchConfig, PEERBenchConfig, TrainBenchConfig, bench_mod,
                             bench_moe, bench_peer, bench_train)


def test_bench_moe_smoke(tmp_path):
    result = bench_moe(MoEBenchConfig(steps=1, rounds=1, tokens=64, no_memory=True, out=str(tmp_path)))
    saved = json.loads((tmp_path / "results.json").read_text())
    for shape in result["shapes"].values():
        rows = shape["contenders"]
        assert rows["dense floor"]["x_dense_floor"] == pytest.approx(1.0)
        assert all(r["fwd_bwd_s"] > 0 and r["decode_1_token_s"] > 0 for r in rows.values())
    assert saved["tokens"] == 64 and "machine" in saved


@pytest.mark.slow
def test_bench_train_smoke(tmp_path):
    result = bench_train(TrainBenchConfig(steps=1, rounds=1, batch_size=2, seq_len=32, out=str(tmp_path)))
    assert result["params"]["mixturelm"] == result["params"]["transformers Llama"]  # the same shape
    assert result["ratio_tok_per_s_ours_over_peer"] > 0


def test_bench_mod_smoke(tmp_path):
    result = bench_mod(MoDBenchConfig(steps=1, rounds=1, batch_size=1, seq_len=64, capacity=0.125, decode_tokens=4,
                                      out=str(tmp_path)))
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    flops = rows["forward FLOPs/token (analytic)"]
    assert flops["MoD"] < 0.6 * flops["dense"]
    assert rows["forward FLOPs/token (counted)"]["MoD"] == pytest.approx(flops["MoD"], rel=0.02)
    assert all(r["dense"] > 0 and r["MoD"] > 0 for r in rows.values())
    assert 0 <= result["decode_batch1_fraction_entered"] <= 1


def test_bench_peer_smoke(tmp_path):
    """A tiny PEER shape; PEER-pytorch joins when installed (the `bench` and `dev` extras)."""
    try:
        import PEER_pytorch  # noqa: F401
        no_peer = False
    except ImportError:
        no_peer = True
    result = bench_peer(PEERBenchConfig(steps=1, rounds=1, tokens=32, no_memory=True, out=str(tmp_path),
                                        n_experts=16 * 16, d_model=16, heads=2, top_k=4, d_key=8, no_peer=no_peer))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["expert_rows"]["pairs"] == 32 * 2 * 4
    assert result["contenders"]["mixturelm PEER"]["fwd_bwd_s"] > 0 and result["copy_bytes_per_s"] > 0
    assert no_peer or result["speedup_over_peer"] > 0


@pytest.mark.slow
def test_bench_compile_smoke(tmp_path):
    from mixturelm.bench import CompileBenchConfig, bench_compile

    result = bench_compile(CompileBenchConfig(steps=1, rounds=1, presets="dense-debug,peer-debug", batch_size=2,
                                              seq_len=16, out=str(tmp_path)))
    assert set(result["presets"]) == {"dense-debug", "peer-debug"}
    assert result["presets"]["dense-debug"]["graph_breaks"] == []
    assert all(r["speedup"] > 0 for r in result["presets"].values())


@pytest.mark.slow
def test_bench_moe_and_peer_compile_smoke(tmp_path):
    moe = bench_moe(MoEBenchConfig(steps=1, rounds=1, tokens=64, no_memory=True, compile=True))
    assert all(s["contenders"]["mixturelm MoE (compiled)"]["fwd_bwd_s"] > 0 for s in moe["shapes"].values())
    peer = bench_peer(PEERBenchConfig(steps=1, rounds=1, tokens=32, no_memory=True, no_peer=True, compile=True,
                                      n_experts=64 * 64, d_model=32, heads=2, top_k=4, d_key=16))
    assert peer["contenders"]["mixturelm PEER (compiled)"]["fwd_bwd_s"] > 0
