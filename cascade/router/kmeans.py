"""k-means with k-means++ initialisation, in numpy: seeded and deterministic.

Same data, same ``k`` and same seed give the same centroids, bit for bit, on any machine with the same
numpy: all randomness comes from one ``numpy.random.Generator`` and ties are broken by the lowest index.

Why not a library: determinism needs more than a seed here. A router file must be a function of (prompts,
``k``, seed) alone, in one call, also when a small corpus repeats prompts. ``scipy.cluster.vq.kmeans2`` (scipy
is installed) has no restarts, and when an initialisation leaves a cluster empty (always, with fewer distinct
points than ``k``, where its k-means++ seeding also divides by zero) it warns or raises and asks to be re-run
with another initialisation. Here an empty cluster is re-seeded at the farthest point, and the best of
``n_init`` seeded runs is kept. scikit-learn's ``KMeans`` does both but is not a dependency of the library (a
large one, for about 100 lines).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cascade.errors import InvalidRequestError

__all__ = ["KMeansResult", "assign", "kmeans"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class KMeansResult:
    """A fitted clustering.

    Attributes:
        centroids: ``(k, D)`` cluster centres.
        labels: ``(N,)`` cluster of each training point.
        inertia: sum of squared distances of the points to their centres.
        n_iter: Lloyd iterations of the best run.
    """

    centroids: FloatArray
    labels: IntArray
    inertia: float
    n_iter: int


def _sq_dist(x: FloatArray, centroids: FloatArray) -> FloatArray:
    """Squared Euclidean distances, ``(N, D) x (k, D) -> (N, k)``, clipped at 0 against rounding."""
    d: FloatArray = (x * x).sum(1)[:, None] - 2.0 * x @ centroids.T + (centroids * centroids).sum(1)[None, :]
    out: FloatArray = np.maximum(d, 0.0)
    return out


def assign(x: npt.ArrayLike, centroids: npt.ArrayLike) -> IntArray:
    """Nearest centroid of each point (lowest index on ties).

    Args:
        x: ``(N, D)`` points.
        centroids: ``(k, D)`` centres.

    Returns:
        ``(N,)`` cluster ids.
    """
    xa, ca = np.asarray(x, dtype=np.float64), np.asarray(centroids, dtype=np.float64)
    if xa.ndim != 2 or ca.ndim != 2 or xa.shape[1] != ca.shape[1]:
        raise InvalidRequestError(f"cannot assign points of shape {xa.shape} to centroids of shape {ca.shape}")
    labels: IntArray = np.argmin(_sq_dist(xa, ca), axis=1).astype(np.int64)
    return labels


def _plus_plus(x: FloatArray, k: int, rng: np.random.Generator) -> FloatArray:
    """k-means++ seeding: each new centre drawn with probability proportional to squared distance."""
    n = x.shape[0]
    centres = [int(rng.integers(n))]
    closest = _sq_dist(x, x[centres])[:, 0]
    for _ in range(1, k):
        total = float(closest.sum())
        if total <= 0.0:  # fewer distinct points than k: pick any point not chosen yet
            rest = np.setdiff1d(np.arange(n), np.array(centres))
            nxt = int(rest[0])
        else:
            nxt = int(np.searchsorted(np.cumsum(closest), rng.random() * total, side="right"))
            nxt = min(nxt, n - 1)
        centres.append(nxt)
        closest = np.minimum(closest, _sq_dist(x, x[[nxt]])[:, 0])
    return x[centres].copy()


def _lloyd(x: FloatArray, centroids: FloatArray, max_iter: int, tol: float) -> tuple[FloatArray, IntArray, float, int]:
    k = centroids.shape[0]
    labels = np.zeros(x.shape[0], dtype=np.int64)
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 (the count is reported)
        dist = _sq_dist(x, centroids)
        labels = np.argmin(dist, axis=1).astype(np.int64)
        new = np.zeros_like(centroids)
        counts = np.bincount(labels, minlength=k)
        np.add.at(new, labels, x)
        empty = counts == 0
        new[~empty] /= counts[~empty, None]
        if empty.any():  # re-seed an empty cluster at the point farthest from its centre
            far = np.argsort(-dist[np.arange(x.shape[0]), labels], kind="stable")
            new[empty] = x[far[: int(empty.sum())]]
        shift = float(((new - centroids) ** 2).sum())
        centroids = new
        if shift <= tol:
            break
    dist = _sq_dist(x, centroids)
    labels = np.argmin(dist, axis=1).astype(np.int64)
    inertia = float(dist[np.arange(x.shape[0]), labels].sum())
    return centroids, labels, inertia, n_iter


def kmeans(x: npt.ArrayLike, k: int, *, seed: int = 0, n_init: int = 4, max_iter: int = 100,
           tol: float = 1e-8) -> KMeansResult:
    """Cluster ``x`` into ``k`` groups: best of ``n_init`` k-means++ seeded Lloyd runs.

    Args:
        x: ``(N, D)`` finite points, N >= k.
        k: number of clusters, >= 1.
        seed: seed of the only random generator used.
        n_init: independent restarts; the lowest inertia wins (the first on ties).
        max_iter: Lloyd iterations per run at most.
        tol: stop when the squared centroid shift is at most this.

    Raises:
        InvalidRequestError: bad shapes, non-finite values, or k out of range.
    """
    xa = np.asarray(x, dtype=np.float64)
    if xa.ndim != 2 or xa.shape[0] == 0:
        raise InvalidRequestError(f"k-means needs a non-empty (N, D) array, got shape {xa.shape}")
    if not np.isfinite(xa).all():
        raise InvalidRequestError("k-means input has NaN or infinite values")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= xa.shape[0]:
        raise InvalidRequestError(f"k must be an integer in [1, {xa.shape[0]}], got {k!r}")
    if n_init < 1 or max_iter < 1:
        raise InvalidRequestError("n_init and max_iter must be >= 1")
    rng = np.random.default_rng(seed)
    best: KMeansResult | None = None
    for _ in range(n_init):
        centroids, labels, inertia, n_iter = _lloyd(xa, _plus_plus(xa, k, rng), max_iter, tol)
        if best is None or inertia < best.inertia:
            best = KMeansResult(centroids, labels, inertia, n_iter)
    assert best is not None
    return best
