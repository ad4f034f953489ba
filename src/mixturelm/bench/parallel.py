"""bench parallel: expert parallelism as a user's processes run it. For each process count P (`procs`), torchrun
launches P processes (bench/parallel_worker.py) that train a stack of MoE layers, the experts sharded over the
P processes (expert-parallel size P; P = 1 is the plain single-device layer, the baseline), and report their
step time, the time and bytes of every all-to-all exchange, gradient all-reduce time and peak memory.

The process counts alternate within each round (1, 2, 4, 1, 2, 4, ...), so a machine whose speed drifts shows
it as spread rather than as a difference between process counts. The workload grows with P (each process
has `tokens` tokens: weak scaling), so tokens/s over all processes is the throughput of the whole group.

Bytes, per process and training step (fp32 rows, b = 4; A = tokens x top_k assignments, dropless):
the dispatch sends A rows, the combine sends back the R rows this process's experts received, and the
backward sends A and R again; `sent` counts every row put in a send buffer, its own experts' rows included.
Summed over the processes R equals A, so the mean over processes is exactly the formula of docs/parallel.md,
4 x A x D x b per layer, plus the per-expert counts (n_experts int64 per layer, forward only).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import UsageError
from ..files import machine
from .timing import check_config, machine_line, positive_int_list, prepare, save_results

DEFAULT_TOKENS = 2048
ROW_BYTES_PER_ELEMENT = 4  # fp32
COUNT_BYTES = 8  # the per-expert counts are int64
KINDS = ("counts", "dispatch", "combine", "dispatch backward", "combine backward")


@dataclass(kw_only=True)
class ParallelBenchConfig:
    procs: tuple[int, ...] | str = (1, 2, 4)  # process counts, each also the expert-parallel size; text "1,2,4"
    device: str = "cpu"  # cpu (gloo) or cuda (nccl, one GPU per process)
    d_model: int = 256  # model width
    n_experts: int = 8  # experts per layer, divisible by every process count
    top_k: int = 2  # experts per token
    d_expert: int = 512  # hidden size of each SwiGLU expert
    layers: int = 2  # MoE layers in the stack
    tokens: int = DEFAULT_TOKENS  # tokens per process (None: the default)
    steps: int = 5  # timed training steps per launch
    rounds: int = 3  # launches of each process count, alternating
    warmup: int = 2  # untimed steps first (the optimizer's moments are allocated in the first)
    threads: int | None = None  # torch threads per process; None: the cores divided by the processes
    out: str | None = None  # also write results.json there
    overwrite: bool = False  # replace an earlier benchmark's results in out

    def __post_init__(self) -> None:
        if self.tokens is None:
            self.tokens = DEFAULT_TOKENS
        check_config(self, positive=("steps", "rounds", "warmup", "tokens", "d_model", "n_experts", "top_k",
                                     "d_expert", "layers"))
        self.procs = process_counts(self.procs)
        if self.top_k > self.n_experts:
            raise UsageError(f"ParallelBenchConfig.top_k={self.top_k} exceeds n_experts={self.n_experts}; "
                             "lower top_k or raise n_experts")
        bad = next((p for p in self.procs if self.n_experts % p), None)
        if bad is not None:
            raise UsageError(f"ParallelBenchConfig.procs has {bad}, which does not divide n_experts="
                             f"{self.n_experts} (each process holds n_experts / procs experts); choose divisors "
                             f"of {self.n_experts} or change n_experts")
        self._check_device()

    def _check_device(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise UsageError(f"ParallelBenchConfig.device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda":
            if not torch.cuda.is_available():
                raise UsageError("ParallelBenchConfig.device is cuda but torch sees no CUDA device; run on a "
                                 "machine with a GPU or use cpu")
            if max(self.procs) > torch.cuda.device_count():
                raise UsageError(f"ParallelBenchConfig.procs has {max(self.procs)} but there are "
                                 f"{torch.cuda.device_count()} GPUs (nccl needs one per process); choose at most "
                                 f"{torch.cuda.device_count()} processes")


def process_counts(value) -> tuple[int, ...]:
    """Positive integers, in order, without repeats: a sequence of them, or the command line's text "1,2,4"."""
    return positive_int_list(value, "ParallelBenchConfig.procs", "1,2,4")


# ----------------------------------------------------------------------------------------------
# Traffic by the formula

def formula_bytes(cfg: ParallelBenchConfig, procs: int, n_experts: int | None = None) -> dict[str, float]:
    """Bytes one process sends per training step by docs/parallel.md's formula (the mean over processes):
    4 x A x D x b per layer for the rows (dispatch and combine, forward and backward) and the counts;
    `to_others` is the part that crosses to other processes under balanced routing, (P - 1) / P of it."""
    if procs == 1:  # the single-device layer exchanges nothing
        return {"rows": 0, "counts": 0, "sent": 0, "to_others_balanced": 0.0}
    n_experts = n_experts or cfg.n_experts
    rows = 4 * cfg.layers * cfg.tokens * cfg.top_k * cfg.d_model * ROW_BYTES_PER_ELEMENT
    counts = cfg.layers * n_experts * COUNT_BYTES
    return {"rows": rows, "counts": counts, "sent": rows + counts,
            "to_others_balanced": (rows + counts) * (procs - 1) / procs}


def growth(cfg: ParallelBenchConfig) -> dict[str, dict[str, dict[str, float]]]:
    """The formula at 1, 4 and 16 times the experts, for each process count: rows do not grow with experts
    (only the counts do); the share crossing between processes grows with them as (P - 1) / P."""
    return {str(e): {str(p): formula_bytes(cfg, p, e) for p in cfg.procs}
            for e in (cfg.n_experts, 4 * cfg.n_experts, 16 * cfg.n_experts)}


# ----------------------------------------------------------------------------------------------
# Launching and collecting

def _threads(cfg: ParallelBenchConfig, procs: int) -> int:
    return cfg.threads or max(1, (os.cpu_count() or 1) // procs)


def launch(cfg: ParallelBenchConfig, procs: int, folder: Path) -> list[dict]:
    """One torchrun launch of `procs` processes; each process's figures."""
    folder.mkdir(parents=True)
    worker_cfg = asdict(cfg) | {"threads": _threads(cfg, procs)}
    worker_cfg.pop("procs"), worker_cfg.pop("out")
    (folder / "config.json").write_text(json.dumps(worker_cfg))
    # the processes import this very mixturelm, whatever the environment's install points at
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, OMP_NUM_THREADS=str(worker_cfg["threads"]),
               PYTHONPATH=os.pathsep.join([package_root, *filter(None, [os.environ.get("PYTHONPATH")])]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           "-m", "mixturelm.bench.parallel_worker", str(folder / "config.json"), str(folder)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)  # its stderr in our error
    if proc.returncode != 0:
        raise RuntimeError(f"bench parallel: {procs} processes failed (exit {proc.returncode}):\n"
                           + proc.stderr[-4000:])
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(procs)]


def _per_step(rank: dict, key: str) -> float:
    """One of an exchange's totals over all kinds, per timed step."""
    return sum(t[key] for t in rank["exchanges"].values()) / rank["steps"]


def summarise(cfg: ParallelBenchConfig, procs: int, rounds: list[list[dict]]) -> dict:
    """Medians over rounds (and their spread) for the group and for each process."""
    # a step ends when the slowest process's does: the exchanges keep them in lockstep
    step_rounds = [max(r["step_s"] for r in ranks) for ranks in rounds]
    tok_rounds = [procs * cfg.tokens / s for s in step_rounds]
    med = statistics.median
    ranks = []
    for r in range(procs):
        mine = [ranks_[r] for ranks_ in rounds]
        row = {"step_s": med(m["step_s"] for m in mine),
               "exchange_s": {k: med(m["exchanges"].get(k, {}).get("seconds", 0.0) / m["steps"] for m in mine)
                              for k in KINDS},
               "exchange_total_s": med(_per_step(m, "seconds") if m["exchanges"] else 0.0 for m in mine),
               "exchange_share": med((_per_step(m, "seconds") if m["exchanges"] else 0.0) / m["step_s"]
                                     for m in mine),
               "grad_reduce_s": med(m["grad_reduce_s"] for m in mine)}
        for key in ("sent", "sent_to_self", "received"):
            row[f"bytes_{key}"] = med(_per_step(m, key) if m["exchanges"] else 0.0 for m in mine)
        row["bytes_sent_to_others"] = row["bytes_sent"] - row["bytes_sent_to_self"]
        for key in ("param_bytes", "rss_after_build_bytes", "peak_rss_bytes", "peak_rss_growth_bytes",
                    "cuda_after_build_bytes", "cuda_peak_bytes", "cuda_peak_growth_bytes"):
            if key in mine[0]:
                row[key] = med(m[key] for m in mine)
        ranks.append(row)
    return {"procs": procs, "threads_per_process": _threads(cfg, procs),
            "step_s": med(step_rounds), "step_s_min": min(step_rounds), "step_s_max": max(step_rounds),
            "tokens_per_s": med(tok_rounds), "tokens_per_s_min": min(tok_rounds),
            "tokens_per_s_max": max(tok_rounds), "tokens_per_s_per_process": med(tok_rounds) / procs,
            "exchange_share": med(r["exchange_share"] for r in ranks),
            "bytes_sent_mean": statistics.fmean(r["bytes_sent"] for r in ranks),
            "bytes_sent_to_others_mean": statistics.fmean(r["bytes_sent_to_others"] for r in ranks),
            "formula": formula_bytes(cfg, procs), "ranks": ranks, "all_rounds": rounds}


def bench_parallel(cfg: ParallelBenchConfig, command: str = "") -> dict:
    """Training steps of a MoE stack at each process count, alternating over rounds; printed and returned."""
    out = prepare(cfg)
    launches: dict[int, list[list[dict]]] = {p: [] for p in cfg.procs}
    with tempfile.TemporaryDirectory(prefix="mixturelm-bench-parallel-") as tmp:
        for i in range(cfg.rounds):
            for p in cfg.procs:
                launches[p].append(launch(cfg, p, Path(tmp) / f"round{i}-procs{p}"))
    result = {"machine": machine(), "command": command,
              "config": asdict(cfg) | {"procs": list(cfg.procs)}, "dtype": "fp32",
              "backend": "nccl" if cfg.device == "cuda" else "gloo",
              "procs": {str(p): summarise(cfg, p, rounds) for p, rounds in launches.items()},
              "formula_growth": growth(cfg)}
    base = result["procs"].get("1")
    for s in result["procs"].values():
        s["x_one_process"] = s["tokens_per_s"] / base["tokens_per_s"] if base else None
    print_parallel(result)
    save_results(out, result)
    return result


# ----------------------------------------------------------------------------------------------
# Printing

def _mb(n: float) -> str:
    return f"{n / 2**20:.4g}"


def _span(s: dict, key: str, fmt: str) -> str:
    return f"[{s[key + '_min']:{fmt}}, {s[key + '_max']:{fmt}}]"


def print_parallel(r: dict) -> None:
    c = r["config"]
    print(machine_line(r["machine"]) + f"; {r['backend']} on {c['device']}")
    print(f"stack of {c['layers']} MoE layers: d_model {c['d_model']}, {c['n_experts']} experts top-{c['top_k']}, "
          f"expert hidden {c['d_expert']}; {c['tokens']} tokens per process; fp32 training step (forward + "
          f"backward + AdamW); expert-parallel size = processes; {c['rounds']} rounds x {c['steps']} steps, "
          "median [min, max] over rounds")
    print(f"\n{'procs':>5}{'thr/proc':>9}{'step s':>9}{'[min, max]':>18}{'tokens/s':>10}{'[min, max]':>18}"
          f"{'x 1 proc':>9}{'a2a share':>10}{'grad reduce s':>14}")
    for p, s in r["procs"].items():
        ratio = f"{s['x_one_process']:>9.2f}" if s["x_one_process"] is not None else f"{'':>9}"
        print(f"{p:>5}{s['threads_per_process']:>9}{s['step_s']:>9.4f}"
              f"{_span(s, 'step_s', '.4f'):>18}{s['tokens_per_s']:>10.0f}{_span(s, 'tokens_per_s', '.0f'):>18}{ratio}"
              f"{s['exchange_share']:>10.1%}{s['ranks'][0]['grad_reduce_s']:>14.4f}")
    mem = "cuda_peak_growth_bytes" if c["device"] == "cuda" else "peak_rss_growth_bytes"
    print(f"\nper process, per step: all-to-all seconds by exchange, peak memory growth over the built model "
          f"({'max_memory_allocated' if c['device'] == 'cuda' else 'resident set'}), MiB sent")
    print(f"{'procs':>5}{'rank':>5}{'step s':>9}{'counts':>8}{'dispatch':>9}{'combine':>9}{'disp bwd':>9}"
          f"{'comb bwd':>9}{'share':>7}{'peak MiB':>9}{'sent MiB':>9}{'to others':>10}{'formula':>9}")
    for p, s in r["procs"].items():
        for i, k in enumerate(s["ranks"]):
            e = k["exchange_s"]
            print(f"{p:>5}{i:>5}{k['step_s']:>9.4f}" + "".join(f"{e[x]:>{w}.4f}" for x, w in zip(KINDS, (8, 9, 9, 9, 9)))
                  + f"{k['exchange_share']:>7.1%}{_mb(k.get(mem, 0)):>9}{_mb(k['bytes_sent']):>9}"
                  f"{_mb(k['bytes_sent_to_others']):>10}{_mb(s['formula']['sent']):>9}")
    print("\nbytes sent per process and step, measured (mean over processes) against the formula "
          "(4 x tokens x top_k x d_model x 4 bytes per layer, plus n_experts x 8 bytes of counts per layer)")
    print(f"{'procs':>5}{'measured MiB':>13}{'formula MiB':>12}{'to others MiB':>14}{'balanced formula':>17}")
    for p, s in r["procs"].items():
        f = s["formula"]
        print(f"{p:>5}{_mb(s['bytes_sent_mean']):>13}{_mb(f['sent']):>12}{_mb(s['bytes_sent_to_others_mean']):>14}"
              f"{_mb(f['to_others_balanced']):>17}")
    print("\nby the formula, as experts grow (MiB sent per process and step; crossing under balanced routing):")
    for e, by_p in r["formula_growth"].items():
        print(f"  {e:>5} experts: " + ", ".join(f"{p} procs {_mb(f['sent'])} ({_mb(f['to_others_balanced'])})"
                                                for p, f in by_p.items()))
