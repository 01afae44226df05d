"""What one ``cascade-calibrate`` run fits on: its examples, and every tier's answers to them as arrays.

:func:`read_inputs` reads the fit and held-out examples (labelled, or for label-free calibration not) and
resolves the scorer and the function that decides when two answers are the same; :func:`measure_arrays` runs
every tier through the generation cache and returns, per uncertainty measure, the arrays a fit works on
(:mod:`calibration.metrics`): the labels, or for label-free calibration the agreement with the last tier.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calibration.pipeline import (
    Example,
    agreement_matrix,
    check_scorer,
    generate_all,
    load_examples,
    split_examples,
)
from cascade.errors import InvalidRequestError

if TYPE_CHECKING:
    from calibration.certify import Claim
    from calibration.generation_cache import TierArrays
    from cascade.combined import Combination
    from cascade.config import CascadeConfig
    from cascade.scorers import Same, Scorer
    from cascade.types import GenerationParams

__all__ = ["Arrays", "Inputs", "measure_arrays", "read_inputs", "scorer_for"]


@dataclass(frozen=True)
class Inputs:
    """The examples of one run.

    Attributes:
        data: every example of ``--data``.
        fit: the examples the thresholds are fitted on.
        test: the held-out examples (``--test-data`` or a ``--test-split`` of ``--data``), possibly none.
        split: how the held-out examples were chosen, in words.
        scorer_name: the scorer's name (``auto`` resolved).
        scorer: the scorer.
        same_name: what decides that two answers are the same (label-free and planning), or None.
        same: that function, or None.
        prior: the requests each tier's choice prior is fitted on (``--choice-prior``; answers unused), or none.
        prior_source: where they came from, in words.
    """

    data: list[Example]
    fit: list[Example]
    test: list[Example]
    split: str
    scorer_name: str
    scorer: Scorer
    same_name: str | None = None
    same: Same | None = None
    prior: list[Example] = field(default_factory=list)
    prior_source: str = ""


def read_inputs(data: str, *, scorer: str = "auto", test_data: str | None = None, test_split: float | None = None,
                seed: int = 0, same: str | None = None, label_free: bool = False, prior_data: str | None = None,
                prior_share: float | None = None) -> Inputs:
    """Read ``data`` (and ``test_data``), check the scorer on them, and split off the held-out examples.

    Args:
        data: the JSONL examples to fit on.
        scorer: scorer name (``auto``: ``choice`` when every example has choices, else ``exact``).
        test_data: a separate JSONL to check the fit on, or None.
        test_split: else hold out this share of ``data`` (seeded by ``seed``), or None.
        seed: seed of ``test_split``.
        same: what decides that two answers are the same (default: the scorer's, for a built-in scorer).
        label_free: lines may omit ``answer``; a same-answer function is then required.
        prior_data: a JSONL of requests (answers unused) to fit the choice priors on, or None.
        prior_share: else set this share of the fit examples aside for the choice priors (seeded by
            ``seed + 1``), or None: no priors.

    Raises:
        InvalidRequestError: a bad line, an unknown scorer or same-answer function, or a label-free run with a
            user scorer and no ``same``.
    """
    from cascade.scorers import get_same

    labelled = not label_free
    examples = load_examples(data, labelled=labelled)
    scorer_name, score = check_scorer(scorer, examples)
    fit_ex, test_ex, split = examples, [], "no held-out check"
    if test_data:
        test_ex = load_examples(test_data, labelled=labelled)
        check_scorer(scorer_name, test_ex)
        split = f"held-out check on {test_data}"
    elif test_split:
        fit_ex, test_ex = split_examples(examples, test_split, seed)
        split = f"seeded split (seed {seed}), {len(test_ex)} held out"
    same_name = same or (scorer_name if ":" not in scorer_name else None)
    if same_name is None and label_free:
        raise InvalidRequestError(f"--label-free with the user scorer {scorer_name!r} needs --same module:function: "
                                  "a function (answer_a, answer_b, example) -> bool saying when two answers are the "
                                  "same")
    same_fn = get_same(same_name) if same_name is not None else None
    prior: list[Example] = []
    source = ""
    if prior_data:
        prior, source = load_examples(prior_data, labelled=False), prior_data
    elif prior_share:
        fit_ex, prior = split_examples(fit_ex, prior_share, seed + 1)
        source = f"a {prior_share:g} share of the fit data set aside (seed {seed + 1})"
    return Inputs(examples, fit_ex, test_ex, split, scorer_name, score, same_name, same_fn, prior, source)


@dataclass(frozen=True)
class Arrays:
    """Every tier on every example (fit examples first), per measure.

    Attributes:
        by_measure: measure -> arrays whose ``correct`` is what the fit uses: the labels, or for
            ``--label-free`` the agreement with the last tier's answers.
        labels: ``(n, N)`` correctness under the scorer (False on unlabeled examples).
        labelled: ``(n,)`` which examples have labels.
        agreement: ``(n, N)`` agreement with the last tier, or None without a same-answer function.
        claim: ``"disagreement"`` with ``--label-free``, else ``"accuracy"``.
        priors: each tier's choice priors (tier -> choice set -> offsets), already subtracted from its
            answers, or None (:mod:`calibration.priors`).
        combination: the fitted weights of the measure ``"combined"`` (:func:`calibration.combine.combine_arrays`),
            one per lower tier, or None.
        answers: ``(n, N-1)`` object array of the lower tiers' answer texts (after the priors), or None.
    """

    by_measure: dict[str, TierArrays]
    labels: Any
    labelled: Any
    agreement: Any
    claim: Claim
    priors: dict[int, dict[str, tuple[float, ...]]] | None = None
    combination: tuple[Combination, ...] | None = None
    answers: Any = None


def measure_arrays(cfg: CascadeConfig, inputs: Inputs, params: GenerationParams, cache_dir: Path, *,
                   batch_size: int = 16, progress: bool = True, choices: bool = True,
                   label_free: bool = False) -> Arrays:
    """Every tier on every example (cached), as arrays per measure with finite scores (fit examples first).

    Examples with ``choices`` are answered with the most likely of them unless ``choices`` is False.

    Raises:
        InvalidRequestError: no measure has finite scores, or the scorer or same-answer function failed.
    """
    import numpy as np

    from calibration.generation_cache import TierArrays, tier_arrays
    from cascade.engine import Price
    from cascade.types import MEASURES

    every = inputs.fit + inputs.test
    rows = [e.data for e in inputs.prior + every]
    gens = asyncio.run(generate_all(cfg, rows, params, cache_dir, batch_size=batch_size, progress=progress,
                                    choices=choices))
    priors = None
    if inputs.prior:  # fitted on the requests set aside, subtracted from every other answer
        from calibration.priors import apply_priors, fit_priors

        k = len(inputs.prior)
        priors = fit_priors(rows[:k], [g[:k] for g in gens])
        gens = apply_priors(rows[k:], [g[k:] for g in gens], priors)
    prices = [Price(t.price_input_per_mtok, t.price_output_per_mtok) for t in cfg.tiers]
    score = scorer_for(inputs.scorer, every)
    arrays = {m: arr for m in MEASURES
              if np.isfinite((arr := tier_arrays([e.data for e in every], gens, score, m, prices)).scores).all()}
    if not arrays:
        raise InvalidRequestError("the lower tiers returned no finite uncertainty scores for any measure")
    labelled = np.array([e.labelled for e in every], dtype=np.bool_)
    labels = next(iter(arrays.values())).correct
    agreement = None if inputs.same is None else agreement_matrix(every, gens, inputs.same)
    if label_free:
        if agreement is None:
            raise InvalidRequestError("label-free arrays need a same-answer function")
        arrays = {m: TierArrays(arr.scores, agreement, arr.costs, m) for m, arr in arrays.items()}
    answers = np.array([[g.text for g in tier] for tier in gens[:-1]], dtype=object).T.reshape(len(every), -1)
    return Arrays(arrays, labels, labelled, agreement, "disagreement" if label_free else "accuracy", priors,
                  answers=answers)


def scorer_for(scorer: Any, examples: Sequence[Example]) -> Any:
    """Wrap a scorer so that its failure names the input line of the example."""
    where = {id(e.data): e for e in examples}

    def score(text: str, ex: Any) -> bool:
        if "answer" not in ex:  # an unlabeled line of label-free data: no correctness to score
            return False
        try:
            return bool(scorer(text, ex))
        except Exception as exc:
            e = where.get(id(ex))
            at = f"{e.source}:{e.line}" if e else "an example"
            raise InvalidRequestError(f"{at}: the scorer failed: {type(exc).__name__}: {exc}") from exc

    return score
