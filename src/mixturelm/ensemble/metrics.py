"""Classification metrics with bootstrap 95 % intervals over days.

Point values come from scikit-learn (f1_score weighted / macro, accuracy_score, matthews_corrcoef, the
multi-class MCC of Gorodkin 2004). The bootstrap needs thousands of resamples, so it computes the same
metrics from batched confusion matrices; tests check both against each other.
"""

from __future__ import annotations

import numpy as np

METRICS = ("weighted_f1", "macro_f1", "accuracy", "mcc")


def point_metrics(y_true, y_pred, n_classes: int) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    labels = list(range(n_classes))
    return {
        "weighted_f1": float(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "mcc": float(matthews_corrcoef(y_true, y_pred)),
    }


def confusion_metrics(c_BKK: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics of a batch of confusion matrices c[b, true, pred] (scikit-learn's definitions and zero rules)."""
    c = c_BKK.astype(float)
    tp = np.diagonal(c, axis1=1, axis2=2)
    support, predicted = c.sum(2), c.sum(1)
    n = c.sum((1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(support + predicted > 0, 2 * tp / (support + predicted), 0.0)
        weighted = (f1 * support).sum(1) / n
        # macro: classes with no true and no predicted sample still count (scikit-learn, labels= given)
        macro = f1.mean(1)
        acc = tp.sum(1) / n
        cov_tp = tp.sum(1) * n - (support * predicted).sum(1)
        cov_pp = n ** 2 - (predicted ** 2).sum(1)
        cov_tt = n ** 2 - (support ** 2).sum(1)
        denom = np.sqrt(cov_pp * cov_tt)
        mcc = np.where(denom > 0, cov_tp / denom, 0.0)
    return {"weighted_f1": weighted, "macro_f1": macro, "accuracy": acc, "mcc": mcc}


def bootstrap(y_true, y_pred, n_classes: int, resamples: int = 1000, seed: int = 0) -> dict[str, dict]:
    """{metric: {"value", "lo", "hi"}}: sklearn's value and the 2.5/97.5 percentiles of `resamples` resamples
    of days (with replacement; the same resamples, from `seed`, for every row of a table)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    values = point_metrics(y_true, y_pred, n_classes)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(y_true), size=(resamples, len(y_true)))
    cells = y_true[idx] * n_classes + y_pred[idx]  # (B, T) -> confusion cell
    counts = np.apply_along_axis(np.bincount, 1, cells, minlength=n_classes * n_classes)
    boot = confusion_metrics(counts.reshape(resamples, n_classes, n_classes))
    return {m: {"value": values[m], "lo": float(np.percentile(boot[m], 2.5)),
                "hi": float(np.percentile(boot[m], 97.5))} for m in METRICS}
