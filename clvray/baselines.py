"""Buy-till-you-die baselines: BG/NBD for purchases, Gamma-Gamma for spend, and a heuristic.

The learned models are judged against these. Both probabilistic models are fitted by maximum
likelihood with SciPy: log-likelihoods written with `gammaln` / `betaln` and `logaddexp` so they
stay finite for customers with many purchases, parameters optimised on the log scale (they are
all positive) with L-BFGS-B and analytic gradients, from a few starting points.

Inputs are per-customer summaries in the usual RFM convention (Fader, Hardie and Lee 2005):

- `frequency` (x): number of repeat purchases, i.e. purchases after the first one;
- `recency` (t_x): time of the last purchase minus time of the first, 0 when x = 0;
- `T`: cutoff minus time of the first purchase;
- `monetary`: mean value of the repeat purchases (the first purchase excluded, as it is often
  different in kind), used only where frequency > 0.

Time may be in any unit (clvray uses days, the CDNOW benchmark weeks) as long as `recency`, `T`
and the horizon `t` share it; only `alpha` depends on the unit.

Cost: special functions of the (integer) frequency are evaluated once per distinct value, the
rest is a few vectorised logs and exps per customer: about 150 ns per customer per evaluation,
some 60 evaluations over three starts, so roughly 10 s and O(n) memory per 10^6 customers on
one core; predictions are one pass (about 2 us per customer, a short series included). This runs on the driver: beyond a few million customers fit
on a sample, or pass `weights` with customers aggregated by a Ray groupby on (frequency,
rounded recency, rounded T), which is all the likelihood depends on.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy.optimize import minimize
from scipy.special import betaln, gammaln, hyp2f1, psi

from clvray.contract import require_columns

CALIB_COLUMNS = ("frequency", "recency", "T", "monetary")
LOG_PARAM_BOUND = 20.0
"""Log-scale parameters stay in [-20, 20] so exp() never overflows during the search."""


@dataclass(frozen=True)
class BGNBDParams:
    """BG/NBD: purchase rate lambda ~ Gamma(shape r, rate alpha), dropout p ~ Beta(a, b)."""

    r: float
    alpha: float
    a: float
    b: float


@dataclass(frozen=True)
class GGParams:
    """Gamma-Gamma: a transaction's value ~ Gamma(p, nu), the customer's nu ~ Gamma(q, v)."""

    p: float
    q: float
    v: float

    @property
    def mean_spend(self) -> float:
        """Population mean value per transaction, `v p / (q - 1)`; NaN when q <= 1 (infinite)."""
        return self.v * self.p / (self.q - 1.0) if self.q > 1.0 else math.nan


@dataclass(frozen=True)
class BTYDModel:
    """Fitted BG/NBD, and Gamma-Gamma when value is predicted, as `fit_btyd` returns them."""

    bgnbd: BGNBDParams
    gamma_gamma: GGParams | None = None
    fallback_spend: float = math.nan
    """Spend for customers without repeat purchases: `gamma_gamma.mean_spend` when finite,
    else the mean observed `monetary` of repeat customers."""


def _vector(name: str, values: ArrayLike) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has {int(np.sum(~np.isfinite(arr)))} non-finite values")
    return arr


def _rft(
    frequency: ArrayLike, recency: ArrayLike, T: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = _vector("frequency", frequency)
    tx = _vector("recency", recency)
    t_obs = _vector("T", T)
    if not (x.size == tx.size == t_obs.size):
        raise ValueError(
            f"frequency, recency and T differ in length: {x.size}, {tx.size}, {t_obs.size}"
        )
    if np.any(x < 0) or np.any(x != np.round(x)):
        raise ValueError("frequency must hold non-negative whole numbers (repeat purchases)")
    if np.any(tx < 0):
        raise ValueError(f"recency is negative for {int(np.sum(tx < 0))} customers")
    if np.any(tx > t_obs):
        raise ValueError(f"recency exceeds T for {int(np.sum(tx > t_obs))} customers")
    return x, tx, t_obs


def _weights(weights: ArrayLike | None, n: int) -> np.ndarray:
    if weights is None:
        return np.ones(n)
    w = _vector("weights", weights)
    if w.size != n or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be {n} non-negative numbers with a positive sum")
    return w


def _fit(objective, starts: list[np.ndarray], what: str) -> np.ndarray:
    """Minimise `objective(theta) -> (value, gradient)` from each start; keep the best."""
    bounds = [(-LOG_PARAM_BOUND, LOG_PARAM_BOUND)] * len(starts[0])
    best = None
    for x0 in starts:
        res = minimize(
            objective,
            np.clip(x0, -LOG_PARAM_BOUND, LOG_PARAM_BOUND),
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            options={"maxiter": 2000, "ftol": 1e-14, "gtol": 1e-9},
        )
        if np.isfinite(res.fun) and (best is None or res.fun < best.fun):
            best = res
    if best is None:
        raise RuntimeError(f"{what}: the likelihood was not finite from any starting point")
    # With ftol this tight L-BFGS-B often ends with ABNORMAL_TERMINATION_IN_LNSRCH at the
    # optimum (no step improves at machine precision): only warn when the gradient says so.
    grad_small = np.max(np.abs(best.jac)) <= 1e-4 * max(1.0, abs(best.fun))
    if not best.success and not grad_small:
        warnings.warn(
            f"{what}: the optimiser stopped early: {best.message}", RuntimeWarning, stacklevel=3
        )
    if np.any(np.abs(best.x) >= LOG_PARAM_BOUND - 1e-6):
        warnings.warn(
            f"{what}: a parameter reached its bound ({np.exp(best.x)}); the data may not "
            "identify the model (too few repeat purchases?)",
            RuntimeWarning,
            stacklevel=3,
        )
    return np.exp(best.x)


# --- BG/NBD ----------------------------------------------------------------------------------


def _by_value(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of `x` and the index of each row's value: special functions of the
    (integer) frequency are evaluated once per distinct value, not once per customer."""
    values, index = np.unique(x, return_inverse=True)
    return values, index.ravel()


def _bgnbd_loglik(
    theta: np.ndarray,
    x: np.ndarray,
    tx: np.ndarray,
    t_obs: np.ndarray,
    groups: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-customer log-likelihood (FHL 2005, eq. 6) and its gradient in log-parameters.

    L = B(a, b+x)/B(a, b) G(r+x) alpha^r / (G(r) (alpha+T)^(r+x))
        + [x > 0] B(a+1, b+x-1)/B(a, b) G(r+x) alpha^r / (G(r) (alpha+t_x)^(r+x))
    The first term is "still alive at T", the second "dropped out right after the last purchase".
    `groups` is `_by_value(x)`, passed in by the optimiser so it is computed once.
    """
    r, alpha, a, b = np.exp(theta)
    ux, idx = _by_value(x) if groups is None else groups
    # The second term exists only for x > 0; evaluate it at x >= 1 everywhere (finite) and give
    # it zero weight where x = 0, so no NaN from B(a+1, b-1) with b < 1 can leak in.
    uxs = np.maximum(ux, 1.0)
    beta_alive = betaln(a, b + ux) - betaln(a, b)
    beta_dropped = beta_alive + np.log(a) - np.log(b + uxs - 1.0)  # B(a+1, c-1) = B(a, c) a/(c-1)
    psi_abx = psi(a + b + ux)
    common_u = gammaln(r + ux) - gammaln(r) + r * np.log(alpha)
    d_r_u = psi(r + ux) - psi(r) + np.log(alpha)
    d_a_u = psi(a + b) - psi_abx
    d_b_u = psi(b + ux) - psi(b) + psi(a + b) - psi_abx
    d_b_dropped_u = psi(b + uxs - 1.0) - psi(b + ux)

    rx = r + x
    log_at = np.log(alpha + t_obs)
    log_atx = np.log(alpha + tx)
    alive = beta_alive[idx] - rx * log_at
    dropped = np.where(x > 0, beta_dropped[idx] - rx * log_atx, -np.inf)
    mix = np.logaddexp(alive, dropped)
    ll = common_u[idx] + mix
    w_alive = np.exp(alive - mix)
    w_dropped = 1.0 - w_alive

    d_r = d_r_u[idx] - w_alive * log_at - w_dropped * log_atx
    d_alpha = r / alpha - rx * (w_alive / (alpha + t_obs) + w_dropped / (alpha + tx))
    d_a = d_a_u[idx] + w_dropped / a
    d_b = d_b_u[idx] + w_dropped * d_b_dropped_u[idx]
    grad = np.stack([r * d_r, alpha * d_alpha, a * d_a, b * d_b])
    return ll, grad


def bgnbd_log_likelihood(
    params: BGNBDParams,
    frequency: ArrayLike,
    recency: ArrayLike,
    T: ArrayLike,
    weights: ArrayLike | None = None,
) -> float:
    """Total BG/NBD log-likelihood of the customers under `params` (CDNOW, weeks: -9582.4)."""
    x, tx, t_obs = _rft(frequency, recency, T)
    w = _weights(weights, x.size)
    theta = np.log([params.r, params.alpha, params.a, params.b])
    return float(np.dot(w, _bgnbd_loglik(theta, x, tx, t_obs)[0]))


def fit_bgnbd(
    frequency: ArrayLike,
    recency: ArrayLike,
    T: ArrayLike,
    weights: ArrayLike | None = None,
) -> BGNBDParams:
    """Maximum-likelihood BG/NBD parameters for the customers' (frequency, recency, T).

    `weights` (optional) counts customers per row, for fitting on aggregated summaries. Needs at
    least one customer with a repeat purchase: without one the dropout process is not
    identified. Warns (RuntimeWarning) when a parameter ends on its search bound.

    Where the data show no spread in dropout probability between customers, the likelihood
    keeps rising as a and b grow together (Beta(a, b) tends to a point mass at p = a/(a+b)),
    ever more slowly, and the fit stops wherever the optimiser's tolerance is met, often with a
    and b in the millions. That is a valid fit, not a failure: predictions then depend on a and
    b only through a/(a+b), up to O(1/(a+b)), and `bgnbd_expected_purchases` and
    `bgnbd_prob_alive` are evaluated stably for any a, b up to the search bound (e^20, about
    5e8, where the bound warning fires). So a and b are deliberately not capped lower: a cap
    would change predictions only by O(1/cap) and hide the signal that dropout looks
    homogeneous.
    """
    x, tx, t_obs = _rft(frequency, recency, T)
    w = _weights(weights, x.size)
    if not np.any((x > 0) & (w > 0)):
        raise ValueError("fit_bgnbd needs at least one customer with frequency > 0")
    total = w.sum()
    groups = _by_value(x)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        ll, grad = _bgnbd_loglik(theta, x, tx, t_obs, groups)
        return -float(np.dot(w, ll)) / total, -(grad @ w) / total

    # Start the purchase-rate prior at the observed rate, x / T, whatever the time unit.
    rate = max(float(np.dot(w, x) / max(np.dot(w, t_obs), 1e-12)), 1e-6)
    starts = [
        np.log([1.0, 1.0 / rate, 1.0, 1.0]),
        np.log([0.5, 0.5 / rate, 0.5, 2.0]),
        np.log([2.0, 2.0 / rate, 2.0, 5.0]),
    ]
    r, alpha, a, b = _fit(objective, starts, "fit_bgnbd")
    return BGNBDParams(r=float(r), alpha=float(alpha), a=float(a), b=float(b))


def bgnbd_prob_alive(
    params: BGNBDParams, frequency: ArrayLike, recency: ArrayLike, T: ArrayLike
) -> np.ndarray:
    """P(customer still active at T | x, t_x, T); 1 when x = 0 (BG/NBD lets customers drop out
    only right after a repeat purchase). Fader, Hardie and Lee's note on P(alive) for BG/NBD."""
    x, tx, t_obs = _rft(frequency, recency, T)
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    xs = np.maximum(x, 1.0)
    log_odds_dead = (
        np.log(a) - np.log(b + xs - 1.0) + (r + xs) * (np.log(alpha + t_obs) - np.log(alpha + tx))
    )
    return np.where(x > 0, np.exp(-np.logaddexp(0.0, log_odds_dead)), 1.0)


def _log_hyp2f1_series(
    A: np.ndarray, B: np.ndarray, C: np.ndarray, z: np.ndarray, max_terms: int = 100_000
) -> tuple[np.ndarray, np.ndarray]:
    """(log |S|, sign S) of Gauss's series S = sum_k (A)_k (B)_k / ((C)_k k!) z^k, summed until
    the tail is < 1e-16 of the sum. The partial sums are rescaled as they grow, so the log is
    finite even where S itself overflows float64. NaN where the series has not converged after
    `max_terms` terms."""
    total = np.ones_like(z)
    term = np.ones_like(z)
    log_scale = np.zeros_like(z)
    todo = np.arange(z.size)
    for k in range(max_terms):
        if todo.size == 0:
            break
        ratio = (A[todo] + k) * (B[todo] + k) / ((C[todo] + k) * (k + 1.0)) * z[todo]
        term[todo] *= ratio
        total[todo] += term[todo]
        big = np.abs(total[todo]) > 1e200
        if np.any(big):
            rows = todo[big]
            factor = np.abs(total[rows])
            total[rows] /= factor
            term[rows] /= factor
            log_scale[rows] += np.log(factor)
        # Once the terms shrink, the ratios tend to z; the tail is below term * q / (1 - q).
        q = np.maximum(np.abs(ratio), z[todo])
        done = (q < 1.0) & (np.abs(term[todo]) * q <= 1e-16 * (1.0 - q) * np.abs(total[todo]))
        todo = todo[~done]
    total[todo] = math.nan
    with np.errstate(divide="ignore"):
        return np.log(np.abs(total)) + log_scale, np.where(total < 0, -1.0, 1.0)


def _log_hyp2f1(
    A: ArrayLike, B: ArrayLike, C: ArrayLike, z: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """(log |F|, sign F) of F = 2F1(A, B; C; z) for 0 <= z < 1, accurate where scipy's alone is
    not.

    `scipy.special.hyp2f1` returns inf or NaN once C - A - B is large (about 100 and up) and z is
    near 1 (0.97 and up), which here means heavy buyers or a large `a` (C - A - B is
    x + r - a + 1 or a - 1 - x - r, see `bgnbd_expected_purchases`) over long horizons. There
    the series converges in a few hundred terms, because its terms fall like k^-(C-A-B) z^k, so
    it is summed directly, in rescaled form: 2F1 itself may exceed float64 there. Elsewhere
    scipy is used, and the series where scipy gives inf or NaN. Checked against mpmath to 1e-9
    over wide grids in the tests.
    """
    A, B, C, z = (np.asarray(v, dtype=np.float64) for v in np.broadcast_arrays(A, B, C, z))
    log_abs = np.full(z.shape, math.nan)
    sign = np.ones(z.shape)
    series = (C - A - B) >= 30.0
    direct = np.flatnonzero(~series)
    if direct.size:
        with np.errstate(over="ignore", invalid="ignore"):
            val = np.asarray(hyp2f1(A[direct], B[direct], C[direct], z[direct]), np.float64)
        ok = np.isfinite(val)
        with np.errstate(divide="ignore"):
            log_abs[direct[ok]] = np.log(np.abs(val[ok]))
        sign[direct[ok]] = np.where(val[ok] < 0, -1.0, 1.0)
        series[direct[~ok]] = True
    if np.any(series):
        log_abs[series], sign[series] = _log_hyp2f1_series(
            A[series], B[series], C[series], z[series]
        )
    return log_abs, sign


def _bgnbd_alive_purchases_by_sum(
    s: np.ndarray, a: float, B: np.ndarray, z: np.ndarray, max_terms: int = 2000
) -> np.ndarray:
    """E[purchases in the horizon | alive at T] as a sum of positive terms, sum_k P(N=k) W_k.

    N ~ NBD: P(N=k) = (s)_k / k! (1-z)^s z^k, the purchases in the horizon of a customer who
    never dropped out (Poisson given lambda ~ Gamma(s = r+x, alpha+T)); W_k = sum_{j<k} (B)_j /
    (a+B)_j, the expected number of those k made before dropping out, as purchase j+1 happens
    with chance E[(1-p)^j] under the posterior p ~ Beta(a, B = b+x). No 1/(a-1) and no
    cancellation, so it is accurate exactly where eq. 10 is not (short horizons with a close to
    1 or b >> a), and there it converges fast. NaN where it has not converged in `max_terms`
    terms; terms are summed until the tail is < 1e-16 of the sum.
    """
    prob = np.exp(s * np.log1p(-z))  # P(N = 0); callers keep it far from underflow
    w = np.ones_like(z)  # (B)_k / (a+B)_k
    cum_w = np.zeros_like(z)  # W_k
    total = np.zeros_like(z)
    todo = np.arange(z.size)
    for k in range(max_terms):
        if todo.size == 0:
            break
        # Move from k to k+1 and add P(N=k+1) W_(k+1).
        prob[todo] *= (s[todo] + k) * z[todo] / (k + 1.0)
        cum_w[todo] += w[todo]
        w[todo] *= (B[todo] + k) / (a + B[todo] + k)
        term = prob[todo] * cum_w[todo]
        total[todo] += term
        # w falls with k, so W_(j+1) / W_j <= (j+1) / j and the terms' ratio is at most
        # q = (s+j) z / j, which falls with j: past the mode the tail is below term q / (1-q).
        q = (s[todo] + k + 1.0) * z[todo] / (k + 1.0)
        done = (q < 1.0) & (term * q <= 1e-16 * (1.0 - q) * total[todo])
        todo = todo[~done]
    total[todo] = math.nan
    return total


def _bgnbd_alive_purchases_eq10(
    r: float, a: float, b: float, x: np.ndarray, z: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """E[purchases in the horizon | alive at T] by FHL's eq. 10, and its bracket (see
    `bgnbd_expected_purchases`). Needs a != 1."""
    s = r + x
    log_1mz = np.log1p(-z)
    # tail = (1-z)^(r+x) 2F1(r+x, b+x; a+b+x-1; z) as (log |tail|, sign), in the form whose
    # 2F1 stays bounded. (Negative only where a + b + x < 1.)
    log_tail = np.empty(z.shape)
    sign = np.empty(z.shape)
    printed = a - 1.0 > s
    euler = ~printed
    if np.any(printed):
        xp = x[printed]
        log_f, sign[printed] = _log_hyp2f1(r + xp, b + xp, a + b + xp - 1.0, z[printed])
        log_tail[printed] = (r + xp) * log_1mz[printed] + log_f
    if np.any(euler):
        xe = x[euler]
        log_f, sign[euler] = _log_hyp2f1(a + b - 1.0 - r, a - 1.0, a + b + xe - 1.0, z[euler])
        log_tail[euler] = (a - 1.0) * log_1mz[euler] + log_f
    bracket = np.where(sign > 0, -np.expm1(log_tail), 1.0 + np.exp(log_tail))
    return (a + b + x - 1.0) / (a - 1.0) * bracket, bracket


def bgnbd_expected_purchases(
    params: BGNBDParams,
    frequency: ArrayLike,
    recency: ArrayLike,
    T: ArrayLike,
    t: ArrayLike,
) -> np.ndarray:
    """Expected number of purchases in (T, T + t] given (x, t_x, T): FHL 2005, eq. 10.

        E[Y(t)] = (a+b+x-1)/(a-1) [1 - (1-z)^(r+x) 2F1(r+x, b+x; a+b+x-1; z)] * P(alive),
        z = t / (alpha+T+t)

    The term after the 1 in the bracket is evaluated in log space, by whichever of two equal
    forms has a bounded 2F1 (C - A - B >= 0, so the series converges up to z = 1): as printed
    when a - 1 > r + x, else after Euler's transformation 2F1(A, B; C; z) = (1-z)^(C-A-B)
    2F1(C-A, C-B; C; z), i.e. (1-z)^(a-1) 2F1(a+b-1-r, a-1; a+b+x-1; z). Either way a huge 2F1
    and a tiny power never multiply each other: the printed form overflows for heavy buyers
    over long horizons, the transformed one once a is large (fits with a and b in the millions,
    where every customer has about the same dropout probability a / (a+b), gave 0 * inf).

    Where the bracket is small (|bracket| < 0.1) it is a difference of nearly equal numbers,
    divided by a - 1: short horizons with b >> a, or a near 1, lose digits (all of them at
    a = 1, where eq. 10 is 0/0). Those customers are summed directly instead, with
    `_bgnbd_alive_purchases_by_sum`, when that converges within its term budget. Within 1e-5
    of a = 1 that is tried for every customer, and where the sum is too long eq. 10 stands in
    as the mean of its values at a -+ 2e-5 (eq. 10 is smooth in a; about 1e-9 relative
    error). `t` is a scalar or one value per customer.
    """
    x, tx, t_obs = _rft(frequency, recency, T)
    horizon = np.asarray(t, dtype=np.float64)
    if np.any(horizon < 0) or not np.all(np.isfinite(horizon)):
        raise ValueError("t (the horizon) must be finite and non-negative")
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    z = horizon / (alpha + t_obs + horizon)
    x_z, z = np.broadcast_arrays(x, z)
    near_one = abs(a - 1.0) < 1e-5
    if near_one:
        below, _ = _bgnbd_alive_purchases_eq10(r, a - 2e-5, b, x_z, z)
        above, _ = _bgnbd_alive_purchases_eq10(r, a + 2e-5, b, x_z, z)
        alive_purchases = 0.5 * (below + above)
        cancels = np.ones(z.shape, dtype=bool)
    else:
        alive_purchases, bracket = _bgnbd_alive_purchases_eq10(r, a, b, x_z, z)
        cancels = ~(np.abs(bracket) >= 0.1)
    # Sum directly where eq. 10 cancels, unless P(N = 0) = (1-z)^(r+x) is near underflow (then
    # N is large and the sum long).
    s = r + x_z
    redo = np.flatnonzero(cancels & (s * np.log1p(-z) > -600.0))
    if redo.size:
        by_sum = _bgnbd_alive_purchases_by_sum(s[redo], a, b + x_z[redo], z[redo])
        ok = np.isfinite(by_sum)
        alive_purchases[redo[ok]] = by_sum[ok]
    return alive_purchases * bgnbd_prob_alive(params, x, tx, t_obs)


# --- Gamma-Gamma -----------------------------------------------------------------------------


def _gg_loglik(
    theta: np.ndarray,
    x: np.ndarray,
    m: np.ndarray,
    groups: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Log density of the mean repeat value m of x transactions (Fader and Hardie 2013).

    f(m | p, q, v; x) = G(px+q) / (G(px) G(q)) v^q m^(px-1) x^(px) / (v + x m)^(px+q)
    """
    p, q, v = np.exp(theta)
    ux, idx = _by_value(x) if groups is None else groups
    pux = p * ux
    gam_u = gammaln(pux + q) - gammaln(pux) - gammaln(q) + q * np.log(v)
    psi_u = psi(pux + q)
    d_p_u = ux * (psi_u - psi(pux) + np.log(ux))
    d_q_u = psi_u - psi(q) + np.log(v)

    px = p * x
    log_m = np.log(m)
    vxm = v + x * m
    log_vxm = np.log(vxm)
    ll = gam_u[idx] + (px - 1.0) * log_m + px * np.log(x) - (px + q) * log_vxm
    d_p = d_p_u[idx] + x * (log_m - log_vxm)
    d_q = d_q_u[idx] - log_vxm
    d_v = q / v - (px + q) / vxm
    return ll, np.stack([p * d_p, q * d_q, v * d_v])


def _repeat_spenders(
    frequency: ArrayLike, monetary_value: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = _vector("frequency", frequency)
    m = _vector("monetary_value", monetary_value)
    if x.size != m.size:
        raise ValueError(f"frequency has {x.size} values but monetary_value has {m.size}")
    return x, m, (x > 0) & (m > 0)


def fit_gamma_gamma(
    frequency: ArrayLike, monetary_value: ArrayLike, weights: ArrayLike | None = None
) -> GGParams:
    """Maximum-likelihood Gamma-Gamma parameters of spend per transaction.

    Fitted on repeat customers only (frequency > 0), with `monetary_value` the mean value of
    their repeat transactions; rows with frequency 0, or with a mean value <= 0 (refunds
    outweighing purchases, which the gamma model cannot hold), are left out. The model assumes
    spend is independent of purchase frequency; check that correlation is small before trusting
    it.
    """
    x, m, use = _repeat_spenders(frequency, monetary_value)
    w = _weights(weights, x.size)
    use &= w > 0
    if int(use.sum()) < 2:
        raise ValueError(
            "fit_gamma_gamma needs at least 2 customers with frequency > 0 and value > 0"
        )
    x, m, w = x[use], m[use], w[use]
    total = w.sum()
    groups = _by_value(x)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        ll, grad = _gg_loglik(theta, x, m, groups)
        return -float(np.dot(w, ll)) / total, -(grad @ w) / total

    # Starts whose population mean v p / (q - 1) equals the observed mean, at three shapes.
    mean = float(np.dot(w, m) / total)
    starts = [
        np.log([1.0, 2.0, mean]),
        np.log([5.0, 3.0, 0.4 * mean]),
        np.log([0.5, 5.0, 8.0 * mean]),
    ]
    p, q, v = _fit(objective, starts, "fit_gamma_gamma")
    return GGParams(p=float(p), q=float(q), v=float(v))


def gamma_gamma_expected_spend(
    params: GGParams, frequency: ArrayLike, monetary_value: ArrayLike
) -> np.ndarray:
    """E[value per transaction | x, mean repeat value] = (v + x m) p / (p x + q - 1).

    A weighted mean of the population mean `v p / (q - 1)` and the customer's own mean `m`, the
    weight on `m` growing with x. Customers with x = 0 get the population mean (NaN if q <= 1);
    negative mean values are taken as 0. NaN where p x + q - 1 <= 0 (no finite mean).
    """
    x = _vector("frequency", frequency)
    m = np.maximum(_vector("monetary_value", monetary_value), 0.0)
    if x.size != m.size:
        raise ValueError(f"frequency has {x.size} values but monetary_value has {m.size}")
    x_used = np.where(x > 0, x, 0.0)
    denom = params.p * x_used + params.q - 1.0
    safe = np.where(denom > 0, denom, 1.0)
    return np.where(denom > 0, (params.v + x_used * m) * params.p / safe, math.nan)


# --- Heuristic and convenience ---------------------------------------------------------------


def heuristic_value(
    total_past_value: ArrayLike, T: ArrayLike, horizon: float, min_T: float = 1.0
) -> np.ndarray:
    """Past value per period times the horizon: `total_past_value / max(T, min_T) * horizon`.

    T below `min_T` (default one period, e.g. a customer first seen on the cutoff day) is raised
    to it, so a brand-new customer's first order is not extrapolated to infinity.
    """
    value = _vector("total_past_value", total_past_value)
    t_obs = _vector("T", T)
    if value.size != t_obs.size:
        raise ValueError(f"total_past_value has {value.size} values but T has {t_obs.size}")
    if min_T <= 0:
        raise ValueError(f"min_T must be positive, got {min_T}")
    return value / np.maximum(t_obs, min_T) * float(horizon)


def _check_calib(calib_df: pd.DataFrame, value: bool, caller: str) -> None:
    needed = CALIB_COLUMNS if value else CALIB_COLUMNS[:3]
    require_columns(calib_df.columns, needed, f"{caller}: calib_df (one row per customer)")


def fit_btyd(calib_df: pd.DataFrame, value: bool = True) -> BTYDModel:
    """Fit BG/NBD on all rows of `calib_df`, and Gamma-Gamma on its repeat customers if `value`.

    `calib_df` has one row per customer with `frequency`, `recency`, `T` (days) and, for value,
    `monetary` (mean repeat-order value). Use the training customers' rows; they only hold data
    from before the cutoff.
    """
    _check_calib(calib_df, value, "fit_btyd")
    bgnbd = fit_bgnbd(calib_df["frequency"], calib_df["recency"], calib_df["T"])
    if not value:
        return BTYDModel(bgnbd=bgnbd)
    gg = fit_gamma_gamma(calib_df["frequency"], calib_df["monetary"])
    fallback = gg.mean_spend
    if not math.isfinite(fallback):
        freq = calib_df["frequency"].to_numpy(dtype=np.float64)
        money = calib_df["monetary"].to_numpy(dtype=np.float64)
        fallback = float(money[(freq > 0) & (money > 0)].mean())
    return BTYDModel(bgnbd=bgnbd, gamma_gamma=gg, fallback_spend=fallback)


def predict_btyd(model: BTYDModel, calib_df: pd.DataFrame, horizon: float) -> dict[str, np.ndarray]:
    """Per-customer predictions for the `horizon` (days) after the cutoff, in row order.

    Keys: `expected_purchases`, `prob_alive`, and when the model has Gamma-Gamma
    `expected_spend` (per transaction) and `expected_value` = purchases * spend. Customers
    without a repeat purchase get `model.fallback_spend` as their spend.
    """
    value = model.gamma_gamma is not None
    _check_calib(calib_df, value, "predict_btyd")
    x, tx, t_obs = (calib_df[c].to_numpy(dtype=np.float64) for c in CALIB_COLUMNS[:3])
    out = {
        "expected_purchases": bgnbd_expected_purchases(model.bgnbd, x, tx, t_obs, horizon),
        "prob_alive": bgnbd_prob_alive(model.bgnbd, x, tx, t_obs),
    }
    if model.gamma_gamma is not None:
        spend = gamma_gamma_expected_spend(
            model.gamma_gamma, x, calib_df["monetary"].to_numpy(dtype=np.float64)
        )
        spend = np.where((x > 0) & np.isfinite(spend), spend, model.fallback_spend)
        out["expected_spend"] = spend
        out["expected_value"] = out["expected_purchases"] * spend
    return out


def fit_predict_btyd(
    calib_df: pd.DataFrame, horizon: float, value: bool = True
) -> dict[str, np.ndarray]:
    """`fit_btyd` then `predict_btyd` on the same customers (keys as in `predict_btyd`)."""
    return predict_btyd(fit_btyd(calib_df, value=value), calib_df, horizon)
