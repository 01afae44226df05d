"""Synthetic calibration populations with known risk, for the statistical tests of the quality fits.

Each lower tier j has a latent ``u_j ~ U(0, 1)``, independent across stages, and reports the score
``s_j = lo_j + width_j * u_j`` (so stages can live on different scales, like SmolLM2's margins near 0.95 and
Qwen-0.5B's spread over [0, 1]). It is right with probability ``a_j - b_j u_j``; the last tier with a
constant ``p_last``. For thresholds ``t`` let ``q_j = clip((t_j - lo_j) / width_j, 0, 1)`` (the share accepted
at stage j among those reaching it). The exact population accuracy loss against always-last is

    R(t) = sum_j  prod_{i<j} (1 - q_i)  *  int_0^{q_j} (p_last - a_j + b_j u) du
         = sum_j  reach_j * (q_j (p_last - a_j) + b_j q_j^2 / 2).

It does not depend on how the tiers' errors are coupled; the coupling (``"independent"``, or ``"nested"``:
one uniform per example, so a tier is never right where a more accurate one is wrong) only changes how tight
the bounds are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Stage:
    """One lower tier: right with probability ``a - b u``, score ``lo + width * u``."""

    a: float
    b: float
    lo: float = 0.0
    width: float = 1.0


@dataclass(frozen=True)
class Population:
    """Lower tiers, cheapest first, and the last tier's accuracy."""

    stages: tuple[Stage, ...]
    p_last: float

    def true_risk(self, thresholds: Sequence[float]) -> float:
        """Exact accuracy loss vs always-last of the cascade with these thresholds."""
        risk, reach = 0.0, 1.0
        for st, t in zip(self.stages, thresholds):
            q = min(max((t - st.lo) / st.width, 0.0), 1.0) if np.isfinite(t) else float(t > 0)
            risk += reach * (q * (self.p_last - st.a) + st.b * q * q / 2)
            reach *= 1.0 - q
        return risk

    def draw(self, n: int, rng: np.random.Generator, coupling: str = "independent") -> tuple[np.ndarray, np.ndarray]:
        """``(scores (n, N-1), correct (n, N))`` of n examples."""
        u = rng.uniform(size=(n, len(self.stages)))
        scores = np.column_stack([st.lo + st.width * u[:, j] for j, st in enumerate(self.stages)])
        probs = np.column_stack([st.a - st.b * u[:, j] for j, st in enumerate(self.stages)]
                                + [np.full(n, self.p_last)])
        v = rng.uniform(size=(n, 1)) if coupling == "nested" else rng.uniform(size=probs.shape)
        return scores, v < probs


TWO_TIER_HELPFUL = Population((Stage(0.98, 0.6),), 0.8)  # the small tier beats the large one on easy inputs
TWO_TIER_NESTED = Population((Stage(0.95, 0.6),), 0.95)  # never better than the large tier
THREE_TIER = Population((Stage(0.9, 0.7), Stage(0.97, 0.4)), 0.85)
#: Like SmolLM2 -> Qwen-0.5B -> Qwen-1.5B: a weak first stage whose scores sit in [0.9, 1], a strong second
#: stage spread over [0, 1]. One common threshold cannot suit both.
THREE_TIER_SCALES = Population((Stage(0.93, 0.5, lo=0.9, width=0.1), Stage(0.99, 0.5)), 0.92)
