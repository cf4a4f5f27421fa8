"""The math of post-hoc EMA, in float64: EDM2's power-function profiles, their inner products, and the
least-squares combination of stored profiles closest to a target (Karras et al. 2024, Appendix C.3,
Algorithm 3). No tensors here: the plan asks these for each snapshot's coefficient.

A power-function EMA with exponent ``gamma`` read at step ``t`` weighs the value of training time ``tau``
by the profile ``p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)`` on ``[0, t]`` (its per-step weights are
exactly the integrals of ``p`` over each step: the online rule ``(1 - 1/t)^(gamma + 1)`` telescopes to
them). A snapshot is such a profile; the EMA of another profile is approximated by the combination of
snapshots whose profile is nearest in L2, then scaled so its coefficients sum to 1 (EDM2 does the same),
so a weight that never moved stays exactly what it was.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ema_average.engine.decay_rules import gamma_to_sigma_rel
from ema_average.errors import ConfigurationError

# Profiles with gamma <= -1/2 are not square-integrable: their inner product with themselves diverges.
MIN_GAMMA = -0.5
# Beyond this condition number (of the scaled system) the snapshots' profiles are taken as dependent.
SINGULAR_CONDITION = 1e13
# Beyond this the solve still holds, but the coefficients lose digits: the plan says so.
ILL_CONDITIONED = 1e8
# A synthesized profile this far from the target (relative L2) is named in the plan.
POOR_FIT = 0.05


@dataclass(frozen=True)
class Profile:
    """One power-function profile: the EMA of exponent ``gamma`` read at training step ``step``."""

    step: int
    gamma: float

    @property
    def sigma_rel(self) -> float:
        return gamma_to_sigma_rel(self.gamma)


@dataclass(frozen=True)
class Reconstruction:
    """How one target profile is made from the snapshots: one coefficient per snapshot (0 for those past
    the target's step), how far the result is from the target, and the notes the plan shows."""

    target: Profile
    coefficients: tuple[float, ...]  # sums to 1; zeros for snapshots after target.step
    fit_error: float  # ||synthesized - target|| / ||target||, L2 over training time
    condition: float  # of the scaled normal equations
    warnings: list[str] = field(default_factory=list)

    @property
    def amplification(self) -> float:
        """Sum of |coefficient|: how much a per-value error of the snapshots (their rounding) can grow."""
        return math.fsum(abs(c) for c in self.coefficients)


def inner_products(a: Sequence[Profile], b: Sequence[Profile]) -> np.ndarray:
    """``<p_a, p_b>`` for every pair, in closed form (EDM2's Eq. 151): with ``ta <= tb``,
    ``(ga + 1)(gb + 1) / (ga + gb + 1) * (ta / tb)^gb / tb``; symmetric otherwise."""
    ta = np.array([p.step for p in a], dtype=np.float64)[:, None]
    ga = np.array([p.gamma for p in a], dtype=np.float64)[:, None]
    tb = np.array([p.step for p in b], dtype=np.float64)[None, :]
    gb = np.array([p.gamma for p in b], dtype=np.float64)[None, :]
    ratio = np.minimum(ta, tb) / np.maximum(ta, tb)
    power = np.where(ta <= tb, gb, ga)  # the exponent of the longer profile, over the shorter's end
    return (ga + 1) * (gb + 1) / (ga + gb + 1) * ratio**power / np.maximum(ta, tb)


def check_profiles(snapshots: Sequence[Profile]) -> None:
    """Refuse what the solve cannot take: no snapshot, a step below 1, a gamma that is not a finite number
    above -1/2 (its profile has no finite L2 norm), the same profile twice."""
    if not snapshots:
        raise ConfigurationError("post-hoc EMA needs snapshots; none were given")
    seen: set[tuple[int, float]] = set()
    for p in snapshots:
        check_gamma(p.gamma, "a snapshot's gamma")
        if isinstance(p.step, bool) or not isinstance(p.step, int) or p.step < 1:
            raise ConfigurationError(f"a snapshot's step must be a whole number >= 1, got {p.step!r}")
        if (p.step, p.gamma) in seen:
            raise ConfigurationError(
                f"two snapshots of the same profile (gamma {p.gamma:.6g}) at step {p.step}: each must be once"
            )
        seen.add((p.step, p.gamma))


def check_gamma(gamma: float, what: str) -> None:
    if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not math.isfinite(gamma):
        raise ConfigurationError(f"{what} must be a finite number, got {gamma!r}")
    if gamma <= MIN_GAMMA:
        raise ConfigurationError(
            f"{what} must be above -0.5 (sigma_rel below {gamma_to_sigma_rel(-0.5):.4f}): the profile of "
            f"gamma {gamma:.6g} weighs the first steps without bound and has no least-squares fit"
        )


def reconstruct(snapshots: Sequence[Profile], target: Profile) -> Reconstruction:
    """The coefficients of the snapshots whose combination is nearest ``target``, from snapshots at or
    before ``target.step`` only, solved in float64, normalised to sum to 1.

    Refuses (one line) a target past the last snapshot or before the first, and snapshots whose profiles
    are linearly dependent; the result's ``warnings`` name an ill-conditioned system and a poor fit.
    """
    check_profiles(snapshots)
    check_gamma(target.gamma, "the target's gamma")
    last = max(p.step for p in snapshots)
    if isinstance(target.step, bool) or not isinstance(target.step, int) or target.step > last:
        raise ConfigurationError(
            f"the target step {target.step!r} is past the last snapshot (step {last}): post-hoc EMA can only "
            "be read at or before it"
        )
    used = [i for i, p in enumerate(snapshots) if p.step <= target.step]
    if not used:
        first = min(p.step for p in snapshots)
        raise ConfigurationError(
            f"no snapshot at or before the target step {target.step} (the first is at step {first})"
        )
    chosen = [snapshots[i] for i in used]
    gram = inner_products(chosen, chosen)
    rhs = inner_products(chosen, [target])[:, 0]
    solution, condition = _solve(gram, rhs, chosen)
    total = math.fsum(solution)
    if not (math.isfinite(total) and abs(total) > 1e-12):
        raise ConfigurationError(
            f"the snapshots cannot express the target (sigma_rel {target.sigma_rel:.4g} at step "
            f"{target.step}): its coefficients sum to {total:.3g}"
        )
    solution = solution / total
    fit = _fit_error(gram, rhs, solution, target)
    coefficients = [0.0] * len(snapshots)
    for i, c in zip(used, solution.tolist(), strict=True):
        coefficients[i] = c
    return Reconstruction(
        target, tuple(coefficients), fit, condition, _warnings(chosen, target, fit, condition)
    )


def _solve(gram: np.ndarray, rhs: np.ndarray, chosen: Sequence[Profile]) -> tuple[np.ndarray, float]:
    """``gram x = rhs`` after scaling rows and columns to a unit diagonal (the profiles' norms differ by
    their steps' ratio): the condition number then measures how nearly dependent the profiles are."""
    scale = 1.0 / np.sqrt(np.diag(gram))
    scaled = gram * scale[:, None] * scale[None, :]
    condition = float(np.linalg.cond(scaled))
    if not math.isfinite(condition) or condition > SINGULAR_CONDITION:
        gammas = sorted({f"{p.gamma:.6g}" for p in chosen})
        raise ConfigurationError(
            f"the snapshots' profiles are linearly dependent (condition number {condition:.3g}; gammas "
            f"{', '.join(gammas)}): give profiles of clearly different widths, or fewer snapshots"
        )
    return np.linalg.solve(scaled, rhs * scale) * scale, condition


def _fit_error(gram: np.ndarray, rhs: np.ndarray, x: np.ndarray, target: Profile) -> float:
    """``||sum x_i p_i - p_target|| / ||p_target||`` from the inner products alone."""
    own = (target.gamma + 1) ** 2 / ((2 * target.gamma + 1) * target.step)
    squared = float(x @ gram @ x) - 2.0 * float(x @ rhs) + own
    return math.sqrt(max(squared, 0.0) / own)


def _warnings(chosen: Sequence[Profile], target: Profile, fit: float, condition: float) -> list[str]:
    notes = []
    if condition > ILL_CONDITIONED:
        notes.append(
            f"the system is ill-conditioned (condition number {condition:.3g}): the coefficients are large "
            "and of both signs; fewer or more widely spaced snapshots give a steadier result"
        )
    if fit > POOR_FIT:
        widths = sorted({p.sigma_rel for p in chosen})
        notes.append(
            f"sigma_rel {target.sigma_rel:.4g} at step {target.step} is poorly expressed by the stored "
            f"profiles (sigma_rel {', '.join(f'{w:.3g}' for w in widths)}): the synthesized profile is "
            f"{fit:.1%} from it"
        )
    return notes


def binned_weights(profile: Profile, steps: int | None = None) -> np.ndarray:
    """The weight a power EMA read at ``profile.step`` gives the value of each step 1..T (the profile's
    integral over each step): what the online rule ``(1 - 1/t)^(gamma + 1)`` gives, exactly."""
    t = np.arange(0, (steps or profile.step) + 1, dtype=np.float64) / profile.step
    cumulative = np.minimum(t, 1.0) ** (profile.gamma + 1)
    return np.diff(cumulative)
