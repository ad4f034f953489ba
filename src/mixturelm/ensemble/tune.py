"""Choosing aggregators and their hyper-parameters on development streams, reporting them on test streams.

`mixturelm ensemble tune` scores the experts once on every stream, then for each variant (VARIANTS: the
baselines, MoE-F and its ablations and variants) runs every point of its grid on the development streams and
keeps the one with the fewest bits per byte there (the first in grid order on a tie). Only that choice is
run on the test streams, and every variant is reported there, the losing ones included.

The protocol, fixed before any result is seen:
- development streams draw on the "dev" half of each source's held-out documents, test streams on the "test"
  half (lm_stream.dev_or_test, a salted hash of the document's name), so they never share a document; the
  streams are also checked for shared documents by their real paths, which catches two spellings of one
  source (a folder and the folder above it, whose document names differ and so hash differently);
- a test stream may pair other sources than the development ones: hyper-parameters must carry over to them;
- every figure on a test stream has a 95 % interval from resampling its segments; differences are paired
  (same resamples) against Fixed-Share as chosen on the development streams and against the stream's best
  expert (which is chosen in hindsight, on the stream itself).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import UsageError
from . import aggregators as ag
from .experts import MIXTURELM, expert_kind, load_experts
from .lm_stream import LM_ALPHA, Segment, bpb_with_ci, build_stream, mix_stream, segment_losses

# The grids, declared before tuning. Switching rate per token (1 - alpha for MoE-F); MoE-F's observation noise
# in nats; the Gibbs scores' discount per token; window-softmin's window in tokens. eta = lam = 1 throughout
# (log loss is 1-mixable: Hedge with eta 1 is the Bayes mixture).
SWITCH_RATES = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
NOISES = (0.5, 1.0, 2.0)
DISCOUNTS = (0.9, 0.97, 0.99, 0.997)
WINDOWS = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Variant:
    name: str
    make: Callable[..., ag.Aggregator]  # make(n_experts, **params)
    grid: dict = field(default_factory=dict)  # parameter -> values; every combination is tried on dev

    def points(self) -> list[dict]:
        keys = list(self.grid)
        return [dict(zip(keys, vals)) for vals in itertools.product(*(self.grid[k] for k in keys))]


def variants(switch_rates=SWITCH_RATES, noises=NOISES, discounts=DISCOUNTS, windows=WINDOWS) -> list[Variant]:
    moef = dict(mix="log", lam=1.0)
    sw, sn = {"switch": tuple(switch_rates)}, {"switch": tuple(switch_rates), "noise": tuple(noises)}
    return [
        Variant("uniform", lambda n: ag.Uniform(n)),
        Variant("follow-the-leader", lambda n: ag.FollowTheLeader(n)),
        Variant("hedge (Bayes mixture)", lambda n: ag.Hedge(n, eta=1.0)),
        Variant("window-softmin", lambda n, window: ag.WindowSoftmin(n, window=window, lam=1.0),
                {"window": tuple(windows)}),
        Variant("fixed-share", lambda n, switch: ag.FixedShare(n, eta=1.0, alpha=switch), sw),
        Variant("fixed-share, fixed in advance (as `ensemble lm`)",
                lambda n: ag.FixedShare(n, eta=1.0, alpha=LM_ALPHA)),
        Variant("moe-f (cumulative Gibbs scores, as the paper)",
                lambda n, switch, noise: ag.MoEF(n, alpha=1 - switch, noise=noise, **moef), sn),
        Variant("moe-f, fixed in advance (as `ensemble lm`)",
                lambda n: ag.MoEF(n, alpha=1 - LM_ALPHA, noise=1.0, **moef)),
        Variant("moe-f, discounted Gibbs scores",
                lambda n, switch, noise, discount: ag.MoEF(n, alpha=1 - switch, noise=noise, score_discount=discount,
                                                           **moef), sn | {"discount": tuple(discounts)}),
        Variant("moe-f, joint posterior as the mixture",
                lambda n, switch, noise: ag.MoEF(n, alpha=1 - switch, noise=noise, mixture="posterior", **moef), sn),
        Variant("moe-f no gibbs (filters averaged)",
                lambda n, switch, noise: ag.MoEF(n, alpha=1 - switch, noise=noise, use_gibbs=False, **moef), sn),
        Variant("moe-f no Q update",
                lambda n, switch, noise: ag.MoEF(n, alpha=1 - switch, noise=noise, use_q_update=False, **moef), sn),
    ]


REFERENCE = "fixed-share"  # the differences are taken against it, as chosen on the development streams


@dataclass
class Scored:
    """One stream with every expert's per-token losses and MoE-F's signal."""

    sources: list[str]
    segments: list[Segment]
    losses_TN: np.ndarray
    a_TNN: np.ndarray
    v_TNN: np.ndarray
    mixed: dict = field(default_factory=dict)  # variant name -> (T,) mixture losses with its chosen point

    @property
    def seg_id(self) -> np.ndarray:
        return np.concatenate([np.full(len(s.tokens) - 1, k) for k, s in enumerate(self.segments)])

    @property
    def seg_bytes(self) -> np.ndarray:
        return np.array([s.n_bytes for s in self.segments], dtype=float)

    def per_segment(self, token_nats: np.ndarray) -> np.ndarray:
        return np.bincount(self.seg_id, weights=token_nats, minlength=len(self.segments))

    def mix(self, agg: ag.Aggregator) -> np.ndarray:
        return mix_stream(agg, self.losses_TN, self.a_TNN, self.v_TNN)[0]


def parse_streams(spec: str, what: str) -> list[list[str]]:
    """'S1,S2;S1,S3' -> [[S1, S2], [S1, S3]]: streams separated by ';', their sources by ','."""
    streams = [[s.strip() for s in part.split(",") if s.strip()] for part in spec.split(";") if part.strip()]
    if not streams:
        raise UsageError(f"{what} is empty; give streams as 'SOURCE1,SOURCE2', several separated by ';'")
    for st in streams:
        if len(st) < 2:
            raise UsageError(f"{what}: the stream {','.join(st)!r} has {len(st)} source; a stream alternates between "
                             "at least two, separated by ','")
    return streams


def check_disjoint(dev_streams: list[list[str]], test_streams: list[list[str]], val_fraction: float,
                   text_field: str = "text") -> None:
    """Refuse development and test streams whose halves share a document (by its real path): every held-out
    document of the dev half of the development sources against every one of the test half of the test
    sources, not only those the segments happen to cover."""
    from .lm_stream import held_out_documents

    def identities(streams, part):
        return {i for src in {s for st in streams for s in st}
                for i, _ in held_out_documents(src, val_fraction, part, text_field)}

    shared = sorted(identities(dev_streams, "dev") & identities(test_streams, "test"))
    if shared:
        raise UsageError(f"the development and test streams share {len(shared)} document(s), e.g. {shared[0]}; "
                         "a source was given twice under two names (a folder and a folder inside it?): give each "
                         "source the same way in --dev-data and --test-data")


def choose(variant: Variant, dev: list[Scored], n: int) -> tuple[dict, list[dict]]:
    """The grid point with the fewest bits per byte over all development streams (pooled), and every point's."""
    total_bytes = sum(s.seg_bytes.sum() for s in dev)
    tried = []
    for params in variant.points():
        nats = sum(float(s.mix(variant.make(n, **params)).sum()) for s in dev)
        tried.append({"params": params, "bits_per_byte": nats / math.log(2) / total_bytes})
    best = min(range(len(tried)), key=lambda k: tried[k]["bits_per_byte"])  # the first of equals
    return tried[best]["params"], tried


def shown(identity: str) -> str:
    """A document's identity as results.json records it: relative to the working folder, or under "stdlib/"
    for the standard library's, so that a record names no machine's paths."""
    import os
    import sysconfig

    std = sysconfig.get_paths()["stdlib"]
    if identity.startswith(std + os.sep):
        return "stdlib/" + os.path.relpath(identity, std)
    rel = os.path.relpath(identity) if os.path.isabs(identity) else identity
    return identity if rel.startswith("..") else rel


def _params_text(params: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in params.items()) or "(none)"


def run_tune(expert_paths: list[str], dev_data: str, test_data: str, out, segment_len: int, n_segments: int,
             val_fraction: float | None, text_field: str, device: str, resamples: int = 1000,
             grids: dict | None = None, log=print) -> dict:
    from .report import ci, claim, markdown_table, print_table, write_json, write_text_atomic

    dev_streams, test_streams = parse_streams(dev_data, "--dev-data"), parse_streams(test_data, "--test-data")
    all_variants = variants(**(grids or {}))
    for v in all_variants:
        for k, vals in v.grid.items():
            if not vals:
                raise UsageError(f"the grid of {k} for {v.name} is empty; give at least one value")
    if val_fraction is None and MIXTURELM not in [expert_kind(p) for p in expert_paths]:
        raise UsageError("`val_fraction` is needed when no expert is a mixturelm run; give it (e.g. 0.1)")
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise UsageError(f"`val_fraction` must be in (0, 1), got {val_fraction}")
    from ..data import corpus

    for src in {s for st in dev_streams + test_streams for s in st}:
        corpus.resolve(src)  # a missing source is refused before any expert is loaded
    experts, names = load_experts(expert_paths, device)
    tok = experts[0].tokenizer
    vf = val_fraction if val_fraction is not None else min(e.val_fraction for e in experts
                                                           if e.val_fraction is not None)

    def segments(sources, part):
        return build_stream(sources, tok, experts[0].tokenizer_spec, vf, text_field, segment_len, n_segments,
                            log=log, part=part)

    check_disjoint(dev_streams, test_streams, vf, text_field)
    dev_segs = [segments(st, "dev") for st in dev_streams]
    test_segs = [segments(st, "test") for st in test_streams]  # every input checked before the long work

    def score(sources, segs) -> Scored:
        log(f"scoring {len(experts)} experts on {len(segs)} segments of {', '.join(sources)} ...")
        parts = [segment_losses(experts, s, device) for s in segs]
        return Scored(sources, segs, *(np.concatenate([p[i] for p in parts]) for i in range(3)))

    dev = [score(st, sg) for st, sg in zip(dev_streams, dev_segs)]
    test = [score(st, sg) for st, sg in zip(test_streams, test_segs)]
    n = len(experts)

    chosen, grid_results = {}, {}
    for v in all_variants:
        log(f"  choosing on the development streams: {v.name} ({len(v.points())} points)")
        chosen[v.name], grid_results[v.name] = choose(v, dev, n)
    make = {v.name: v.make for v in all_variants}

    def evaluate(streams: list[Scored]) -> list[dict]:
        """Rows of experts, the per-segment oracle and every variant with its development choice, on the
        segments of `streams` pooled."""
        seg_bytes = np.concatenate([s.seg_bytes for s in streams])
        expert_seg = np.stack([np.concatenate([s.per_segment(s.losses_TN[:, i]) for s in streams])
                               for i in range(n)])
        for s in streams:
            for name in chosen:
                if name not in s.mixed:
                    s.mixed[name] = s.mix(make[name](n, **chosen[name]))
        mixed = {name: np.concatenate([s.per_segment(s.mixed[name]) for s in streams]) for name in chosen}
        rows = [{"kind": "expert", "name": nm, "seg_nats": expert_seg[i]} for i, nm in enumerate(names)]
        rows.append({"kind": "oracle", "name": "per-segment oracle (sees the future)", "seg_nats": expert_seg.min(0)})
        rows += [{"kind": "aggregator", "name": nm, "params": chosen[nm], "seg_nats": mixed[nm]} for nm in chosen]
        best = int(np.argmin(expert_seg.sum(1)))
        for r in rows:
            r["bits_per_byte"] = bpb_with_ci(r["seg_nats"], seg_bytes, resamples)
            if r["kind"] == "aggregator":
                r["minus_best_expert"] = bpb_with_ci(r["seg_nats"], seg_bytes, resamples, minus=expert_seg[best])
                r["minus_fixed_share"] = bpb_with_ci(r["seg_nats"], seg_bytes, resamples, minus=mixed[REFERENCE])
        for r in rows:
            r["seg_nats"] = [float(x) for x in r["seg_nats"]]
        return {"best_expert": names[best], "rows": rows}

    log("mixing the test streams with the development choices ...")
    test_results = [{"sources": s.sources, "segments": [{"source": s.sources[g.source], "bytes": g.n_bytes,
                                                          "documents": [shown(d) for d in g.documents]} for g in s.segments],
                     "result": evaluate([s])} for s in test]
    pooled = evaluate(test) if len(test) > 1 else None
    dev_rows = evaluate(dev)

    out = claim(out)
    summary = {
        "benchmark": "lm-tune", "experts": dict(zip(names, expert_paths)), "val_fraction": vf,
        "segment_len": segment_len, "segments_per_stream": n_segments,
        "protocol": "variants and hyper-parameters chosen on the development streams (the dev half of each "
                    "source's held-out documents), reported on the test streams (the test half); no stream of "
                    "one shares a document with a stream of the other",
        "grids": {v.name: {k: list(vals) for k, vals in v.grid.items()} for v in all_variants},
        "dev": {"streams": [{"sources": s.sources, "segments": [{"source": s.sources[g.source], "bytes": g.n_bytes,
                                                                  "documents": [shown(d) for d in g.documents]}
                                                                 for g in s.segments]} for s in dev],
                "chosen": chosen, "tried": grid_results, "result": dev_rows},
        "test": test_results, "test_pooled": pooled,
    }
    write_json(out / "results.json", summary)

    def table(res: dict) -> tuple[list[str], list[list[str]]]:
        best = res["best_expert"]
        header = ["kind", "name", "chosen on dev", "bits/byte [95% CI]", f"minus best expert ({best})",
                  "minus fixed-share (dev-tuned)"]
        body = [[r["kind"], r["name"], _params_text(r["params"]) if "params" in r else "", ci(r["bits_per_byte"], 4)]
                + ([ci(r["minus_best_expert"], 4), ci(r["minus_fixed_share"], 4)] if r["kind"] == "aggregator"
                   else ["", ""]) for r in res["rows"]]
        return header, body

    n_tok = lambda s: sum(len(g.tokens) - 1 for g in s.segments)  # noqa: E731
    md = ["# Aggregators chosen on development streams, reported on test streams", "",
          f"Experts: {', '.join(f'{nm} ({p})' for nm, p in zip(names, expert_paths))}. Each stream: {n_segments} "
          f"segments of {segment_len} tokens, in turn from its sources, from the documents held out from every "
          f"expert at val_fraction {vf}: the development half for the development streams, the test half for "
          "the test streams. Each variant's grid point is chosen on the development streams only; below 0 is "
          "better in the differences, which are paired (the same resampled segments for both rows).", ""]
    for title, res in ([(f"Test stream: {', '.join(s['sources'])}", s["result"]) for s in test_results]
                        + ([("Every test stream, pooled", pooled)] if pooled else [])
                        + [("Development streams (where the choices were made: not a result)", dev_rows)]):
        header, body = table(res)
        md += [f"## {title}", "", markdown_table(header, body), ""]
        print_table(title, header, body)
    md += ["## Every grid point on the development streams (bits/byte)", ""]
    for v in all_variants:
        if len(grid_results[v.name]) > 1:
            md.append(f"- {v.name}: " + "; ".join(f"{_params_text(t['params'])}: {t['bits_per_byte']:.4f}"
                                                  for t in grid_results[v.name]))
    md.append("")
    write_text_atomic(out / "report.md", "\n".join(md))
    log(f"dev {sum(n_tok(s) for s in dev):,} tokens, test {sum(n_tok(s) for s in test):,} tokens; "
        f"results.json and report.md in {out}")
    return summary
