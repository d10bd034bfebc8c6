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

Three more changes lower the peak memory (SD 2.1 base UNet: 5.5 to 3.8 GiB) without changing the
program. Without them every float32 weight stays alive to the end: the TorchScript module holds it
(the MIL consts are views of its tensors), and removed MIL ops and vars form reference cycles that
only a full garbage collection frees; meanwhile the float16 cast pass adds a float16 copy of each.

- Each float32 weight enters MIL as its own copy and the torch tensor is emptied after its last
  reader; the TorchScript module is never run again after that. The finished frontend's cycles
  (its context names every var) are collected once.
- When the cast pass has moved the last user of a float32 const onto its float16 cast, that cast is
  folded into a const at once, exactly as `const_elimination` does it later (same name, same place, same
  value), the float32 const is removed, and its array is dropped from the removed op (the pass's
  snapshot of the block still references it), so float32 and float16 copies do not pile up.

One change saves writing the weights twice more: the converter writes them to a temporary folder,
then copies them into the package (and `MLModel.save` would copy the package again). The package
is created with an empty weights folder and the weight files are moved in; the converter's
temporary folder is on the output's filesystem (the engine points TMPDIR at the stage's work
folder), so that is a rename. The package's manifest lists folders, not file contents, so it is the
same package.

`tests/test_convert_speedups.py` converts the same module with and without these and compares the
packages.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from builder.coreml.package import WEIGHTS_DIR

_FP16_MAX = 65504


def fits_fp16_for_certain(value: np.ndarray) -> bool:
    """True when every element is within +-65504 (False for NaN, infinities or larger values)."""
    if value.size == 0:
        return True
    return bool(max(value.max(), -value.min()) <= _FP16_MAX)


@contextmanager
def faster_conversion() -> Iterator[None]:
    """Within this block, coremltools converts with the two shortcuts above; restored on exit."""
    import torch
    from coremltools.converters.mil.frontend.torch import load as torch_load
    from coremltools.converters.mil.frontend.torch.converter import TorchConverter
    from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision
    from coremltools.converters.mil.mil.program import Program
    from coremltools.models import model as ct_model

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

    library_load = torch_load.load
    library_create_package = ct_model._create_mlpackage
    library_transform = FP16ComputePrecision.transform_op
    library_convert_const = TorchConverter.convert_const
    library_add_const = TorchConverter._add_const

    def transform_op(self, op) -> None:
        block = op.enclosing_block  # the pass builds in this block (its context is entered)
        weights = [var for var in _const_inputs(op) if var.is_tensor_or_scalar_of(dtype="fp32")]
        library_transform(self, op)
        for var in weights:
            _fold_last_cast(var, block)

    def convert_const(self) -> None:
        # A tensor object can appear under several names; it is released after its last one.
        self._sdbuild_readers = Counter(id(val) for val in self.graph.params.values() if _releasable(val))
        library_convert_const(self)

    def add_const(self, name, val) -> None:
        readers = getattr(self, "_sdbuild_readers", None)
        if readers is None or not _releasable(val) or self._has_compression_info(name):
            return library_add_const(self, name, val)
        library_add_const(self, name, val.detach().clone())
        readers[id(val)] -= 1
        if readers[id(val)] == 0:
            # Points the tensor (shared with the module's parameter) at an empty storage; the old one
            # is freed once no other tensor uses it. Storages loaded by torch.jit.load cannot be resized.
            val.data = torch.empty(0, dtype=val.dtype)

    FP16ComputePrecision.fp16_overflow = staticmethod(fp16_overflow)
    Program.validate = validate

    def load(*args, **kwargs):
        program = library_load(*args, **kwargs)
        # The finished frontend's converter and context (which name every var) form reference cycles
        # that would keep the float32 consts alive through the whole pipeline.
        gc.collect()
        return program

    def create_package(proto_spec, weights_dir=None, package_path=None) -> str:
        if weights_dir is None:
            return library_create_package(proto_spec, weights_dir, package_path)
        with tempfile.TemporaryDirectory() as empty:
            package_path = library_create_package(proto_spec, empty, package_path)
        for name in os.listdir(weights_dir):
            shutil.move(os.path.join(weights_dir, name), os.path.join(package_path, WEIGHTS_DIR, name))
        return package_path

    torch_load.load = load
    ct_model._create_mlpackage = create_package
    FP16ComputePrecision.transform_op = transform_op
    TorchConverter.convert_const = convert_const
    TorchConverter._add_const = add_const
    try:
        yield
    finally:
        FP16ComputePrecision.fp16_overflow = library_overflow
        Program.validate = library_validate
        torch_load.load = library_load
        ct_model._create_mlpackage = library_create_package
        FP16ComputePrecision.transform_op = library_transform
        TorchConverter.convert_const = library_convert_const
        TorchConverter._add_const = library_add_const


def _releasable(val) -> bool:
    """A plain float32 CPU tensor: its values are copied into MIL, so its storage can go."""
    import torch

    return (
        isinstance(val, torch.Tensor)
        and val.dtype == torch.float32
        and not val.is_quantized
        and val.device.type == "cpu"
    )


def _const_inputs(op) -> list:
    found = []
    for inputs in op.inputs.values():
        for var in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
            if var.op is not None and var.op.op_type == "const" and var not in found:
                found.append(var)
    return found


def _fold_last_cast(var, block) -> None:
    """If const `var` of `block` now feeds only one cast with a known value, do what const_elimination would.

    That pass replaces the cast by `const(val=cast output, name=cast output's name)` placed before the
    cast and renames the dropped output; dead-code elimination then removes the cast and `var`.
    Only within the block whose context the pass has entered (consts used across blocks are left alone).
    """
    from coremltools.converters.mil import Builder as mb

    if var.op is None or var.op.enclosing_block is not block or len(var.child_ops) != 1 or var in block.outputs:
        return
    (cast,) = var.child_ops
    if cast.op_type != "cast" or cast.enclosing_block is not block:
        return
    (output,) = cast.outputs
    if not output.can_be_folded_to_const():
        return
    folded = mb.const(val=output.val, before_op=cast, name=output.name)
    if not block.try_replace_uses_of_var_after_op(anchor_op=cast, old_var=output, new_var=folded):
        block.remove_ops([folded.op])
        return
    output.set_name(output.name + "_ignored")
    const = var.op
    block.remove_ops([cast, const])
    # The pass's snapshot of the block still holds the removed ops, and ops and vars form reference
    # cycles, so the float32 array would outlive the pass; drop it from the removed const now.
    for holder in (var, *const.internal_inputs.values()):
        holder._sym_val = None
