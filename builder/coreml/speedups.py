"""Faster coremltools conversions that produce the same program, byte for byte.

Two checks inside coremltools 9.0 dominate the conversion of full-size models without changing it:

- The float16 cast pass asks, per op, whether a float32 const fits float16 with
  `max(|v|[where(|v| < 1e38)]) > 65504`. `np.where` builds one int64 index array per dimension, so a
  2-D weight costs 24 bytes of temporaries per element: 21 s of a 75 s SD 2.1 text encoder
  conversion and most of its peak memory growth. `max(|v|)`, computed without temporaries, bounds
  the masked maximum from above, so when it is <= 65504 the answer is "no overflow" for certain;
  otherwise (a large value, an infinity or a NaN) the library's own check decides. Same answer
  for every input.
- The pass manager re-validates the whole program after each of its ~110 passes (a third of a
  full-size UNet conversion). Validation only reads the program and raises on an inconsistent
  one; we keep it where it matters — at the start of each pipeline (so every pipeline's result is
  checked by the next one) and after each dead-code elimination, where coremltools also checks
  scope information — and skip the rest.

`tests/test_convert_speedups.py` converts the same module with and without these and compares the
packages.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

_FP16_MAX = 65504


def fits_fp16_for_certain(value: np.ndarray) -> bool:
    """True when every element is within +-65504 (False for NaN, infinities or larger values)."""
    if value.size == 0:
        return True
    return bool(max(value.max(), -value.min()) <= _FP16_MAX)


@contextmanager
def faster_conversion() -> Iterator[None]:
    """Within this block, coremltools converts with the two shortcuts above; restored on exit."""
    from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision
    from coremltools.converters.mil.mil.program import Program

    library_overflow = FP16ComputePrecision.__dict__["fp16_overflow"]
    library_validate = Program.validate

    def fp16_overflow(op) -> bool:
        for inputs in op.inputs.values():
            for var in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
                if var.op is not None and var.op.op_type == "const" and var.is_tensor_or_scalar_of(dtype="fp32"):
                    if not fits_fp16_for_certain(np.asarray(var.op.val.val)):
                        return library_overflow.__func__(op)
        return False

    def validate(program, check_essential_scope=None) -> None:
        # The pass manager calls validate() once before a pipeline and validate(check_essential_scope=...)
        # after every pass; the latter is True right after dead-code elimination.
        if check_essential_scope is None or check_essential_scope:
            library_validate(program, check_essential_scope=bool(check_essential_scope))

    FP16ComputePrecision.fp16_overflow = staticmethod(fp16_overflow)
    Program.validate = validate
    try:
        yield
    finally:
        FP16ComputePrecision.fp16_overflow = library_overflow
        Program.validate = library_validate
