"""Evaluation: mean next-token loss over fixed held-out windows, with perplexity and bits per byte, what
each mechanism measures over the same tokens, and the calibration some mechanisms need before it."""

from __future__ import annotations

import contextlib
import math

import torch

from ..data.tokens import TokenData, val_windows
from ..errors import UsageError
from ..mechanisms import registry
from .distributed import Dist


def loss_metrics(loss: float, bytes_per_token: float) -> dict:
    """A mean next-token loss in nats with its perplexity and bits per byte of text."""
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_bpb": loss / math.log(2) / bytes_per_token}


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TokenData, seq_len: int, max_tokens: int, batch: int,
             device: str, d: Dist = Dist(), autocast=contextlib.nullcontext, lockstep: bool = False) -> dict:
    """Mean next-token loss over the fixed validation windows, with perplexity and bits per byte.

    A model with a mechanism whose training routing looks ahead (Mixture-of-Depths' top-k over the
    sequence) is also evaluated with causal routing (val_loss_causal): the token-by-token decisions of
    sampling. Each mechanism adds what it measures over the tokens of the first pass
    (Mechanism.eval_value, summed over batches and processes, then eval_metrics: PEER's expert usage,
    "layer{i}.peer_usage"). lockstep: every process makes the same number of forward calls (expert
    parallelism's exchanges need them all); a process out of windows runs a discarded one."""
    was_training = model.training
    model.eval()
    present = registry.present(model)
    every = val_windows(data.val, seq_len, max_tokens)
    windows = every[d.rank::d.world]
    calls = -(-len(every) // d.world) if lockstep else len(windows)
    routings = [False, True] if any(m.causal_eval for m in present) else [False]
    total = torch.zeros(len(routings), 2, dtype=torch.float64)
    totals: dict[tuple[str, str], torch.Tensor] = {}  # (layer, kind) -> what the mechanism sums over batches
    for i in range(0, calls, batch):
        if i >= len(windows):  # lockstep: this process has no windows left, the others one batch more
            for causal in routings:
                with autocast():
                    model(every[:1, :-1].to(device), every[:1, 1:].to(device), causal_routing=causal)
            continue
        w = windows[i:i + batch].to(device)
        for j, causal in enumerate(routings):
            with autocast():
                out = model(w[:, :-1], w[:, 1:], causal_routing=causal)
            for name, aux in out.named_aux():
                mechanism = registry.of_aux(aux)
                # the first pass for every mechanism; the causal pass for those whose routing it changes
                value = mechanism.eval_value(aux) if j == 0 or mechanism.causal_eval else None
                if value is not None:
                    key = (name, aux.kind)
                    totals[key] = totals[key] + value if key in totals else value
            total[j] += torch.tensor([out.loss.item() * w[:, 1:].numel(), w[:, 1:].numel()], dtype=torch.float64)
    d.sum_in_place(total)
    for v in totals.values():
        d.sum_in_place(v)
    model.train(was_training)
    loss = (total[0, 0] / total[0, 1]).item()
    res = loss_metrics(loss, data.val.bytes_per_token) | {"val_tokens": int(total[0, 1])}
    if len(routings) > 1:
        res["val_loss_causal"] = (total[1, 0] / total[1, 1]).item()
    for name, kind in sorted(totals):
        res.update(registry.get(kind).eval_metrics(name, totals[name, kind]))
    return res


def calibrate(model: torch.nn.Module, make_batches, options_of, autocast=contextlib.nullcontext,
              d: Dist = Dist()) -> int:
    """Before an evaluation: each mechanism of the model that asks for it re-estimates what evaluation needs
    (Mechanism.calibrate: PEER's precise-BN of its query norms) on the last n training batches, n its
    `calibration_batches`. make_batches(n) gives them; options_of(mechanism) its training options.
    Returns the number of layers calibrated."""
    done = 0
    for mechanism in registry.present(model):
        n = mechanism.calibration_batches(options_of(mechanism)) if mechanism.train_options_class else 0
        if n:
            done += mechanism.calibrate(model, make_batches(n), autocast,
                                        d.mean_in_place if d.world > 1 else None)
    return done


def evaluate_checkpoint(ckpt, data: str | None = None, split: str = "val", max_tokens: int | None = None,
                        batch_size: int | None = None, device: str = "cpu", log=lambda msg: None) -> dict:
    """Loss, perplexity, bits per byte (and each mechanism's measures) of a checkpoint, on its run's held-out
    split or on other text (`data`); split "all": every document of it. The result names its inputs."""
    import numpy as np

    from .. import checkpoint
    from ..data.tokens import TokenSplit, check_length, prepare

    if split not in ("val", "all"):
        raise UsageError(f"split={split!r} is unknown; choose val or all")
    for name, value in (("max_tokens", max_tokens), ("batch_size", batch_size)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise UsageError(f"`{name}` must be a positive integer (or None for the run's own), got {value!r}")
    model, run_cfg, tokenizer, ckpt_dir = checkpoint.load_model(ckpt, device)
    t = run_cfg["train"]
    tokens = prepare(data if data else t["data"], t["tokenizer"], t["val_fraction"], t["text_field"], tokenizer,
                     log=log)
    if split == "all":
        tokens.val = TokenSplit(np.concatenate([tokens.train.tokens, tokens.val.tokens]),
                                tokens.train.n_bytes + tokens.val.n_bytes, tokens.train.n_docs + tokens.val.n_docs)
    check_length(tokens.val, t["seq_len"], split)
    top = int(tokens.val.tokens.max()) if len(tokens.val.tokens) else 0
    if top >= model.config.vocab_size:
        raise UsageError(f"the {split} tokens reach id {top}, beyond the checkpoint's vocabulary of "
                         f"{model.config.vocab_size}; its tokenizer.json does not belong to it (restore the run's own)")
    res = evaluate(model, tokens, t["seq_len"], t["eval_tokens"] if max_tokens is None else max_tokens,
                   t["batch_size"] if batch_size is None else batch_size, device)
    return res | {"checkpoint": str(ckpt_dir), "data": data or t["data"] or "stdlib", "split": split}


def describe_evaluation(res: dict) -> list[str]:
    """Lines for people about evaluate()'s result."""
    from .summary import describe_summary

    lines = [f"loss {res['val_loss']:.4f}  perplexity {res['val_ppl']:.3f}  bits/byte {res['val_bpb']:.4f}  "
             f"({res['val_tokens']:,} tokens of {res.get('data', 'the validation split')}, "
             f"{res.get('split', 'val')} split)"]
    if "val_loss_causal" in res:
        lines.append(f"with causal (sampling) routing of the wrapped blocks: loss {res['val_loss_causal']:.4f}")
    return lines + describe_summary({k: v for m in registry.all_mechanisms() for k, v in m.summarize(res).items()})
