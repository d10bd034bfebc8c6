"""Look-up-table maths of palettization: exact k-means over a weight's distinct values.

A weight is clustered through its histogram (distinct values and their counts), so the result is a
pure function of the values: the same bytes for any thread count, and the same table whether a
weight is palettized in a package or predicted in torch (`palettize_array`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from builder.coreml.kmeans import weighted_kmeans_1d

_FLOAT16_SIGN_ZERO = 0x8000  # bit pattern of -0.0, folded into +0.0 as np.unique would


@dataclass(frozen=True)
class Histogram:
    """Distinct values of one weight group (ascending, float64), their counts and float16 codes."""

    values: np.ndarray
    counts: np.ndarray
    codes: np.ndarray | None  # uint16 bit patterns of float16 values; None for float32


def histogram(flat: np.ndarray) -> Histogram:
    if flat.dtype == np.float16:
        counts = np.bincount(flat.view(np.uint16), minlength=1 << 16)
        counts[0] += counts[_FLOAT16_SIGN_ZERO]
        counts[_FLOAT16_SIGN_ZERO] = 0
        codes = np.flatnonzero(counts).astype(np.uint16)
        values = codes.view(np.float16).astype(np.float64)
        order = np.argsort(values, kind="stable")
        return Histogram(values[order], counts[codes[order]], codes[order])
    values, counts = np.unique(flat, return_counts=True)
    return Histogram(values.astype(np.float64), counts, None)


def centroids(values: np.ndarray, counts: np.ndarray, clusters: int) -> np.ndarray:
    """Optimal weighted 1-D k-means centres (ascending), or the values themselves if few enough."""
    return weighted_kmeans_1d(values, counts, clusters)


def lut_and_assignment(
    hist: Histogram, centres: np.ndarray, nbits: int, dtype: npt.DTypeLike
) -> tuple[np.ndarray, np.ndarray]:
    """The stored LUT, and the nearest stored entry for each distinct value.

    Assigning after rounding the centres to the LUT's dtype never does worse than keeping the
    k-means clusters, so the error is at most that of coremltools' LUT from the same centres.
    """
    lut = np.zeros(1 << nbits, dtype)
    lut[: len(centres)] = centres
    if len(hist.values) <= len(lut):
        return lut, np.arange(len(hist.values), dtype=np.uint8)
    stored = lut.astype(np.float64)
    return lut, np.searchsorted((stored[1:] + stored[:-1]) / 2, hist.values).astype(np.uint8)


def indices(flat: np.ndarray, hist: Histogram, assignment: np.ndarray) -> np.ndarray:
    """Each element's LUT index, looked up through its distinct value."""
    if hist.codes is None:
        return assignment[np.searchsorted(hist.values.astype(flat.dtype), flat)]
    table = np.zeros(1 << 16, np.uint8)
    table[hist.codes] = assignment
    table[_FLOAT16_SIGN_ZERO] = table[0]
    return table[flat.view(np.uint16)]


def squared_error(hist: Histogram, lut: np.ndarray, assignment: np.ndarray) -> tuple[float, float]:
    """Sum of squared reconstruction errors and of squared values, from the histogram alone."""
    error = hist.values - lut.astype(np.float64)[assignment]
    return float(hist.counts @ error**2), float(hist.counts @ hist.values**2)


def palettize_array(weight: np.ndarray, nbits: int) -> np.ndarray:
    """`weight` as the palettizer stores it per tensor (its k-means table looked up by index).

    Used to predict compression in torch with exactly the clustering the real palettization uses.
    """
    flat = np.ascontiguousarray(weight, dtype=np.float16).reshape(-1)
    hist = histogram(flat)
    lut, assignment = lut_and_assignment(hist, centroids(hist.values, hist.counts, 1 << nbits), nbits, np.float16)
    return lut[indices(flat, hist, assignment)].reshape(weight.shape)
