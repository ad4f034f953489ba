"""The benchmarks run end to end and record what they measured (no timing is asserted: machines are noisy)."""

from __future__ import annotations

import json

import pytest

from mixturelm.bench import (MoDBenchConfig, MoEBenchConfig, PEERBenchConfig, TrainBenchConfig, bench_mod,
                             bench_moe, bench_peer, bench_train)


@pytest.mark.slow  # a minute: it builds every contender at the benchmark's full shapes (64 experts of 512 x 1408)
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
                                      decode_batches="1,2", out=str(tmp_path)))
    saved = json.loads((tmp_path / "results.json").read_text())
    rows = saved["rows"]
    flops = rows["forward FLOPs/token (analytic)"]
    assert flops["MoD"] < 0.6 * flops["dense"]
    assert rows["forward FLOPs/token (counted)"]["MoD"] == pytest.approx(flops["MoD"], rel=0.02)
    assert all(r["dense"] > 0 and r["MoD"] > 0 for r in rows.values())
    decode = saved["decode"]["batches"]
    assert list(decode) == ["1", "2"] and decode["1"]["sequences"] == decode["2"]["sequences"] == 2
    # each row routes on its own: the same sequences let in the same share at every batch size
    assert decode["1"]["routing"]["share"] == pytest.approx(decode["2"]["routing"]["share"])
    for x in decode.values():
        assert x["MoD"]["bound_tokens_per_s"] > 0 and x["dense"]["tokens_per_s"] > 0
    assert 0 <= result["prefill_share"] <= 1
    # the prefills' counted FLOPs: fewer for MoD where any share under 100 % skips the routed blocks
    assert result["prefill_flop_speedup"] > 1 or result["prefill_share"] == 1
    timed = [rows[name] for name in rows if "FLOPs" not in name] + list(decode.values())
    for row in timed:  # speed-ups paired by round, with their spread
        assert row["speedup_min"] <= row["speedup"] <= row["speedup_max"]
        assert len(row["all_rounds_s"]["dense"]) == len(row["all_rounds_s"]["MoD"]) == 1


def test_interleaved_timing_alternates_which_contender_goes_first():
    from mixturelm.bench.timing import time_alternating

    calls = []
    contenders = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    times = time_alternating(contenders, steps=3, rounds=2, warmup=1, interleave=True)
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b"] * 2  # warm-up, then call by call, the order turned
    assert {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2} and all(t >= 0 for v in times.values() for t in v)
    calls.clear()
    time_alternating(contenders, steps=2, rounds=1, warmup=0)
    assert calls == ["a", "a", "b", "b"]  # the default: each contender's calls back to back


def test_paired_speedup_by_hand():
    from mixturelm.bench.timing import paired_speedup
    # paired by round the ratios are 2, 2.5 and 2; the ratio of the medians would say 5 / 2 = 2.5
    assert paired_speedup([2.0, 5.0, 6.0], [1.0, 2.0, 3.0]) == {"speedup": 2.0, "speedup_min": 2.0, "speedup_max": 2.5}
    with pytest.raises(ValueError):
        paired_speedup([1.0, 2.0], [1.0])


def test_decode_bound_by_hand():
    """decode_bound against a hand count for a 2-block model (d 8, 2 heads of 4, FFN 16, vocabulary 11, tied
    head), block 1 routed, at batch 3: per block 656 weights (norms 8 + 8, qkv 8 x 24, out 8 x 8, gate-up
    8 x 32, down 16 x 8), 640 of them in matrices; 64 key/value bytes and 32 attention FLOPs per cached token."""
    from mixturelm import MixtureLM, ModelConfig
    from mixturelm.bench.decode_bound import Machine, decode_stages, step_seconds
    from mixturelm.config import BlockSpec
    from mixturelm.layers.mod import MoDConfig

    model = MixtureLM(ModelConfig(vocab_size=11, d_model=8, n_layers=2, n_heads=2, d_ffn=16, max_seq_len=16,
                                  blocks=[BlockSpec(), BlockSpec(wrapper="mod", mod=MoDConfig())]))
    one_row_enters = decode_stages(model, batch=3, context=10, routed_contexts=[[4]])
    assert one_row_enters == [(2624, 3 * 1280), (3 * 10 * 64, 3 * 10 * 32),  # block 0: weights, attention
                              (32, 3 * 16),  # block 1's router, every row
                              (2624, 1280), (4 * 64, 4 * 32),  # block 1 for the one row, over its 4 tokens
                              (352, 3 * 176)]  # the head
    machine = Machine(bytes_per_s=1000.0, flops_per_s=2000.0)
    assert step_seconds(one_row_enters, machine) == pytest.approx(2.624 + 1.92 + 0.032 + 2.624 + 0.256 + 0.352)
    # no row enters: the routed block's weights are not read
    assert step_seconds(decode_stages(model, 3, 10, [[]]), machine) == pytest.approx(2.624 + 1.92 + 0.032 + 0.352)


@pytest.mark.parametrize("batches", ["0", "1,-4", "2.5", "1,,4", "four", "", [], [1, True], 4])
def test_bench_mod_bad_decode_batches(batches):
    from mixturelm.errors import UsageError

    with pytest.raises(UsageError, match="MoDBenchConfig.decode_batches must be positive integers"):
        MoDBenchConfig(decode_batches=batches)


def test_bench_mod_bad_decode_batches_on_the_command_line(capsys):
    from mixturelm.cli import main

    assert main(["bench", "mod", "--decode-batches", "1,0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--decode-batches must be positive integers" in err[0], err


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
