"""The conversion shortcuts in builder/coreml/speedups.py give the same packages as plain coremltools."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from builder.coreml.package import normalize_mlpackage
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
    if fast:
        with faster_conversion():
            model = ct.convert(traced, **arguments)
    else:
        model = ct.convert(traced, **arguments)
    package = folder / ("fast.mlpackage" if fast else "plain.mlpackage")
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

    overflow, validate = FP16ComputePrecision.__dict__["fp16_overflow"], Program.validate
    with faster_conversion():
        assert Program.validate is not validate
    assert FP16ComputePrecision.__dict__["fp16_overflow"] is overflow and Program.validate is validate


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
