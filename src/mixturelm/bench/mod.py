"""bench mod: Mixture-of-Depths (12.5 %, every other block) against the dense model of the same shape:
forward FLOPs, prefill time, training step and decoding tokens/s, in one run."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import BlockSpec, ModelConfig
from ..errors import UsageError
from ..files import machine
from ..flops import flop_counter, forward_flops_per_token
from ..layers.mod import MoD, MoDConfig
from ..model import MixtureLM
from ..runtime import steady_allocator
from ..training.compiling import compiled
from .timing import check_config, machine_line, prepare, save_results, time_alternating, train_step_fn

MOD_SHAPE = dict(vocab_size=257, d_model=512, n_layers=8, n_heads=8, d_ffn=1408)
DEFAULT_SEQ_LEN, DEFAULT_BATCH_SIZE = 1024, 2


@dataclass(kw_only=True)
class MoDBenchConfig:
    steps: int = 5  # timed steps per contender per round
    rounds: int = 3  # rounds, alternating the models
    batch_size: int | None = None  # training-step batch; None: 2
    seq_len: int | None = None  # None: 1024
    capacity: float = 0.125  # fraction of tokens entering a routed block
    decode_tokens: int = 64  # tokens decoded per round, batch 1 and 8
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


def _mod_models(seq_len: int, capacity: float) -> dict[str, MixtureLM]:
    dense_cfg = ModelConfig(**MOD_SHAPE, max_seq_len=seq_len)
    blocks = [BlockSpec(wrapper="mod", mod=MoDConfig(capacity=capacity)) if i % 2 else BlockSpec()
              for i in range(dense_cfg.n_layers)]
    models = {}
    for name, cfg in (("dense", dense_cfg), ("MoD", ModelConfig(**(dense_cfg.to_dict() | {"blocks": blocks})))):
        torch.manual_seed(0)
        models[name] = MixtureLM(cfg)
    _calibrate_mod(models["MoD"], seq_len)
    return models


def _calibrate_mod(model: MixtureLM, seq_len: int, steps: int = 8) -> None:
    """Set the sampling thresholds as training does (running quantile of the scores), so that the causal
    routing of prefill and decoding lets in the capacity's share of tokens, as in a trained model. The
    quantiles are taken only in training mode with gradients on (as in a training step); no backward, no
    optimizer step: the weights stay as initialised."""
    model.train()
    for _ in range(steps):
        with torch.enable_grad():
            model(torch.randint(0, model.config.vocab_size, (2, seq_len)))
        for m in model.modules():
            if isinstance(m, MoD):
                m.after_optimizer_step()
    model.eval()


def _mod_routed_caches(cache) -> list:
    return [layer for layer in cache.layers if hasattr(layer, "length_B")]


def _decode_contenders(models: dict, batch: int, prompt_len: int, new_tokens: int, record: dict):
    """Per model, a function that prefills a fresh cache (untimed) and returns the seconds of decoding
    new_tokens tokens one at a time; record gets the MoD blocks' realised fraction during decoding."""
    torch.manual_seed(1)
    prompt = torch.randint(0, 257, (batch, prompt_len))
    feed = torch.randint(0, 257, (batch, new_tokens))

    def run(name: str, model: MixtureLM) -> float:
        with torch.no_grad():
            cache = model.new_cache(batch, prompt_len + new_tokens)
            model(prompt, cache=cache, last_only=True)
            before = [c.length_B.clone() for c in _mod_routed_caches(cache)]
            t0 = time.perf_counter()
            for i in range(new_tokens):
                model(feed[:, i:i + 1], cache=cache)
            sec = time.perf_counter() - t0
            routed = _mod_routed_caches(cache)
            if routed:
                entered = sum(int((c.length_B - b).sum()) for c, b in zip(routed, before))
                record.setdefault(name, []).append(entered / (len(routed) * batch * new_tokens))
        return sec

    return run


def bench_mod(cfg: MoDBenchConfig, command: str = "") -> dict:
    """MoD against dense, same shape, one run: forward FLOPs, prefill time, training step, decode tokens/s."""
    out = prepare(cfg)
    seq_len, batch = cfg.seq_len or DEFAULT_SEQ_LEN, cfg.batch_size or DEFAULT_BATCH_SIZE
    steady_allocator()
    models = _mod_models(seq_len, cfg.capacity)
    cfgs = {name: m.config for name, m in models.items()}
    result = {"machine": machine(), "command": command,
              "shape": MOD_SHAPE | {"seq_len": seq_len, "train_batch": batch, "dtype": "fp32",
                                    "mod": f"capacity {cfg.capacity}, every other block (4 of 8)"},
              "rows": {}}
    rows = result["rows"]
    # forward FLOPs per token: analytic, and counted by FlopCounterMode on one sequence (top-k routing)
    idx = torch.randint(0, 257, (1, seq_len))
    counted = {}
    for name, m in models.items():
        with torch.no_grad(), flop_counter() as fc:
            m(idx)
        counted[name] = fc.get_total_flops() / seq_len
    rows["forward FLOPs/token (analytic)"] = {n: forward_flops_per_token(c, seq_len) for n, c in cfgs.items()}
    rows["forward FLOPs/token (counted)"] = counted
    flop_ratio = rows["forward FLOPs/token (analytic)"]["MoD"] / rows["forward FLOPs/token (analytic)"]["dense"]
    result["flop_ratio"] = flop_ratio
    result["goal_speedup"] = 0.9 / flop_ratio

    def prefill(m: MixtureLM) -> Callable[[], None]:
        def fn() -> None:
            with torch.no_grad():
                m(idx, cache=m.new_cache(1, seq_len), last_only=True)
        return fn

    times = time_alternating({n: prefill(m) for n, m in models.items()}, cfg.steps, cfg.rounds, warmup=1)
    rows[f"prefill {seq_len} tokens, batch 1 (s)"] = {n: statistics.median(t) for n, t in times.items()}
    train_batch = torch.randint(0, 257, (batch, seq_len + 1))
    forwards = {n: compiled(m) if cfg.compile else m for n, m in models.items()}  # compiled in the warm-up
    steps = {n: train_step_fn(m.train(), lambda x, f=forwards[n]: f(x).logits, train_batch) for n, m in models.items()}
    times = time_alternating(steps, cfg.steps, cfg.rounds, warmup=2 if cfg.compile else 1)
    step_row = f"training step{', compiled' if cfg.compile else ''}, {batch} x {seq_len} tokens (s)"
    rows[step_row] = {n: statistics.median(t) for n, t in times.items()}
    for m in models.values():
        m.eval()
    fractions: dict[str, list[float]] = {}
    for b in (1, 8):
        run = _decode_contenders(models, b, seq_len // 2, cfg.decode_tokens, fractions)
        secs: dict[str, list[float]] = {n: [] for n in models}
        run("dense", models["dense"]), run("MoD", models["MoD"])  # warm-up
        fractions.clear()
        for _ in range(cfg.rounds):
            for n, m in models.items():
                secs[n].append(run(n, m))
        rows[f"decode, batch {b}, after {seq_len // 2} (tokens/s)"] = {
            n: b * cfg.decode_tokens / statistics.median(s) for n, s in secs.items()}
        result[f"decode_batch{b}_fraction_entered"] = statistics.mean(fractions["MoD"])
        fractions.clear()
    for name, row in rows.items():
        faster_is_higher = "tokens/s" in name
        row["speedup"] = (row["MoD"] / row["dense"]) if faster_is_higher else (row["dense"] / row["MoD"])
    print_mod(result)
    save_results(out, result)
    return result


def print_mod(r: dict) -> None:
    m = r["machine"]
    print(machine_line(m))
    print(f"shape: {r['shape']}")
    print(f"{'':<44}{'dense':>12}{'MoD':>12}{'MoD speed-up':>14}")
    for name, row in r["rows"].items():
        fmt = (lambda v: f"{v / 1e6:>11.1f}M") if "FLOPs" in name else (lambda v: f"{v:>12.3f}")
        label = "x fewer" if "FLOPs" in name else "x"
        print(f"{name:<44}{fmt(row['dense'])}{fmt(row['MoD'])}{row['speedup']:>12.2f}{label:>2}"[:120])
    print(f"FLOP ratio MoD/dense {r['flop_ratio']:.3f}: FLOP speed-up {1 / r['flop_ratio']:.2f}x, "
          f"goal (90 %) {r['goal_speedup']:.2f}x")
    print(f"MoD blocks' realised fraction while decoding: batch 1 {r['decode_batch1_fraction_entered']:.3f}, "
          f"batch 8 {r['decode_batch8_fraction_entered']:.3f}")
