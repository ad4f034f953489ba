"""An audit of the MoE-F output released with the paper for NIFTY (df_moe-f.csv): what a causal aggregator of
the released expert labels reaches, what the same aggregator reaches with a one-step look-ahead, and whether
the released output carries information about a day's label beyond the experts' calls and the past labels.

Look-ahead runs are NOT causal: day t's realised label reaches the aggregator before it predicts day t
(nifty.run_labels(lookahead=True)). They exist only here, to ask whether the released figures are
consistent with such a leak, and every row, table and field that holds one says so.

Dimension letters: T days, N experts, K labels, B permutations, S strata.
"""

from __future__ import annotations

import numpy as np

from . import aggregators as ag
from .metrics import bootstrap, point_metrics
from .nifty import HISTORY_WINDOW, LABELS, Pool, history_forecasts, run_labels, vote

CAUSAL, LOOKAHEAD = "causal", "look-ahead (NOT causal)"

# The family and its hyper-parameter grid, declared before any run: 38 settings, each run both ways.
ETAS = (0.5, 1.0, 2.0, "anytime")
FS_ALPHAS = (0.01, 0.05, 0.1, 0.3)
WINDOWS = (1, 3, 5, 10)
WINDOW_LAMS = (0.5, 1.0, 2.0)
MOEF_ALPHAS = (0.5, 0.7, 0.9, 0.99)
PERMUTATIONS = 2000


def grid(n: int) -> list[tuple[str, str, callable]]:
    """(family, parameters, factory) for every declared setting."""
    g = [("majority vote", "", lambda: ag.Uniform(n)), ("follow-the-leader", "", lambda: ag.FollowTheLeader(n))]
    g += [("hedge", f"eta={e}", lambda e=e: ag.Hedge(n, eta=e)) for e in ETAS]
    g += [("fixed-share", f"eta={e}, alpha={a}", lambda e=e, a=a: ag.FixedShare(n, eta=e, alpha=a))
          for e in ETAS for a in FS_ALPHAS]
    g += [("window-softmin", f"window={w}, lambda={lam}", lambda w=w, lam=lam: ag.WindowSoftmin(n, window=w, lam=lam))
          for w in WINDOWS for lam in WINDOW_LAMS]
    g += [("moe-f", f"alpha={a}", lambda a=a: ag.MoEF(n, alpha=a)) for a in MOEF_ALPHAS]
    return g


# ---- the conditional permutation test ----

def expert_majority(y: np.ndarray, preds_TN: np.ndarray) -> np.ndarray:
    """(T,) the experts' unweighted majority call; ties to the label seen most on past days (nifty.vote)."""
    n = preds_TN.shape[1]
    return np.array([vote(np.ones(n), preds_TN[t], np.bincount(y[:t], minlength=len(LABELS)))
                     for t in range(len(y))])


def strata(y: np.ndarray, preds_TN: np.ndarray) -> np.ndarray:
    """(T,) stratum ids: the experts' unweighted majority call on day t x yesterday's label x the majority of
    the last 10 labels (day 1, which has no past, is a stratum of its own). Everything here is known before
    day t's label."""
    majority, k = expert_majority(y, preds_TN), len(LABELS)
    yesterday = np.r_[k, y[:-1]]  # k: no past yet
    recent = history_forecasts(y, k, HISTORY_WINDOW)
    key = (majority * (k + 1) + yesterday) * (k + 1) + recent
    return np.unique(key, return_inverse=True)[1]


def conditional_mi(x_BT: np.ndarray, y: np.ndarray, s: np.ndarray, k: int) -> np.ndarray:
    """Plug-in conditional mutual information I(x; y | s) in bits, for each row of x_BT."""
    B, T = x_BT.shape
    n_s = int(s.max()) + 1
    cell = (np.arange(B)[:, None] * n_s + s[None, :]) * k * k + x_BT * k + y[None, :]
    c = np.bincount(cell.ravel(), minlength=B * n_s * k * k).reshape(B, n_s, k, k).astype(float)
    n_ = c.sum((2, 3), keepdims=True)
    n_x, n_y = c.sum(3, keepdims=True), c.sum(2, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(c > 0, c * np.log2(c * n_ / (n_x * n_y)), 0.0)
    return terms.sum((1, 2, 3)) / T


def permutation_test(x: np.ndarray, y: np.ndarray, s: np.ndarray, permutations: int = PERMUTATIONS,
                     seed: int = 0, k: int = len(LABELS)) -> dict:
    """Does x carry information about y beyond the strata s? Statistic: I(x; y | s). Null: x permuted within
    each stratum (it keeps its relation to s, loses any other to y). p = (1 + #{null >= observed}) / (1 + B)."""
    x, y, s = np.asarray(x), np.asarray(y), np.asarray(s)
    observed = float(conditional_mi(x[None], y, s, k)[0])
    rng = np.random.default_rng(seed)
    by_stratum = np.argsort(s, kind="stable")  # positions, grouped by stratum
    keys = s[by_stratum][None, :] + rng.random((permutations, len(s)))  # random order inside each stratum
    shuffled = by_stratum[np.argsort(keys, axis=1)]
    x_BT = np.empty((permutations, len(s)), dtype=x.dtype)
    x_BT[:, by_stratum] = x[shuffled]
    null = conditional_mi(x_BT, y, s, k)
    exceed = int(np.sum(null >= observed - 1e-12))
    return {"statistic_bits": observed, "null_mean_bits": float(null.mean()),
            "null_95th_bits": float(np.percentile(null, 95)), "p_value": (1 + exceed) / (1 + permutations),
            "permutations": permutations, "seed": seed, "strata": int(s.max()) + 1}


# ---- the audit of one pool ----

def _facts(pool: Pool, preds_TN: np.ndarray, resamples: int, seed: int) -> dict:
    y, r = pool.y, pool.reference
    majority = expert_majority(y, preds_TN)
    no_expert_right = ~(preds_TN == y[:, None]).any(1)
    unseen = ~(preds_TN == r[:, None]).any(1)  # days the released label is no expert's call
    k = len(LABELS)
    return {
        "released_vs_label": bootstrap(y, r, k, resamples, seed),
        "released_vs_expert_majority": bootstrap(majority, r, k, resamples, seed),
        "expert_majority_vs_label": bootstrap(y, majority, k, resamples, seed),
        "released_mcc_with_label_of": {"day t-1": point_metrics(y[:-1], r[1:], k)["mcc"],
                                       "day t": point_metrics(y, r, k)["mcc"],
                                       "day t+1": point_metrics(y[1:], r[:-1], k)["mcc"]},
        "released_counts": dict(zip(LABELS, np.bincount(r, minlength=k).tolist())),
        "label_counts": dict(zip(LABELS, np.bincount(y, minlength=k).tolist())),
        "days": len(y),
        "days_no_expert_right": int(no_expert_right.sum()),
        "released_right_when_no_expert_right": int((r == y)[no_expert_right].sum()),
        "days_released_label_no_expert_gave": int(unseen.sum()),
        "released_right_on_those_days": int((r == y)[unseen].sum()),
        "released_labels_on_those_days": dict(zip(LABELS, np.bincount(r[unseen], minlength=k).tolist())),
    }


def audit_pool(pool: Pool, resamples: int, permutations: int = PERMUTATIONS, seed: int = 0) -> dict:
    """Every grid setting causal and with look-ahead (weighted F1, MCC and day-by-day agreement with the
    released output, with bootstrap intervals), the permutation tests with their controls, and the facts."""
    if pool.reference is None:
        raise ValueError(f"pool {pool.name}, seed {pool.seed} has no released MoE-F output to audit")
    names = list(pool.experts)
    preds_TN = np.stack([pool.experts[k] for k in names], 1)
    y, r, k = pool.y, pool.reference, len(LABELS)
    rows, outputs = [], {}
    for family, params, make in grid(len(names)):
        for mode in (CAUSAL, LOOKAHEAD):
            pred = run_labels(make(), y, preds_TN, lookahead=mode == LOOKAHEAD)[0]
            outputs[(family, params, mode)] = pred
            agree = bootstrap(r, pred, k, resamples, seed)
            rows.append({"family": family, "params": params, "mode": mode,
                         "metrics": bootstrap(y, pred, k, resamples, seed),
                         "agreement": {"fraction": agree["accuracy"], "mcc": agree["mcc"]}})
    always = np.full_like(y, LABELS.index("Neutral"))
    a = bootstrap(r, always, k, resamples, seed)
    s = strata(y, preds_TN)
    first = vote(np.ones(len(names)), preds_TN[0], np.zeros(k))
    controls = {"released MoE-F output (the subject)": ("subject", r),
                "realised label itself": ("positive control", y),
                "majority of all past labels": ("negative control", history_forecasts(y, first, None))}
    for family, params in (("fixed-share", "eta=anytime, alpha=0.1"), ("window-softmin", "window=10, lambda=1.0"),
                           ("moe-f", "alpha=0.9")):
        controls[f"{family} ({params}), causal"] = ("negative control", outputs[(family, params, CAUSAL)])
        controls[f"{family} ({params}), {LOOKAHEAD}"] = ("positive control", outputs[(family, params, LOOKAHEAD)])
    tests = [{"column": name, "role": role} | permutation_test(x, y, s, permutations, seed)
             for name, (role, x) in controls.items()]
    return {"pool": pool.name, "seed": pool.seed, "rows": rows, "tests": tests,
            "facts": _facts(pool, preds_TN, resamples, seed),
            "always_neutral_agreement": {"fraction": a["accuracy"], "mcc": a["mcc"]},
            "grid": {"hedge_eta": ETAS, "fixed_share_eta": ETAS, "fixed_share_alpha": FS_ALPHAS,
                     "window": WINDOWS, "window_lambda": WINDOW_LAMS, "moef_alpha": MOEF_ALPHAS},
            "strata": "experts' majority call x yesterday's label x majority of the last 10 labels"}


# ---- the report section ----

def summary(a: dict) -> str:
    """One line for the terminal."""
    rows, ref, t = a["rows"], a["facts"]["released_vs_label"], a["tests"][0]
    return (f"audit, pool {a['pool']}, seed {a['seed']}: released output weighted F1 {ref['weighted_f1']['value']:.3f}; "
            f"grid of {len(rows) // 2} settings: causal {_range(rows, CAUSAL)}, look-ahead (NOT causal) "
            f"{_range(rows, LOOKAHEAD)}; knows the day's label beyond the experts and past labels: "
            f"p = {t['p_value']:.4f} ({t['permutations']} permutations); details in report.md")


def _best(rows: list[dict], family: str, mode: str) -> dict:
    sel = [r for r in rows if r["family"] == family and r["mode"] == mode]
    return max(sel, key=lambda r: r["metrics"]["weighted_f1"]["value"])


def _range(rows: list[dict], mode: str, key=lambda r: r["metrics"]["weighted_f1"]["value"]) -> str:
    v = [key(r) for r in rows if r["mode"] == mode]
    return f"{min(v):.3f}-{max(v):.3f}"


def markdown(a: dict) -> list[str]:
    from .report import ci, markdown_table

    rows, f = a["rows"], a["facts"]
    families = list(dict.fromkeys(r["family"] for r in rows))
    ref = f["released_vs_label"]
    n_causal = sum(r["mode"] == CAUSAL for r in rows)
    closest = [(m, max((r for r in rows if r["mode"] == m), key=lambda r: r["agreement"]["mcc"]["value"]))
               for m in (CAUSAL, LOOKAHEAD)]
    md = [f"## Audit of the released MoE-F output (pool {a['pool']}, seed {a['seed']})", "",
          f"The paper's released output: weighted F1 {ci(ref['weighted_f1'])}, MCC {ci(ref['mcc'])}. "
          f"Each of {n_causal} settings of a grid declared in advance (mixturelm.ensemble.audit) runs twice on the "
          "released expert labels: **causal** (day t's weights from days < t) and **look-ahead (NOT causal)**: day "
          "t's realised label is given to the aggregator and its tie-break before it predicts day t. Look-ahead is "
          "a leak, run only to ask what it would produce. Agreement = fraction of days equal to the released "
          "label, and its MCC (chance-corrected: predicting Neutral every day agrees on "
          f"{ci(a['always_neutral_agreement']['fraction'])} of days with agreement MCC 0).", "",
          f"Weighted F1 over the whole grid: causal {_range(rows, CAUSAL)}, look-ahead {_range(rows, LOOKAHEAD)}. "
          f"Agreement MCC: causal {_range(rows, CAUSAL, lambda r: r['agreement']['mcc']['value'])}, look-ahead "
          f"{_range(rows, LOOKAHEAD, lambda r: r['agreement']['mcc']['value'])} (the realised label itself: "
          f"{ref['mcc']['value']:.3f}). Closest to the released output by agreement MCC: " +
          "; ".join(f"{m}, {r['family']} {r['params']}: {ci(r['agreement']['mcc'])}" for m, r in closest) +
          ". The best of a grid, chosen here on the test labels, is itself optimistic.", "",
          "### Best setting of each family, by weighted F1", ""]
    header = ["family", "mode", "setting", "weighted F1", "MCC", "agreement with released", "agreement MCC"]

    def line(r):
        return [r["family"], r["mode"], r["params"] or "-", ci(r["metrics"]["weighted_f1"]), ci(r["metrics"]["mcc"]),
                ci(r["agreement"]["fraction"]), ci(r["agreement"]["mcc"])]

    md += [markdown_table(header, [line(_best(rows, fam, m)) for fam in families for m in (CAUSAL, LOOKAHEAD)]), ""]
    t = a["tests"][0]
    md += ["### Does the released output know the day's label beyond the experts and the past labels?", "",
           f"Statistic: conditional mutual information I(column; label | strata) in bits, strata = {a['strata']} "
           f"({t['strata']} strata). Null: the column permuted within strata ({t['permutations']} permutations, seed "
           f"{t['seed']}), which keeps its relation to the strata and breaks any other to the day's label. The "
           "controls check the test on these days: causal outputs (functions of the experts and the past labels) "
           "should not be flagged, look-ahead outputs should.", "",
           markdown_table(["column", "role", "I (bits)", "null mean", "null 95th pct", "p"],
                          [[x["column"], x["role"], f"{x['statistic_bits']:.4f}", f"{x['null_mean_bits']:.4f}",
                            f"{x['null_95th_bits']:.4f}", f"{x['p_value']:.4f}"] for x in a["tests"]]), "",
           "### Day by day", "",
           f"- Released output against the label: MCC {ci(ref['mcc'])}; against the experts' majority call: MCC "
           f"{ci(f['released_vs_expert_majority']['mcc'])}; the experts' majority against the label: MCC "
           f"{ci(f['expert_majority_vs_label']['mcc'])}.",
           "- MCC of the released output with the label of " +
           ", ".join(f"{d}: {v:.3f}" for d, v in f["released_mcc_with_label_of"].items()) + ".",
           f"- Released labels {f['released_counts']}; realised {f['label_counts']}.",
           f"- On {f['days_no_expert_right']} of {f['days']} days no expert called the realised label (any vote over "
           f"the released expert labels, causal or look-ahead, is then wrong); the released output is right on "
           f"{f['released_right_when_no_expert_right']} of them.",
           f"- On {f['days_released_label_no_expert_gave']} days the released label is one no expert gave "
           f"({f['released_labels_on_those_days']}), right on {f['released_right_on_those_days']}: the released output is not a "
           "weighted vote over the released expert labels, which never gives a label no expert gave.", "",
           "### Every setting", "",
           markdown_table(header, [line(r) for r in rows]), ""]
    return md
