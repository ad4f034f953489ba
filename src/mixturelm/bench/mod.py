"""bench mod: Mixture-of-Depths (12.5 %, every other block) against the dense model of the same shape:
forward FLOPs, prefill time, training step and decoding tokens/s, in one run."""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import BlockSpec, ModelConfig
from ..errors import UsageError
from ..files import machine
from ..flops import flop_counter, forward_flops_per_token, measure_matmul_flops
from ..layers.mod import MoDConfig
from ..mechanisms.mod import calibrate_on_decoding
from ..model import MixtureLM
from ..training.compiling import compiled
from .decode_bound import Machine
from .mod_decode import decode_at, prefilled_pool, ragged_lengths
from .timing import (check_config, machine_line, paired_speedup, positive_int_list, prepare, read_bandwidth,
                     save_results, time_alternating, train_step_fn)

MOD_SHAPE = dict(vocab_size=257, d_model=512, n_layers=8, n_heads=8, d_ffn=1408)
DEFAULT_SEQ_LEN, DEFAULT_BATCH_SIZE = 1024, 2
PREFILL_CALLS_PER_STEP = 4  # a prefill costs about a sixth of a training step: more calls make a round as steady


@dataclass(kw_only=True)
class MoDBenchConfig:
    steps: int = 5  # timed steps per contender per round (prefills: PREFILL_CALLS_PER_STEP times as many)
    rounds: int = 3  # rounds, alternating the models
    batch_size: int | None = None  # training-step batch; None: 2
    seq_len: int | None = None  # None: 1024
    capacity: float = 0.125  # fraction of tokens entering a routed block
    decode_tokens: int = 32  # tokens decoded after each prompt
    decode_batches: tuple[int, ...] | str = (1, 4, 16, 64)  # batch sizes decoded; text: "1,4,16,64"
    threads: int | None = None  # torch threads; None: all cores
    compile: bool = False  # the training step of both models through torch.compile (prefill, decoding eager)
    out: str | None = None  # also write results.json there
    overwrite: bool = False  # replace an earlier benchmark's results in out

    def __post_init__(self) -> None:
        check_config(self, positive=("steps", "rounds", "decode_tokens"),
                     optional_positive=("batch_size", "seq_len", "threads"))
        c = self.capacity
        if isinstance(c, bool) or not isinstance(c, (int, float)) or math.isnan(c) or not 0 < c <= 1:
            raise UsageError(f"MoDBenchConfig.capacity must be in (0, 1] (a fraction of the sequence), got {c!r}")
        self.decode_batches = batch_sizes(self.decode_batches)


def batch_sizes(value) -> tuple[int, ...]:
    """Positive integers, as a tuple: a sequence of them, or the command line's text "1,4,16,64"."""
    return positive_int_list(value, "MoDBenchConfig.decode_batches", "1,4,16,64")


def _mod_models(seq_len: int, capacity: float) -> dict[str, MixtureLM]:
    dense_cfg = ModelConfig(**MOD_SHAPE, max_seq_len=seq_len)
    blocks = [BlockSpec(wrapper="mod", mod=MoDConfig(capacity=capacity)) if i % 2 else BlockSpec()
              for i in range(dense_cfg.n_layers)]
    models = {}
    for name, cfg in (("dense", dense_cfg), ("MoD", ModelConfig(**(dense_cfg.to_dict() | {"blocks": blocks})))):
        torch.manual_seed(0)
        models[name] = MixtureLM(cfg)
    return models


CALIBRATION_ROWS = 128  # sequences that set the thresholds: the share a sequence lets in varies (calibrate_on_decoding)


def _calibrate_mod(model: MixtureLM, prompt_len: int, new_tokens: int) -> list[float]:
    """Set the sampling thresholds on the distribution decoding sees (mechanisms.mod.calibrate_on_decoding),
    from prompts and fed tokens of their own: the decoding that is measured uses other ones."""
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, MOD_SHAPE["vocab_size"], (CALIBRATION_ROWS, prompt_len), generator=g)
    feed = torch.randint(0, MOD_SHAPE["vocab_size"], (CALIBRATION_ROWS, new_tokens), generator=g)
    return calibrate_on_decoding(model, prompt, feed)


def bench_mod(cfg: MoDBenchConfig, command: str = "") -> dict:
    """MoD against dense, same shape, one run: forward FLOPs, prefill time, training step, and decoding
    tokens/s at each batch size beside the least time the machine allows."""
    out = prepare(cfg)
    seq_len, batch = cfg.seq_len or DEFAULT_SEQ_LEN, cfg.batch_size or DEFAULT_BATCH_SIZE
    prompt_len = seq_len // 2
    models = _mod_models(seq_len, cfg.capacity)
    thresholds = _calibrate_mod(models["MoD"], prompt_len, cfg.decode_tokens)
    result = {"machine": machine(), "command": command,
              "shape": MOD_SHAPE | {"seq_len": seq_len, "train_batch": batch, "dtype": "fp32",
                                    "mod": f"capacity {cfg.capacity}, every other block (4 of 8)"},
              "thresholds": thresholds, "rows": {}}
    _flop_rows(models, seq_len, result)
    _prefill_rows(models, seq_len, cfg, result)
    _training_rows(models, seq_len, batch, cfg, result)
    hw = Machine(bytes_per_s=read_bandwidth(), flops_per_s=measure_matmul_flops())
    result["machine_bound"] = {"read_bytes_per_s": hw.bytes_per_s, "matmul_flops_per_s": hw.flops_per_s}
    pool = prefilled_pool(models, max(cfg.decode_batches), prompt_len, cfg.decode_tokens, MOD_SHAPE["vocab_size"])
    result["decode"] = {"prompt_len": prompt_len, "new_tokens": cfg.decode_tokens,
                        "batches": {str(b): decode_at(models, pool, b, cfg.rounds, hw) for b in cfg.decode_batches}}
    for name, row in result["rows"].items():
        row.setdefault("speedup", row["dense"] / row["MoD"])  # FLOPs: a plain ratio; timed rows: paired by round
    print_mod(result)
    save_results(out, result)
    return result


def _flop_rows(models: dict[str, MixtureLM], seq_len: int, result: dict) -> None:
    """Forward FLOPs per token: analytic, and counted by FlopCounterMode on one sequence (top-k routing)."""
    idx = torch.randint(0, MOD_SHAPE["vocab_size"], (1, seq_len))
    counted = {}
    for name, m in models.items():
        with torch.no_grad(), flop_counter() as fc:
            m(idx)
        counted[name] = fc.get_total_flops() / seq_len
    analytic = {n: forward_flops_per_token(m.config, seq_len) for n, m in models.items()}
    result["rows"]["forward FLOPs/token (analytic)"] = analytic
    result["rows"]["forward FLOPs/token (counted)"] = counted
    result["flop_ratio"] = analytic["MoD"] / analytic["dense"]
    result["goal_speedup"] = 0.9 / result["flop_ratio"]


def _prefill_rows(models: dict[str, MixtureLM], seq_len: int, cfg: MoDBenchConfig, result: dict) -> None:
    """One prompt of seq_len tokens into a fresh cache (causal routing), and the share that entered. Each step's
    PREFILL_CALLS_PER_STEP calls prefill as many different prompts: the share one prompt lets into the routed blocks
    swings with the prompt (8 to 19 % over six random prompts at a 12.5 % calibration, and the prefill's time with
    it), so that one prompt alone would measure its own share more than the model."""
    prompts = torch.randint(0, MOD_SHAPE["vocab_size"], (PREFILL_CALLS_PER_STEP, 1, seq_len))

    def prefill(m: MixtureLM) -> Callable[[], None]:
        calls = 0

        def fn() -> None:
            nonlocal calls
            idx = prompts[calls % PREFILL_CALLS_PER_STEP]
            calls += 1
            with torch.no_grad():
                cache = m.new_cache(1, seq_len)
                m(idx, cache=cache, last_only=True)
                shares.extend(float(n.sum()) / seq_len for n in ragged_lengths(cache))
        return fn

    shares: list[float] = []  # of every prefill: they all route alike
    calls = cfg.steps * PREFILL_CALLS_PER_STEP
    times = time_alternating({n: prefill(m) for n, m in models.items()}, calls, cfg.rounds, warmup=1, interleave=True)
    result["rows"][f"prefill {seq_len} tokens, batch 1 (s)"] = _timed_row(times)
    result["prefill_share"] = statistics.mean(shares)
    # the FLOPs these prefills need, counted as they routed: their share is not exactly the capacity
    flops = dict.fromkeys(models, 0.0)
    for idx in prompts:
        for name, m in models.items():
            with torch.no_grad(), flop_counter() as fc:
                m(idx, cache=m.new_cache(1, seq_len), last_only=True)
            flops[name] += fc.get_total_flops()
    result["prefill_flop_speedup"] = flops["dense"] / flops["MoD"]


def _timed_row(times: dict[str, list[float]]) -> dict:
    """Each model's median seconds per call, its per-round times, and MoD's speed-up paired by round."""
    return ({n: statistics.median(t) for n, t in times.items()} | {"all_rounds_s": times}
            | paired_speedup(times["dense"], times["MoD"]))


def _training_rows(models: dict[str, MixtureLM], seq_len: int, batch: int, cfg: MoDBenchConfig,
                   result: dict) -> None:
    """Training steps of copies of the models: the optimizer moves the weights, and AdamW's first steps
    move each router weight by about the learning rate, which shifts the router scores by more than their
    spread in an untrained model; the models measured afterwards must keep their calibrated routing."""
    train_batch = torch.randint(0, MOD_SHAPE["vocab_size"], (batch, seq_len + 1))
    copies = {n: copy.deepcopy(m).train() for n, m in models.items()}
    forwards = {n: compiled(m) if cfg.compile else m for n, m in copies.items()}  # compiled in the warm-up
    steps = {n: train_step_fn(m, lambda x, f=forwards[n]: f(x).logits, train_batch) for n, m in copies.items()}
    times = time_alternating(steps, cfg.steps, cfg.rounds, warmup=2 if cfg.compile else 1, interleave=True)
    row = f"training step{', compiled' if cfg.compile else ''}, {batch} x {seq_len} tokens (s)"
    result["rows"][row] = _timed_row(times)


def print_mod(r: dict) -> None:
    print(machine_line(r["machine"]))
    print(f"shape: {r['shape']}")
    print(f"{'':<44}{'dense':>12}{'MoD':>12}{'MoD speed-up':>14}{'rounds':>14}")
    for name, row in r["rows"].items():
        fmt = (lambda v: f"{v / 1e6:>11.1f}M") if "FLOPs" in name else (lambda v: f"{v:>12.3f}")
        label = "x fewer" if "FLOPs" in name else "x"
        spread = f"{row['speedup_min']:>8.2f}-{row['speedup_max']:.2f}" if "speedup_min" in row else ""
        print(f"{name:<44}{fmt(row['dense'])}{fmt(row['MoD'])}{row['speedup']:>12.2f}{label:>2}{spread}"[:130])
    print("(timed rows: seconds are each model's median; the speed-up is the median over rounds of dense / MoD "
          "in the same round, and `rounds` its least and greatest round)")
    flop_speedup = 1 / r["flop_ratio"]
    prefill = next(row["speedup"] for name, row in r["rows"].items() if name.startswith("prefill"))
    print(f"FLOP speed-up {flop_speedup:.2f}x (at the capacity); prefill {prefill:.2f}x = {prefill / flop_speedup:.1%} "
          f"of it (goal 90 %)")
    if "prefill_flop_speedup" in r:
        counted = r["prefill_flop_speedup"]
        print(f"the prompts prefilled let {r['prefill_share']:.1%} of their tokens into the routed blocks: counted as "
              f"they routed, their prefills need {counted:.2f}x fewer FLOPs, and prefill's {prefill:.2f}x is "
              f"{prefill / counted:.1%} of that")
    _print_decode(r)


def _print_decode(r: dict) -> None:
    d, hw = r["decode"], r["machine_bound"]
    print(f"decoding, {d['new_tokens']} tokens after each {d['prompt_len']}-token prompt (tokens/s); bound: the least "
          f"time that reading {hw['read_bytes_per_s'] / 1e9:.1f} GB/s and {hw['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s "
          f"allow (bench/decode_bound.py)")
    print(f"{'batch':>5}{'seqs':>6}{'dense':>10}{'bound':>10}{'MoD':>10}{'bound':>10}{'speed-up':>10}{'bound':>8}"
          f"{'meas/bound':>12}{'rounds':>15}{'FLOPs':>8}{'meas/FLOPs':>12}")
    for b, x in d["batches"].items():
        bound = x["bound_speedup"]
        print(f"{b:>5}{x['sequences']:>6}{x['dense']['tokens_per_s']:>10.1f}{x['dense']['bound_tokens_per_s']:>10.1f}"
              f"{x['MoD']['tokens_per_s']:>10.1f}{x['MoD']['bound_tokens_per_s']:>10.1f}{x['speedup']:>9.2f}x"
              f"{bound:>7.2f}x{x['speedup'] / bound:>12.1%}"
              f"{x['speedup_min'] / bound:>8.1%}-{x['speedup_max'] / bound:.1%}{x['flop_speedup']:>7.2f}x"
              f"{x['speedup'] / x['flop_speedup']:>12.1%}")
    print("routed blocks while decoding: share of tokens entering; blocks run (at least one row entered: weights "
          "read), against 1 - (1 - share)^batch; rows per run; runs for one row alone; each model's measured/bound")
    print(f"{'batch':>5}{'share':>8}{'blocks run':>12}{'expected':>10}{'rows/run':>10}{'1-row runs':>12}"
          f"{'dense/bound':>13}{'MoD/bound':>11}")
    for b, x in d["batches"].items():
        rt = x["routing"]
        p = rt["share"]
        print(f"{b:>5}{p:>8.1%}{rt['blocks_run']:>12.1%}{1 - (1 - p) ** int(b):>10.1%}{rt['rows_per_run']:>10.2f}"
              f"{rt['single_row_runs']:>12.0%}"
              + "".join(f"{x[n]['tokens_per_s'] / x[n]['bound_tokens_per_s']:>{w}.0%}" for n, w in (("dense", 13), ("MoD", 11))))
