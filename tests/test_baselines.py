"""BTYD baselines: published CDNOW fits, the closed forms against numerical integration, and
parameter recovery on customers simulated from known parameters."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import integrate, stats
from scipy.optimize import approx_fprime
from scipy.special import hyp2f1

from clvray import baselines
from clvray.baselines import BGNBDParams, BTYDModel, GGParams

CDNOW = Path(__file__).parent / "data" / "cdnow_customers_summary_with_transactions.csv"

# Fader, Hardie and Lee (2005), CDNOW sample, weeks; log-likelihood -9582.4.
PUBLISHED_BGNBD = BGNBDParams(r=0.243, alpha=4.414, a=0.793, b=2.426)
# Fader and Hardie (2013), the same customers' repeat transactions.
PUBLISHED_GG = GGParams(p=6.25, q=3.74, v=15.44)


@pytest.fixture(scope="module")
def cdnow() -> pd.DataFrame:
    df = pd.read_csv(CDNOW)
    return df.rename(columns={"x": "frequency", "t_x": "recency", "zbar": "monetary"})


@pytest.fixture(scope="module")
def cdnow_bgnbd(cdnow: pd.DataFrame) -> BGNBDParams:
    return baselines.fit_bgnbd(cdnow["frequency"], cdnow["recency"], cdnow["T"])


def _rft(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return df["frequency"].to_numpy(float), df["recency"].to_numpy(float), df["T"].to_numpy(float)


# --- published CDNOW results -----------------------------------------------------------------


def test_cdnow_sample_is_the_published_one(cdnow: pd.DataFrame):
    assert len(cdnow) == 2357
    assert int(cdnow["frequency"].sum()) == 2457
    assert int((cdnow["frequency"] > 0).sum()) == 946


def test_fit_bgnbd_reproduces_published_cdnow_parameters(cdnow, cdnow_bgnbd):
    for name in ("r", "alpha", "a", "b"):
        assert getattr(cdnow_bgnbd, name) == pytest.approx(getattr(PUBLISHED_BGNBD, name), abs=5e-3)
    ll = baselines.bgnbd_log_likelihood(cdnow_bgnbd, *_rft(cdnow))
    assert ll == pytest.approx(-9582.4, abs=0.05)
    # A maximum: at least as good as the published (rounded) parameters.
    assert ll >= baselines.bgnbd_log_likelihood(PUBLISHED_BGNBD, *_rft(cdnow))


def test_bgnbd_published_customer_forecast():
    # FHL 2005: the customer with x = 2, t_x = 30.43, T = 38.86 weeks is expected to make 1.226
    # purchases in the next 39 weeks.
    got = baselines.bgnbd_expected_purchases(PUBLISHED_BGNBD, [2], [30.43], [38.86], 39)
    assert got[0] == pytest.approx(1.226, abs=5e-4)


def test_fit_gamma_gamma_reproduces_published_cdnow_parameters(cdnow):
    gg = baselines.fit_gamma_gamma(cdnow["frequency"], cdnow["monetary"])
    assert gg.p == pytest.approx(PUBLISHED_GG.p, abs=5e-3)
    assert gg.q == pytest.approx(PUBLISHED_GG.q, abs=5e-3)
    # The MLE is v = 15.448; the published 15.44 is a slightly less converged optimum (its
    # log-likelihood is lower, checked below), so the last digit is allowed to differ by one.
    assert gg.v == pytest.approx(PUBLISHED_GG.v, abs=1e-2)
    repeat = cdnow[cdnow["frequency"] > 0]
    x, m = repeat["frequency"].to_numpy(float), repeat["monetary"].to_numpy(float)

    def loglik(params: GGParams) -> float:
        theta = np.log([params.p, params.q, params.v])
        return float(baselines._gg_loglik(theta, x, m)[0].sum())

    assert loglik(gg) >= loglik(PUBLISHED_GG)
    assert gg.mean_spend == pytest.approx(gg.v * gg.p / (gg.q - 1))


# --- closed forms against independent computations -------------------------------------------


def _bgnbd_by_quadrature(
    params: BGNBDParams, x: int, tx: float, t_obs: float, t: float
) -> tuple[float, float]:
    """(E[purchases in (T, T+t]], P(alive at T)) by integrating over the prior of (lambda, p).

    Re-derived from the model, not from FHL's closed forms: given (lambda, p) the customer's
    data have likelihood (1-p)^x lambda^x e^(-lambda T) if still alive at T, plus
    p (1-p)^(x-1) lambda^x e^(-lambda t_x) if they dropped out after the last purchase; an alive
    customer makes (1 - e^(-lambda p t)) / p purchases in t on average (Poisson purchases, a
    geometric number of them before dropping out). Normalising constants of the priors cancel.
    """
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    shape = r + x  # lambda^x times the Gamma(r, alpha) prior: a Gamma(r + x, .) kernel

    def over_lambda(f, rate: float) -> float:
        # int_0^inf lambda^(shape-1) e^(-rate lambda) f(lambda) dlambda, divided by the
        # constant G(shape) / (alpha+T)^shape common to every term (it cancels in the ratios),
        # as E[f] under Gamma(shape, rate) times ((alpha+T) / rate)^shape.
        top = (shape + 40.0 + 10.0 * math.sqrt(shape)) / rate
        opts = {"epsabs": 0.0, "epsrel": 1e-12, "limit": 500}
        if shape < 1:  # density singular at 0: let the weight carry lambda^(shape-1)
            val = (
                integrate.quad(
                    lambda lam: math.exp(-rate * lam) * f(lam),
                    0.0,
                    top,
                    weight="alg",
                    wvar=(shape - 1.0, 0.0),
                    **opts,
                )[0]
                * rate**shape
                / math.gamma(shape)
            )
        else:
            log_norm = shape * math.log(rate) - math.lgamma(shape)

            def pdf(lam: float) -> float:
                return (
                    math.exp(log_norm + (shape - 1.0) * math.log(lam) - rate * lam)
                    if lam > 0
                    else 0.0
                )

            val = integrate.quad(
                lambda lam: pdf(lam) * f(lam), 0.0, top, points=[(shape - 1.0) / rate], **opts
            )[0]
        return val * ((alpha + t_obs) / rate) ** shape

    def over_p(g) -> float:
        val, _ = integrate.quad(
            g, 0.0, 1.0, weight="alg", wvar=(a - 1.0, b - 1.0), epsabs=0.0, epsrel=1e-12, limit=500
        )
        return val

    alive = over_p(lambda p: (1.0 - p) ** x) * over_lambda(lambda lam: 1.0, alpha + t_obs)
    dropped = 0.0
    if x > 0:
        dropped = over_p(lambda p: p * (1.0 - p) ** (x - 1)) * over_lambda(
            lambda lam: 1.0, alpha + tx
        )

    def future(p: float) -> float:
        p = max(p, 1e-300)  # (1 - e^(-lambda p t)) / p -> lambda t as p -> 0
        inner = over_lambda(lambda lam: -math.expm1(-lam * p * t), alpha + t_obs)
        return (1.0 - p) ** x * inner / p

    return over_p(future) / (alive + dropped), alive / (alive + dropped)


@pytest.mark.parametrize(
    "x, tx, t_obs, t",
    [
        (0, 0.0, 38.86, 39.0),
        (2, 30.43, 38.86, 39.0),
        (1, 1.71, 38.86, 52.0),
        (7, 20.0, 30.0, 10.0),
        (29, 38.0, 38.43, 39.0),
        (150, 30.0, 31.0, 2000.0),  # z = 0.98 and C - A - B = 150: the series branch
    ],
)
def test_bgnbd_closed_forms_match_numerical_integration(x, tx, t_obs, t):
    expected, alive = _bgnbd_by_quadrature(PUBLISHED_BGNBD, x, tx, t_obs, t)
    got = baselines.bgnbd_expected_purchases(PUBLISHED_BGNBD, [x], [tx], [t_obs], t)[0]
    got_alive = baselines.bgnbd_prob_alive(PUBLISHED_BGNBD, [x], [tx], [t_obs])[0]
    assert got == pytest.approx(expected, rel=1e-9)
    assert got_alive == pytest.approx(alive, rel=1e-9)


def test_bgnbd_expected_purchases_equals_untransformed_formula(cdnow, cdnow_bgnbd):
    # FHL eq. 10 as printed, before the Euler transformation the implementation applies; both
    # agree wherever the printed form is accurate (CDNOW: x <= 29).
    x, tx, t_obs = _rft(cdnow)
    r, alpha, a, b = cdnow_bgnbd.r, cdnow_bgnbd.alpha, cdnow_bgnbd.a, cdnow_bgnbd.b
    t = 39.0
    z = t / (alpha + t_obs + t)
    head = (a + b + x - 1) / (a - 1)
    bracket = 1 - ((alpha + t_obs) / (alpha + t_obs + t)) ** (r + x) * hyp2f1(
        r + x, b + x, a + b + x - 1, z
    )
    odds = np.where(
        x > 0, a / (b + np.maximum(x, 1) - 1) * ((alpha + t_obs) / (alpha + tx)) ** (r + x), 0.0
    )
    printed = head * bracket / (1 + odds)
    got = baselines.bgnbd_expected_purchases(cdnow_bgnbd, x, tx, t_obs, t)
    np.testing.assert_allclose(got, printed, rtol=1e-9)


def _bgnbd_by_posterior(params: BGNBDParams, x: int, tx: float, t_obs: float, t: float) -> float:
    """E[purchases in (T, T+t]] from the posterior given "alive at T", one integral over p.

    Alive at T, the likelihood (1-p)^x lambda^x e^(-lambda T) makes lambda ~ Gamma(r+x, rate
    alpha+T) and p ~ Beta(a, b+x) independent; averaging (1 - e^(-lambda p t)) / p over lambda
    in closed form leaves (1 - (1 + p t / (alpha+T))^-(r+x)) / p to average over p. The
    integral runs over the Beta's mean +- 50 standard deviations (clipped to [0, 1]), so that
    it finds the mass when a and b are huge and the Beta is a spike.
    """
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    u = t / (alpha + t_obs)
    mean_p = a / (a + b + x)
    sd_p = math.sqrt(mean_p * (1.0 - mean_p) / (a + b + x + 1.0))
    lo, hi = max(0.0, mean_p - 50.0 * sd_p), min(1.0, mean_p + 50.0 * sd_p)

    def g(p: float) -> float:
        p = max(p, 1e-300)
        return -math.expm1(-(r + x) * math.log1p(p * u)) / p * stats.beta.pdf(p, a, b + x)

    mean, _ = integrate.quad(g, lo, hi, epsabs=0.0, epsrel=1e-11, limit=1000, points=[mean_p])
    return mean * baselines.bgnbd_prob_alive(params, [x], [tx], [t_obs])[0]


def test_bgnbd_expected_purchases_behaves_at_extremes():
    p = BGNBDParams(r=0.5, alpha=10.0, a=1.5, b=4.0)
    horizons = np.array([0.0, 1.0, 10.0, 100.0, 1e4])
    one = [baselines.bgnbd_expected_purchases(p, [3], [20.0], [30.0], h)[0] for h in horizons]
    assert one[0] == 0.0
    assert np.all(np.diff(one) > 0)
    # Heavy buyers and long horizons, where scipy's hyp2f1 alone returns NaN.
    for x, t in [(2000, 3650.0), (300, 1e5), (40, 1e5)]:
        got = baselines.bgnbd_expected_purchases(p, [x], [364.0], [365.0], t)[0]
        assert got == pytest.approx(_bgnbd_by_posterior(p, x, 364.0, 365.0, t), rel=1e-7)
    # a = 1 exactly is 0/0 in the formula; the value is continuous through it.
    near = [
        baselines.bgnbd_expected_purchases(
            BGNBDParams(0.5, 10.0, a, 4.0), [3], [20.0], [30.0], 30.0
        )[0]
        for a in (1.0 - 1e-3, 1.0, 1.0 + 1e-3)
    ]
    assert near[1] == pytest.approx((near[0] + near[2]) / 2, rel=1e-4)


# A fit that ended with a and b in the millions: Beta(a, b) is nearly a point mass, so every
# customer drops out after a purchase with about the same chance a / (a+b) = 0.145. Eq. 10 gave
# NaN for every customer here ((1-z)^(a-1) underflowed to 0, its 2F1 overflowed to inf).
HUGE_AB = BGNBDParams(
    r=0.6272262747384251, alpha=3.455203323773967, a=2372514.9091632417, b=13935046.925549459
)
HUGE_AB_X = np.array([5.0, 5.0, 11.0, 0.0, 1.0])
HUGE_AB_TX = np.array([276.9, 272.7, 448.1, 0.0, 35.7]) / 7
HUGE_AB_T = np.array([373.1, 566.6, 526.6, 204.6, 470.6]) / 7
HUGE_AB_HORIZON = 90 / 7


def _huge_ab_predictions(params: BGNBDParams) -> tuple[np.ndarray, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow / invalid-value warnings either
        expected = baselines.bgnbd_expected_purchases(
            params, HUGE_AB_X, HUGE_AB_TX, HUGE_AB_T, HUGE_AB_HORIZON
        )
        alive = baselines.bgnbd_prob_alive(params, HUGE_AB_X, HUGE_AB_TX, HUGE_AB_T)
    return expected, alive


def test_bgnbd_predictions_with_huge_a_and_b_match_the_posterior_integral():
    expected, alive = _huge_ab_predictions(HUGE_AB)
    assert np.all(np.isfinite(expected)) and np.all(expected > 0)
    assert np.all((alive > 0) & (alive <= 1)) and alive[3] == 1.0
    reference = [
        _bgnbd_by_posterior(HUGE_AB, int(x), tx, t_obs, HUGE_AB_HORIZON)
        for x, tx, t_obs in zip(HUGE_AB_X, HUGE_AB_TX, HUGE_AB_T, strict=True)
    ]
    np.testing.assert_allclose(expected, reference, rtol=1e-8)


def test_bgnbd_predictions_with_huge_a_and_b_converge_to_the_common_dropout_limit():
    r, alpha, a, b = HUGE_AB.r, HUGE_AB.alpha, HUGE_AB.a, HUGE_AB.b
    expected, alive = _huge_ab_predictions(HUGE_AB)
    # The same a / (a+b) with a and b 10, 100, 1000 times smaller approaches these values as
    # O(1 / (a+b)); the smallest is also checked against the quadrature.
    gaps = []
    for scale in (1000.0, 100.0, 10.0):
        smaller = BGNBDParams(r=r, alpha=alpha, a=a / scale, b=b / scale)
        got, got_alive = _huge_ab_predictions(smaller)
        if scale == 1000.0:
            x, tx, t_obs = HUGE_AB_X[0], HUGE_AB_TX[0], HUGE_AB_T[0]
            assert got[0] == pytest.approx(
                _bgnbd_by_posterior(smaller, int(x), tx, t_obs, HUGE_AB_HORIZON), rel=1e-8
            )
        gaps.append(max(np.max(np.abs(got / expected - 1)), np.max(np.abs(got_alive / alive - 1))))
    assert gaps[0] < 1e-2 and gaps[1] < gaps[0] / 8 and gaps[2] < gaps[1] / 8, gaps
    # The limit itself, a common dropout probability p = a/(a+b): dropping out is then
    # independent of the purchase rate's posterior, so P(alive) = 1 / (1 + p/(1-p)
    # ((alpha+T)/(alpha+t_x))^(r+x)) for x > 0, and an alive customer makes
    # E[(1 - e^(-lambda p t)) / p] = (1 - (1 + p t/(alpha+T))^-(r+x)) / p purchases.
    p = a / (a + b)
    x, tx, t_obs, t = HUGE_AB_X, HUGE_AB_TX, HUGE_AB_T, HUGE_AB_HORIZON
    odds_dead = np.where(x > 0, p / (1 - p) * ((alpha + t_obs) / (alpha + tx)) ** (r + x), 0.0)
    limit_alive = 1 / (1 + odds_dead)
    limit_expected = (1 - (1 + p * t / (alpha + t_obs)) ** -(r + x)) / p * limit_alive
    np.testing.assert_allclose(alive, limit_alive, rtol=1e-5)
    np.testing.assert_allclose(expected, limit_expected, rtol=1e-5)


@pytest.mark.parametrize(
    "a, b",
    [
        (2e6, 1.2e7),  # huge a and b, a / (a+b) moderate
        (4.8e8, 2.4e8),  # at the search bound e^20
        (300.0, 60.0),  # a - 1 > r + x: eq. 10 as printed, not Euler-transformed
        (0.7, 3e7),  # b >> a: nearly nobody drops out
        (25.0, 4e8),
        (1.0, 4.0),  # eq. 10 is 0/0 at a = 1 exactly
        (1.0 + 3e-8, 4.0),
    ],
)
def test_bgnbd_expected_purchases_matches_posterior_integral_across_a_and_b(a, b):
    params = BGNBDParams(r=0.8, alpha=12.0, a=a, b=b)
    cases = [(0, 0.0, 200.0), (2, 40.0, 300.0), (12, 290.0, 300.0), (60, 150.0, 160.0)]
    for t in (0.5, 30.0, 365.0, 5000.0):
        x = np.array([c[0] for c in cases], float)
        tx = np.array([c[1] for c in cases])
        t_obs = np.array([c[2] for c in cases])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = baselines.bgnbd_expected_purchases(params, x, tx, t_obs, t)
        want = [_bgnbd_by_posterior(params, *c, t) for c in cases]
        np.testing.assert_allclose(got, want, rtol=1e-8, err_msg=f"t = {t}")


def test_hyp2f1_matches_mpmath():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 30
    rng = np.random.default_rng(11)
    n = 400
    # BG/NBD's arguments A = a+b-1-r, B = a-1, C = a+b+x-1 over plausible fitted parameters.
    a = np.exp(rng.uniform(np.log(0.1), np.log(10), n))
    b = np.exp(rng.uniform(np.log(0.2), np.log(20), n))
    r = np.exp(rng.uniform(np.log(0.05), np.log(5), n))
    x = rng.choice([0, 1, 2, 5, 10, 30, 60, 100, 300, 1000, 5000], n)
    z = np.where(rng.random(n) < 0.5, rng.uniform(0, 0.9, n), 1 - 10 ** rng.uniform(-4, -1, n))
    A, B, C = a + b - 1 - r, a - 1, a + b + x - 1
    log_abs, sign = baselines._log_hyp2f1(A, B, C, z)
    got = sign * np.exp(log_abs)
    ref = np.array([float(mpmath.hyp2f1(*args)) for args in zip(A, B, C, z, strict=True)])
    np.testing.assert_allclose(got, ref, rtol=1e-9)

    # Eq. 10's arguments as printed, A = r+x, B = b+x, C = a+b+x-1, which are used where
    # a - 1 > r + x: a up to the search bound, a / (a+b) anywhere. 2F1 runs past float64 for
    # heavy buyers (to about 1e434 here), so it is compared in logs. z <= 0.8, where mpmath's own
    # evaluation stays fast with parameters this large.
    n = 150
    a = np.exp(rng.uniform(np.log(2), np.log(5e8), n))
    p_drop = np.exp(rng.uniform(np.log(1e-4), np.log(0.99), n))
    b = a * (1 - p_drop) / p_drop
    r = np.exp(rng.uniform(np.log(0.05), np.log(5), n))
    x = rng.choice([0, 1, 2, 5, 10, 30, 100, 300, 1000], n)
    z = rng.uniform(0, 0.8, n)
    keep = a - 1 > r + x
    A, B, C, z = (r + x)[keep], (b + x)[keep], (a + b + x - 1)[keep], z[keep]
    log_abs, sign = baselines._log_hyp2f1(A, B, C, z)
    ref = [mpmath.hyp2f1(*map(mpmath.mpf, args)) for args in zip(A, B, C, z, strict=True)]
    assert np.all(sign == 1.0) and all(v > 0 for v in ref)
    assert max(float(mpmath.log10(v)) for v in ref) > 308  # some do overflow float64
    np.testing.assert_allclose(log_abs, [float(mpmath.log(v)) for v in ref], rtol=0, atol=1e-9)


def test_gamma_gamma_expected_spend_is_the_posterior_mean():
    # Re-derived by integrating over the customer's rate nu: the mean of x values with shape p
    # and rate nu is Gamma(p x, rate x nu); nu ~ Gamma(q, rate v); the spend per transaction is
    # p / nu.
    gg = GGParams(p=6.25, q=3.74, v=15.44)
    for x, m in [(1, 10.0), (3, 40.0), (12, 22.5)]:

        def weight(nu: float, x: int = x, m: float = m) -> float:
            return stats.gamma.pdf(m, gg.p * x, scale=1 / (x * nu)) * stats.gamma.pdf(
                nu, gg.q, scale=1 / gg.v
            )

        num = integrate.quad(lambda nu, w=weight: gg.p / nu * w(nu), 0, np.inf, epsrel=1e-10)[0]
        den = integrate.quad(weight, 0, np.inf, epsrel=1e-10)[0]
        got = baselines.gamma_gamma_expected_spend(gg, [x], [m])[0]
        assert got == pytest.approx(num / den, rel=1e-7)
    assert baselines.gamma_gamma_expected_spend(gg, [0], [0.0])[0] == pytest.approx(gg.mean_spend)


def test_log_likelihood_gradients_match_finite_differences(cdnow):
    x, tx, t_obs = _rft(cdnow.iloc[::7])
    theta = np.log([0.4, 6.0, 1.3, 3.0])  # away from the optimum, where the gradient is large

    def total(th):
        return baselines._bgnbd_loglik(th, x, tx, t_obs)[0].sum()

    analytic = baselines._bgnbd_loglik(theta, x, tx, t_obs)[1].sum(axis=1)
    np.testing.assert_allclose(analytic, approx_fprime(theta, total, 1e-6), rtol=1e-4)

    repeat = cdnow[cdnow["frequency"] > 0]
    xr, m = repeat["frequency"].to_numpy(float), repeat["monetary"].to_numpy(float)
    theta_gg = np.log([3.0, 2.5, 30.0])
    analytic_gg = baselines._gg_loglik(theta_gg, xr, m)[1].sum(axis=1)
    numeric_gg = approx_fprime(theta_gg, lambda th: baselines._gg_loglik(th, xr, m)[0].sum(), 1e-6)
    np.testing.assert_allclose(analytic_gg, numeric_gg, rtol=1e-4)


# --- known truth: simulated customers --------------------------------------------------------


def _simulate_bgnbd(
    params: BGNBDParams, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Customers with first purchase at 0, observed for T in [200, 400] days."""
    lam = rng.gamma(params.r, 1 / params.alpha, n)
    drop = rng.beta(params.a, params.b, n)
    t_obs = rng.uniform(200, 400, n)
    x, tx, clock = np.zeros(n), np.zeros(n), np.zeros(n)
    active = np.ones(n, bool)
    while active.any():
        clock[active] += rng.exponential(1 / lam[active])
        active &= clock <= t_obs
        x[active] += 1
        tx[active] = clock[active]
        active &= rng.random(n) >= drop  # drops out right after this purchase
    return x, tx, t_obs


def test_fit_bgnbd_recovers_simulated_parameters():
    truth = BGNBDParams(r=0.8, alpha=40.0, a=0.9, b=3.0)  # days: ~1 purchase in 50 days
    x, tx, t_obs = _simulate_bgnbd(truth, 20_000, np.random.default_rng(3))
    fit = baselines.fit_bgnbd(x, tx, t_obs)
    for name in ("r", "alpha", "a", "b"):
        assert getattr(fit, name) == pytest.approx(getattr(truth, name), rel=0.15), name


def test_fit_gamma_gamma_recovers_simulated_parameters():
    truth = GGParams(p=4.0, q=3.0, v=20.0)
    rng = np.random.default_rng(5)
    x = rng.integers(1, 10, 20_000).astype(float)
    nu = rng.gamma(truth.q, 1 / truth.v, x.size)
    monetary = rng.gamma(truth.p * x, 1 / nu) / x
    fit = baselines.fit_gamma_gamma(x, monetary)
    for name in ("p", "q", "v"):
        assert getattr(fit, name) == pytest.approx(getattr(truth, name), rel=0.15), name


# --- convenience layer, heuristic, validation ------------------------------------------------


def test_fit_predict_btyd_on_cdnow(cdnow, cdnow_bgnbd):
    out = baselines.fit_predict_btyd(cdnow, horizon=39.0)
    assert set(out) == {"expected_purchases", "prob_alive", "expected_spend", "expected_value"}
    assert all(v.shape == (len(cdnow),) for v in out.values())
    x, tx, t_obs = _rft(cdnow)
    np.testing.assert_allclose(
        out["expected_purchases"],
        baselines.bgnbd_expected_purchases(cdnow_bgnbd, x, tx, t_obs, 39.0),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        out["expected_value"], out["expected_purchases"] * out["expected_spend"]
    )
    gg = baselines.fit_gamma_gamma(cdnow["frequency"], cdnow["monetary"])
    new = x == 0
    np.testing.assert_allclose(out["expected_spend"][new], gg.mean_spend)
    np.testing.assert_allclose(
        out["expected_spend"][~new],
        (gg.v + x[~new] * cdnow["monetary"].to_numpy()[~new]) * gg.p / (gg.p * x[~new] + gg.q - 1),
    )
    assert np.all(out["prob_alive"][new] == 1.0)

    purchases_only = baselines.fit_predict_btyd(
        cdnow[["frequency", "recency", "T"]], 39.0, value=False
    )
    assert set(purchases_only) == {"expected_purchases", "prob_alive"}


def test_btyd_falls_back_to_observed_mean_spend_when_gamma_gamma_has_no_mean():
    model = BTYDModel(
        bgnbd=PUBLISHED_BGNBD, gamma_gamma=GGParams(p=2.0, q=0.8, v=5.0), fallback_spend=33.0
    )
    df = pd.DataFrame(
        {"frequency": [0, 4], "recency": [0.0, 20.0], "T": [30.0, 30.0], "monetary": [0.0, 50.0]}
    )
    out = baselines.predict_btyd(model, df, horizon=10.0)
    assert out["expected_spend"][0] == 33.0
    assert out["expected_spend"][1] == pytest.approx((5.0 + 4 * 50.0) * 2.0 / (2.0 * 4 + 0.8 - 1))


def test_fit_predict_btyd_names_the_missing_column(cdnow):
    with pytest.raises(ValueError, match=r"lacks required column\(s\) \['monetary'\]"):
        baselines.fit_predict_btyd(cdnow.drop(columns="monetary"), 39.0)
    # Without value, monetary is not needed.
    baselines.fit_btyd(cdnow.drop(columns="monetary"), value=False)


def test_inputs_are_checked_at_the_door():
    with pytest.raises(ValueError, match="recency exceeds T"):
        baselines.fit_bgnbd([1, 2], [5.0, 40.0], [30.0, 30.0])
    with pytest.raises(ValueError, match="whole numbers"):
        baselines.fit_bgnbd([1.5, 2], [5.0, 10.0], [30.0, 30.0])
    with pytest.raises(ValueError, match="frequency > 0"):
        baselines.fit_bgnbd([0, 0], [0.0, 0.0], [30.0, 30.0])
    with pytest.raises(ValueError, match="differ in length"):
        baselines.bgnbd_prob_alive(PUBLISHED_BGNBD, [1, 2], [5.0], [30.0, 30.0])
    with pytest.raises(ValueError, match="at least 2 customers"):
        baselines.fit_gamma_gamma([0, 3, 1], [0.0, 10.0, -5.0])


def test_heuristic_value_by_hand():
    # 300 over 100 days -> 3/day -> 90 in a 30-day horizon; 50 spent on the cutoff day (T = 0)
    # counts as one day; a customer with no value predicts 0.
    got = baselines.heuristic_value([300.0, 50.0, 0.0], [100.0, 0.0, 10.0], horizon=30)
    np.testing.assert_allclose(got, [90.0, 1500.0, 0.0])
    np.testing.assert_allclose(
        baselines.heuristic_value([50.0], [0.0], horizon=30, min_T=7.0), [50 / 7 * 30]
    )
