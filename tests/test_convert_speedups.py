"""The conversion shortcuts in builder/coreml/speedups.py give the same packages as plain coremltools."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from builder.coreml.package import normalize_mlpackage, write_spec
from builder.coreml.speedups import faster_conversion, fits_fp16_for_certain


class _Mixed(nn.Module):
    """Convolution, linear layers and one const too large for float16 (that op must stay float32)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.linear = nn.Linear(8, 8)
        self.register_buffer("large", torch.full((8,), 70000.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).mean(dim=(2, 3))
        return self.linear(y) + y * self.large


def _convert(folder: Path, *, fast: bool) -> dict[str, bytes]:
    import coremltools as ct

    torch.manual_seed(0)
    example = torch.randn(1, 4, 8, 8)
    traced = torch.jit.trace(_Mixed().eval(), example)
    arguments = dict(
        inputs=[ct.TensorType(name="x", shape=example.shape)],
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16,
        minimum_deployment_target=ct.target.iOS16,
        skip_model_load=True,
    )
    package = folder / ("fast.mlpackage" if fast else "plain.mlpackage")
    if fast:  # as the convert stage does it: written in place, the weights moved in
        with faster_conversion():
            model = ct.convert(traced, package_dir=str(package), **arguments)
        model.short_description = "sdbuild test"
        write_spec(package, model.get_spec())
    else:
        model = ct.convert(traced, **arguments)
        model.short_description = "sdbuild test"
        model.save(str(package))
    normalize_mlpackage(package)
    return {str(p.relative_to(package)): p.read_bytes() for p in sorted(package.rglob("*")) if p.is_file()}


def test_same_package_with_and_without_speedups(tmp_path: Path) -> None:
    plain = _convert(tmp_path, fast=False)
    fast = _convert(tmp_path, fast=True)
    assert plain.keys() == fast.keys()
    assert plain == fast


def test_library_functions_restored() -> None:
    from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision
    from coremltools.converters.mil.mil.program import Program
    from coremltools.models import model as ct_model

    overflow, validate, create = (
        FP16ComputePrecision.__dict__["fp16_overflow"],
        Program.validate,
        ct_model._create_mlpackage,
    )
    with faster_conversion():
        assert Program.validate is not validate and ct_model._create_mlpackage is not create
    assert FP16ComputePrecision.__dict__["fp16_overflow"] is overflow and Program.validate is validate
    assert ct_model._create_mlpackage is create


@pytest.mark.parametrize(
    ("values", "certain"),
    [
        ([0.5, -65504.0], True),
        ([], True),
        ([65505.0], False),
        ([-1e5], False),
        ([np.inf], False),
        ([np.nan, 1.0], False),
    ],
)
def test_fits_fp16_for_certain(values: list[float], certain: bool) -> None:
    assert fits_fp16_for_certain(np.array(values, dtype=np.float32)) is certain


def test_torch_weights_released_once_read(tmp_path: Path) -> None:
    """The TorchScript module's float32 parameters are emptied as they enter MIL, a shared one after its last reader."""
    import coremltools as ct

    torch.manual_seed(0)
    example = torch.randn(1, 4, 8, 8)
    torch.jit.save(torch.jit.trace(_Mixed().eval(), example), str(tmp_path / "m.pt"))
    module = torch.jit.load(str(tmp_path / "m.pt"))
    with faster_conversion():
        ct.convert(
            module,
            inputs=[ct.TensorType(name="x", shape=example.shape)],
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16,
            minimum_deployment_target=ct.target.iOS16,
            skip_model_load=True,
        )
    assert {name: p.numel() for name, p in module.named_parameters()} == dict.fromkeys(
        ["conv.weight", "conv.bias", "linear.weight", "linear.bias"], 0
    )


def _cast_pass_program():
    """conv(x, w) with a float32 weight const, run through the float16 cast pass."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    weight = np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4, 8, 8))])
    def program(x):
        return mb.conv(x=x, weight=mb.const(val=weight, name="w"), name="y")

    PASS_REGISTRY["common::add_fp16_cast"](program)
    operations = program.functions["main"].operations
    return {
        op.outputs[0].name: op.outputs[0].val.dtype
        for op in operations
        if op.op_type == "const" and op.outputs[0].rank == 4
    }


def test_cast_pass_folds_weight_at_once() -> None:
    """The library leaves const w (float32) feeding a cast until const_elimination; we fold it in the pass."""
    plain = _cast_pass_program()
    assert plain["w"] == np.float32 and "w_to_fp16" not in plain
    with faster_conversion():
        fast = _cast_pass_program()
    assert "w" not in fast and fast["w_to_fp16"] == np.float16


def test_every_patch_is_installed_during_a_conversion_and_restored_after():
    from builder.coreml.speedups import PATCHES, patches_unavailable

    assert patches_unavailable() is None
    originals = [patch.original() for patch in PATCHES]
    with faster_conversion() as off:
        assert off is None
        for patch, original in zip(PATCHES, originals, strict=True):
            assert patch.original() is not original, patch.attribute
    for patch, original in zip(PATCHES, originals, strict=True):
        assert patch.original() is original, patch.attribute


def test_a_renamed_coremltools_internal_turns_the_speedups_off_with_one_warning(tmp_path: Path, monkeypatch):
    """coremltools renamed an internal the table patches (here: the table names one the library does
    not have): nothing is patched, one warning says so, and the conversion is plain coremltools'."""
    import dataclasses

    from builder.coreml import speedups

    renamed = tuple(
        dataclasses.replace(patch, attribute="_add_const_before_rename") if patch.attribute == "_add_const" else patch
        for patch in speedups.PATCHES
    )
    monkeypatch.setattr(speedups, "PATCHES", renamed)
    originals = [patch.original() for patch in renamed if patch.attribute != "_add_const_before_rename"]
    with pytest.warns(
        RuntimeWarning, match=r"speed-ups are off: .*TorchConverter\._add_const_before_rename is missing"
    ):
        fast = _convert(tmp_path, fast=True)
    assert [patch.original() for patch in renamed if patch.attribute != "_add_const_before_rename"] == originals
    assert fast == _convert(tmp_path, fast=False)  # a valid package: the one plain coremltools writes
