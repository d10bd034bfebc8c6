"""Our palettizer against coremltools' `palettize_weights` on a small converted model."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from builder.coreml.palettize import PalettizeOptions, palettize_package
from builder.coreml.weights import read_back_weights, reconstruction_errors

EMBEDDING = "emb_weight_to_fp16"


class _Small(torch.nn.Module):
    """Conv, linears above and below coremltools' 10,000-element k-means switch, one under the
    2048-element threshold, and an embedding table read by `gather`."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(100, 64)
        self.conv = torch.nn.Conv2d(64, 96, 3, padding=1)
        self.lin = torch.nn.Linear(96, 128)
        self.lin2 = torch.nn.Linear(128, 32)
        self.tiny = torch.nn.Linear(32, 32)

    def forward(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x + self.emb(ids).mean(1)[:, :, None, None]).mean((2, 3))
        return self.tiny(self.lin2(torch.relu(self.lin(y))))


def _convert(target: str, out: Path) -> Path:
    import coremltools as ct

    torch.manual_seed(0)
    example = (torch.zeros(1, 8, dtype=torch.int32), torch.randn(1, 64, 16, 16))
    model = ct.convert(
        torch.jit.trace(_Small().eval(), example),
        inputs=[
            ct.TensorType(name="ids", shape=example[0].shape, dtype=np.int32),
            ct.TensorType(name="x", shape=example[1].shape, dtype=np.float16),
        ],
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16,
        minimum_deployment_target=getattr(ct.target, target),
        skip_model_load=True,
    )
    model.save(str(out))
    return out


@pytest.fixture(scope="module")
def float16(tmp_path_factory) -> Path:
    return _convert("macOS13", tmp_path_factory.mktemp("fp16") / "model.mlpackage")


@pytest.fixture(scope="module")
def float16_ios18(tmp_path_factory) -> Path:
    return _convert("iOS18", tmp_path_factory.mktemp("fp16_ios18") / "model.mlpackage")


def _reference(src: Path, out: Path, nbits: int, **config) -> Path:
    """coremltools' own palettization, as the palettize stage calls it."""
    import coremltools as ct
    from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig, palettize_weights

    model = ct.models.MLModel(str(src), skip_model_load=True)
    op_config = OpPalettizerConfig(nbits=nbits, mode="kmeans", weight_threshold=2048, **config)
    palettize_weights(model, OptimizationConfig(global_config=op_config, op_type_configs={"gather": None})).save(
        str(out)
    )
    return out


def _ours(src: Path, out: Path, **options) -> Path:
    palettize_package(src, out, PalettizeOptions(**options), workers=1)
    return out


def _structure(package: Path) -> tuple[Counter, list]:
    """Op type counts, and each LUT op's parameters as (name, data type, shape)."""
    from coremltools.models import MLModel
    from coremltools.proto import MIL_pb2

    spec = MLModel(str(package), skip_model_load=True).get_spec()
    types, luts = Counter(), []
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            for op in block.operations:
                types[op.type] += 1
                if op.type == "constexpr_lut_to_dense":
                    values = {k: v for k, v in op.attributes.items() if k != "name"}
                    values |= {k: a.arguments[0].value for k, a in op.inputs.items()}
                    luts.append(
                        (op.outputs[0].name,)
                        + tuple(
                            (
                                k,
                                MIL_pb2.DataType.Name(v.type.tensorType.dataType),
                                [d.constant.size for d in v.type.tensorType.dimensions],
                            )
                            for k, v in sorted(values.items())
                        )
                    )
    return types, sorted(luts)


def _digest(package: Path) -> str:
    files = sorted(p for p in package.rglob("*") if p.is_file())
    return hashlib.sha256(
        b"".join(p.relative_to(package).as_posix().encode() + p.read_bytes() for p in files)
    ).hexdigest()


@pytest.mark.parametrize("nbits", [8, 6, 4, 2])
def test_same_structure_and_no_worse_than_coremltools(float16: Path, tmp_path: Path, nbits: int) -> None:
    ours = _ours(float16, tmp_path / "ours.mlpackage", nbits=nbits)
    reference = _reference(float16, tmp_path / "reference.mlpackage", nbits)
    assert _structure(ours) == _structure(reference)

    weights, original = read_back_weights(ours), read_back_weights(float16)
    np.testing.assert_array_equal(weights[EMBEDDING], original[EMBEDDING])
    for name in ("conv_weight_to_fp16", "lin_weight_to_fp16", "lin2_weight_to_fp16"):
        assert len(np.unique(weights[name].astype(np.float32))) <= 1 << nbits  # numpy 2.2 float16 unique misorders
    ours_errors = reconstruction_errors(ours, float16)
    reference_errors = reconstruction_errors(reference, float16)
    assert ours_errors.keys() == reference_errors.keys()
    for name, error in ours_errors.items():
        assert error <= reference_errors[name] * (1 + 1e-6) + 1e-12, name


def test_report_matches_read_back(float16: Path, tmp_path: Path) -> None:
    report = palettize_package(float16, tmp_path / "ours.mlpackage", PalettizeOptions(nbits=4))
    errors = reconstruction_errors(tmp_path / "ours.mlpackage", float16)
    palettized = {w.name: w for w in report.weights if w.nbits is not None}
    assert set(palettized) == {"conv_weight_to_fp16", "lin_weight_to_fp16", "lin2_weight_to_fp16"}
    for name, weight in palettized.items():
        assert weight.relative_rmse == pytest.approx(errors[name], rel=1e-9)
    assert 4 < report.palettized_bits_per_weight < 4.1 < report.bits_per_weight
    assert report.bytes_after < report.bytes_before / 2


def test_error_falls_with_more_bits(float16: Path, tmp_path: Path) -> None:
    errors = [
        reconstruction_errors(_ours(float16, tmp_path / f"{nbits}.mlpackage", nbits=nbits), float16)[
            "conv_weight_to_fp16"
        ]
        for nbits in (1, 2, 3, 4, 6, 8)
    ]
    assert errors == sorted(errors, reverse=True) and errors[-1] > 0


def test_bytes_do_not_depend_on_workers_or_run(float16: Path, tmp_path: Path) -> None:
    digests = {
        _digest(
            palettize_package(float16, tmp_path / name, PalettizeOptions(nbits=6), workers=workers) and tmp_path / name
        )
        for name, workers in (("one.mlpackage", 1), ("two.mlpackage", 2), ("again.mlpackage", 2))
    }
    assert len(digests) == 1


def test_per_op_bits_and_threshold(float16: Path, tmp_path: Path) -> None:
    options = dict(nbits=4, nbits_by_op={"conv_weight_to_fp16": 2, "lin_weight_to_fp16": None})
    report = palettize_package(float16, tmp_path / "mixed.mlpackage", PalettizeOptions(**options))
    bits = {w.name: w.nbits for w in report.weights}
    assert bits["conv_weight_to_fp16"] == 2 and bits["lin_weight_to_fp16"] is None and bits["lin2_weight_to_fp16"] == 4
    weights, original = read_back_weights(tmp_path / "mixed.mlpackage"), read_back_weights(float16)
    np.testing.assert_array_equal(weights["lin_weight_to_fp16"], original["lin_weight_to_fp16"])
    assert len(np.unique(weights["conv_weight_to_fp16"].astype(np.float32))) <= 4

    # lin2 has 4096 elements: kept above that threshold, palettized below it; `tiny` (1024) never.
    above = palettize_package(float16, tmp_path / "above.mlpackage", PalettizeOptions(nbits=4, weight_threshold=4096))
    below = palettize_package(float16, tmp_path / "below.mlpackage", PalettizeOptions(nbits=4, weight_threshold=4095))
    assert {w.name: w.nbits for w in above.weights}["lin2_weight_to_fp16"] is None
    assert {w.name: w.nbits for w in below.weights}["lin2_weight_to_fp16"] == 4
    assert {w.name: w.nbits for w in below.weights}["tiny_weight_to_fp16"] is None

    with pytest.raises(ValueError, match="no_such_weight"):
        palettize_package(float16, tmp_path / "bad.mlpackage", PalettizeOptions(nbits_by_op={"no_such_weight": 4}))


@pytest.mark.parametrize("granularity", ["per_tensor", "per_grouped_channel"])
def test_ios18_form_matches_coremltools(float16_ios18: Path, tmp_path: Path, granularity: str) -> None:
    ours = _ours(float16_ios18, tmp_path / "ours.mlpackage", nbits=4, granularity=granularity, group_size=16)
    config = {"granularity": granularity, "group_size": 16} if granularity == "per_grouped_channel" else {}
    reference = _reference(float16_ios18, tmp_path / "reference.mlpackage", 4, **config)
    # Only the LUT ops: re-running the pass pipeline also rewrites iOS18 gather index handling.
    assert _structure(ours)[1] == _structure(reference)[1]
    ours_errors, reference_errors = (
        reconstruction_errors(ours, float16_ios18),
        reconstruction_errors(reference, float16_ios18),
    )
    for name, error in ours_errors.items():
        assert error <= reference_errors[name] * (1 + 1e-6) + 1e-12, name


def test_grouped_needs_ios18(float16: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="iOS18"):
        palettize_package(float16, tmp_path / "out.mlpackage", PalettizeOptions(granularity="per_grouped_channel"))


@pytest.mark.parametrize("nbits", range(1, 9))
def test_packed_indices_are_coremltools_bytes(nbits):
    from coremltools.optimize._utils import pack_elements_into_bits, restore_elements_from_packed_bits

    from builder.coreml import bits

    generator = np.random.default_rng(nbits)
    for count in (1, 7, 8, 9, 17, 1001):
        elements = generator.integers(0, 2**nbits, count).astype(np.uint8)
        packed = pack_elements_into_bits(elements, nbits)
        np.testing.assert_array_equal(bits.pack(elements, nbits), packed)
        np.testing.assert_array_equal(bits.unpack(packed, nbits, count), elements)
        np.testing.assert_array_equal(restore_elements_from_packed_bits(packed, nbits, count), elements)
