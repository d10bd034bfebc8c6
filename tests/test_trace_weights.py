"""Traced graphs are saved without the rewrite stage's weights and get them back exactly before conversion."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from builder.coreml.package import normalize_mlpackage
from builder.coreml.speedups import faster_conversion
from builder.stages.torchscript import load_graph, save_graph

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Attention(nn.Module):
    """Weights under nested names, a scalar parameter and a mask buffer the weights file does not hold."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
        self.norm = nn.LayerNorm(64)
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.register_buffer("mask", torch.full((16, 16), float("-inf")).triu(1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.block(x))
        return torch.softmax(h @ h.transpose(-1, -2) * self.scale + self.mask, dim=-1) @ h


def _example() -> tuple[torch.Tensor]:
    return (torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(1)),)


def _saved(folder: Path, weights: dict[str, torch.Tensor] | None = None) -> tuple[nn.Module, Path, Path]:
    """A seeded module, its weights file (as the rewrite stage writes it, or `weights`) and its stripped graph."""
    torch.manual_seed(0)
    module = _Attention().eval()
    save_file(weights if weights is not None else module.state_dict(), folder / "weights.safetensors")
    traced = torch.jit.trace(module, _example())
    shapes = save_graph(traced, folder / "model.pt", folder / "weights.safetensors")
    assert shapes == {name: list(t.shape) for name, t in module.state_dict().items()}
    # The traced module is left as it was.
    assert torch.equal(traced(*_example()), module(*_example()))
    return module, folder / "model.pt", folder / "weights.safetensors"


def _stored_bytes(archive: Path) -> int:
    with zipfile.ZipFile(archive) as zipped:
        return sum(
            info.file_size
            for info in zipped.infolist()
            if "/data/" in info.filename and not info.filename.endswith("serialization_id")
        )


def test_stripped_graph_holds_only_the_tensors_the_weights_file_lacks(tmp_path: Path) -> None:
    module, graph, _ = _saved(tmp_path)
    full = tmp_path / "full.pt"
    torch.jit.save(torch.jit.trace(module, _example()), str(full))
    assert _stored_bytes(graph) == module.mask.numel() * 4  # the mask, nothing else
    assert _stored_bytes(full) > 30 * _stored_bytes(graph)


def test_attached_graph_gives_exactly_the_original_outputs(tmp_path: Path) -> None:
    module, graph, weights = _saved(tmp_path)
    loaded = load_graph(graph, weights)
    assert torch.equal(loaded(*_example()), module(*_example()))
    assert {n: p.requires_grad for n, p in loaded.named_parameters()} == {
        n: p.requires_grad for n, p in module.named_parameters()
    }


def test_missing_weight_is_refused(tmp_path: Path) -> None:
    _, graph, weights = _saved(tmp_path)
    state = _Attention().state_dict()
    del state["block.2.weight"]
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"holds no weight 'block.2.weight'"):
        load_graph(graph, weights)


@pytest.mark.parametrize(
    ("name", "replacement", "message"),
    [
        (
            "block.0.weight",
            torch.zeros(64, 32),
            r"'block.0.weight' .* torch.float32 \[64, 32\], .* torch.float32 \[64, 64\]",
        ),
        ("scale", torch.tensor(0.5, dtype=torch.float16), r"'scale' .* torch.float16 \[\], .* torch.float32 \[\]"),
    ],
)
def test_weight_of_another_shape_or_dtype_is_refused(
    tmp_path: Path, name: str, replacement: torch.Tensor, message: str
) -> None:
    _, graph, weights = _saved(tmp_path)
    save_file(_Attention().state_dict() | {name: replacement}, weights)
    with pytest.raises(ValueError, match=message):
        load_graph(graph, weights)


def test_graph_saved_with_its_weights_is_refused(tmp_path: Path) -> None:
    module, _, weights = _saved(tmp_path)
    torch.jit.save(torch.jit.trace(module, _example()), str(tmp_path / "full.pt"))
    with pytest.raises(ValueError, match="no 'sdbuild/placeholders.json'"):
        load_graph(tmp_path / "full.pt", weights)


def _convert(module: torch.jit.ScriptModule, package: Path) -> dict[str, bytes]:
    import coremltools as ct

    with faster_conversion():
        model = ct.convert(
            module,
            inputs=[ct.TensorType(name="x", shape=_example()[0].shape)],
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16,
            minimum_deployment_target=ct.target.iOS16,
            skip_model_load=True,
        )
    model.save(str(package))
    normalize_mlpackage(package)
    return {str(p.relative_to(package)): p.read_bytes() for p in sorted(package.rglob("*")) if p.is_file()}


def test_attached_graph_converts_to_the_same_package_and_is_released(tmp_path: Path) -> None:
    """Same bytes as converting the graph saved with its weights; the attached weights are emptied as they enter MIL."""
    module, graph, weights = _saved(tmp_path)
    torch.jit.save(torch.jit.trace(module, _example()), str(tmp_path / "full.pt"))
    attached = load_graph(graph, weights)
    assert _convert(attached, tmp_path / "attached.mlpackage") == _convert(
        torch.jit.load(str(tmp_path / "full.pt")), tmp_path / "full.mlpackage"
    )
    assert {name: p.numel() for name, p in attached.named_parameters()} == dict.fromkeys(module.state_dict(), 0)


def test_convert_stage_refuses_a_graph_its_weights_do_not_fit(tmp_path: Path) -> None:
    """A user error naming the component and the weight, before any conversion starts."""
    import json

    from builder.errors import UserError
    from builder.stages import convert

    _, _, weights = _saved(tmp_path)
    save_file(_Attention().state_dict() | {"norm.weight": torch.ones(32)}, weights)
    (tmp_path / "architecture.json").write_text(
        json.dumps({"inputs": [{"name": "x", "shape": [1, 16, 64], "dtype": "float32"}], "outputs": ["y"]})
    )
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match=r"text_encoder: the traced graph does not fit .* 'norm.weight'"):
        convert.run(
            {"traced": tmp_path, "rewritten": tmp_path},
            {"component": "text_encoder", "deployment_target": "iOS16"},
            tmp_path / "out",
        )
