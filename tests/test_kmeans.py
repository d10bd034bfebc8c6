"""The exact 1-D k-means against exhaustive search: on small inputs every split of the sorted values
into k contiguous groups is tried (an optimal 1-D clustering is always contiguous)."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest

from builder.coreml.kmeans import weighted_kmeans_1d


def _cost(values: np.ndarray, weights: np.ndarray, centroids: np.ndarray) -> float:
    """Weighted squared error with each value at its nearest centroid."""
    nearest = np.abs(values[:, None] - centroids[None, :]).min(axis=1)
    return float((weights * nearest**2).sum())


def _best_by_exhaustion(values: np.ndarray, weights: np.ndarray, k: int) -> float:
    best = np.inf
    for cuts in combinations(range(1, values.size), k - 1):
        groups = np.split(np.arange(values.size), cuts)
        centroids = np.array([np.average(values[g], weights=weights[g]) for g in groups])
        best = min(best, _cost(values, weights, centroids))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_the_solution_is_optimal_on_small_inputs(seed):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(2, 12))
    k = int(rng.integers(1, size + 1))
    values = np.unique(rng.normal(size=size).astype(np.float16)).astype(np.float64)
    weights = rng.integers(1, 50, size=values.size).astype(np.float64)
    k = min(k, values.size)
    centroids = weighted_kmeans_1d(values, weights, k)
    assert centroids.shape == (k,) and np.all(np.diff(centroids) > 0)
    assert _cost(values, weights, centroids) == pytest.approx(
        _best_by_exhaustion(values, weights, k), rel=1e-9, abs=1e-12
    )


def test_few_values_are_their_own_centroids_and_bad_input_is_refused():
    values, weights = np.array([-1.0, 0.5, 2.0]), np.ones(3)
    assert weighted_kmeans_1d(values, weights, 4).tolist() == values.tolist()
    with pytest.raises(ValueError, match="sorted and distinct"):
        weighted_kmeans_1d(values[::-1], weights, 2)
    with pytest.raises(ValueError, match="equal-length"):
        weighted_kmeans_1d(values, np.ones(2), 2)
