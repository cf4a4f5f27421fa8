"""Draw docs/posthoc-profiles.svg: target power-EMA profiles against those post-hoc EMA synthesizes.

    PYTHONPATH=src python docs/posthoc_profiles.py

The setting of docs/posthoc-ema.md's worked example: snapshots of sigma_rel 0.05 and 0.10 every 200 steps,
read at step 2000. Each curve is the weight a step's model gets in the average (per 1,000), computed by
``ema_average.engine.posthoc_profiles``; the SVG is written by hand (no plotting library needed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ema_average.engine.decay_rules import sigma_rel_to_gamma
from ema_average.engine.posthoc_profiles import Profile, binned_weights, reconstruct

LAST, EVERY, STORED = 2000, 200, (0.05, 0.10)
TARGETS = ((0.03, "#d62728"), (0.07, "#1f77b4"), (0.15, "#2ca02c"))
WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 760, 400, 70, 20, 40, 60


def curves() -> list[tuple[float, str, np.ndarray, np.ndarray, float]]:
    """For each target: its per-step weights, the synthesized ones, and the fit error."""
    snapshots = [Profile(s, sigma_rel_to_gamma(w)) for s in range(EVERY, LAST + 1, EVERY) for w in STORED]
    out = []
    for width, color in TARGETS:
        target = Profile(LAST, sigma_rel_to_gamma(width))
        solved = reconstruct(snapshots, target)
        synthesized = sum(
            c * binned_weights(p, LAST) for c, p in zip(solved.coefficients, snapshots, strict=True)
        )
        out.append((width, color, binned_weights(target), np.asarray(synthesized), solved.fit_error))
    return out


def svg() -> str:
    drawn = curves()
    top = max(float(max(t.max(), s.max())) for _, _, t, s, _ in drawn) * 1000 * 1.05
    first = 1000  # the first half carries almost no weight: drawn from here

    def x(step: float) -> float:
        return LEFT + (step - first) / (LAST - first) * (WIDTH - LEFT - RIGHT)

    def y(value: float) -> float:
        return HEIGHT - BOTTOM - value / top * (HEIGHT - TOP - BOTTOM)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        'font-family="sans-serif" font-size="12">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="22" text-anchor="middle" font-size="14">Weight of each step in the '
        "average at step 2000: target (solid) and post-hoc synthesized (dashed)</text>",
        f'<line x1="{LEFT}" y1="{y(0)}" x2="{WIDTH - RIGHT}" y2="{y(0)}" stroke="black"/>',
        f'<line x1="{LEFT}" y1="{y(0)}" x2="{LEFT}" y2="{TOP}" stroke="black"/>',
        f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 20}" text-anchor="middle">training step '
        "(snapshots of sigma_rel 0.05 and 0.10 every 200 steps, grey lines)</text>",
        f'<text transform="translate(18 {(TOP + HEIGHT - BOTTOM) / 2}) rotate(-90)" text-anchor="middle">'
        "weight per 1,000</text>",
    ]
    for step in range(first, LAST + 1, EVERY):
        parts.append(f'<line x1="{x(step):.1f}" y1="{y(0)}" x2="{x(step):.1f}" y2="{TOP}" stroke="#ddd"/>')
        parts.append(f'<text x="{x(step):.1f}" y="{y(0) + 16}" text-anchor="middle">{step}</text>')
    for tick in np.linspace(0, top, 5)[1:]:
        parts.append(f'<text x="{LEFT - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:.1f}</text>')
    steps = np.arange(first, LAST + 1, 4)
    for i, (width, color, target, synthesized, fit) in enumerate(drawn):
        for values, dash in ((target, ""), (synthesized, ' stroke-dasharray="6 4"')):
            points = " ".join(f"{x(s):.1f},{y(values[s - 1] * 1000):.1f}" for s in steps)
            parts.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        ly = TOP + 16 + 18 * i
        parts.append(
            f'<line x1="{LEFT + 14}" y1="{ly - 4}" x2="{LEFT + 44}" y2="{ly - 4}" stroke="{color}" stroke-width="2"/>'
        )
        parts.append(f'<text x="{LEFT + 50}" y="{ly}">sigma_rel {width}: fit error {fit:.1%}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    path = Path(__file__).with_name("posthoc-profiles.svg")
    path.write_text(svg())
    print(f"wrote {path}")
