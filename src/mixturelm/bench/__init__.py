"""Side-by-side benchmarks (`mixturelm bench train|moe|mod|peer|compile|parallel`): ours and a peer measured in the same
run, alternating, with ratios.

Never a timed test: these machines are shared and noisy, so every benchmark alternates the contenders
over several rounds and reports medians, the machine and the command. Each benchmark is a function of
its config dataclass, `bench_xxx(cfg, command="") -> dict` (the command line is only recorded in
results.json); `BENCHMARKS` maps each name to (config class, function).
"""

from __future__ import annotations

from .compile import CompileBenchConfig, bench_compile
from .mod import MoDBenchConfig, bench_mod
from .moe import MoEBenchConfig, bench_moe
from .parallel import ParallelBenchConfig, bench_parallel
from .peer import PEERBenchConfig, bench_peer
from .train import TrainBenchConfig, bench_train

BENCHMARKS = {"train": (TrainBenchConfig, bench_train), "moe": (MoEBenchConfig, bench_moe),
              "mod": (MoDBenchConfig, bench_mod), "peer": (PEERBenchConfig, bench_peer),
              "compile": (CompileBenchConfig, bench_compile), "parallel": (ParallelBenchConfig, bench_parallel)}

__all__ = ["BENCHMARKS", "CompileBenchConfig", "MoDBenchConfig", "MoEBenchConfig", "PEERBenchConfig",
           "ParallelBenchConfig", "TrainBenchConfig", "bench_compile", "bench_mod", "bench_moe", "bench_parallel",
           "bench_peer", "bench_train"]
