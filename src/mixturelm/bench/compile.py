"""bench compile: the training step of each kind of model (dense, MoE, MoD, PEER presets) eager against
torch.compile'd, alternating in one process, with the graph breaks compile finds in each."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from ..config import TrainConfig
from ..errors import UsageError
from ..files import machine
from ..presets import PRESETS
from ..runtime import steady_allocator
from ..training.compiling import compiled, graph_breaks, preset_model
from ..training.optim import Optimizers
from .timing import check_config, machine_line, prepare, save_results, time_alternating

DEFAULT_PRESETS = "dense-tiny,moe-tiny,mod-tiny,peer-debug"  # peer-tiny's 1024^2 experts: a GB of tables
DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN = 8, 128


@dataclass(kw_only=True)
class CompileBenchConfig:
    steps: int = 5  # timed steps per contender per round
    rounds: int = 3  # rounds, alternating eager and compiled
    presets: str = DEFAULT_PRESETS  # comma-separated
    batch_size: int | None = None  # None: 8
    seq_len: int | None = None  # None: 128
    threads: int | None = None  # torch threads; None: all cores
    out: str | None = None  # also write results.json there
    overwrite: bool = False  # replace an earlier benchmark's results in out

    def __post_init__(self) -> None:
        check_config(self, optional_positive=("batch_size", "seq_len", "threads"))
        unknown = [p for p in self.names() if p not in PRESETS]
        if unknown or not self.names():
            raise UsageError(f"CompileBenchConfig.presets={self.presets!r}: unknown preset(s) {', '.join(unknown)}; "
                             f"give comma-separated presets, e.g. {DEFAULT_PRESETS}")

    def names(self) -> list[str]:
        return [p.strip() for p in self.presets.split(",") if p.strip()]


def _train_step(preset: str, compile_: bool, batch: torch.Tensor):
    """One training step of the preset's model (forward, backward, the trainer's optimizers), eager or
    compiled; each contender its own copy, with the same initial weights."""
    model, train = preset_model(preset)
    model.train()
    optim = Optimizers(model, TrainConfig.from_dict(train | {"max_steps": 10**6}), 10**6)
    forward = compiled(model) if compile_ else model

    def step() -> None:
        out = forward(batch[:, :-1], batch[:, 1:])
        (out.loss if out.aux_loss is None else out.loss + out.aux_loss).backward()
        optim.step()

    return step


def bench_compile(cfg: CompileBenchConfig, command: str = "") -> dict:
    """Eager against compiled training steps, preset by preset; compile time is not counted (warm-up)."""
    out = prepare(cfg)
    steady_allocator()
    batch_size, seq_len = cfg.batch_size or DEFAULT_BATCH_SIZE, cfg.seq_len or DEFAULT_SEQ_LEN
    result = {"machine": machine(), "command": command, "batch_size": batch_size, "seq_len": seq_len,
              "dtype": "fp32", "presets": {}}
    for preset in cfg.names():
        found = graph_breaks(preset)
        batch = torch.randint(0, 257, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(0))
        steps = {name: _train_step(preset, name == "compiled", batch) for name in ("eager", "compiled")}
        times = time_alternating(steps, cfg.steps, cfg.rounds, warmup=3)
        eager, fast = statistics.median(times["eager"]), statistics.median(times["compiled"])
        result["presets"][preset] = {"eager_step_s": eager, "compiled_step_s": fast, "speedup": eager / fast,
                                     "all_rounds_s": times, "graphs": found["graphs"],
                                     "graph_breaks": [f"{where}: {reason}" for reason, where in found["breaks"]]}
        print_row(preset, result["presets"][preset])
    print(machine_line(result["machine"]) + f"; {batch_size} x {seq_len} tokens, fp32, compile time not counted")
    save_results(out, result)
    return result


def print_row(preset: str, r: dict) -> None:
    print(f"{preset:<16} eager {r['eager_step_s'] * 1e3:8.1f} ms   compiled {r['compiled_step_s'] * 1e3:8.1f} ms   "
          f"speed-up {r['speedup']:.2f}x   {r['graphs']} graph(s)", flush=True)
    for b in r["graph_breaks"]:
        print(f"  graph break at {b}")
