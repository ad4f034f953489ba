"""bench peer: one PEER layer at the paper's N, h, k against PEER-pytorch (the paper's softmax setting), in a
plain process (no allocator setting): forward + backward, and a whole training step (forward, backward,
optimizer: ours mixturelm.optim.build_optimizer, PEER-pytorch torch's AdamW) with its peak memory above the
tables and their optimizer moments; and the bytes of expert rows the step moves against a large copy."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import UsageError
from ..files import machine
from ..layers.peer import PEER
from ..optim import build_optimizer
from ..training.compiling import compiled
from .timing import (
    check_config,
    copy_bandwidth,
    fwd_bwd,
    in_fresh_process,
    machine_line,
    peak_rss_bytes,
    prepare,
    reset_peak_rss,
    rss_bytes,
    save_results,
    time_alternating,
)

DEFAULT_TOKENS = 2048


@dataclass(kw_only=True)
class PEERBenchConfig:
    steps: int = 5  # timed steps per contender per round
    rounds: int = 3  # rounds, alternating the contenders
    tokens: int = DEFAULT_TOKENS  # tokens per call (None: the default)
    no_memory: bool = False  # skip the peak-memory measurement
    n_experts: int = 1024 * 1024  # experts N, a perfect square
    d_model: int = 256  # model width
    heads: int = 8  # retrieval heads
    top_k: int = 16  # experts per head
    d_key: int = 128  # query / key size
    no_peer: bool = False  # time ours alone (no PEER-pytorch)
    threads: int | None = None  # torch threads; None: all cores
    compile: bool = False  # also time a torch.compile'd copy of ours (its retrieval compiled, tables eager)
    out: str | None = None  # also write results.json there
    overwrite: bool = False  # replace an earlier benchmark's results in out

    def __post_init__(self) -> None:
        if self.tokens is None:
            self.tokens = DEFAULT_TOKENS
        check_config(self, positive=("steps", "rounds", "tokens", "n_experts", "d_model", "heads", "top_k", "d_key"))
        s = math.isqrt(self.n_experts)
        if s * s != self.n_experts:
            raise UsageError(f"PEERBenchConfig.n_experts={self.n_experts} is not a perfect square; product keys "
                             f"need N = S*S, e.g. {s * s} or {(s + 1) ** 2}")
        if self.d_key % 2:
            raise UsageError(f"PEERBenchConfig.d_key={self.d_key} is odd; the query is split in two halves, "
                             "use an even size")
        if self.top_k > s:
            raise UsageError(f"PEERBenchConfig.top_k={self.top_k} exceeds sqrt(n_experts)={s}; each half's top-k "
                             "picks among sqrt(N) sub-keys; lower top_k or raise n_experts")


def _peer_contenders(shape: dict) -> dict[str, Callable[[], torch.nn.Module]]:
    def lucidrains():
        try:
            from PEER_pytorch import PEER as LucidPEER
        except ImportError:
            raise UsageError("bench peer needs PEER-pytorch for the peer; pip install 'mixturelm[bench]' "
                             "(or --no-peer to time ours alone)") from None
        # the paper's setting: softmax over each head's top-k (non_competing_scores=False); its dim_key
        # is the size of one half of the query, ours the whole query
        return LucidPEER(shape["d_model"], heads=shape["heads"], num_experts=shape["n_experts"],
                         num_experts_per_head=shape["top_k"], dim_key=shape["d_key"] // 2,
                         non_competing_scores=False)

    return {
        "mixturelm PEER": lambda: PEER(shape["d_model"], n_experts=shape["n_experts"], n_heads=shape["heads"],
                                       top_k=shape["top_k"], d_key=shape["d_key"], sparse_grad=True),
        "PEER-pytorch": lucidrains,
    }


def optimizer_for(name: str, module: torch.nn.Module) -> torch.optim.Optimizer:
    """What a user trains each with: ours mixturelm.optim.build_optimizer (row-wise Adam on the tables),
    PEER-pytorch torch's AdamW with its defaults (dense table gradients)."""
    if name.startswith("mixturelm"):
        return build_optimizer(module, lr=1e-3, weight_decay=0.0)
    return torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=0.0)


def train_step(module: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, grad: torch.Tensor):
    """Forward, backward against a fixed output gradient, optimizer step."""
    forward_backward = fwd_bwd(module, x, grad)

    def step() -> None:
        forward_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _peer_memory_child(name: str, shape: dict, queue) -> None:
    """Peak resident memory of a training step in a fresh process: total, and above the state at its start
    (the tables and the optimizer's moments, made by a first step, and the input)."""
    torch.manual_seed(0)
    module = _peer_contenders(shape)[name]()
    x = torch.randn(1, shape["tokens"], shape["d_model"], requires_grad=True)
    grad = torch.randn(1, shape["tokens"], shape["d_model"])
    step = train_step(module, optimizer_for(name, module), x, grad)
    step()  # the moments exist from here on
    before = rss_bytes()
    reset_peak_rss()
    step()
    queue.put((peak_rss_bytes(), peak_rss_bytes() - before, before))


def peer_expert_bytes(module: PEER, x: torch.Tensor) -> dict:
    """Bytes of expert rows one forward + backward must move: each of the T*h*k retrieved rows of u and v
    read in the forward and again in the backward (not kept: that would hold (T, h*k, d) twice), and the
    gradient rows of the distinct experts written once per table."""
    with torch.no_grad():
        ids, _ = module.retrieve(x.reshape(-1, x.shape[-1]))
    pairs, rows = ids.numel(), torch.unique(ids).numel()
    row_bytes = module.d_model * module.w_up.element_size()
    n_tables = len(module.expert_tables())
    return {"pairs": pairs, "distinct_experts": rows,
            "bytes": n_tables * (2 * pairs + rows) * row_bytes}


def bench_peer(cfg: PEERBenchConfig, command: str = "") -> dict:
    """One PEER layer at the paper's N, h, k: forward + backward time and peak memory, ours against
    PEER-pytorch (the paper's softmax setting), and the bytes of expert rows against a large copy."""
    out = prepare(cfg)
    shape = {"tokens": cfg.tokens, "d_model": cfg.d_model, "n_experts": cfg.n_experts, "heads": cfg.heads,
             "top_k": cfg.top_k, "d_key": cfg.d_key}
    builders = _peer_contenders(shape)
    if cfg.no_peer:
        builders.pop("PEER-pytorch")
    torch.manual_seed(0)
    x = torch.randn(1, cfg.tokens, cfg.d_model, requires_grad=True)
    grad = torch.randn(1, cfg.tokens, cfg.d_model)
    modules = {name: build() for name, build in builders.items()}
    if cfg.compile:  # compiled in the untimed warm-up
        modules["mixturelm PEER (compiled)"] = compiled(builders["mixturelm PEER"]())
    params = {name: sum(p.numel() * p.element_size() for p in m.parameters()) for name, m in modules.items()}
    moved = peer_expert_bytes(modules["mixturelm PEER"], x)
    times = time_alternating({name: fwd_bwd(m, x, grad) for name, m in modules.items()}, cfg.steps, cfg.rounds)
    steps = {name: train_step(m, optimizer_for(name, m), x, grad) for name, m in modules.items()}
    train_times = time_alternating(steps, cfg.steps, cfg.rounds)
    del modules, steps
    bandwidth = copy_bandwidth(min(1 << 29, max(1 << 24, moved["bytes"])))  # large, but no larger than needed
    result = {"machine": machine(), "command": command, "shape": shape,
              "dtype": "fp32", "copy_bytes_per_s": bandwidth, "expert_rows": moved, "contenders": {}}
    for name, ts in times.items():
        row = {"fwd_bwd_s": statistics.median(ts), "all_rounds_s": ts, "param_bytes": params[name],
               "train_step_s": statistics.median(train_times[name]), "train_all_rounds_s": train_times[name]}
        if not cfg.no_memory and name in builders:
            row["peak_rss_bytes"], row["peak_above_start_bytes"], row["start_bytes"] = in_fresh_process(
                _peer_memory_child, name, shape)
        result["contenders"][name] = row
    ours = result["contenders"]["mixturelm PEER"]
    ours["expert_bytes_per_s"] = moved["bytes"] / ours["fwd_bwd_s"]
    ours["x_copy_floor"] = ours["fwd_bwd_s"] / (moved["bytes"] / bandwidth)
    if "PEER-pytorch" in result["contenders"]:
        peer = result["contenders"]["PEER-pytorch"]
        result["speedup_over_peer"] = peer["fwd_bwd_s"] / ours["fwd_bwd_s"]
        result["train_step_speedup_over_peer"] = peer["train_step_s"] / ours["train_step_s"]
        if not cfg.no_memory:
            result["memory_above_start_ours_over_peer"] = (ours["peak_above_start_bytes"]
                                                           / peer["peak_above_start_bytes"])
    print_peer(result)
    save_results(out, result)
    return result


def print_peer(r: dict) -> None:
    m, s, e = r["machine"], r["shape"], r["expert_rows"]
    print(machine_line(m))
    print(f"PEER: N={s['n_experts']:,} experts, d_model {s['d_model']}, {s['heads']} heads x top-{s['top_k']}, "
          f"d_key {s['d_key']}, {s['tokens']} tokens, fp32, a plain process; training step = forward + backward + "
          "optimizer (ours: mixturelm.optim.build_optimizer; PEER-pytorch: torch.optim.AdamW)")
    print(f"  {'':<27}{'fwd+bwd s':>10}{'train step s':>14}{'params MB':>11}{'peak RSS MB':>13}"
          f"{'params+moments MB':>19}{'peak above MB':>15}")
    for name, c in r["contenders"].items():
        mem = (f"{c['peak_rss_bytes'] / 2**20:>13.0f}{c['start_bytes'] / 2**20:>19.0f}"
               f"{c['peak_above_start_bytes'] / 2**20:>15.0f}" if "peak_rss_bytes" in c else "")
        print(f"  {name:<27}{c['fwd_bwd_s']:>10.3f}{c['train_step_s']:>14.3f}{c['param_bytes'] / 2**20:>11.0f}{mem}")
    if "speedup_over_peer" in r:
        print(f"ours is {r['speedup_over_peer']:.2f}x faster than PEER-pytorch in forward + backward, "
              f"{r['train_step_speedup_over_peer']:.2f}x in a training step"
              + (f"; peak memory of a training step above the tables and moments: ours / PEER-pytorch = "
                 f"{r['memory_above_start_ours_over_peer']:.3f}" if "memory_above_start_ours_over_peer" in r else ""))
    ours = r["contenders"]["mixturelm PEER"]
    print(f"expert rows moved per step: {e['bytes'] / 1e9:.3f} GB ({e['pairs']:,} retrievals, "
          f"{e['distinct_experts']:,} distinct experts); large copy {r['copy_bytes_per_s'] / 1e9:.1f} GB/s; "
          f"ours {ours['expert_bytes_per_s'] / 1e9:.2f} GB/s, {ours['x_copy_floor']:.1f}x the copy floor")
