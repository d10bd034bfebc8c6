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

All seven replacements are rows of one table (`PATCHES`), checked before a conversion: a different
coremltools version, or an attribute renamed or gone, turns them all off with one warning and the
conversion runs as plain coremltools (a replacement installed over a renamed internal would
otherwise be a silent no-op). `tests/test_convert_speedups.py` converts the same module with and
without them, compares the packages, and patches and restores every row.
"""

from __future__ import annotations

import gc
import importlib
import inspect
import os
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from builder.coreml.package import WEIGHTS_DIR

_FP16_MAX = 65504


def fits_fp16_for_certain(value: np.ndarray) -> bool:
    """True when every element is within +-65504 (False for NaN, infinities or larger values)."""
    if value.size == 0:
        return True
    return bool(max(value.max(), -value.min()) <= _FP16_MAX)


@dataclass(frozen=True)
class Patch:
    """One coremltools attribute replaced during a conversion: where it lives, its name, and how to
    build the replacement from the library's own (which the replacement may call)."""

    owner: str  # "module" or "module:Class"
    attribute: str
    replacement: Callable[[Any], Any]

    def target(self) -> Any:
        module, _, cls = self.owner.partition(":")
        found = importlib.import_module(module)
        return getattr(found, cls) if cls else found

    def original(self) -> Any:
        """The attribute as stored, inherited or not (a staticmethod stays one); AttributeError if absent."""
        return inspect.getattr_static(self.target(), self.attribute)

    def owned(self) -> bool:
        """Whether the owner itself holds the attribute (restoring an inherited one removes the override)."""
        return self.attribute in vars(self.target())


TESTED_VERSION = "9.0"  # the coremltools these replacements were written against and compared with


def _fp16_overflow(library: Any) -> Any:
    def fp16_overflow(op) -> bool:
        for inputs in op.inputs.values():
            for var in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
                if var.op is not None and var.op.op_type == "const" and var.is_tensor_or_scalar_of(dtype="fp32"):
                    if not fits_fp16_for_certain(np.asarray(var.op.val.val)):
                        return library.__func__(op)
        return False

    return staticmethod(fp16_overflow)


def _validate(library: Any) -> Any:
    def validate(program, check_essential_scope=None) -> None:
        # The pass manager calls validate() once before a pipeline and validate(check_essential_scope=...)
        # after every pass; the latter is True right after dead-code elimination.
        if check_essential_scope is None or check_essential_scope:
            library(program, check_essential_scope=bool(check_essential_scope))

    return validate


def _load(library: Any) -> Any:
    def load(*args, **kwargs):
        program = library(*args, **kwargs)
        # The finished frontend's converter and context (which name every var) form reference cycles
        # that would keep the float32 consts alive through the whole pipeline.
        gc.collect()
        return program

    return load


def _create_package(library: Any) -> Any:
    def create_package(proto_spec, weights_dir=None, package_path=None) -> str:
        if weights_dir is None:
            return library(proto_spec, weights_dir, package_path)
        with tempfile.TemporaryDirectory() as empty:
            package_path = library(proto_spec, empty, package_path)
        for name in os.listdir(weights_dir):
            shutil.move(os.path.join(weights_dir, name), os.path.join(package_path, WEIGHTS_DIR, name))
        return package_path

    return create_package


def _transform_op(library: Any) -> Any:
    def transform_op(self, op) -> None:
        block = op.enclosing_block  # the pass builds in this block (its context is entered)
        weights = [var for var in _const_inputs(op) if var.is_tensor_or_scalar_of(dtype="fp32")]
        library(self, op)
        for var in weights:
            _fold_last_cast(var, block)

    return transform_op


def _convert_const(library: Any) -> Any:
    def convert_const(self) -> None:
        # A tensor object can appear under several names; it is released after its last one.
        self._sdbuild_readers = Counter(id(val) for val in self.graph.params.values() if _releasable(val))
        library(self)

    return convert_const


def _add_const(library: Any) -> Any:
    def add_const(self, name, val) -> None:
        import torch

        readers = getattr(self, "_sdbuild_readers", None)
        if readers is None or not _releasable(val) or self._has_compression_info(name):
            return library(self, name, val)
        library(self, name, val.detach().clone())
        readers[id(val)] -= 1
        if readers[id(val)] == 0:
            # Points the tensor (shared with the module's parameter) at an empty storage; the old one
            # is freed once no other tensor uses it. Storages loaded by torch.jit.load cannot be resized.
            val.data = torch.empty(0, dtype=val.dtype)

    return add_const


_QUANTIZATION = "coremltools.converters.mil.mil.passes.defs.quantization:FP16ComputePrecision"
_CONVERTER = "coremltools.converters.mil.frontend.torch.converter:TorchConverter"
PATCHES = (
    Patch(_QUANTIZATION, "fp16_overflow", _fp16_overflow),
    Patch("coremltools.converters.mil.mil.program:Program", "validate", _validate),
    Patch("coremltools.converters.mil.frontend.torch.load", "load", _load),
    Patch("coremltools.models.model", "_create_mlpackage", _create_package),
    Patch(_QUANTIZATION, "transform_op", _transform_op),
    Patch(_CONVERTER, "convert_const", _convert_const),
    Patch(_CONVERTER, "_add_const", _add_const),
)


def patches_unavailable() -> str | None:
    """Why the patches cannot be applied to the installed coremltools, or None when they can."""
    from coremltools import __version__ as version

    if version != TESTED_VERSION:
        return f"coremltools {version} is not the {TESTED_VERSION} they were checked against"
    for patch in PATCHES:
        try:
            original = patch.original()
        except (ImportError, AttributeError, KeyError):
            return f"{patch.owner.replace(':', '.')}.{patch.attribute} is missing"
        if not callable(original) and not isinstance(original, staticmethod):
            return f"{patch.owner.replace(':', '.')}.{patch.attribute} is no longer a function"
    return None


@contextmanager
def faster_conversion() -> Iterator[str | None]:
    """Within this block coremltools converts with the shortcuts above (restored on exit). Yields
    None, or, when the installed coremltools does not have what they replace, why they are off: the
    conversion then runs as plain coremltools, after one warning."""
    unavailable = patches_unavailable()
    if unavailable is not None:
        warnings.warn(f"conversion speed-ups are off: {unavailable}", RuntimeWarning, stacklevel=3)
        yield unavailable
        return
    originals = [(patch, patch.original(), patch.owned()) for patch in PATCHES]
    try:
        for patch, original, _ in originals:
            setattr(patch.target(), patch.attribute, patch.replacement(original))
        yield None
    finally:
        for patch, original, owned in originals:
            if owned:
                setattr(patch.target(), patch.attribute, original)
            else:
                delattr(patch.target(), patch.attribute)


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
