"""Online aggregation of N experts: at each step `weights()` gives the mixture for the coming outcome,
computed only from losses already revealed; `update(losses, signal)` reveals the step's losses.

Dimension letters: N experts (and N filters in MoE-F), T steps.

    agg = FixedShare(n, eta=1.0, alpha=0.01)
    for t in range(T):
        w_N = agg.weights()              # before outcome t is known
        agg.update(losses_TN[t])         # then its losses are revealed

The state lives in the object and changes only in `update`; `weights()` reads it and returns a copy.
`signal` is the (A_NN, V_NN) pair of losses.py (expected loss of expert n if expert i were the truth,
and its variance): only MoE-F's filters use it; it depends on the forecasts, not on the outcome.

References: Hedge/EWA (Littlestone & Warmuth 1994; Freund & Schapire 1997; anytime rate eta_t =
sqrt(8 ln N / t), Cesa-Bianchi & Lugosi 2006, Thm 2.3); Fixed-Share (Herbster & Warmuth 1998);
MoE-F (Saqur et al., ICLR 2025, arXiv 2406.02969); docs/moef.md describes how it is rebuilt here.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
from ..errors import UsageError


def mixture_loss(w_KN: np.ndarray, losses_N: np.ndarray, mix: str) -> np.ndarray:
    """Loss of each weight vector's mixture: linear sum_i w_i l_i, or log -log sum_i w_i exp(-l_i)."""
    if mix == "linear":
        return w_KN @ losses_N
    m = losses_N.min()
    return m - np.log(np.maximum(w_KN @ np.exp(-(losses_N - m)), 1e-300))


def softmin(scores_N: np.ndarray, lam: float) -> np.ndarray:
    z = -lam * (scores_N - scores_N.min())
    w = np.exp(z)
    return w / w.sum()


def anytime_rate(n: int, t: int) -> float:
    """eta_t = sqrt(8 ln N / t) for losses in [0, 1], t = 1, 2, ... the step being predicted."""
    return math.sqrt(8 * math.log(max(n, 2)) / max(t, 1))


class Aggregator:
    """Base: checks what `update` receives, counts revealed steps (self.t)."""

    name = "aggregator"

    def __init__(self, n: int) -> None:
        if n < 1:
            raise UsageError(f"an aggregator needs at least one expert, got {n}")
        self.n, self.t = n, 0

    def weights(self) -> np.ndarray:
        raise NotImplementedError

    def update(self, losses, signal=None) -> None:
        self._reveal(self._check(losses))

    def _reveal(self, losses_N: np.ndarray) -> None:
        raise NotImplementedError

    def _check(self, losses) -> np.ndarray:
        x = np.asarray(losses, dtype=float)
        if x.shape != (self.n,):
            raise UsageError(f"{self.name}: step {self.t + 1} has {x.size} losses for {self.n} experts; "
                             "give one loss per expert at every step")
        if not np.all(np.isfinite(x)):
            i = int(np.flatnonzero(~np.isfinite(x))[0])
            raise UsageError(f"{self.name}: the loss of expert {i} at step {self.t + 1} is {x[i]}; "
                             "losses must be finite numbers (check the forecasts for NaN)")
        self.t += 1
        return x


class Uniform(Aggregator):
    name = "uniform"

    def weights(self) -> np.ndarray:
        return np.full(self.n, 1.0 / self.n)

    def _reveal(self, losses_N) -> None:
        pass


class FollowTheLeader(Aggregator):
    """All weight on the smallest cumulative loss so far (ties shared); uniform before any loss."""

    name = "follow-the-leader"

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.cum = np.zeros(n)

    def weights(self) -> np.ndarray:
        lead = np.isclose(self.cum, self.cum.min(), rtol=0, atol=1e-12)
        return lead / lead.sum()

    def _reveal(self, losses_N) -> None:
        self.cum += losses_N


class Hedge(Aggregator):
    """Exponential weights w_i ∝ exp(-eta L_i). eta="anytime": eta_t = sqrt(8 ln N / t) on losses / scale
    (regret <= 2 sqrt(T/2 ln N) + sqrt(ln N / 8) for losses in [0, scale]); a number: fixed (eta = 1 with
    log loss is the Bayes mixture, regret <= ln N)."""

    name = "hedge"

    def __init__(self, n: int, eta: float | str = "anytime", scale: float = 1.0) -> None:
        super().__init__(n)
        self.eta, self.scale, self.cum = eta, scale, np.zeros(n)

    def rate(self) -> float:
        return anytime_rate(self.n, self.t + 1) if self.eta == "anytime" else float(self.eta)

    def weights(self) -> np.ndarray:
        return softmin(self.cum / self.scale, self.rate())

    def _reveal(self, losses_N) -> None:
        self.cum += losses_N


class FixedShare(Aggregator):
    """Herbster & Warmuth: v = w exp(-eta l) / Z, then w = (1 - alpha) v + alpha / N. It is the forward
    recursion of an HMM over "which expert is best": transition (1 - alpha) I + (alpha / N) 1 1^T,
    emission exp(-eta l)."""

    name = "fixed-share"

    def __init__(self, n: int, eta: float | str = "anytime", alpha: float = 0.01, scale: float = 1.0) -> None:
        super().__init__(n)
        if not 0 <= alpha <= 1:
            raise UsageError(f"fixed-share alpha must be in [0, 1], got {alpha}")
        self.eta, self.alpha, self.scale = eta, alpha, scale
        self.w = np.full(n, 1.0 / n)

    def weights(self) -> np.ndarray:
        return self.w.copy()

    def _reveal(self, losses_N) -> None:
        eta = anytime_rate(self.n, self.t) if self.eta == "anytime" else float(self.eta)
        v = self.w * np.exp(-eta * (losses_N - losses_N.min()) / self.scale)
        v /= v.sum()
        self.w = (1 - self.alpha) * v + self.alpha / self.n


class WindowSoftmin(Aggregator):
    """w_i ∝ exp(-lam * sum of expert i's last `window` losses)."""

    name = "window-softmin"

    def __init__(self, n: int, window: int = 10, lam: float | None = None, scale: float = 1.0) -> None:
        super().__init__(n)
        if window < 1:
            raise UsageError(f"window must be >= 1, got {window}")
        # default: Hedge's rate for a horizon of `window` steps
        self.window, self.scale = window, scale
        self.lam = lam if lam is not None else anytime_rate(n, window)
        self.recent: deque = deque(maxlen=window)

    def weights(self) -> np.ndarray:
        if not self.recent:
            return np.full(self.n, 1.0 / self.n)
        return softmin(np.sum(self.recent, axis=0) / self.scale, self.lam)

    def _reveal(self, losses_N) -> None:
        self.recent.append(losses_N)


def moef_generator(pibar_N: np.ndarray, alpha: float) -> np.ndarray:
    """MoE-F Step 3 (Prop. 1): P = 1 pibar^T, P_alpha = (1 - alpha) P + alpha I, Q = ReLU(log P_alpha) off the
    diagonal, rows summing to 0. Since 1 pibar^T is idempotent, log P_alpha = ln(alpha) (I - 1 pibar^T)
    exactly (eigenvalues 1 and alpha): Q = -ln(alpha) (1 pibar^T - I), already >= 0 off the diagonal."""
    n = len(pibar_N)
    return -math.log(alpha) * (np.outer(np.ones(n), pibar_N) - np.eye(n))


def moef_transition(pibar_N: np.ndarray, alpha: float, dt: float) -> np.ndarray:
    """exp(Q dt) for Q = moef_generator(pibar, alpha): alpha^dt I + (1 - alpha^dt) 1 pibar^T (the same
    idempotent argument; tests check it against scipy's expm)."""
    a = alpha ** dt
    return a * np.eye(len(pibar_N)) + (1 - a) * np.outer(np.ones(len(pibar_N)), pibar_N)


class MoEF(Aggregator):
    """MoE-F (Saqur et al. 2025), in a positivity-preserving discrete form.

    Step 1: N Wonham-Shiryaev filters; filter n sees only expert n's loss l^(n) and keeps pi^(n), a
      posterior over the hidden "which expert is best" state. Per step: correct with the loss likelihood
      N(l^(n); A[n, i], V[n, i] + noise^2) under state i (A: the loss expert n takes if expert i is the
      truth, losses.py), normalise, then predict with exp(Q dt)^T (closed form, moef_transition). This is the exact HMM-forward form of
      the Wonham SDE (research note, Step 1), with no clipping.
    Step 2: Gibbs soft-min over the N filters' proposals, pibar_n ∝ exp(-lam S_n), S_n the cumulative loss of
      proposal n's mixture (lam="anytime": Hedge's rate, the Gibbs variational solution being EWA);
      the weights are omega = sum_n pibar_n pi^(n).
    Step 3: Q <- -ln(alpha) (1 pibar^T - I), the generator whose one-step transition is
      alpha I + (1 - alpha) 1 pibar^T (moef_generator).
    Switches `use_filter`, `use_gibbs`, `use_q_update` turn each step off for ablation: without filters each
    proposal is its own expert (Step 2 alone is then Hedge); without Gibbs the proposals are averaged;
    without Step 3 Q stays at its start, the generator of uniform pibar (Fixed-Share's transition).

    Two variants, off by default:
    `score_discount` gamma in (0, 1]: S_n <- gamma S_n + (loss of proposal n), so the Gibbs step forgets
      old losses at rate 1 - gamma (gamma = 1: the paper's cumulative scores).
    `mixture="posterior"`: no Gibbs step; the weights are the posterior of one filter that conditions on all
      N losses, p(i | l_1..l_N) ∝ p(i) prod_n N(l_n; A[n, i], V[n, i] + noise^2), the losses being taken as
      independent given the state. That is the product of the N filters' one-step posteriors divided by
      the prior^(N-1) only while the state cannot move; once it can, the N separately predicted posteriors
      no longer multiply to the joint one, so one joint filter is kept. Its transition is the generator of
      uniform pibar (Fixed-Share's): Step 3 with pibar = the filter's own posterior would leave it
      unchanged (post @ (alpha I + (1 - alpha) 1 post^T) = post), i.e. never switch.
    """

    name = "moe-f"

    def __init__(self, n: int, alpha: float = 0.9, lam: float | str = "anytime", noise: float = 0.5,
                 dt: float = 1.0, mix: str = "linear", scale: float = 1.0, use_filter: bool = True,
                 use_gibbs: bool = True, use_q_update: bool = True, score_discount: float = 1.0,
                 mixture: str = "gibbs") -> None:
        super().__init__(n)
        if not 0 < alpha < 1:
            raise UsageError(f"moe-f alpha must be in (0, 1), got {alpha}")
        if mix not in ("linear", "log"):
            raise UsageError(f"mix must be 'linear' or 'log', got {mix!r}")
        if not 0 < score_discount <= 1:
            raise UsageError(f"moe-f score_discount must be in (0, 1], got {score_discount}")
        if mixture not in ("gibbs", "posterior"):
            raise UsageError(f"moe-f mixture must be 'gibbs' or 'posterior', got {mixture!r}")
        if noise <= 0 and mixture == "posterior":
            raise UsageError(f"moe-f noise must be > 0 for the posterior mixture, got {noise}")
        self.alpha, self.lam, self.noise, self.dt, self.mix, self.scale = alpha, lam, noise, dt, mix, scale
        self.use_filter, self.use_gibbs, self.use_q_update = use_filter, use_gibbs, use_q_update
        self.score_discount, self.mixture = score_discount, mixture
        self.pi_N = np.full(n, 1.0 / n)  # mixture "posterior": the joint filter's predicted posterior
        self.pi_NN = np.full((n, n), 1.0 / n)  # row n: filter n's predicted posterior over states
        self.scores = np.zeros(n)
        self.Q = moef_generator(np.full(n, 1.0 / n), alpha)
        self._transition = moef_transition(np.full(n, 1.0 / n), alpha, dt)

    def proposals(self) -> np.ndarray:
        return self.pi_NN if self.use_filter else np.eye(self.n)

    def gibbs(self) -> np.ndarray:
        if not self.use_gibbs:
            return np.full(self.n, 1.0 / self.n)
        lam = anytime_rate(self.n, self.t + 1) if self.lam == "anytime" else float(self.lam)
        return softmin(self.scores / self.scale, lam)

    def weights(self) -> np.ndarray:
        if self.mixture == "posterior":
            return self.pi_N.copy()
        return self.gibbs() @ self.proposals()

    def _loglik(self, losses_N: np.ndarray, signal) -> np.ndarray:
        """(N, N): log N(l_n; A[n, i], V[n, i] + noise^2), row n the filter of expert n, column i the state."""
        if signal is None:
            raise UsageError("moe-f needs the forecasts' signal (A, V) at every step; see losses.py")
        a_NN, v_NN = (np.asarray(s, dtype=float) for s in signal)
        var = v_NN + self.noise ** 2
        return -0.5 * (losses_N[:, None] - a_NN) ** 2 / var - 0.5 * np.log(var)

    def update(self, losses, signal=None) -> None:
        losses_N = self._check(losses)
        if self.mixture == "posterior":  # one filter conditioned on every expert's loss
            joint = self._loglik(losses_N, signal).sum(0)
            post = self.pi_N * np.exp(joint - joint.max())
            self.pi_N = (post / post.sum()) @ self._transition
            self.pi_N /= self.pi_N.sum()
            return
        # what each proposal just lost, older losses discounted by score_discount (1: cumulative)
        self.scores = self.score_discount * self.scores + mixture_loss(self.proposals(), losses_N, self.mix)
        if self.use_filter:
            loglik = self._loglik(losses_N, signal)
            post = self.pi_NN * np.exp(loglik - loglik.max(1, keepdims=True))
            post /= post.sum(1, keepdims=True)
        if self.use_q_update:
            pibar = self.gibbs()
            self.Q = moef_generator(pibar, self.alpha)
            self._transition = moef_transition(pibar, self.alpha, self.dt)
        if self.use_filter:
            self.pi_NN = post @ self._transition  # predict: pi <- exp(Q dt)^T pi, for every filter at once
            self.pi_NN /= self.pi_NN.sum(1, keepdims=True)

    def _reveal(self, losses_N) -> None:  # update() is overridden
        raise AssertionError


class OnlineTuned(Aggregator):
    """Prequential tuning: Hedge over a grid of aggregators ("members"), each run on the same stream.
    Its weights are sum_k v_k w^(k); v_k ∝ exp(-eta M_k), M_k the cumulative loss of member k's mixture,
    so the choice at step t uses only steps before t. eta="anytime" for bounded losses, 1 for log loss."""

    def __init__(self, members: list[Aggregator], mix: str = "linear", eta: float | str = "anytime",
                 name: str = "online-tuned", scale: float = 1.0) -> None:
        super().__init__(members[0].n)
        self.members, self.mix, self.eta, self.name, self.scale = members, mix, eta, name, scale
        self.cum = np.zeros(len(members))

    def member_weights(self) -> np.ndarray:
        eta = anytime_rate(len(self.members), self.t + 1) if self.eta == "anytime" else float(self.eta)
        return softmin(self.cum / self.scale, eta)

    def weights(self) -> np.ndarray:
        return self.member_weights() @ np.stack([m.weights() for m in self.members])

    def update(self, losses, signal=None) -> None:
        losses_N = self._check(losses)
        w_KN = np.stack([m.weights() for m in self.members])
        self.cum += mixture_loss(w_KN, losses_N, self.mix)
        for m in self.members:
            m.update(losses_N, signal)


def run(agg: Aggregator, losses_TN: np.ndarray, signals=None) -> np.ndarray:
    """Drive one aggregator over a loss stream: (T, N) weights, row t computed before losses t are revealed."""
    losses_TN = np.asarray(losses_TN, dtype=float)
    out = np.empty_like(losses_TN)
    for t in range(len(losses_TN)):
        out[t] = agg.weights()
        agg.update(losses_TN[t], None if signals is None else (signals[0][t], signals[1][t]))
    return out
