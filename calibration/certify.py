"""Certifying a quality target: what a certificate bounds, each candidate's upper bound, and the test sequence.

Every quality fit shares these pieces (:func:`calibration.fit.fit_quality`, and any family of threshold
candidates for N tiers): what counts as a loss comes in as :class:`LossIndicators` (:func:`accuracy_loss`
from labels, :func:`disagreement_loss` without); a fit evaluates a table of candidates on the fit data (harm
and help counts per candidate), bounds each candidate's loss with :func:`upper_bounds`, and accepts
candidates in a sequence fixed before the data were seen with :func:`fixed_sequence`.

**Claims (what is certified).** Per example, the cascade's answer is compared with the last tier's:

- ``"accuracy"`` (labelled data): the loss is ``L = last_right - cascade_right`` in {-1, 0, 1}. With *harm* =
  the cascade kept a lower tier's wrong answer where the last tier was right and *help* = it kept a lower
  tier's right answer where the last tier was wrong, ``L = harm - help``, and the claim is
  ``acc(always last) - acc(cascade) = p_harm - p_help <= eps``.
- ``"disagreement"`` (no labels needed): the loss is ``L = 1[the cascade's answer differs from the last tier's]``
  in {0, 1}, "differs" as the scorer decides it (another choice, another normalised text, another number,
  or a user function of two answers). Where the two answers are the same, both are scored alike under every
  ground truth, so ``acc(always last) - acc(cascade) <= P(differ)`` for *every* labelling: a certificate of
  ``P(differ) <= eps`` bounds the accuracy loss without one label. It is looser per example (answers that
  differ but are both wrong, or where the cascade's is the right one, count as losses), which more
  unlabeled data pays for.

Both are counted by the same code: the disagreement claim is the accuracy claim with the last tier's answers
as the labels. Pass an ``agreement`` matrix (``(n, N)`` bool, tier j's answer is the same as the last
tier's; the last column is all True) where ``correct`` is expected: then help is 0 and harm is disagreement
(:func:`disagreement_loss` is :func:`accuracy_loss` of it).

**Upper confidence bounds per candidate** (:func:`upper_bounds`; the test rejects the null ``E[L] > eps``
iff the bound is <= eps):

- ``"discordant"`` (the default for the accuracy claim): write ``E[L] = q (2 pi - 1)`` with
  ``q = p_harm + p_help`` (the rate of discordant examples, D of n observed) and ``pi = p_harm / q``. Given D,
  the harm count is exactly Binomial(D, pi) (a McNemar-type conditional law), so ``pi <= pi_U``, the one-sided
  Clopper-Pearson bound at level ``delta - gamma`` from (harm, D), fails with probability <= delta - gamma;
  ``q <= q_U``, the Clopper-Pearson bound at level ``gamma = delta / 4`` from (D, n), fails with probability
  <= gamma. When both hold, ``E[L] <= max(q_U (2 pi_U - 1), 0)``. It uses both counts and their
  exclusivity, so it certifies far fewer escalations than the harm bound when the lower tier is often right
  where the last tier is wrong.
- ``"harm"`` (the default, and the exact bound, for the disagreement claim, where help is always 0):
  ``UCB_delta(p_harm)`` (Clopper-Pearson), valid because ``L <= harm``.

**Fixed-sequence testing** (:func:`fixed_sequence`). Candidates are tested at level delta in an order fixed
before seeing the data; testing stops at the first failure and every candidate before it is accepted. For
the common-threshold family the order is ``lam`` ascending over the continuum (escalate everything first: loss
exactly 0, accepted without a test), so the last-tier share never increases along it.

*Proof.* Let ``T`` be the set of ``lam`` whose population loss exceeds eps and ``lam0 = inf T`` (fixed: a
property of the population). Accepting any ``lam`` in ``T`` needs every earlier candidate accepted, ``lam0``
among them (the table's counts are constant between consecutive data values, so testing the table's
candidates is testing the continuum). Hence ``P(accept some lam in T) <= P(accept lam0) <= delta``: one
test at level delta, no multiplicity correction. The same holds for any order fixed independently of the
fit data (e.g. by another split).

*Every accepted candidate holds at once.* On the event that the bound holds at the first candidate whose loss
exceeds eps (probability >= 1 - delta), that candidate fails, so every candidate accepted before it has loss
<= eps: the fit may choose among the accepted ones by any rule afterwards (the cheapest, say) without losing
the guarantee (:func:`accepted_prefix`). Orders other than ``lam`` ascending, e.g. the per-stage sequences of
:mod:`calibration.family`, fixed on a separate part of the data, are covered by the same argument.

**Several targets at once** (certified per-request levels, :func:`calibration.fit.fit_levels`): L targets
``eps_l``, each with its own sequence (fixed before the data that tests it), each tested at ``delta / L``
(Bonferroni). Level l fails only if the first candidate of its sequence with loss above ``eps_l`` was
accepted, probability <= ``delta / L``; the union of the L failure events has probability <= delta. So with
probability >= 1 - delta every level holds at the same time, which is what a deployment serving requests at
several levels needs (each level alone holds with probability >= 1 - delta / L).

*What the order leaves on the table* (``python -m eval.sequences``, synthetic two-tier draws, 5% at 90%): with
a bound that grows monotonically along the sequence (harm; disagreement with two tiers) nothing: the first
failure is the last possible accept. With the discordant bound the bound is a noisy walk, and fixed-sequence
stops at its first excursion above eps. The smallest share whose bound is <= eps anywhere (picking it reuses
the noise and voids the guarantee) is 29 points lower at n = 150 and 13 points at n = 300 when the two tiers
are equally accurate and the signal is weak, 0.5 to 11 points lower in the other settings at n <= 300, and
at most 1.1 points at n >= 1,000.
Coarse grids of 20 shares and four sequences with the level split between them, even placed with
independent data, certified more escalation than the continuum sequence in nearly every setting, not less.
What does certify less at the same confidence is splitting the level between the sequences of several
*measures* and keeping the one that certifies the least escalation
(:func:`calibration.fit.fit_quality_measures`), where a measure chosen by AUC on the same data had to be
tested at the same split level anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from cascade.errors import InvalidRequestError

__all__ = [
    "CLAIMS",
    "Bound",
    "Claim",
    "LossIndicators",
    "accepted_prefix",
    "accuracy_loss",
    "check_agreement",
    "claim_text",
    "cp_upper",
    "default_bound",
    "disagreement_loss",
    "fixed_sequence",
    "upper_bounds",
]

Bound = Literal["discordant", "harm"]
Claim = Literal["accuracy", "disagreement"]

#: The two claims a quality certificate makes, in words (see the module docstring).
CLAIMS: dict[str, str] = {
    "accuracy": "accuracy loss against always using the last tier",
    "disagreement": "share of answers that differ from the last tier's (label-free; it bounds the accuracy "
                    "loss against the last tier for any labels)",
}

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True, eq=False)
class LossIndicators:
    """What counts as a loss or a gain when tier j answers example i, against always using the last tier.

    Attributes:
        harm: ``(n, N)`` bool, the answer costs quality (last column False).
        help: ``(n, N)`` bool, the answer gains quality (last column False; never together with ``harm``).
        name: the claim the loss belongs to (``"accuracy"`` or ``"disagreement"``).
    """

    harm: BoolArray
    help: BoolArray
    name: str = "accuracy"

    def __post_init__(self) -> None:
        h, g = np.asarray(self.harm), np.asarray(self.help)
        if h.ndim != 2 or h.shape != g.shape or h.dtype != np.bool_ or g.dtype != np.bool_:
            raise InvalidRequestError(f"harm and help must be boolean (n, N) arrays, got {h.shape}, {g.shape}")
        if (h & g).any() or h[:, -1].any() or g[:, -1].any():
            raise InvalidRequestError("harm and help must be exclusive and False for the last tier")

    def subset(self, idx: npt.ArrayLike) -> LossIndicators:
        """The indicators of the examples at ``idx``."""
        i = np.asarray(idx, dtype=np.int64)
        return LossIndicators(self.harm[i], self.help[i], self.name)


def accuracy_loss(correct: npt.ArrayLike) -> LossIndicators:
    """The labelled loss: harm = wrong where the last tier is right, help = right where it is wrong.

    Args:
        correct: ``(n, N)`` bool, whether tier j's answer to example i is right.
    """
    c = np.asarray(correct, dtype=np.bool_)
    last = c[:, -1:]
    return LossIndicators(~c & last, c & ~last, "accuracy")


def disagreement_loss(agreement: npt.ArrayLike) -> LossIndicators:
    """The label-free loss: harm = the answer differs from the last tier's, help never.

    Args:
        agreement: ``(n, N)`` bool, whether tier j's answer to example i is the same as the last tier's (the
            last column all True).

    Raises:
        InvalidRequestError: the last column is not all True.
    """
    a = np.asarray(agreement, dtype=np.bool_)
    check_agreement(a)
    return LossIndicators(~a, np.zeros_like(a), "disagreement")


def default_bound(claim: str) -> Bound:
    """``"discordant"`` for the accuracy claim, ``"harm"`` (exact, help being 0) for the disagreement claim."""
    if claim not in CLAIMS:
        raise InvalidRequestError(f"unknown claim {claim!r}; use one of {sorted(CLAIMS)}")
    return "harm" if claim == "disagreement" else "discordant"


def claim_text(claim: str) -> str:
    """What a certificate of ``claim`` bounds, in words."""
    if claim not in CLAIMS:
        raise InvalidRequestError(f"unknown claim {claim!r}; use one of {sorted(CLAIMS)}")
    return CLAIMS[claim]


def check_agreement(agreement: npt.NDArray[np.bool_]) -> None:
    """Raise InvalidRequestError unless the last column (the last tier against itself) is all True."""
    if agreement.ndim != 2 or not bool(agreement[:, -1].all()):
        raise InvalidRequestError("an agreement matrix needs the last tier to agree with itself (last column True)")


def cp_upper(k: npt.ArrayLike, n: npt.ArrayLike, alpha: float) -> FloatArray:
    """One-sided Clopper-Pearson upper bounds at level 1 - alpha for k successes of n trials (1 when k == n).

    ``k`` and ``n`` broadcast against each other (the result is flat); the beta quantile is computed once per
    distinct (k, n) pair.
    """
    from scipy.stats import beta

    pairs = np.stack(np.broadcast_arrays(np.asarray(k), np.asarray(n)), axis=-1).reshape(-1, 2)
    u, inv = np.unique(pairs, axis=0, return_inverse=True)
    out = np.ones(len(u))
    m = u[:, 0] < u[:, 1]
    out[m] = beta.ppf(1.0 - alpha, u[m, 0] + 1, u[m, 1] - u[m, 0])
    return np.asarray(out[inv.ravel()], dtype=np.float64)


def upper_bounds(harmed: npt.ArrayLike, helped: npt.ArrayLike, n: int, delta: float,
                 bound: Bound = "discordant") -> FloatArray:
    """Upper confidence bound of each candidate's loss ``E[L] = p_harm - p_help`` at level 1 - delta.

    The bounds (``"discordant"``, ``"harm"``) and why they hold are in the module docstring.

    Args:
        harmed: ``(P,)`` int, harm counts of P candidates on the same n examples (or any shape: flattened).
        helped: ``(P,)`` int, their help counts (0 for the disagreement claim).
        n: number of examples.
        delta: allowed probability of a bound below the true loss, per candidate, in (0, 1).
        bound: ``"discordant"`` or ``"harm"``.

    Returns:
        ``(P,)`` upper bounds (0 for a candidate whose bound is negative).
    """
    h = np.asarray(harmed, dtype=np.int64)
    if bound == "harm":
        return cp_upper(h, n, delta)
    if bound != "discordant":
        raise InvalidRequestError(f"bound must be 'discordant' or 'harm', got {bound!r}")
    discordant = h + np.asarray(helped, dtype=np.int64)
    pi_u = cp_upper(h, discordant, 0.75 * delta)
    return np.asarray(np.maximum(cp_upper(discordant, n, 0.25 * delta) * (2.0 * pi_u - 1.0), 0.0), dtype=np.float64)


def fixed_sequence(upper: npt.ArrayLike, eps: float) -> int:
    """Fixed-sequence testing: the index of the last candidate accepted before the first failure.

    Args:
        upper: ``(P,)`` upper bounds in testing order; index 0 is always the last tier (accepted untested).
        eps: the target, accepted where ``upper <= eps``.
    """
    passed = np.asarray(upper, dtype=np.float64) <= eps
    if passed.ndim != 1 or passed.size < 1:
        raise InvalidRequestError("fixed_sequence needs a 1-D sequence of at least one bound")
    passed[0] = True
    fails = np.flatnonzero(~passed)
    return int(fails[0] - 1) if fails.size else len(passed) - 1


def accepted_prefix(harmed: npt.ArrayLike, helped: npt.ArrayLike, n: int, eps: float, delta: float,
                    bound: Bound = "discordant") -> tuple[int, FloatArray]:
    """Fixed-sequence test of one target: how far along the sequence every candidate is certified.

    On the event that the bound holds at the first candidate whose true loss exceeds eps (probability >=
    1 - delta), that candidate fails its test, so *every* candidate of the returned prefix has loss <= eps at
    once: any of them may be chosen afterwards, by any rule (the cheapest, say), without losing the guarantee.

    Returns:
        ``(stop, upper)``: candidates ``0..stop`` are certified; the ``(P,)`` bounds at level delta.
    """
    upper = upper_bounds(harmed, helped, n, delta, bound)
    return fixed_sequence(upper, eps), upper
