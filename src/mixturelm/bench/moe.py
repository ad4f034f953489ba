"""bench moe: one MoE layer, forward + backward, against transformers' Mixtral block with each of its experts
implementations (eager, batched_mm, grouped_mm) and the dense floor (a SwiGLU of the same active size), with
peak memory and one-token decoding latency. A plain process: no allocator setting, the library's defaults."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import UsageError
from ..files import machine
from ..layers.ffn import SwiGLU
from ..layers.moe import MoE
from ..training.compiling import compiled
from .timing import (
    check_config,
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

MOE_SHAPES = {"8x top-2": (8, 2, 1408), "64x top-8 (fine-grained)": (64, 8, 352)}  # experts, k, expert hidden
D_MODEL = 512
DEFAULT_TOKENS = 4096


@dataclass(kw_only=True)
class MoEBenchConfig:
    steps: int = 5  # timed steps per contender per round
    rounds: int = 3  # rounds, alternating the contenders
    tokens: int = DEFAULT_TOKENS  # tokens per call (None: the default)
    no_memory: bool = False  # skip the peak-memory measurement
    threads: int | None = None  # torch threads; None: all cores
    compile: bool = False  # also time a torch.compile'd copy of ours (forward + backward only)
    out: str | None = None  # also write results.json there
    overwrite: bool = False  # replace an earlier benchmark's results in out

    def __post_init__(self) -> None:
        if self.tokens is None:
            self.tokens = DEFAULT_TOKENS
        check_config(self, positive=("steps", "rounds", "tokens"))


def _moe_contenders(n_experts: int, top_k: int, d_hidden: int,
                    d_model: int) -> dict[str, Callable[[], torch.nn.Module]]:
    def mixtral(impl: str):
        def build():
            try:
                from transformers import MixtralConfig
                from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
            except ImportError:
                raise UsageError("bench moe needs transformers for the Mixtral peer; "
                                 "pip install 'mixturelm[bench]'") from None
            cfg = MixtralConfig(hidden_size=d_model, intermediate_size=d_hidden, num_local_experts=n_experts,
                                num_experts_per_tok=top_k)
            cfg._experts_implementation = impl
            block = MixtralSparseMoeBlock(cfg)
            for p in block.parameters():
                torch.nn.init.normal_(p, 0.0, 0.02)
            return block
        return build

    def ours(impl: str):
        return lambda: MoE(d_model, n_experts=n_experts, top_k=top_k, d_expert=d_hidden, router="softmax", impl=impl)

    return {
        "mixturelm MoE": ours("auto"),
        "mixturelm MoE, grouped impl": ours("grouped"),
        "Mixtral block (eager)": mixtral("eager"),
        "Mixtral block (batched_mm)": mixtral("batched_mm"),
        "Mixtral block (grouped_mm)": mixtral("grouped_mm"),
        "dense floor": lambda: SwiGLU(d_model, top_k * d_hidden),
    }


def _peak_memory_child(shape: str, name: str, tokens: int, d_model: int, queue) -> None:
    """In a fresh process: peak resident memory growth over one forward + backward (CPU has no allocator
    stats). Linux's high-water mark is reset first (clear_refs 5), then read after the step."""
    torch.manual_seed(0)
    module = _moe_contenders(*MOE_SHAPES[shape], d_model)[name]()
    x = torch.randn(1, tokens, d_model, requires_grad=True)
    grad = torch.randn(1, tokens, d_model)
    before = rss_bytes()
    reset_peak_rss()
    fwd_bwd(module, x, grad)()
    queue.put(peak_rss_bytes() - before)


def peak_memory(shape: str, name: str, tokens: int, d_model: int) -> int:
    return in_fresh_process(_peak_memory_child, shape, name, tokens, d_model)


@torch.no_grad()
def _decode_latency(builders: dict, d_model: int, steps: int, rounds: int) -> dict[str, float]:
    """Forward of one token (batch 1, inference): the decoding case where capacity-based layers break."""
    torch.manual_seed(0)
    x = torch.randn(1, 1, d_model)
    modules = {name: build().eval() for name, build in builders.items()}
    times = time_alternating({name: (lambda m=m: m(x)) for name, m in modules.items()}, steps, rounds)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_moe(cfg: MoEBenchConfig, command: str = "") -> dict:
    """One MoE layer, forward + backward: ours against Mixtral's block and the dense FFN of the same active size."""
    out = prepare(cfg)
    tokens, d_model = cfg.tokens, D_MODEL
    result = {"machine": machine(), "command": command, "tokens": tokens,
              "d_model": d_model, "dtype": "fp32", "shapes": {}}
    for shape, (n_experts, top_k, d_hidden) in MOE_SHAPES.items():
        torch.manual_seed(0)
        x = torch.randn(1, tokens, d_model, requires_grad=True)
        grad = torch.randn(1, tokens, d_model)
        builders = _moe_contenders(n_experts, top_k, d_hidden, d_model)
        steps, failed = {}, {}
        for name, build in builders.items():
            step = fwd_bwd(build(), x, grad)
            try:
                step()  # transformers' batched_mm copies each token's expert weights: it may not fit
            except RuntimeError as e:
                if "allocate" not in str(e):
                    raise
                failed[name] = "out of memory: " + str(e).split(": ", 1)[-1].split(". ", 1)[0]
                continue
            steps[name] = step
        builders = {name: build for name, build in builders.items() if name not in failed}
        if cfg.compile:  # compiled in the untimed warm-up
            steps["mixturelm MoE (compiled)"] = fwd_bwd(compiled(builders["mixturelm MoE"]()), x, grad)
        times = time_alternating(steps, cfg.steps, cfg.rounds)
        rows = {name: {"fwd_bwd_s": statistics.median(ts), "all_rounds_s": ts} for name, ts in times.items()}
        if not cfg.no_memory:
            for name in builders:
                rows[name]["peak_mem_bytes"] = peak_memory(shape, name, tokens, d_model)
        floor = rows["dense floor"]["fwd_bwd_s"]
        best = min((n for n in rows if n.startswith("Mixtral")), key=lambda n: rows[n]["fwd_bwd_s"])
        for row in rows.values():
            row["x_dense_floor"] = row["fwd_bwd_s"] / floor
            row["x_best_mixtral"] = row["fwd_bwd_s"] / rows[best]["fwd_bwd_s"]
        decode = _decode_latency(builders, d_model, max(20, cfg.steps * 10), cfg.rounds)
        for name, sec in decode.items():
            rows[name]["decode_1_token_s"] = sec
        result["shapes"][shape] = {"n_experts": n_experts, "top_k": top_k, "d_expert": d_hidden, "contenders": rows,
                                   "best_mixtral": best, "failed": failed}
    print_moe(result)
    save_results(out, result)
    return result


def print_moe(r: dict) -> None:
    m = r["machine"]
    print(machine_line(m) + f"; {r['tokens']} tokens, d_model "
          f"{r['d_model']}, fp32, forward + backward, a plain process (no allocator setting)")
    for shape, s in r["shapes"].items():
        print(f"\n{shape}: {s['n_experts']} experts, top-{s['top_k']}, expert hidden {s['d_expert']}")
        print(f"  {'':<28}{'fwd+bwd s':>10}{'x dense':>9}{'x best Mixtral':>16}{'peak MB':>9}{'1-token fwd ms':>16}")
        for name, c in s["contenders"].items():
            mem = f"{c['peak_mem_bytes'] / 2**20:>9.0f}" if "peak_mem_bytes" in c else f"{'':>9}"
            print(f"  {name:<28}{c['fwd_bwd_s']:>10.3f}{c['x_dense_floor']:>9.2f}{c['x_best_mixtral']:>16.2f}{mem}"
                  + (f"{c['decode_1_token_s'] * 1e3:>16.3f}" if "decode_1_token_s" in c else ""))
        for name, why in s.get("failed", {}).items():
            print(f"  {name:<28}{why}")
