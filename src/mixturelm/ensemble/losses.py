"""Losses of N experts' forecasts against a revealed outcome, and what MoE-F's filters need from them.

Dimension letters: N experts, K classes, V vocabulary.

Every loss has
  - `loss(forecasts, y) -> (N,)`: each expert's loss once the outcome y is revealed;
  - `signal(forecasts) -> (A_NN, V_NN)`: A[n, i] = the loss expert n is expected to take if expert i's
    forecast were the truth, and V[n, i] its variance. This is the drift A^(n)(e_i) of the paper's
    loss process dl^(n) = A^(n)(w_t) dt + B^(n) dW (Saqur et al., Eqs 2-5) in discrete time; it depends on
    the forecasts only, so it is known before the outcome;
  - `mix`: how the loss of a mixture follows from the experts' losses: "linear" (the expected loss
    sum_i w_i l_i, convex, used for 0-1 and squared error) or "log" (-log sum_i w_i exp(-l_i), exact for
    a mixture of probabilities under log loss);
  - `noise`: the observation noise B of the filter's loss likelihood, added to V (variance noise^2).

Forecasts of class experts are hard labels (N,) ints or probabilities (N, K). Hard labels are one-hot
distributions; cross-entropy smooths them with `smoothing` (a hard label has infinite log loss when wrong).
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError


def _finite(x: np.ndarray, what: str) -> np.ndarray:
    if not np.all(np.isfinite(x)):
        raise UsageError(f"{what} contains NaN or infinity; clean the input (every forecast must be a number)")
    return x


def class_probs(forecasts, n_classes: int, smoothing: float = 0.0) -> np.ndarray:
    """(N, K) probabilities from hard labels (N,) or probabilities (N, K); checks labels and rows."""
    f = np.asarray(forecasts)
    if f.ndim == 1:
        f = _finite(f.astype(float), "forecast labels")
        if np.any((f < 0) | (f >= n_classes) | (f != np.round(f))):
            bad = f[(f < 0) | (f >= n_classes) | (f != np.round(f))][0]
            raise UsageError(f"forecast label {bad:g} is not one of the {n_classes} classes 0..{n_classes - 1}")
        p = np.eye(n_classes)[f.astype(int)]
    elif f.ndim == 2 and f.shape[1] == n_classes:
        p = _finite(f.astype(float), "forecast probabilities")
        if np.any(p < 0) or np.any(np.abs(p.sum(1) - 1) > 1e-6):
            raise UsageError("forecast probabilities must be non-negative and sum to 1 for every expert")
    else:
        raise UsageError(f"forecasts of shape {f.shape}: give (N,) labels or (N, {n_classes}) probabilities")
    return (1 - smoothing) * p + smoothing / n_classes if smoothing else p


def _check_label(y, n_classes: int) -> int:
    if y is None or not np.isfinite(y) or y != int(y) or not 0 <= int(y) < n_classes:
        raise UsageError(f"outcome {y!r} is not one of the {n_classes} classes 0..{n_classes - 1}")
    return int(y)


def _cross(p_NK: np.ndarray, loss_NK: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A[n, i] = E_{y ~ p_i} loss_n(y), V[n, i] = Var_{y ~ p_i} loss_n(y)."""
    a = loss_NK @ p_NK.T
    v = np.maximum((loss_NK ** 2) @ p_NK.T - a ** 2, 0.0)
    return a, v


class ZeroOne:
    """0-1 loss of each expert's (arg-max) class against the revealed class."""

    mix = "linear"
    noise = 0.5  # the largest standard deviation of a 0/1 variable: the likelihood's scale, fixed in advance

    def __init__(self, n_classes: int) -> None:
        self.k = n_classes

    def loss(self, forecasts, y) -> np.ndarray:
        p = class_probs(forecasts, self.k)
        return (p.argmax(1) != _check_label(y, self.k)).astype(float)

    def signal(self, forecasts) -> tuple[np.ndarray, np.ndarray]:
        p = class_probs(forecasts, self.k)
        return _cross(p, 1.0 - np.eye(self.k)[p.argmax(1)])


class CrossEntropy:
    """-log p_n(y) for class distributions; hard labels become (1 - smoothing) one-hot + smoothing / K."""

    mix = "log"
    noise = 0.5

    def __init__(self, n_classes: int, smoothing: float = 0.1) -> None:
        self.k, self.smoothing = n_classes, smoothing

    def loss(self, forecasts, y) -> np.ndarray:
        p = class_probs(forecasts, self.k, self.smoothing)
        return -np.log(np.maximum(p[:, _check_label(y, self.k)], 1e-300))

    def signal(self, forecasts) -> tuple[np.ndarray, np.ndarray]:
        p = class_probs(forecasts, self.k, self.smoothing)
        return _cross(p, -np.log(np.maximum(p, 1e-300)))


class Squared:
    """(f_n - y)^2 for numeric forecasts. Under expert i, y = f_i: A[n, i] = (f_i - f_n)^2."""

    mix = "linear"
    noise = 1.0

    def loss(self, forecasts, y) -> np.ndarray:
        f = _finite(np.asarray(forecasts, dtype=float).reshape(-1), "forecasts")
        y = _finite(np.asarray(y, dtype=float), "the outcome")
        return (f - y) ** 2

    def signal(self, forecasts) -> tuple[np.ndarray, np.ndarray]:
        f = _finite(np.asarray(forecasts, dtype=float).reshape(-1), "forecasts")
        a = (f[None, :] - f[:, None]) ** 2
        return a, np.zeros_like(a)


class LogLoss:
    """Next-token log loss: forecasts are (N, V) log-probabilities, y a token id."""

    mix = "log"
    noise = 1.0  # nats

    def loss(self, logp_NV, y) -> np.ndarray:
        logp = _finite(np.asarray(logp_NV, dtype=float), "log-probabilities")
        return -logp[:, _check_label(y, logp.shape[1])]

    def signal(self, logp_NV) -> tuple[np.ndarray, np.ndarray]:
        logp = _finite(np.asarray(logp_NV, dtype=float), "log-probabilities")
        return _cross(np.exp(logp), -logp)
