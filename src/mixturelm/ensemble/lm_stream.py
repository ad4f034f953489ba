"""Mixing language models online: a stream of segments drawn in turn from different sources (Python code,
English prose, ...), experts being mixturelm checkpoints or Hugging Face causal LMs of one tokenizer
(experts.py); each expert's next-token distribution is mixed with weights computed from the log losses of
earlier tokens only.

Dimension letters: N experts, L tokens of a segment, V vocabulary, T tokens of the stream.

- Text of each source is its held-out split: the documents that the hash split (corpus.is_validation)
  puts in validation at the smallest val_fraction of the mixturelm experts, so none of them trained on them
  (the validation sets of larger fractions contain it). With Hugging Face experts alone `val_fraction` must
  be given: which documents such a model trained on is unknown.
- `part` "dev" or "test" halves that held-out set again, by a hash of each document's name with its own salt
  (dev_or_test): the development streams, on which variants and hyper-parameters are chosen, and the test
  streams, on which they are reported, never share a document. "all" keeps the whole held-out set.
- Segment k comes from source k mod S: `segment_len` + 1 consecutive tokens of that source's held-out
  stream, the segments of a source spread evenly over it; the first token is context, the others are
  scored. Each expert conditions on the segment only (no BOS is added), in windows of its context that
  overlap by half (every scored token after the first window sees at least context / 2 tokens of context).
  The context is max_seq_len for a mixturelm model and the config's max_position_embeddings for a Hugging
  Face one, capped by the segment.
- The distribution of an expert over the shared vocabulary V (the tokenizer's ids) is the softmax over all of
  its logits, restricted to the first V: a model whose embedding is padded beyond its tokenizer keeps the
  mass it puts on the padding (those ids are never a target), so its loss is the model's own cross-entropy.
- The mixture's loss at a token is -log sum_i w_i p_i(y) (a mixture of probabilities); its weights are
  updated after the token's losses -log p_i(y) are revealed.
- Bits per byte = total nats / ln 2 / bytes of the scored tokens. The per-segment oracle takes, in each
  segment, the expert with the smallest loss on it (it sees the future: a bound, not a method).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UsageError
from . import aggregators as ag
from .experts import MIXTURELM, Expert, expert_kind, load_experts
from .losses import LogLoss

__all__ = ["Expert", "PARTS", "Segment", "build_stream", "dev_or_test", "load_experts", "next_token_logprobs",
           "run_lm", "segment_losses"]

PARTS = ("all", "dev", "test")
DEV_TEST_SALT = "mixturelm: development or test half of the held-out documents\n"
# Left out of development and test streams: the standard library's pydoc_data/ holds the pydoc topics' English
# prose as string literals, the same text as a pydoc-topics source (benchmarks/ensemble/pydoc_topics.py) that a
# prose expert trains on, so as "code" it would put that expert's training text into the streams.
STDLIB_STREAM_EXCLUDED = ("pydoc_data/",)


@dataclass
class Segment:
    source: int
    tokens: np.ndarray  # (L + 1,), the first is context only
    n_bytes: int  # bytes of text of the L scored tokens
    documents: tuple[str, ...] = ()  # the documents its tokens come from (part "dev" or "test": file paths)


def dev_or_test(name: str) -> str:
    """The half of the held-out documents a document belongs to: a hash of its name, salted so that it is
    independent of the training/validation split (corpus.is_validation hashes the bare name)."""
    h = hashlib.sha256((DEV_TEST_SALT + name).encode("utf-8", "surrogatepass")).digest()
    return "dev" if h[0] < 128 else "test"


def held_out_documents(source: str, val_fraction: float, part: str, text_field: str = "text"):
    """(identity, document) of the held-out documents of `source` in half `part`, in corpus order. The
    identity is the document's real path (with ':line' for .jsonl records), so that two spellings of one
    source (a folder and a glob inside it) are seen to share documents."""
    from ..data import corpus

    if part not in ("dev", "test"):
        raise UsageError(f"`part` must be one of {', '.join(PARTS)}, got {part!r}")
    found = []
    for src in corpus.resolve(source):
        docs = corpus.read_documents([src], text_field)
        _, val, how = corpus.split(docs, val_fraction)
        if how != "by document":
            raise UsageError(f"source {src.spec!r} has too few documents to hold whole documents out at val_fraction "
                             f"{val_fraction} ({how}); a development/test split needs a source of many documents")
        base = src.root if src.root is not None else (src.files[0].parent if src.files else None)
        for d in val:
            if src.spec == corpus.DEFAULT_CORPUS and d.name.startswith(STDLIB_STREAM_EXCLUDED):
                continue
            if dev_or_test(d.name) == part:
                found.append((os.path.realpath(base / d.name) if base is not None else f"{src.spec}:{d.name}", d))
    return found


def _part_stream(source: str, tokenizer, val_fraction: float, part: str, text_field: str):
    """The tokens of a source's held-out documents of one half, joined by the end-of-document token, and the
    identity of the document each token comes from."""
    docs = held_out_documents(source, val_fraction, part, text_field)
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    pieces, owner = [], []
    for k, (_, d) in enumerate(docs):
        ids = np.concatenate([np.asarray(tokenizer.encode(d.data), dtype=np.int64), np.array(eos, dtype=np.int64)])
        pieces.append(ids)
        owner.append(np.full(len(ids), k))
    if not pieces:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), []
    return np.concatenate(pieces), np.concatenate(owner), [i for i, _ in docs]


def _bytes_of(tokenizer, ids: np.ndarray) -> int:
    if tokenizer.name == "bytes":
        return int(np.sum(ids < 256))
    return len(tokenizer.decode(ids).encode("utf-8"))


def build_stream(sources: list[str], tokenizer, tokenizer_spec: str, val_fraction: float, text_field: str,
                 segment_len: int, n_segments: int, log=print, part: str = "all") -> list[Segment]:
    """Segments taken in turn from `sources`, from the documents the split at `val_fraction` holds out:
    all of them (`part` "all") or the development or test half of them ("dev", "test"; each segment then
    names its documents)."""
    from ..data.tokens import prepare

    if len(sources) < 2:
        raise UsageError(f"`data` needs at least two sources separated by commas, got {len(sources)}")
    if segment_len < 1 or n_segments < 1:
        raise UsageError(f"`segment_len` and `segments` must be >= 1, got {segment_len} and {n_segments}")
    if part not in PARTS:
        raise UsageError(f"`part` must be one of {', '.join(PARTS)}, got {part!r}")
    held_out, owners, identities = [], [], []
    for src in sources:
        if part == "all":
            data = prepare(src, tokenizer_spec, val_fraction, text_field, tokenizer, log=log)
            held_out.append(np.asarray(data.val.tokens))
        else:
            toks, owner, ids = _part_stream(src, tokenizer, val_fraction, part, text_field)
            held_out.append(toks)
            owners.append(owner)
            identities.append(ids)
    starts = []
    what = "held-out tokens" if part == "all" else f"held-out tokens in the {part} half"
    for s, toks in enumerate(held_out):
        count = len(range(s, n_segments, len(sources)))
        if len(toks) < count * (segment_len + 1):
            raise UsageError(f"source {sources[s]!r} has {len(toks):,} {what}, fewer than the "
                             f"{count} segments of {segment_len} + 1 it must give; lower `segments` or "
                             "`segment_len`, or give more text")
        # spread evenly over the held-out text, so that the stream is not just its first documents
        starts.append(np.linspace(0, len(toks) - segment_len - 1, max(count, 1)).astype(int))
    segs = []
    for k in range(n_segments):
        s, j = k % len(sources), k // len(sources)
        a = starts[s][j]
        toks = held_out[s][a: a + segment_len + 1].astype(np.int64)
        docs = () if part == "all" else tuple(identities[s][k] for k in np.unique(owners[s][a: a + segment_len + 1]))
        segs.append(Segment(s, toks, _bytes_of(tokenizer, toks[1:]), docs))
    return segs


@torch.no_grad()
def next_token_logprobs(model, x_L1: torch.Tensor, window: int, vocab: int | None = None) -> torch.Tensor:
    """(L, V) log-probabilities of x[1:] given the tokens before them inside the segment, V = `vocab` (the
    tokenizer's ids) or all the model's logits. `model(x_1T).logits` is (1, T, columns)."""
    L = len(x_L1) - 1
    out = None
    done = 0
    while done < L:
        start = max(0, done - window // 2) if done else 0
        end = min(start + window, L)
        logits = model(x_L1[start:end][None]).logits[0].float()
        if vocab is not None and logits.shape[-1] < vocab:
            raise UsageError(f"the model gives {logits.shape[-1]} logits per token, fewer than the {vocab} tokens "
                             "of its tokenizer; the tokenizer does not belong to it")
        # the softmax over every column the model has, then the tokenizer's ids only: columns of a padded
        # embedding are never a target, and the mass the model puts there is its own loss, not renormalised away
        lp = F.log_softmax(logits, -1)[:, :vocab]
        if out is None:
            out = torch.empty(L, lp.shape[-1])
        out[done:end] = lp[done - start:].cpu()
        done = end
    return out


def segment_losses(experts: list[Expert], seg: Segment, device: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(L, N) log losses of the experts on the segment's tokens, and MoE-F's signal (L, N, N) x 2."""
    x = torch.as_tensor(seg.tokens, device=device)
    L, vocab = len(seg.tokens) - 1, experts[0].tokenizer.vocab_size
    logp_NLV = torch.stack([next_token_logprobs(e, x, e.window(L), vocab) for e in experts])
    y = torch.as_tensor(seg.tokens[1:])
    N, V = len(experts), logp_NLV.shape[-1]
    losses_LN = -logp_NLV.double().gather(2, y[None, :, None].expand(N, -1, 1))[..., 0].T
    a_LNN, v_LNN = torch.empty(L, N, N, dtype=torch.float64), torch.empty(L, N, N, dtype=torch.float64)
    step = max(1, (1 << 24) // (N * V))  # positions at a time: each float64 (N, step, V) tensor under 128 MiB
    for s in range(0, L, step):
        lp = logp_NLV[:, s:s + step].double()
        p = lp.exp()
        # A[n, i] = E_{y ~ p_i} -log p_n(y) (cross-entropy), V[n, i] its variance: losses.LogLoss.signal, batched
        a = -torch.einsum("ilv,nlv->lni", p, lp)
        a_LNN[s:s + step] = a
        v_LNN[s:s + step] = (torch.einsum("ilv,nlv->lni", p, lp ** 2) - a ** 2).clamp_min(0)
    return losses_LN.numpy(), a_LNN.numpy(), v_LNN.numpy()


# Fixed in advance: log loss is 1-mixable, so eta = 1 (Bayes) for Hedge, Fixed-Share, the Gibbs step and the
# online tuning; switching rate 1 - alpha = 0.01 per token (a switch every ~100 tokens) for Fixed-Share and MoE-F.
LM_ALPHA = 0.01
LM_ALPHA_GRID = (1e-4, 1e-3, 1e-2, 5e-2)
LM_WINDOW = 64


def lm_aggregators(n: int) -> dict[str, callable]:
    moef = dict(mix="log", lam=1.0, noise=LogLoss.noise)
    return {
        "uniform": lambda: ag.Uniform(n),
        "follow-the-leader": lambda: ag.FollowTheLeader(n),
        "hedge (Bayes mixture)": lambda: ag.Hedge(n, eta=1.0),
        "fixed-share": lambda: ag.FixedShare(n, eta=1.0, alpha=LM_ALPHA),
        "window-softmin": lambda: ag.WindowSoftmin(n, window=LM_WINDOW, lam=1.0),
        "fixed-share (online-tuned)": lambda: ag.OnlineTuned(
            [ag.FixedShare(n, eta=1.0, alpha=a) for a in LM_ALPHA_GRID], mix="log", eta=1.0),
        "moe-f": lambda: ag.MoEF(n, alpha=1 - LM_ALPHA, **moef),
        "moe-f (online-tuned)": lambda: ag.OnlineTuned(
            [ag.MoEF(n, alpha=1 - a, **moef) for a in LM_ALPHA_GRID], mix="log", eta=1.0),
        "moe-f no filter (step 2 only)": lambda: ag.MoEF(n, alpha=1 - LM_ALPHA, use_filter=False, **moef),
        "moe-f no gibbs (filters averaged)": lambda: ag.MoEF(n, alpha=1 - LM_ALPHA, use_gibbs=False, **moef),
        "moe-f no Q update": lambda: ag.MoEF(n, alpha=1 - LM_ALPHA, use_q_update=False, **moef),
    }


def mix_stream(agg: ag.Aggregator, losses_TN, a_TNN, v_TNN) -> tuple[np.ndarray, np.ndarray]:
    """(T,) mixture log losses and (T, N) weights; token t's weights before its losses are revealed."""
    T, N = losses_TN.shape
    w_TN, mixed = np.empty((T, N)), np.empty(T)
    for t in range(T):
        w_TN[t] = agg.weights()
        mixed[t] = ag.mixture_loss(w_TN[t][None], losses_TN[t], "log")[0]
        agg.update(losses_TN[t], (a_TNN[t], v_TNN[t]))
    return mixed, w_TN


def bpb_with_ci(seg_nats: np.ndarray, seg_bytes: np.ndarray, resamples: int = 1000, seed: int = 0,
                minus: np.ndarray | None = None) -> dict:
    """Bits per byte over all segments, and a 95 % interval from resampling segments (the same resamples for
    every row). With `minus` (another row's nats per segment): the paired difference of the two."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(seg_nats), size=(resamples, len(seg_nats)))
    diff = seg_nats - (minus if minus is not None else 0.0)
    boot = diff[idx].sum(1) / math.log(2) / seg_bytes[idx].sum(1)
    return {"value": float(diff.sum() / math.log(2) / seg_bytes.sum()),
            "lo": float(np.percentile(boot, 2.5)), "hi": float(np.percentile(boot, 97.5))}


# ---- the `mixturelm ensemble lm` command ----

PLOTTED = ("moe-f", "fixed-share", "hedge (Bayes mixture)")


def plot_weights(path: Path, names: list[str], sources: list[str], segs: list[Segment], paths: dict) -> None:
    from .report import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(len(PLOTTED), 1, figsize=(12, 2.4 * len(PLOTTED)), sharex=True)
    colors = plt.get_cmap("tab10")
    for ax, agg in zip(axes, PLOTTED):
        w_TN = paths[agg]
        start = 0
        for seg in segs:  # the true source of each segment, shaded
            L = len(seg.tokens) - 1
            ax.axvspan(start, start + L, color=colors(seg.source), alpha=0.12, lw=0)
            start += L
        for i, n in enumerate(names):
            ax.plot(w_TN[:, i], lw=0.8, label=f"expert {n}")
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("weight")
        ax.set_title(f"{agg}: weights per token; shading = true source", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors(s), alpha=0.3) for s in range(len(sources))]
    axes[0].legend(axes[0].get_lines() + handles, names + [f"source {Path(s).name}" for s in sources],
                   fontsize=7, loc="upper right", ncol=2)
    axes[-1].set_xlabel("token of the stream")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_lm(expert_paths: list[str], data: str, out: Path, segment_len: int, n_segments: int,
           val_fraction: float | None, text_field: str, device: str, resamples: int = 1000, log=print) -> dict:
    from .report import ci, claim, markdown_table, print_table, write_json, write_text_atomic

    sources = [s.strip() for s in data.split(",") if s.strip()]
    if val_fraction is None and len(expert_paths) >= 2 and MIXTURELM not in [expert_kind(p) for p in expert_paths]:
        raise UsageError("`val_fraction` is needed when no expert is a mixturelm run: the stream is made of each "
                         "source's held-out documents, and a Hugging Face model does not say which ones it did "
                         "not train on; give it (e.g. 0.1)")
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise UsageError(f"`val_fraction` must be in (0, 1), got {val_fraction}")
    experts, names = load_experts(expert_paths, device)
    tokenizer = experts[0].tokenizer
    vf = val_fraction if val_fraction is not None else min(e.val_fraction for e in experts
                                                           if e.val_fraction is not None)
    if not 0 < vf < 1:
        raise UsageError(f"`val_fraction` must be in (0, 1), got {vf}")
    segs = build_stream(sources, tokenizer, experts[0].tokenizer_spec, vf, text_field, segment_len,
                        n_segments, log=log)
    log(f"{len(segs)} segments of {segment_len} tokens from {len(sources)} sources; scoring {len(experts)} experts ...")
    parts = [segment_losses(experts, s, device) for s in segs]
    losses_TN = np.concatenate([p[0] for p in parts])
    a_TNN, v_TNN = np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])
    seg_id = np.concatenate([np.full(len(s.tokens) - 1, k) for k, s in enumerate(segs)])
    seg_bytes = np.array([s.n_bytes for s in segs], dtype=float)

    def per_segment(token_nats: np.ndarray) -> np.ndarray:
        return np.bincount(seg_id, weights=token_nats, minlength=len(segs))

    def row(kind: str, name: str, token_nats: np.ndarray) -> dict:
        seg_nats = per_segment(token_nats)
        by_source = {Path(src).name or src: float(seg_nats[[s.source == k for s in segs]].sum() / math.log(2)
                                                  / seg_bytes[[s.source == k for s in segs]].sum())
                     for k, src in enumerate(sources)}
        return {"kind": kind, "name": name, "bits_per_byte": bpb_with_ci(seg_nats, seg_bytes, resamples),
                "nats_per_token": float(token_nats.mean()), "bits_per_byte_by_source": by_source}

    rows = [row("expert", e.name, losses_TN[:, i]) | {"checkpoint": e.path, "format": e.kind,
                                                        "context": e.window(segment_len)}
            for i, e in enumerate(experts)]
    seg_NS = np.stack([per_segment(losses_TN[:, i]) for i in range(len(names))])
    oracle_tokens = losses_TN[np.arange(len(seg_id)), seg_NS.argmin(0)[seg_id]]
    rows.append(row("oracle", "per-segment oracle (best expert of each segment, sees the future)", oracle_tokens))
    paths, mixed_of = {}, {}
    for name, make in lm_aggregators(len(names)).items():
        log(f"  mixing: {name}")
        mixed, w_TN = mix_stream(make(), losses_TN, a_TNN, v_TNN)
        rows.append(row("aggregator", name, mixed))
        paths[name], mixed_of[name] = w_TN, mixed
    best = min((r for r in rows if r["kind"] == "expert"), key=lambda r: r["bits_per_byte"]["value"])["name"]
    ref = {"best expert": per_segment(losses_TN[:, names.index(best)]),
           "fixed-share": per_segment(mixed_of["fixed-share"])}
    for r in rows:
        if r["kind"] == "aggregator":
            r["difference"] = {k: bpb_with_ci(per_segment(mixed_of[r["name"]]), seg_bytes, resamples, minus=v)
                               for k, v in ref.items()}
    out = claim(out)  # every input checked and the work done: lock, empty when replacing, mark
    plot_weights(out / "weights.png", names, sources, segs, paths)
    header = (["kind", "name", "bits/byte [95% CI over segments]"] + [f"on {Path(s).name}" for s in sources]
              + [f"minus best expert ({best})", "minus fixed-share"])
    table = [[r["kind"], r["name"], ci(r["bits_per_byte"], 4)] + [f"{v:.4f}" for v in r["bits_per_byte_by_source"].values()]
             + ([ci(r["difference"][k], 4) for k in ref] if "difference" in r else ["", ""]) for r in rows]
    summary = {"benchmark": "lm-stream", "experts": dict(zip(names, expert_paths)), "sources": sources,
               "val_fraction": vf, "segment_len": segment_len, "segments": [
                   {"source": sources[s.source], "bytes": s.n_bytes} for s in segs],
               "tokens": int(len(seg_id)), "bytes": int(seg_bytes.sum()),
               "hyperparameters": {"alpha": LM_ALPHA, "alpha_grid": LM_ALPHA_GRID, "window": LM_WINDOW,
                                   "eta": 1.0, "moef_noise": LogLoss.noise}, "rows": rows}
    write_json(out / "results.json", summary)
    md = ["# Mixing language models online: bits per byte on a stream of alternating sources", "",
          f"{len(segs)} segments of {segment_len} tokens ({int(seg_bytes.sum()):,} bytes), in turn from "
          + ", ".join(sources) + f" (held-out documents, val_fraction {vf}). Experts: "
          + ", ".join(f"{n} ({p})" for n, p in zip(names, expert_paths)) + ".", "",
          "Differences are paired (the same resampled segments for both rows): below 0 is better.", "",
          markdown_table(header, table), "", "![weights](weights.png)", ""]
    write_text_atomic(out / "report.md", "\n".join(md))
    print_table("bits per byte on the stream (lower is better)", header, table)
    log(f"results.json, report.md and weights.png in {out}")
    return summary
