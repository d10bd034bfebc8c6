"""Exact weighted 1-D k-means, compiled with numba.

Palettization clusters each weight's distinct float16 values (at most 65,536, typically ~20,000)
into 2^nbits centroids. The optimum is found by dynamic programming over the sorted values: layer
by layer, the best cost of splitting the first j values into c clusters, whose optimal split point
is monotone in j, so each layer is solved by divide and conquer in O(n log n). Compiled, this is
exact and several times faster than coremltools' bundled solver, and it is single-threaded and
free of randomness, so results never depend on the machine.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, inline="always")
def _cost(prefix_w, prefix_s, prefix_q, start, stop):
    """Weighted sum of squared deviations of values[start:stop] from their weighted mean."""
    w = prefix_w[stop] - prefix_w[start]
    if w <= 0.0:
        return 0.0
    s = prefix_s[stop] - prefix_s[start]
    cost = (prefix_q[stop] - prefix_q[start]) - s * s / w
    return cost if cost > 0.0 else 0.0


@njit(cache=True, nogil=True)  # nogil: weights cluster in parallel threads
def _solve(values, weights, k):
    n = values.shape[0]
    prefix_w = np.zeros(n + 1)
    prefix_s = np.zeros(n + 1)
    prefix_q = np.zeros(n + 1)
    for i in range(n):
        prefix_w[i + 1] = prefix_w[i] + weights[i]
        prefix_s[i + 1] = prefix_s[i] + weights[i] * values[i]
        prefix_q[i + 1] = prefix_q[i] + weights[i] * values[i] * values[i]

    previous = np.empty(n + 1)
    for j in range(n + 1):
        previous[j] = _cost(prefix_w, prefix_s, prefix_q, 0, j)
    splits = np.zeros((k, n + 1), dtype=np.int64)
    current = np.empty(n + 1)
    # Explicit stack of (lo, hi, opt_lo, opt_hi) ranges for the divide and conquer.
    stack = np.empty((64 + 2 * n, 4), dtype=np.int64)
    for c in range(1, k):
        current[:] = np.inf
        top = 0
        stack[0, 0], stack[0, 1], stack[0, 2], stack[0, 3] = c, n, c - 1, n - 1
        top = 1
        while top > 0:
            top -= 1
            lo, hi, opt_lo, opt_hi = stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3]
            if lo > hi:
                continue
            mid = (lo + hi) // 2
            best, best_i = np.inf, opt_lo
            last = min(mid - 1, opt_hi)
            for i in range(opt_lo, last + 1):
                candidate = previous[i] + _cost(prefix_w, prefix_s, prefix_q, i, mid)
                if candidate < best:
                    best, best_i = candidate, i
            current[mid] = best
            splits[c, mid] = best_i
            stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3] = lo, mid - 1, opt_lo, best_i
            stack[top + 1, 0], stack[top + 1, 1], stack[top + 1, 2], stack[top + 1, 3] = mid + 1, hi, best_i, opt_hi
            top += 2
        previous[:] = current

    centroids = np.empty(k)
    stop = n
    for c in range(k - 1, -1, -1):
        start = splits[c, stop] if c > 0 else 0
        w = prefix_w[stop] - prefix_w[start]
        centroids[c] = (prefix_s[stop] - prefix_s[start]) / w
        stop = start
    return centroids


def weighted_kmeans_1d(values: np.ndarray, weights: np.ndarray, k: int) -> np.ndarray:
    """Centroids (ascending) minimising the weighted squared error of `values` (sorted, distinct).

    With k or fewer distinct values every value is its own centroid.
    """
    values = np.ascontiguousarray(values, dtype=np.float64)
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    if values.ndim != 1 or values.shape != weights.shape or values.size == 0:
        raise ValueError("values and weights must be equal-length, non-empty 1-D arrays")
    if np.any(np.diff(values) <= 0):
        raise ValueError("values must be sorted and distinct")
    if values.size <= k:
        return values.copy()
    return _solve(values, weights, k)
