"""The post-hoc EMA math against an independent reference: the profiles' inner products by numerical
integration of EDM2's definition in 40-digit arithmetic (mpmath), the normal equations solved there too."""

from __future__ import annotations

import mpmath
import numpy as np
import pytest

from ema_average.engine.decay_rules import PowerRule, sigma_rel_to_gamma
from ema_average.engine.posthoc_profiles import Profile, binned_weights, inner_products, reconstruct
from ema_average.errors import ConfigurationError

mpmath.mp.dps = 40


def _profile(t: float, gamma: float):  # type: ignore[no-untyped-def]
    """EDM2's power-function profile read at time t: (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t]."""
    t, gamma = mpmath.mpf(t), mpmath.mpf(gamma)
    return lambda tau: (gamma + 1) * tau**gamma / t ** (gamma + 1) if tau <= t else mpmath.mpf(0)


def _integrated_inner(a: Profile, b: Profile) -> mpmath.mpf:
    """<p_a, p_b> as an integral over [0, min(ta, tb)] (where both are non-zero)."""
    pa, pb = _profile(a.step, a.gamma), _profile(b.step, b.gamma)
    return mpmath.quad(lambda tau: pa(tau) * pb(tau), [0, min(a.step, b.step)])


def _reference(snapshots: list[Profile], target: Profile) -> list[float]:
    """Least squares in 40 digits: Gram matrix and right-hand side integrated, solved, normalised."""
    used = [p for p in snapshots if p.step <= target.step]
    gram = mpmath.matrix([[_integrated_inner(a, b) for b in used] for a in used])
    rhs = mpmath.matrix([_integrated_inner(a, target) for a in used])
    x = mpmath.lu_solve(gram, rhs)
    total = sum(x)
    solved = iter([float(v / total) for v in x])
    return [next(solved) if p.step <= target.step else 0.0 for p in snapshots]


GAMMAS = (sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10))


@pytest.mark.parametrize(
    ("steps", "target_sigma", "target_step"),
    [
        ((100, 200, 300, 400), 0.07, 400),
        ((100, 200, 300, 400), 0.15, 300),  # the snapshot at 400 is past the target: not used
        ((250, 500, 1000), 0.03, 1000),
    ],
)
def test_coefficients_equal_an_integrated_float64_solve(
    steps: tuple[int, ...], target_sigma: float, target_step: int
) -> None:
    snapshots = [Profile(s, g) for s in steps for g in GAMMAS]
    target = Profile(target_step, sigma_rel_to_gamma(target_sigma))
    got = reconstruct(snapshots, target)
    expected = _reference(snapshots, target)
    np.testing.assert_allclose(got.coefficients, expected, rtol=1e-10, atol=1e-12)
    assert sum(got.coefficients) == pytest.approx(1.0, abs=1e-12)
    assert all(c == 0.0 for c, p in zip(got.coefficients, snapshots, strict=True) if p.step > target_step)


def test_inner_products_equal_integrals() -> None:
    profiles = [Profile(120, 0.3), Profile(77, GAMMAS[0]), Profile(300, GAMMAS[1])]
    got = inner_products(profiles, profiles)
    for i, a in enumerate(profiles):
        for j, b in enumerate(profiles):
            assert got[i, j] == pytest.approx(float(_integrated_inner(a, b)), rel=1e-13)


def test_a_stored_profile_is_reconstructed_exactly_with_no_fit_error() -> None:
    snapshots = [Profile(s, g) for s in (100, 200, 300) for g in GAMMAS]
    got = reconstruct(snapshots, Profile(200, GAMMAS[1]))
    expected = [1.0 if p == Profile(200, GAMMAS[1]) else 0.0 for p in snapshots]
    np.testing.assert_allclose(got.coefficients, expected, atol=1e-9)
    assert got.fit_error < 1e-6


def test_fit_error_equals_the_integrated_distance() -> None:
    snapshots = [Profile(s, g) for s in (100, 200, 300, 400) for g in GAMMAS]
    target = Profile(400, sigma_rel_to_gamma(0.15))
    got = reconstruct(snapshots, target)
    parts = [(c, _profile(p.step, p.gamma)) for c, p in zip(got.coefficients, snapshots, strict=True)]
    want = _profile(target.step, target.gamma)
    edges = [0, *sorted({p.step for p in snapshots})]

    def squared(tau):  # type: ignore[no-untyped-def]
        return (sum(c * f(tau) for c, f in parts) - want(tau)) ** 2

    error = mpmath.sqrt(mpmath.quad(squared, edges) / mpmath.quad(lambda tau: want(tau) ** 2, edges))
    assert got.fit_error == pytest.approx(float(error), rel=1e-5)
    assert got.fit_error > 0.01  # a real distance, not a rounding error


def test_binned_weights_are_the_online_rule() -> None:
    """A power EMA's weights per step from its online decays (1 - 1/t)^(gamma + 1), in float64."""
    rule = PowerRule(gamma=GAMMAS[0])
    weights = [1.0]
    for t in range(2, 51):
        d = rule.at(t, t)
        weights = [w * d for w in weights] + [1 - d]
    np.testing.assert_allclose(binned_weights(Profile(50, GAMMAS[0])), weights, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize(
    ("snapshots", "target", "message"),
    [
        ([], Profile(10, 5.0), "needs snapshots"),
        ([Profile(10, 5.0), Profile(10, 5.0)], Profile(10, 5.0), "same profile"),
        ([Profile(10, 5.0), Profile(20, 5.0)], Profile(30, 5.0), "past the last snapshot"),
        ([Profile(10, 5.0), Profile(20, 5.0)], Profile(5, 5.0), "no snapshot at or before"),
        ([Profile(0, 5.0)], Profile(5, 5.0), "whole number >= 1"),
        ([Profile(10, -0.7)], Profile(10, 5.0), "above -0.5"),
        ([Profile(10, float("nan"))], Profile(10, 5.0), "finite"),
        ([Profile(10, 5.0), Profile(10, 5.0 + 1e-9)], Profile(10, 3.0), "linearly dependent"),
    ],
)
def test_refusals_are_one_line(snapshots: list[Profile], target: Profile, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as caught:
        reconstruct(snapshots, target)
    assert "\n" not in str(caught.value)


def test_a_poor_fit_and_ill_conditioning_are_named() -> None:
    snapshots = [Profile(s, g) for s in (500, 1000, 1500, 2000) for g in GAMMAS]
    far = reconstruct(snapshots, Profile(2000, sigma_rel_to_gamma(0.02)))
    assert any("poorly expressed" in w for w in far.warnings)
    near = reconstruct(snapshots, Profile(2000, sigma_rel_to_gamma(0.07)))
    assert near.warnings == []
    dense = [Profile(s, g) for s in range(5, 2001, 5) for g in GAMMAS]  # condition ~3e8
    assert any("ill-conditioned" in w for w in reconstruct(dense, Profile(2000, GAMMAS[0])).warnings)
