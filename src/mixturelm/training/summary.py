"""What a finished run reports in its results.json: budget, size, losses, and each mechanism's summary."""

from __future__ import annotations

from ..flops import forward_flops_per_token, train_flops_per_token
from ..mechanisms import registry


def run_summary(cfg, steps: int, tokens: int, params: int, wall_s: float, corpus: dict, record: dict) -> dict:
    """record: the last training step's record merged with the last evaluation."""
    t = cfg.train
    summary = {
        "preset": cfg.preset, "steps": steps, "tokens": tokens, "params": params,
        "forward_flops_per_token": forward_flops_per_token(cfg.model, t.seq_len),
        "train_flops": steps * t.batch_size * t.seq_len * train_flops_per_token(cfg.model, t.seq_len),
        "wall_s": wall_s, "corpus": corpus,
        **{k: record.get(k) for k in ("loss", "val_loss", "val_ppl", "val_bpb")},
    }
    if "val_loss_causal" in record:
        summary["val_loss_causal"] = record["val_loss_causal"]
    for mechanism in registry.all_mechanisms():
        summary.update(mechanism.summarize(record))
    return summary


def describe_summary(summary: dict) -> list[str]:
    """Every mechanism's lines about a results.json (train, eval, the compare report)."""
    return [line for m in registry.all_mechanisms() for line in m.describe(summary)]
