"""The text encoders a UNet's workloads (mixed-bit probe, W8A8 calibration) encode prompts with.

By default the pipeline folder's own. Where a LoRA was fused into a text encoder, the bundle ships
the fused one, so the workloads must condition on it too: its rewrite stage becomes an input of
theirs (keying them by the LoRA's digest and scale) and its conversion module replaces the folder's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from builder.engine.spec import StageSpec
from builder.recipe import Component

if TYPE_CHECKING:
    from builder.sd.conditioning import TextEncoder

_CONDITIONING = (Component.TEXT_ENCODER.value, Component.TEXT_ENCODER_2.value)  # what UNets are conditioned on
_PREFIX = "text_encoder."


def fused_text_encoders(stages: Iterable[StageSpec]) -> dict[str, str]:
    """Text encoder -> its rewrite stage id, for the text encoders a LoRA was fused into."""
    return {
        spec.component: spec.id
        for spec in stages
        if spec.stage == "rewrite" and spec.component in _CONDITIONING and spec.params.get("loras")
    }


def text_encoder_inputs(text_encoders: Mapping[str, str] | None) -> dict[str, str]:
    """A workload stage's inputs for `text_encoders` (component -> rewrite stage id)."""
    return {f"{_PREFIX}{component}": stage_id for component, stage_id in (text_encoders or {}).items()}


def rewritten_text_encoders(inputs: Mapping[str, Path]) -> dict[str, TextEncoder]:
    """The conversion modules of a workload stage's text encoder inputs, by component."""
    from builder.stages.trace import load_conversion_module

    return {
        name.removeprefix(_PREFIX): load_conversion_module(folder, attention="ORIGINAL")[0]
        for name, folder in inputs.items()
        if name.startswith(_PREFIX)
    }
