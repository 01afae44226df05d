"""``cascade demo``: the embedded cascade on bundled SST-2 reviews, against each tier alone.

Every bundled request is a plain question with the two allowed answers (``choices``), answered by the
cascade with its shipped thresholds; the summary states the share of requests sent to the large tier, the
accuracy, and the cost against always asking the large tier (each tier alone answers the same requests the
way the cascade's tiers do, with their choice priors), and what the shipped thresholds were fitted for.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

__all__ = ["DEMO_DATA", "demo_examples", "run_demo", "target_text"]

#: The bundled demo requests (a file of ``cascade/data``).
DEMO_DATA = "demo_sst2.jsonl"
_BATCH = 16


def demo_examples(limit: int | None = None) -> list[dict[str, Any]]:
    """The bundled requests: ``id``, ``messages``, ``choices`` and the gold ``answer``."""
    text = resources.files("cascade").joinpath(f"data/{DEMO_DATA}").read_text("utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def target_text(artifact: Any) -> str:
    """What the thresholds were fitted for, in one sentence (from the artifact's method and parameters)."""
    if artifact is None:
        return "hand-set thresholds"
    p = artifact.params
    if artifact.method == "quality":
        head = (f"accuracy loss <= {p['max_quality_loss']:.0%} against always-large with "
                f"{1 - p['delta']:.0%} confidence")
    elif artifact.method == "budget":
        head = f"at most {p['max_large_share']:.0%} of requests sent to the large tier"
    else:
        head = f"{artifact.method} fit"
    held = p.get("held_out")
    tail = ""
    if isinstance(held, Mapping):
        tail = (f"; on {held['n']} held-out examples: {held['large_share']:.1%} escalated, accuracy "
                f"{held['accuracy']:.3f} vs {held['large_accuracy']:.3f} always-large")
    return f"{head}, fitted on {artifact.n} labelled examples{tail}"


async def _alone(cascade: Any, level: int, prompts: Sequence[Any], choices: Sequence[Sequence[str] | None]
                 ) -> list[Any]:
    """Tier ``level``'s answers to every request, as the cascade's tier would give them (prior included)."""
    from cascade.choice_prior import apply_prior

    tier = cascade.tiers[level]
    out = []
    for start in range(0, len(prompts), _BATCH):
        batch, lists = prompts[start : start + _BATCH], choices[start : start + _BATCH]
        if all(c is not None for c in lists):
            gens = await tier.backend.choose(batch, lists, scores=False, length_normalize=cascade.length_normalize)
        else:
            gens = await tier.backend.generate(batch, cascade.params, scores=False)
        for g, c in zip(gens, lists):
            offsets = cascade.policy.prior_for(level, c) if c is not None and g.choice_logprobs else None
            out.append(apply_prior(g, c, offsets) if c is not None and offsets is not None else g)
    return out


async def run_demo(cascade: Any, examples: Sequence[Mapping[str, Any]], scorer: Any, *, compare: bool = True,
                   progress: Any = None) -> dict[str, float]:
    """Answer the examples with the cascade (and each tier alone with ``compare``); print the table and summary.

    Returns:
        The summary numbers (``accuracy``, ``escalated``, ``cost``, and with ``compare`` ``small_accuracy``,
        ``large_accuracy``, ``large_cost``).
    """
    prompts = [e.get("messages") or e["prompt"] for e in examples]
    choices = [e.get("choices") for e in examples]
    results = []
    async with cascade:
        for start in range(0, len(prompts), _BATCH):
            results.extend(await cascade.run_batch(prompts[start : start + _BATCH],
                                                   choices=choices[start : start + _BATCH]))
            if progress is not None:
                progress(len(prompts[start : start + _BATCH]))
        print(f"\n{'id':<16} {'label':<9} {'tier':<6} {cascade.measure:>14} {'thresh':>7}  ok  answer")
        for e, r in zip(examples, results):
            print(f"{e['id']:<16} {e['answer']:<9} {r.tier:<6} {r.uncertainty:>14.4f} {r.threshold:>7.4f}  "
                  f"{'✓' if scorer(r.text, e) else '✗'}   {r.text[:40]!r}")
        n = len(examples)
        out = {"accuracy": sum(scorer(r.text, e) for e, r in zip(examples, results)) / n,
               "escalated": sum(r.escalated for r in results) / n, "cost": sum(r.cost for r in results)}
        art = getattr(cascade.policy, "artifact", None)
        print(f"\nshipped thresholds ({cascade.measure}): {target_text(art)}")
        print(f"cascade on these {n} requests: accuracy {out['accuracy']:.3f}, {out['escalated']:.1%} sent to "
              f"{cascade.tiers[-1].name!r}, cost {out['cost']:.3e}")
        if compare:
            small = await _alone(cascade, 0, prompts, choices)
            large = await _alone(cascade, len(cascade.tiers) - 1, prompts, choices)
            price = cascade.tiers[-1].price
            out.update(small_accuracy=sum(scorer(g.text, e) for g, e in zip(small, examples)) / n,
                       large_accuracy=sum(scorer(g.text, e) for g, e in zip(large, examples)) / n,
                       large_cost=sum(price.cost(g.prompt_tokens, g.completion_tokens) for g in large))
            print(f"{cascade.tiers[0].name!r} alone: accuracy {out['small_accuracy']:.3f}; {cascade.tiers[-1].name!r} "
                  f"alone: accuracy {out['large_accuracy']:.3f}, cost {out['large_cost']:.3e}")
            if out["large_cost"] > 0:
                print(f"the cascade costs {out['cost'] / out['large_cost']:.1%} of always-large, with "
                      f"{100 * (out['accuracy'] - out['large_accuracy']):+.1f} points of accuracy against it")
    sys.stdout.flush()
    return out
