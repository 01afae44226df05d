"""Certifying a quality target: what a certificate bounds, each candidate's upper bound, and the test sequence.

Every quality fit shares these pieces (:func:`calibration.fit.fit_quality`, and any family of threshold
candidates for N tiers): it evaluates a table of candidates on the fit data (harm and help counts per
candidate, see :class:`calibration.fit.Candidates`), bounds each candidate's loss with :func:`upper_bounds`,
and accepts candidates in a sequence fixed before the data were seen with :func:`fixed_sequence`.

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
tier's; the last column is all True) where ``correct`` is expected: then help is 0 and harm is disagreement.

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

from typing import Literal

import numpy as np
import numpy.typing as npt

from cascade.errors import InvalidRequestError

__all__ = [
    "CLAIMS",
    "Bound",
    "Claim",
    "check_agreement",
    "claim_text",
    "cp_upper",
    "default_bound",
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

    ``k`` and ``n`` broadcast against each other; the beta quantile is computed once per distinct (k, n) pair.
    """
    from scipy.stats import beta

    pairs = np.stack(np.broadcast_arrays(np.asarray(k), np.asarray(n)), axis=-1).reshape(-1, 2)
    u, inv = np.unique(pairs, axis=0, return_inverse=True)
    out = np.ones(len(u))
    m = u[:, 0] < u[:, 1]
    out[m] = beta.ppf(1.0 - alpha, u[m, 0] + 1, u[m, 1] - u[m, 0])
    return np.asarray(out[inv.ravel()], dtype=np.float64)


def upper_bounds(harmed: npt.ArrayLike, helped: npt.ArrayLike, n: int, delta: float, bound: Bound) -> FloatArray:
    """Upper confidence bound of each candidate's loss at level 1 - delta (see the module docstring).

    Args:
        harmed: ``(P,)`` harm counts; helped: ``(P,)`` help counts (0 for the disagreement claim).
        n: examples per candidate.
        delta: the level of each test, in (0, 1).
        bound: ``"discordant"`` or ``"harm"``.

    Returns:
        ``(P,)`` upper bounds of ``E[L]``.
    """
    h = np.asarray(harmed, dtype=np.int64)
    if bound == "harm":
        return cp_upper(h, n, delta)
    if bound != "discordant":
        raise InvalidRequestError(f"bound must be 'discordant' or 'harm', got {bound!r}")
    discordant = h + np.asarray(helped, dtype=np.int64)
    pi_u = cp_upper(h, discordant, 0.75 * delta)
    return np.asarray(np.maximum(cp_upper(discordant, n, 0.25 * delta) * (2.0 * pi_u - 1.0), 0.0), dtype=np.float64)


def fixed_sequence(passed: npt.ArrayLike) -> int:
    """Index of the last candidate accepted by fixed-sequence testing: the one before the first failure.

    Args:
        passed: ``(P,)`` bool, whether each candidate's test passed, in test order. Candidate 0 is the safe
            start (escalate everything) and is accepted whatever its entry says.
    """
    p = np.asarray(passed, dtype=np.bool_).copy()
    if p.ndim != 1 or p.size < 1:
        raise InvalidRequestError("fixed_sequence needs a 1-D sequence of at least one test result")
    p[0] = True
    fails = np.flatnonzero(~p)
    return int(fails[0] - 1) if fails.size else len(p) - 1
