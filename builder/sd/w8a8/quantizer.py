"""coremltools' `LinearQuantizer` set up as Apple's activation quantization sets it up.

Symmetric int8 weights (per output channel) and activations (per tensor); milestones that turn the
observers on at once and fake quantization never during calibration, so calibration runs the float
model and only records ranges; `finalize` then yields the quantized model (quantize/dequantize
around every quantized op) that is traced and converted. Three configurations:

- sensitivity: every analysed layer W8A8 and everything else float. Calibrated once, it holds the
  ranges each layer would get calibrated alone (calibration runs the float model either way).
- single layer: one layer W8A8, everything else float (Apple's per-layer schedule, kept as the
  oracle the shared schedule is checked against).
- cumulative: everything W8A8 except concatenations, group norms, SiLUs, GELUs and additions,
  with the layers the analysis kept back at W8A32 (8-bit weights, float activations).
"""

from __future__ import annotations

import copy
import importlib
import itertools
import operator
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from builder.sd.w8a8.unet import QuantizableUnet, opaque_modules

if TYPE_CHECKING:
    from torch.ao.quantization import FakeQuantizeBase

WEIGHT_QUANTIZER = "weight_fake_quant"  # the attribute a quantized module keeps its weight's fake quantizer in
# (observers on from step, fake quantization from step, observers frozen at step, BN frozen at step)
_MILESTONES = [0, 1000, 1000, 0]


def _w8a8():
    from coremltools.optimize.torch.quantization import ModuleLinearQuantizerConfig

    return ModuleLinearQuantizerConfig(quantization_scheme="symmetric", milestones=_MILESTONES)


def _w8a32():
    from coremltools.optimize.torch.quantization import ModuleLinearQuantizerConfig

    return ModuleLinearQuantizerConfig(
        quantization_scheme="symmetric", milestones=_MILESTONES, activation_dtype=torch.float32
    )


def _float():
    from coremltools.optimize.torch.quantization import ModuleLinearQuantizerConfig

    return ModuleLinearQuantizerConfig(
        milestones=_MILESTONES, weight_dtype=torch.float32, activation_dtype=torch.float32
    )


def sensitivity_config(layers: Iterable[str]):
    """Every layer in `layers` W8A8, the rest of the model float."""
    from coremltools.optimize.torch.quantization import LinearQuantizerConfig

    return LinearQuantizerConfig(global_config=_float(), module_name_configs={name: _w8a8() for name in layers})


def cumulative_config(w8a32: Iterable[str]):
    """The model as built: W8A8 throughout, the layers in `w8a32` with float activations."""
    from coremltools.optimize.torch.quantization import LinearQuantizerConfig

    return LinearQuantizerConfig(
        global_config=_w8a8(),
        module_name_configs={name: _w8a32() for name in sorted(w8a32)},
        module_type_configs={
            torch.cat: None,
            nn.GroupNorm: None,
            nn.SiLU: None,
            nn.functional.gelu: None,
            operator.add: None,
        },
    )


class Prepared:
    """A QuantizableUnet prepared for quantization: `model` runs it with observers and fake
    quantization inserted; `finalize()` returns the quantized model.

    Preparing swaps modules in place (no second copy of a full-size UNet's weights), so `unet`, and
    the conversion module whose modules it shares, are the prepared model's afterwards: prepare a
    fresh QuantizableUnet for another configuration.
    """

    def __init__(self, unet: QuantizableUnet, config, example: Sequence[torch.Tensor]):
        from coremltools.optimize.torch.quantization import LinearQuantizer

        config.non_traceable_module_names = opaque_modules(unet)
        config.preserved_attributes = []
        self._quantizer = LinearQuantizer(unet, config)
        self.model = self._quantizer.prepare(example_inputs=tuple(example), inplace=True).eval()
        self._quantizer.step()  # milestones: observers on, fake quantization off

    def fake_quantizers(self) -> dict[str, FakeQuantizeBase]:
        """Every fake-quantize module (activation and weight), by module name."""
        from torch.ao.quantization import FakeQuantizeBase

        return {name: m for name, m in self.model.named_modules() if isinstance(m, FakeQuantizeBase)}

    def weight_quantizers(self) -> dict[str, FakeQuantizeBase]:
        """The fake-quantize modules of weights (the others observe activations)."""
        return {name: m for name, m in self.fake_quantizers().items() if name.endswith(WEIGHT_QUANTIZER)}

    @torch.no_grad()
    def calibrate(self, samples: Iterable[Sequence[torch.Tensor]]) -> int:
        """Run every sample through the model (observers record ranges); returns how many.

        Weights are observed on the first sample only: they do not change between samples, and a
        moving average of a constant is that constant, so the ranges are those of observing every
        sample, without a per-channel min/max over every weight of the UNet on each one."""
        count = 0
        for sample in samples:
            self.model(*sample)
            if count == 0:
                for quantizer in self.weight_quantizers().values():
                    quantizer.disable_observer()
            count += 1
        return count

    def freeze(self) -> None:
        """Observers stop: the recorded ranges (scales) stay as they are."""
        for quantizer in self.fake_quantizers().values():
            quantizer.disable_observer()

    def state(self) -> dict[str, torch.Tensor]:
        """The ranges every fake-quantize module holds (scales, zero points, observed extremes)."""
        return {
            f"{name}.{key}": value.detach().clone().contiguous()
            for name, module in self.fake_quantizers().items()
            for key, value in module.state_dict().items()
        }

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Ranges recorded by `state()` of a model prepared the same way; ValueError if it was not."""
        quantizers = self.fake_quantizers()
        mine = {f"{name}.{key}" for name, module in quantizers.items() for key in module.state_dict()}
        if mine != set(state):
            raise ValueError(
                f"the recorded quantizer state does not fit this model ({len(mine ^ set(state))} entries differ)"
            )
        for name, module in quantizers.items():
            prefix = f"{name}."
            module.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})

    def finalize(self) -> nn.Module:
        """The quantized model: observers replaced by quantize/dequantize with the recorded ranges
        (made from the prepared model in place: `model` is spent)."""
        with tensors_shared_by_module_copies(self.model):
            return self._quantizer.finalize(self.model, inplace=True).eval()


@contextmanager
def tensors_shared_by_module_copies(model: nn.Module) -> Iterator[None]:
    """While it runs, torch's fx convert deep-copies the model's modules with `model`'s parameters and
    buffers shared rather than copied.

    The convert behind `finalize` deep-copies every module only to look their qconfigs up (types,
    names, devices), which for a full-size UNet is a second copy of every weight, made and dropped
    in finalizing. Shared tensors (deepcopy's memo maps each to itself) give the same lookups; the
    converted model is the same (tested). Without torch's `copy` import there, convert runs as is.
    """
    # the module itself: the package's `convert` is the function
    fx_convert: Any = importlib.import_module("torch.ao.quantization.fx.convert")
    library = getattr(fx_convert, "copy", None)
    if library is not copy:
        yield
        return
    tensors = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}

    class _SharingTensors:
        @staticmethod
        def deepcopy(value: Any, memo: dict[int, Any] | None = None) -> Any:
            return copy.deepcopy(value, tensors | (memo or {}))

    fx_convert.copy = _SharingTensors
    try:
        yield
    finally:
        fx_convert.copy = library
