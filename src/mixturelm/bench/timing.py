"""What every benchmark shares: alternating timing, peak-memory measurement in a fresh process, the copy
bandwidth floor, the timed steps (forward + backward, training step), config checks and result writing."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UsageError, positive_ints
from ..files import OutputFolder, claim, results_only, write_json_atomic

__all__ = ["alternate_order", "check_config", "copy_bandwidth", "fwd_bwd", "in_fresh_process", "peak_rss_bytes", "prepare",
           "paired_speedup", "read_bandwidth", "reset_peak_rss", "rss_bytes", "save_results", "time_alternating",
           "train_step_fn"]


def time_alternating(contenders: dict[str, Callable[[], None]], steps: int, rounds: int,
                     warmup: int = 2, interleave: bool = False) -> dict[str, list[float]]:
    """Seconds per call of each contender: `rounds` rounds, each timing `steps` calls of every contender. By default a
    contender's calls run back to back, the contenders in turn. interleave=True alternates the contenders call by
    call, the order reversed every other call so that none always runs first, and sums each one's calls: a slow
    spell of the machine, or a fast one, then falls on all of them alike within a round."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        if not interleave:
            for name, fn in contenders.items():
                t0 = time.perf_counter()
                for _ in range(steps):
                    fn()
                times[name].append((time.perf_counter() - t0) / steps)
            continue
        spent = dict.fromkeys(contenders, 0.0)
        for i in range(steps):
            for name in alternate_order(list(contenders), i):
                t0 = time.perf_counter()
                contenders[name]()
                spent[name] += time.perf_counter() - t0
        for name in contenders:
            times[name].append(spent[name] / steps)
    return times


def alternate_order(names: list[str], i: int) -> list[str]:
    """The contenders in their order for even i, reversed for odd i: interleaved timing where none always goes first
    (the first after another's call finds the caches full of the other's data)."""
    return names if i % 2 == 0 else names[::-1]


def paired_speedup(base_s: list[float], other_s: list[float]) -> dict[str, float]:
    """How many times faster `other` is than `base`, round by round (base_s[i] / other_s[i]: the two were
    timed next to each other, so a slow spell of the machine cancels): the median over the rounds, and the
    least and greatest round, which show how far one round can be trusted."""
    ratios = sorted(b / o for b, o in zip(base_s, other_s, strict=True))
    return {"speedup": statistics.median(ratios), "speedup_min": ratios[0], "speedup_max": ratios[-1]}


# ----------------------------------------------------------------------------------------------
# Timed steps

def fwd_bwd(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    """One forward + backward of a layer against a fixed output gradient. Layers return (y, aux); a peer's
    layer may return a tuple (y first) or y alone."""
    params = list(module.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        out = module(x)
        (out[0] if isinstance(out, tuple) else out).backward(grad)

    return step


def train_step_fn(model, forward_logits, batch: torch.Tensor) -> Callable[[], None]:
    """One training step of next-token cross-entropy: forward_logits(inputs) -> logits, backward, AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # the same optimizer for both

    def step() -> None:
        logits = forward_logits(batch[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


# ----------------------------------------------------------------------------------------------
# Memory and bandwidth

def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset Linux's resident high-water mark (VmHWM) to the current resident size."""
    Path("/proc/self/clear_refs").write_text("5")


def in_fresh_process(target, *args):
    """target(*args, queue) run in a spawned process (fresh memory, for peak-RSS measurements); its answer."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    value = queue.get(timeout=600)
    proc.join()
    return value


def copy_bandwidth(n_bytes: int = 1 << 29, seconds: float = 1.0) -> float:
    """Bytes per second moved by a large tensor copy (each byte read once and written once: 2x size)."""
    src = torch.ones(n_bytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == 0.0:
        t0 = time.perf_counter()
        dst.copy_(src)
        best = max(best, 2 * n_bytes / (time.perf_counter() - t0))
    return best


def read_bandwidth(n_bytes: int = 1 << 29, seconds: float = 1.0) -> float:
    """Bytes per second read from memory: the faster of a matrix-vector product over a matrix far larger
    than the caches (what a decoding step does with each weight matrix) and a sum over it."""
    matrix = torch.ones(n_bytes // 4 // 4096, 4096)
    vector = torch.ones(4096)
    best = 0.0
    for read in (lambda: torch.mv(matrix, vector), matrix.sum):
        read()
        deadline = time.perf_counter() + seconds / 2
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            read()
            best = max(best, n_bytes / (time.perf_counter() - t0))
    return best


# ----------------------------------------------------------------------------------------------
# Configs and results

def positive_int_list(value, field: str, example: str) -> tuple[int, ...]:
    """Positive integers, as a tuple in the order given, repeats dropped: a sequence of them, or the command
    line's text like "1,2,4"; else a UsageError naming the field (e.g. "MoDBenchConfig.decode_batches")."""
    items = value.split(",") if isinstance(value, str) else value
    numbers: list[int] = []
    for item in items if isinstance(items, (list, tuple)) else [None]:
        if isinstance(item, str) and item.strip().isdigit():
            item = int(item)
        if not isinstance(item, int) or isinstance(item, bool) or item <= 0:
            numbers = []
            break
        if item not in numbers:
            numbers.append(item)
    if not numbers:
        raise UsageError(f"{field} must be positive integers separated by commas, like {example}; got {value!r}")
    return tuple(numbers)


def check_config(cfg, positive: tuple[str, ...] = ("steps", "rounds"),
                 optional_positive: tuple[str, ...] = ("threads",)) -> None:
    """The named fields of a benchmark config are positive ints (the optional ones: or None); a UsageError
    naming `XxxBenchConfig.field` otherwise. `out`, when set, must be a string or a path."""
    positive_ints(cfg, *positive)
    positive_ints(cfg, *(name for name in optional_positive if getattr(cfg, name) is not None))
    out = getattr(cfg, "out", None)
    if out is not None and not isinstance(out, (str, os.PathLike)):
        raise UsageError(f"{type(cfg).__name__}.out must be a folder path or None, got {out!r}")


def prepare(cfg) -> OutputFolder | None:
    """Before any work: the output folder checked (new, empty, or with `overwrite` an earlier benchmark's),
    the torch threads set."""
    out = None
    if cfg.out:
        out = OutputFolder(cfg.out, "benchmark", option=f"{type(cfg).__name__}.out", overwrite=cfg.overwrite,
                           legacy=results_only("machine", "command"),
                           exists_hint=f"add {type(cfg).__name__}.overwrite to replace it, or choose another "
                                       f"{type(cfg).__name__}.out").check().lock()  # refused now, not after
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    return out


def save_results(out: OutputFolder | None, result: dict) -> None:
    """results.json in out, written atomically once the folder is claimed; nothing when out is None."""
    if out is not None:
        write_json_atomic(claim(out) / "results.json", result)


def machine_line(m: dict) -> str:
    """The machine of a benchmark record, in one line for the terminal."""
    return f"machine: {m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}"
