"""The NIFTY benchmark of MoE-F: LLM experts' daily $SPY movement calls (Fall / Neutral / Rise) on the 317
test days of NIFTY-LM, as released with the paper (data/nifty-moe-f/README.md, MIT).

Only hard labels were released, so every aggregator works with the 0-1 loss and predicts the arg-max
of its weighted vote (probability outputs would enter through the same vote as distributions; see
losses.py). Ties of the vote go to the label seen most often on past days (then alphabetical order).
Day t's weights use the losses of days < t only; hyper-parameters are fixed in advance (below) or tuned
online by a Hedge over a small grid (OnlineTuned), never on the test labels.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import UsageError
from . import aggregators as ag
from .losses import ZeroOne
from .metrics import bootstrap, point_metrics

LABELS = ("Fall", "Neutral", "Rise")
POOLS = {"all": "all-experts_seed-{seed}", "llama2-7b": "Llama-2-7b-chat-hf_seed-{seed}",
         "llama3-8b": "Meta-Llama-3-8B-Instruct_seed-{seed}"}
REFERENCE = "moe-f"  # df_moe-f.csv: the paper's own MoE-F output
HISTORY_WINDOW = 10


def data_root() -> Path:
    return Path(str(resources.files("mixturelm.ensemble") / "data" / "nifty-moe-f"))


@dataclass
class Pool:
    name: str
    seed: int
    dates: list[str]
    y: np.ndarray  # (T,) realised label ids
    experts: dict[str, np.ndarray]  # name -> (T,) predicted label ids
    reference: np.ndarray | None = None


def _label_id(value: str, path: Path, line: int, column: str) -> int:
    try:
        return LABELS.index(value.strip())
    except ValueError:
        raise UsageError(f"{path}:{line}: unknown {column} {value!r}; expected one of {', '.join(LABELS)}") from None


def read_predictions(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(dates, realised label ids, predicted label ids) of one df_*.csv, columns read by header name."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as e:
        raise UsageError(f"cannot read {path} ({e.strerror}); check the `data` folder") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f"{path} is not a UTF-8 CSV file ({str(e)[:80]}); give the released prediction files") from None
    need = {"date", "label", "predicted_label"}
    if not rows or not need <= set(rows[0]):
        raise UsageError(f"{path} has no rows with columns {', '.join(sorted(need))}; it is not a NIFTY prediction file")
    dates = [r["date"] for r in rows]
    y = np.array([_label_id(r["label"] or "", path, i + 2, "label") for i, r in enumerate(rows)])
    pred = np.array([_label_id(r["predicted_label"] or "", path, i + 2, "predicted_label") for i, r in enumerate(rows)])
    return dates, y, pred


def load_pool(root: Path, pool: str, seed: int) -> Pool:
    if pool not in POOLS:
        raise UsageError(f"unknown pool {pool!r}; choose from {', '.join(POOLS)}")
    folder = Path(root) / POOLS[pool].format(seed=seed)
    files = sorted(folder.glob("df_*.csv")) if folder.is_dir() else []
    if not files:
        raise UsageError(f"{folder}: no df_*.csv prediction files (pool {pool}, seed {seed}); check `data` and `seeds`")
    dates, y, experts, reference = None, None, {}, None
    for f in files:
        d, yy, pred = read_predictions(f)
        if dates is None:
            dates, y = d, yy
        elif len(d) != len(dates):
            raise UsageError(f"{f} has {len(d)} days but {files[0].name} has {len(dates)}; "
                             "every expert must cover the same days")
        elif d != dates or not np.array_equal(yy, y):
            t = next(i for i in range(len(d)) if d[i] != dates[i] or yy[i] != y[i])
            raise UsageError(f"{f}: day {t + 1} ({d[t]}, {LABELS[yy[t]]}) differs from {files[0].name} "
                             f"({dates[t]}, {LABELS[y[t]]}); the files must list the same days in the same order")
        name = f.stem[3:]
        if name == REFERENCE:
            reference = pred
        else:
            experts[name] = pred
    if not experts:
        raise UsageError(f"{folder} holds only the reference output; no expert to aggregate")
    return Pool(pool, seed, dates, y, experts, reference)


# ---- realised-history forecasters: a forecast for day t from the labels of days < t only ----

def _majority(counts: np.ndarray, recent: list[int]) -> int:
    top = np.flatnonzero(counts == counts.max())
    for lab in reversed(recent):  # ties: the most recent of the tied labels
        if lab in top:
            return int(lab)
    return int(top[0])


def history_forecasts(y: np.ndarray, first: int, window: int | None) -> np.ndarray:
    """window 1: yesterday's label; n: majority of the last n labels; None: of all past labels.
    Day 1 has no history and takes `first`."""
    out = np.empty_like(y)
    for t in range(len(y)):
        past = list(y[:t] if window is None else y[max(0, t - window):t])
        out[t] = first if not past else _majority(np.bincount(past, minlength=len(LABELS)), past)
    return out


def vote(w_N: np.ndarray, preds_N: np.ndarray, past_counts: np.ndarray) -> int:
    """Arg-max of the weighted vote; ties to the label seen most on past days, then alphabetical."""
    v = np.bincount(preds_N, weights=w_N, minlength=len(LABELS))
    top = np.flatnonzero(np.isclose(v, v.max(), rtol=0, atol=1e-12))
    return int(top[np.argmax(past_counts[top])])


# ---- aggregators, hyper-parameters fixed in advance ----

FS_ALPHA = 0.1      # one regime change per ~10 trading days: the 10-day market context of the NIFTY prompt
MOEF_ALPHA = 0.9    # the same switching rate for MoE-F's generator (one-step stay probability >= 0.9)
ALPHA_GRID = (0.01, 0.05, 0.1, 0.2, 0.3)  # switching rates 1 - alpha tried by the online-tuned variants


def label_aggregators(n: int) -> dict[str, callable]:
    return {
        "uniform": lambda: ag.Uniform(n),
        "follow-the-leader": lambda: ag.FollowTheLeader(n),
        "hedge": lambda: ag.Hedge(n),
        "fixed-share": lambda: ag.FixedShare(n, alpha=FS_ALPHA),
        "window-softmin": lambda: ag.WindowSoftmin(n, window=HISTORY_WINDOW),
        "fixed-share (online-tuned)": lambda: ag.OnlineTuned([ag.FixedShare(n, alpha=a) for a in ALPHA_GRID]),
        "moe-f": lambda: ag.MoEF(n, alpha=MOEF_ALPHA),
        "moe-f (online-tuned)": lambda: ag.OnlineTuned([ag.MoEF(n, alpha=1 - a) for a in ALPHA_GRID]),
        "moe-f no filter (step 2 only)": lambda: ag.MoEF(n, alpha=MOEF_ALPHA, use_filter=False),
        "moe-f no gibbs (filters averaged)": lambda: ag.MoEF(n, alpha=MOEF_ALPHA, use_gibbs=False),
        "moe-f no Q update": lambda: ag.MoEF(n, alpha=MOEF_ALPHA, use_q_update=False),
    }


def hindsight_grid(n: int) -> dict[str, list]:
    """Each grid's best member by weighted F1 on the test labels: not a method, the ceiling of online tuning."""
    grid = [(a, lam) for a in ALPHA_GRID for lam in (0.5, 2.0, "anytime")]
    return {"fixed-share, best alpha in hindsight": [lambda a=a: ag.FixedShare(n, alpha=a) for a in ALPHA_GRID],
            "moe-f, best (alpha, lambda) in hindsight": [lambda a=a, lam=lam: ag.MoEF(n, alpha=1 - a, lam=lam)
                                                         for a, lam in grid]}


def run_labels(agg: ag.Aggregator, y: np.ndarray, preds_TN: np.ndarray,
               lookahead: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(T,) mixture predictions and (T, N) weights; day t's weights before day t's label is revealed.

    lookahead=True is NOT causal and serves only the audit of the released output (audit.py): day t's label
    is revealed (to the aggregator and to the tie-break counts) before day t's weights and vote."""
    loss = ZeroOne(len(LABELS))
    T, N = preds_TN.shape
    w_TN, out = np.empty((T, N)), np.empty(T, dtype=int)
    counts = np.zeros(len(LABELS))

    def reveal(t: int) -> None:
        agg.update(loss.loss(preds_TN[t], y[t]), loss.signal(preds_TN[t]))
        counts[y[t]] += 1

    for t in range(T):
        if lookahead:
            reveal(t)  # NOT causal: the label of day t is used before day t is predicted
        w_TN[t] = agg.weights()
        out[t] = vote(w_TN[t], preds_TN[t], counts)
        if not lookahead:
            reveal(t)  # the label of day t is revealed
    return out, w_TN


def evaluate_pool(pool: Pool, resamples: int, history: bool = True, boot_seed: int = 0) -> dict:
    """Every row of one (pool, seed) table, and the weight paths for the plots."""
    names = list(pool.experts)
    preds_TN = np.stack([pool.experts[k] for k in names], 1)
    first = vote(np.full(len(names), 1 / len(names)), preds_TN[0], np.zeros(len(LABELS)))
    hist = {"yesterday's label": history_forecasts(pool.y, first, 1),
            f"majority of last {HISTORY_WINDOW} labels": history_forecasts(pool.y, first, HISTORY_WINDOW),
            "majority of all past labels": history_forecasts(pool.y, first, None)}
    rows, paths = [], {}

    def add(kind: str, name: str, pred: np.ndarray, **extra) -> None:
        rows.append({"pool": pool.name, "seed": pool.seed, "kind": kind, "name": name,
                     "metrics": bootstrap(pool.y, pred, len(LABELS), resamples, boot_seed)} | extra)

    for k in names:
        add("expert", k, pool.experts[k])
    for k, p in hist.items():
        add("history", k, p)
    pools = {"experts": (names, preds_TN)}
    if history:
        hn = ["yesterday's label", f"majority of last {HISTORY_WINDOW} labels"]
        pools["experts + history"] = (names + hn, np.concatenate([preds_TN, np.stack([hist[h] for h in hn], 1)], 1))
    for members, (enames, p_TN) in pools.items():
        for k, make in label_aggregators(p_TN.shape[1]).items():
            pred, w_TN = run_labels(make(), pool.y, p_TN)
            add("aggregator", k, pred, members=members)
            paths[(members, k)] = (enames, w_TN)
        for k, make in hindsight_grid(p_TN.shape[1]).items():  # a bound, reported as such: chosen on the test labels
            best = max((run_labels(m(), pool.y, p_TN)[0] for m in make),
                       key=lambda pr: point_metrics(pool.y, pr, len(LABELS))["weighted_f1"])
            add("hindsight", k, best, members=members)
    if pool.reference is not None:
        add("reference", "paper's MoE-F output (released)", pool.reference)
    return {"rows": rows, "paths": paths}


# ---- the `mixturelm ensemble nifty` command ----

HEADER = ["kind", "members", "name", "weighted F1", "macro F1", "accuracy", "MCC"]
PLOTTED = ("moe-f", "fixed-share", "hedge")


def _table_rows(rows: list[dict]) -> list[list[str]]:
    from .report import ci

    return [[r["kind"], r.get("members", ""), r["name"]] + [ci(r["metrics"][m]) for m in
                                                           ("weighted_f1", "macro_f1", "accuracy", "mcc")]
            for r in rows]


def plot_weights(path: Path, pool: Pool, paths: dict, members: str) -> None:
    """Heatmaps of expert weights over the days for a few aggregators, the realised labels below."""
    from .report import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(len(PLOTTED) + 1, 1, figsize=(12, 2.2 * len(PLOTTED) + 1.2), sharex=True,
                             gridspec_kw={"height_ratios": [3] * len(PLOTTED) + [0.6]}, layout="constrained")
    for ax, name in zip(axes, PLOTTED):
        enames, w_TN = paths[(members, name)]
        im = ax.imshow(w_TN.T, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
        ax.set_yticks(range(len(enames)), [e[:28] for e in enames], fontsize=7)
        ax.set_title(f"{name}: weights ({members}), pool {pool.name}, seed {pool.seed}", fontsize=9)
    axes[-1].imshow(pool.y[None, :], aspect="auto", cmap="coolwarm", vmin=0, vmax=2, interpolation="nearest")
    axes[-1].set_yticks([0], ["label"])
    axes[-1].set_xlabel(f"test day (from {pool.dates[0]} to {pool.dates[-1]}); label blue Fall / grey Neutral / red Rise")
    fig.colorbar(im, ax=list(axes), pad=0.01, shrink=0.6, label="weight")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_table(rows: list[dict]) -> str:
    """One line per (pool, seed): best expert, best history rule, best non-MoE-F aggregator and MoE-F for each
    member set, and the paper's released output."""
    from .report import ci, markdown_table

    def best(sel):
        return max(sel, key=lambda r: r["metrics"]["weighted_f1"]["value"], default=None)

    def cell(r, named=True):
        return "" if r is None else (f"{r['name']}: " if named else "") + ci(r["metrics"]["weighted_f1"])

    lines = []
    for key in dict.fromkeys((r["pool"], r["seed"]) for r in rows):
        sel = [r for r in rows if (r["pool"], r["seed"]) == key]
        line = [key[0], str(key[1]), cell(best([r for r in sel if r["kind"] == "expert"])),
                cell(best([r for r in sel if r["kind"] == "history"]))]
        for members in ("experts", "experts + history"):
            aggs = [r for r in sel if r["kind"] == "aggregator" and r.get("members") == members]
            line += [cell(best([r for r in aggs if not r["name"].startswith("moe-f")])),
                     cell(next((r for r in aggs if r["name"] == "moe-f"), None), named=False)]
        line.append(cell(next((r for r in sel if r["kind"] == "reference"), None), named=False))
        lines.append(line)
    return markdown_table(["pool", "seed", "best expert", "best history rule", "best baseline aggregator",
                           "moe-f", "best baseline (+ history)", "moe-f (+ history)", "paper's MoE-F output"], lines)


AUDIT_CHOICES = ("headline", "every", "none")


def audited(loaded: list[Pool], audit: str) -> list[Pool]:
    """The pools whose released MoE-F output is audited: "headline" (the all-experts pool of seed 42, the paper's
    headline figure), "every" (each loaded pool with a released output) or "none"."""
    if audit not in AUDIT_CHOICES:
        raise UsageError(f"--audit {audit!r}: choose one of {', '.join(AUDIT_CHOICES)}")
    with_ref = [p for p in loaded if p.reference is not None]
    if audit == "headline":
        return [p for p in with_ref if (p.name, p.seed) == ("all", 42)]
    return with_ref if audit == "every" else []


def run_benchmark(root: Path, seeds: list[int], pools: list[str], resamples: int, history: bool,
                  out: Path, log=print, audit: str = "headline", permutations: int = 2000) -> dict:
    from . import audit as audit_mod
    from .report import claim, markdown_table, print_table, write_json, write_text_atomic

    loaded = [load_pool(root, p, s) for p in pools for s in seeds]  # every input checked before any work
    to_audit = audited(loaded, audit)
    results, md = [], ["# MoE-F on NIFTY: experts, baselines, aggregators",
                       "", f"Weighted F1, macro F1, accuracy, MCC with bootstrap 95 % intervals ({resamples} resamples "
                       "of the test days, seed 0). Day t's weights use days < t only; hyper-parameters fixed in "
                       f"advance (fixed-share alpha {FS_ALPHA}, moe-f alpha {MOEF_ALPHA}, sigma {ZeroOne.noise}, "
                       "Hedge / Gibbs rate sqrt(8 ln N / t), window 10) or online-tuned (Hedge over "
                       f"switching rates {ALPHA_GRID}).", ""]
    figures = []
    for pool in loaded:
        log(f"pool {pool.name}, seed {pool.seed}: {len(pool.experts)} experts, {len(pool.y)} days")
        res = evaluate_pool(pool, resamples, history)
        results.extend(res["rows"])
        md += [f"## pool {pool.name}, seed {pool.seed} ({len(pool.experts)} experts, {len(pool.y)} days)", "",
               markdown_table(HEADER, _table_rows(res["rows"])), ""]
        for members in ("experts", "experts + history") if history else ("experts",):
            fig = out / f"weights_{pool.name}_seed{pool.seed}{'_hist' if members != 'experts' else ''}.png"
            figures.append((pool, res["paths"], members, fig))
            md += [f"![weights]({fig.name})", ""]
    audits, audit_md = [], []
    for pool in to_audit:
        log(f"audit of the released MoE-F output, pool {pool.name}, seed {pool.seed} "
            f"(causal and look-ahead grid, {permutations} permutations)")
        audits.append(audit_mod.audit_pool(pool, resamples, permutations))
        audit_md += audit_mod.markdown(audits[-1])
    md[4:4] = ["## Summary: weighted F1 [95 % CI] per pool and seed", "", summary_table(results), ""] + audit_md
    if audit == "headline" and not to_audit:
        log("no audit: the all-experts pool of seed 42 (the only one with the paper's headline output) is not loaded")
    out = claim(out)  # every input checked and the work done: lock, empty when replacing, mark
    for pool, paths, members, fig in figures:
        plot_weights(fig, pool, paths, members)
    summary = {"benchmark": "nifty", "labels": list(LABELS), "seeds": seeds, "pools": pools,
               "resamples": resamples, "hyperparameters": {"fixed_share_alpha": FS_ALPHA, "moef_alpha": MOEF_ALPHA,
                                                           "moef_noise": ZeroOne.noise, "alpha_grid": ALPHA_GRID,
                                                           "window": HISTORY_WINDOW},
               "rows": results, "audit": audits}
    write_json(out / "results.json", summary)
    write_text_atomic(out / "report.md", "\n".join(md))
    pool, seed = ("all" if "all" in pools else pools[0]), (42 if 42 in seeds else seeds[0])
    shown = [r for r in results if r["pool"] == pool and r["seed"] == seed]
    print_table(f"NIFTY, pool {pool}, seed {seed} (all tables in report.md)", HEADER, _table_rows(shown))
    for a in audits:
        log(audit_mod.summary(a))
    log(f"results.json, report.md and {len(figures)} weight plots in {out}")
    return summary
