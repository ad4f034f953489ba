"""Decoding in `bench mod`: dense and Mixture-of-Depths at several batch sizes, each beside the least time
the machine allows it (decode_bound), with what the routed blocks did.

Every batch size decodes the same sequences: a pool of prompts (as many as the largest batch) is
prefilled once per model, untimed, and batch b decodes them b at a time from copies of their cache rows.
A routed block's decisions are each row's own, so the share of tokens that enter is then the same at
every batch size; only which steps a block runs at, and for how many rows, changes.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch

from ..model import MixtureLM
from .decode_bound import Machine, decode_stages, step_seconds
from .timing import alternate_order, paired_speedup


@dataclass
class Pool:
    """Prompts prefilled into one cache per model, and the tokens fed after them."""

    caches: dict[str, object]
    feed_BT: torch.Tensor
    prompt_len: int


def prefilled_pool(models: dict[str, MixtureLM], rows: int, prompt_len: int, new_tokens: int, vocab: int,
                   seed: int = 1) -> Pool:
    """`rows` random prompts of prompt_len tokens prefilled by each model, and new_tokens random tokens
    per row to feed after them (an untrained model samples near-random tokens anyway)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (rows, prompt_len), generator=g)
    feed = torch.randint(0, vocab, (rows, new_tokens), generator=g)
    caches = {}
    with torch.no_grad():
        for name, model in models.items():
            caches[name] = model.new_cache(rows, prompt_len + new_tokens)
            model(prompt, cache=caches[name], last_only=True)
    return Pool(caches, feed, prompt_len)


def cache_rows(cache, rows: slice):
    """A cache of batch rows `rows` of `cache`, as a fresh prefill of those prompts would leave it: every
    tensor of a layer's cache (keys, values, per-row lengths) has the batch first."""
    sub = copy.copy(cache)
    sub.layers = []
    for layer in cache.layers:
        part = copy.copy(layer)
        for name, value in vars(layer).items():
            if isinstance(value, torch.Tensor):
                setattr(part, name, value[rows].clone())
        sub.layers.append(part)
    return sub


def ragged_lengths(cache) -> list[torch.Tensor]:
    """Per routed block, the tokens each row has cached there (RaggedKVCache.length_B)."""
    return [layer.length_B for layer in cache.layers if hasattr(layer, "length_B")]


@torch.no_grad()
def decode_seconds(model: MixtureLM, cache, feed_BT: torch.Tensor) -> float:
    """Seconds to feed feed_BT one token at a time: the decoding loop of `generate`, without sampling."""
    t0 = time.perf_counter()
    for i in range(feed_BT.shape[1]):
        model(feed_BT[:, i:i + 1], cache=cache)
    return time.perf_counter() - t0


@torch.no_grad()
def traced_decode(model: MixtureLM, cache, feed_BT: torch.Tensor) -> list[list[list[int]]]:
    """The same decoding, untimed, recording per step and routed block the tokens that each row entering
    the block attends to there (its cached tokens, its own included)."""
    lengths = ragged_lengths(cache)
    trace = []
    for i in range(feed_BT.shape[1]):
        before = [n.clone() for n in lengths]
        model(feed_BT[:, i:i + 1], cache=cache)
        trace.append([n[n > b].tolist() for n, b in zip(lengths, before)])
    return trace


@dataclass
class Routing:
    """What the routed blocks did over a decoding, from its trace."""

    share: float  # of the tokens that came to a routed block, those that entered it
    blocks_run: float  # of the routed block calls, those at least one row entered (so its weights were read)
    rows_per_run: float  # rows entering a routed block that runs, on average
    single_row_runs: float  # of the runs, those for one row alone

    @classmethod
    def of(cls, traces: list[list[list[list[int]]]], batch: int) -> Routing:
        calls = [len(rows) for trace in traces for step in trace for rows in step]
        runs = [n for n in calls if n]
        return cls(share=sum(calls) / (len(calls) * batch), blocks_run=len(runs) / len(calls),
                   rows_per_run=statistics.mean(runs) if runs else 0.0,
                   single_row_runs=sum(n == 1 for n in runs) / len(runs) if runs else 0.0)


def bound_seconds(model: MixtureLM, batch: int, prompt_len: int, traces: list,
                  machine: Machine) -> tuple[float, float]:
    """The least seconds of a decoding and its FLOPs (decode_bound). traces: per group of rows, per step,
    the contexts of the rows entering each routed block (no routed block: an empty list per step); step
    i's plain blocks attend to prompt + i + 1 tokens."""
    seconds = flops = 0.0
    for trace in traces:
        for i, routed in enumerate(trace):
            stages = decode_stages(model, batch, prompt_len + i + 1, routed)
            seconds += step_seconds(stages, machine)
            flops += sum(f for _, f in stages)
    return seconds, flops


def decode_at(models: dict[str, MixtureLM], pool: Pool, batch: int, rounds: int, machine: Machine) -> dict:
    """Decode every group of `batch` rows of the pool with each model, every round, from a fresh copy of its cache
    rows, the models interleaved group by group: tokens/s measured and bound, FLOPs per token, and what the routed
    blocks did."""
    rows = pool.feed_BT.shape[0]
    groups = [slice(start, start + batch) for start in range(0, rows - batch + 1, batch)]
    # untimed, once: warms each model up at this batch size and records the routing
    traces = {name: [traced_decode(m, cache_rows(pool.caches[name], g), pool.feed_BT[g]) for g in groups]
              for name, m in models.items()}
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):  # the models interleaved group by group, the first of each pair alternating
        spent = dict.fromkeys(models, 0.0)
        for i, g in enumerate(groups):
            for name in alternate_order(list(models), i):
                spent[name] += decode_seconds(models[name], cache_rows(pool.caches[name], g), pool.feed_BT[g])
        for name in models:
            seconds[name].append(spent[name])
    tokens = len(groups) * batch * pool.feed_BT.shape[1]
    result = {"sequences": len(groups) * batch}
    for name, m in models.items():
        bound_s, flops = bound_seconds(m, batch, pool.prompt_len, traces[name], machine)
        result[name] = {"tokens_per_s": tokens / statistics.median(seconds[name]),
                        "bound_tokens_per_s": tokens / bound_s, "flops_per_token": flops / tokens}
    d, mod = result["dense"], result["MoD"]
    result["all_rounds_s"] = seconds
    result |= paired_speedup(seconds["dense"], seconds["MoD"])  # per round: a slow spell of the machine cancels
    result["bound_speedup"] = mod["bound_tokens_per_s"] / d["bound_tokens_per_s"]
    result["flop_speedup"] = d["flops_per_token"] / mod["flops_per_token"]
    result["routing"] = vars(Routing.of(traces["MoD"], batch))
    return result
