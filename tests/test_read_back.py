"""Read-back of compressed consts the converter derived from a parameter (reshaped, transposed).

Full-size UNets have per-channel vectors above the palettization threshold (the group norms of the
2560-channel skip concatenations) that the converter folds through a reshape into consts of its own
naming; these small modules reproduce that, and a transposed matrix, and a const with no source.
"""

from __future__ import annotations

from pathlib import Path

import coremltools as ct
import numpy as np
import pytest
import torch
from torch import nn

from builder.coreml.palettize import PalettizeOptions, palettize_package
from builder.coreml.program import float_weight_ops
from builder.coreml.weights import compressed_const_names, read_back_weights
from builder.errors import UserError
from builder.sd.read_back import (
    UnmappedWeights,
    WeightSource,
    float16_weights,
    load_compressed,
    load_sources,
    save_sources,
    weight_sources,
)
from builder.stages import verify

WIDE = 2560  # channels of the SD/SDXL up-block skip concatenation: its norm vectors exceed the threshold


class Folded(nn.Module):
    """A wide group norm (unit scale, so the converter keeps only the shift, reshaped), a matrix the
    converter transposes, and two identical matrices it transposes too."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.norm = nn.GroupNorm(32, WIDE)
        self.conv = nn.Conv2d(WIDE, 8, 1)
        self.right = nn.Parameter(torch.randn(64, 48, generator=generator) * 0.02)
        twin = torch.randn(64, 48, generator=generator) * 0.02
        self.twin_a, self.twin_b = nn.Parameter(twin.clone()), nn.Parameter(twin.clone())
        with torch.no_grad():
            self.norm.bias.copy_(torch.randn(WIDE, generator=generator) * 0.02)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conv(self.norm(x)), y @ self.right + torch.relu(y @ self.twin_a) - y @ self.twin_b


class Scaled(nn.Module):
    """A weight the converter multiplies into a new const: it equals no parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(48, 64, generator=torch.Generator().manual_seed(1)) * 0.02)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y @ (self.weight * 3.0).t()


def _convert_and_palettize(module: nn.Module, inputs: dict[str, torch.Tensor], folder: Path) -> tuple[Path, Path]:
    traced = torch.jit.trace(module.eval(), tuple(inputs.values()))
    model = ct.convert(
        traced,
        inputs=[ct.TensorType(name=name, shape=t.shape) for name, t in inputs.items()],
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS16,
        skip_model_load=True,
    )
    float16, palettized = folder / "float16.mlpackage", folder / "palettized.mlpackage"
    model.save(str(float16))
    palettize_package(float16, palettized, PalettizeOptions(nbits=4))
    return float16, palettized


@pytest.fixture(scope="module")
def folded(tmp_path_factory: pytest.TempPathFactory):
    module = Folded()
    inputs = {"x": torch.randn(1, WIDE, 2, 2), "y": torch.randn(5, 64)}
    float16, palettized = _convert_and_palettize(module, inputs, tmp_path_factory.mktemp("folded"))
    return float16_weights(module), float16, palettized


def test_consts_folded_through_reshape_and_transpose_map_to_their_parameters(folded):
    module, float16, palettized = folded
    names = dict(float_weight_ops(float16))
    reshaped = [n for n, shape in names.items() if shape == (1, WIDE, 1, 1)]
    assert reshaped and not any(n.startswith("norm_") for n in reshaped)  # the converter's own name
    sources = weight_sources(module, palettized, float16)
    assert set(sources) == compressed_const_names(palettized)
    assert sources[reshaped[0]] == (WeightSource("norm.bias"),)
    assert sources["conv_weight_to_fp16"] == (WeightSource("conv.weight"),)
    transposed = {s.tensor: s.permutation for found in sources.values() for s in found if s.permutation is not None}
    assert transposed == {"right": (1, 0), "twin_a": (1, 0), "twin_b": (1, 0)}
    # The identical twins were stored once: one const holds both.
    (twins,) = [found for found in sources.values() if {s.tensor for s in found} & {"twin_a", "twin_b"}]
    assert {s.tensor for s in twins} == {"twin_a", "twin_b"}


def test_loaded_weights_are_the_lut_values_in_torch_layout(folded, tmp_path):
    module, float16, palettized = folded
    sources = weight_sources(module, palettized, float16)
    save_sources(tmp_path / "sources.json", sources)
    assert load_sources(tmp_path / "sources.json") == sources
    stored = read_back_weights(palettized)
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    assert load_compressed(module, palettized, sources) == len(sources)
    after = dict(module.named_parameters())
    for const, found in sources.items():
        for source in found:
            expected = stored[const].astype(np.float32)
            if source.permutation is not None:
                expected = expected.transpose(np.argsort(source.permutation))
            loaded = after[source.tensor]
            np.testing.assert_array_equal(loaded.detach().numpy(), expected.reshape(loaded.shape))
            assert len(np.unique(expected)) <= 16 and not torch.equal(loaded, before[source.tensor])


def test_a_const_with_no_source_is_named_with_its_shape(tmp_path):
    module = Scaled()
    float16, palettized = _convert_and_palettize(module, {"y": torch.randn(5, 64)}, tmp_path)
    (scaled,) = compressed_const_names(palettized)
    with pytest.raises(UnmappedWeights, match=rf"equal to no parameter or buffer of the module: {scaled} \[48, 64\]"):
        weight_sources(float16_weights(module), palettized, float16)
    inputs = {"model": _folder_with(palettized, tmp_path / "p"), "float16": _folder_with(float16, tmp_path / "f")}
    with pytest.raises(UserError, match=rf"{scaled} \[48, 64\]") as refused:
        verify._sources(module, inputs)
    assert "weight_threshold" in refused.value.hint


def _folder_with(package: Path, folder: Path) -> Path:
    folder.mkdir()
    package.rename(folder / "model.mlpackage")
    return folder
