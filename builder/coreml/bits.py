"""Sub-byte indices packed as Core ML stores them: element i in bits [i*n, (i+1)*n) of a little-endian
bit stream (least significant bit first), the layout of coremltools' `pack_elements_into_bits`.

coremltools packs and unpacks through `np.unpackbits`, one byte per bit: eight bytes of temporaries
per element and several passes over them, most of a full-size UNet's palettization and read-back.
Eight n-bit elements fill exactly n bytes, so here each group of eight is one 64-bit word built or
split with shifts, which gives the same bytes.
"""

from __future__ import annotations

import numpy as np

_GROUP = 8  # elements per group: 8 * nbits bits = nbits whole bytes


def pack(elements: np.ndarray, nbits: int) -> np.ndarray:
    """Unsigned `elements` (each below 2**nbits) packed into uint8, as `pack_elements_into_bits`."""
    flat = np.asarray(elements).reshape(-1)
    groups = -(-flat.size // _GROUP)
    padded = np.zeros(groups * _GROUP, np.uint64)
    padded[: flat.size] = flat
    columns = padded.reshape(groups, _GROUP)
    words = columns[:, 0].copy()
    for position in range(1, _GROUP):
        words |= columns[:, position] << np.uint64(position * nbits)
    packed = words.astype("<u8").view(np.uint8).reshape(groups, _GROUP)[:, :nbits].reshape(-1)
    return packed[: -(-flat.size * nbits // 8)]


def unpack(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """The first `count` elements of `packed` as uint8, as `restore_elements_from_packed_bits`."""
    groups = -(-count // _GROUP)
    rows = np.zeros((groups, _GROUP), np.uint8)
    data = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)[: groups * nbits]
    padded = np.zeros(groups * nbits, np.uint8)
    padded[: data.size] = data
    rows[:, :nbits] = padded.reshape(groups, nbits)
    words = rows.view("<u8").reshape(groups)
    mask = np.uint64((1 << nbits) - 1)
    elements = np.empty((groups, _GROUP), np.uint8)
    for position in range(_GROUP):
        elements[:, position] = (words >> np.uint64(position * nbits)) & mask
    return elements.reshape(-1)[:count]
