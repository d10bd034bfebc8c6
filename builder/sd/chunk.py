"""The UNet conversion module cut in two torch modules of near-equal weight size, for iOS.

Apple's reference cuts the converted Core ML program, before palettization, and checks the cut
with a Core ML runtime; neither suits us (chunks must be palettized as the recipe says and Linux
has no runtime). So the cut is made in torch, where it can be checked: the UNet's forward is run
as a flat list of steps (time embedding, conv_in, every resnet, attention and sampler of the down,
mid and up blocks, the output head), each calling the diffusers module it owns exactly as diffusers
does. Chunk 1 runs the steps before the boundary and returns what the rest needs (hidden states,
time embedding, the skip residuals still waiting for an up block); chunk 2 takes those plus the
original inputs it reads and returns the noise prediction first.

Chunks register their modules under the whole module's attribute paths (`unet.down_blocks.0...`),
so parameter names, Core ML const names and mixed-bit recipe keys are the same as unchunked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from builder.sd.contract import RESIDUAL_PREFIX

if TYPE_CHECKING:
    from diffusers.models.unets.unet_2d_blocks import (
        CrossAttnDownBlock2D,
        CrossAttnUpBlock2D,
        DownBlock2D,
        UNetMidBlock2DCrossAttn,
        UpBlock2D,
    )
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

# Block classes whose forward the steps below reproduce (the ones the Neural Engine rewrite accepts).
_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
_MID_BLOCKS = ("UNetMidBlock2DCrossAttn",)
_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
# Top-level UNet modules the steps run themselves; every other top-level module is part of the
# time (and added-condition) embedding, which runs first.
_BODY = ("conv_in", "down_blocks", "mid_block", "up_blocks", "conv_norm_out", "conv_act", "conv_out")

HIDDEN_STATES = "hidden_states"
TIME_EMBEDDING = "time_embedding"
SAMPLE, TIMESTEP, TEXT = "sample", "timestep", "encoder_hidden_states"
MID_RESIDUAL_STEP = "mid_block.control"  # where a ControlledUnet adds the mid-block residual


def residual_name(index: int) -> str:
    """A ControlledUnet's input added to the `index`-th skip residual (the mid block's: index = skip count)."""
    return f"{RESIDUAL_PREFIX}{index}"


def skip_name(index: int) -> str:
    """Feature name of the `index`-th skip residual pushed by the down path (conv_in's is 0)."""
    return f"skip_{index}"


@dataclass(frozen=True)
class Step:
    """One unit of the UNet forward: which modules it owns and how it moves the skip stack."""

    name: str  # e.g. "down_blocks.1.attentions.0"
    kind: str  # embed, conv_in, resnet, attention, downsampler, upsampler, out
    modules: tuple[str, ...]  # attribute paths inside the diffusers UNet
    push: bool = False  # pushes the hidden state as a skip residual afterwards
    pop: bool = False  # concatenates the newest skip residual before running

    @property
    def reads_text(self) -> bool:
        return self.kind == "attention"


def unet_steps(unet: UNet2DConditionModel) -> list[Step]:
    """The forward of a diffusers UNet2DConditionModel as steps; ValueError for blocks not covered."""
    embed = tuple(name for name, m in unet.named_children() if name not in _BODY and m is not None)
    steps = [Step("embed", "embed", embed), Step("conv_in", "conv_in", ("conv_in",), push=True)]
    for i, module in enumerate(unet.down_blocks):
        _check_block(module, _DOWN_BLOCKS, f"down_block_types[{i}]")
        block = cast("CrossAttnDownBlock2D | DownBlock2D", module)  # the classes _check_block admits
        prefix = f"down_blocks.{i}"
        attentions = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            steps.append(Step(f"{prefix}.resnets.{j}", "resnet", (f"{prefix}.resnets.{j}",), push=attentions is None))
            if attentions is not None:
                steps.append(Step(f"{prefix}.attentions.{j}", "attention", (f"{prefix}.attentions.{j}",), push=True))
        for j in range(len(block.downsamplers or ())):
            steps.append(Step(f"{prefix}.downsamplers.{j}", "downsampler", (f"{prefix}.downsamplers.{j}",), push=True))
    if unet.mid_block is not None:
        _check_block(unet.mid_block, _MID_BLOCKS, "mid_block_type")
        mid = cast("UNetMidBlock2DCrossAttn", unet.mid_block)  # the class _check_block admits
        steps.append(Step("mid_block.resnets.0", "resnet", ("mid_block.resnets.0",)))
        for j in range(len(mid.attentions)):
            steps.append(Step(f"mid_block.attentions.{j}", "attention", (f"mid_block.attentions.{j}",)))
            steps.append(Step(f"mid_block.resnets.{j + 1}", "resnet", (f"mid_block.resnets.{j + 1}",)))
        steps.append(Step(MID_RESIDUAL_STEP, "mid_residual", ()))
    for i, module in enumerate(unet.up_blocks):
        _check_block(module, _UP_BLOCKS, f"up_block_types[{i}]")
        up_block = cast("CrossAttnUpBlock2D | UpBlock2D", module)  # the classes _check_block admits
        prefix = f"up_blocks.{i}"
        attentions = getattr(up_block, "attentions", None)
        for j in range(len(up_block.resnets)):
            steps.append(Step(f"{prefix}.resnets.{j}", "resnet", (f"{prefix}.resnets.{j}",), pop=True))
            if attentions is not None:
                steps.append(Step(f"{prefix}.attentions.{j}", "attention", (f"{prefix}.attentions.{j}",)))
        for j in range(len(up_block.upsamplers or ())):
            steps.append(Step(f"{prefix}.upsamplers.{j}", "upsampler", (f"{prefix}.upsamplers.{j}",)))
    head = tuple(name for name in ("conv_norm_out", "conv_act", "conv_out") if getattr(unet, name, None) is not None)
    steps.append(Step("out", "out", head))
    return steps


def _check_block(block: nn.Module, supported: tuple[str, ...], key: str) -> None:
    name = type(block).__name__
    if name not in supported:
        raise ValueError(f"UNet config {key}={name!r} cannot be chunked (supported: {', '.join(supported)})")
    if all(getattr(block, s, None) for s in ("s1", "s2", "b1", "b2")):
        raise ValueError(f"{key}: FreeU is enabled on this block; disable it before chunking")


def parameter_bytes(unet: nn.Module, step: Step) -> int:
    """Bytes of the parameters `step` owns."""
    return sum(p.numel() * p.element_size() for path in step.modules for p in unet.get_submodule(path).parameters())


def balanced_boundary(unet: nn.Module, steps: list[Step]) -> int:
    """Index of chunk 2's first step: the cut whose two parameter byte totals are closest.

    Chunk 1 always holds the embedding and conv_in, chunk 2 at least the output head.
    """
    sizes = [parameter_bytes(unet, s) for s in steps]
    total = sum(sizes)
    return min(range(2, len(steps)), key=lambda k: (abs(total - 2 * sum(sizes[:k])), k))


@dataclass
class _State:
    inputs: dict[str, torch.Tensor]
    hidden: torch.Tensor | None = None
    emb: torch.Tensor | None = None
    skips: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (push index, residual), oldest first
    pushed: int = 0  # skips pushed so far, chunk 1 included

    def current(self) -> torch.Tensor:
        """The hidden states, which conv_in (or chunk 1's hand-over) sets before any other step reads them."""
        if self.hidden is None:
            raise ValueError("a UNet step read the hidden states before conv_in set them")
        return self.hidden

    def embedding(self) -> torch.Tensor:
        """The time embedding, which the embed step (or chunk 1's hand-over) sets."""
        if self.emb is None:
            raise ValueError("the time embedding was read before the embed step set it")
        return self.emb


class UnetChunk(nn.Module):
    """Steps [start, stop) of a UNet conversion module as a module taking and returning named tensors."""

    def __init__(self, module: nn.Module, steps: list[Step], start: int, stop: int, input_names: list[str]):
        super().__init__()
        unet = cast("UNet2DConditionModel", module.unet)  # see split_unet
        self.steps = steps[start:stop]
        self.input_names = input_names
        self._unet_class = type(unet)
        self.unet = _skeleton(unet, [path for step in self.steps for path in step.modules])
        # the diffusers embedding methods read it off `self`
        self.unet.config = unet.config  # type: ignore[assignment]  # torch's stub: __setattr__ takes Tensor | Module only
        self._pushed_before = sum(s.push for s in steps[:start])
        self._live_skips = _live_skip_indices(steps, start)
        self.output_names = ["noise_pred"] if stop == len(steps) else _boundary_names(steps, stop)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values = dict(zip(self.input_names, tensors, strict=False))
        state = _State(
            inputs=values,
            hidden=values.get(HIDDEN_STATES),
            emb=values.get(TIME_EMBEDDING),
            skips=[(i, values[skip_name(i)]) for i in self._live_skips],
            pushed=self._pushed_before,
        )
        for step in self.steps:
            _STEP_RUNNERS[step.kind](self, step, state)
        if self.output_names == ["noise_pred"]:
            return (state.current(),)
        named = {HIDDEN_STATES: state.current(), TIME_EMBEDDING: state.embedding()}
        named |= {skip_name(i): t for i, t in state.skips}
        return tuple(named[name] for name in self.output_names)


def _live_skip_indices(steps: list[Step], start: int) -> list[int]:
    """Push indices of the skip residuals still on the stack when step `start` begins."""
    stack: list[int] = []
    pushed = 0
    for step in steps[:start]:
        if step.pop:
            stack.pop()
        if step.push:
            stack.append(pushed)
            pushed += 1
    return stack


def _boundary_names(steps: list[Step], boundary: int) -> list[str]:
    """What chunk 1 hands over: hidden states, time embedding, then the live skips oldest first."""
    return [HIDDEN_STATES, TIME_EMBEDDING] + [skip_name(i) for i in _live_skip_indices(steps, boundary)]


def _skeleton(unet: nn.Module, paths: list[str]) -> nn.Module:
    """A module holding `unet`'s submodules at `paths` under the same attribute paths (shared, not copied)."""
    root = nn.Module()
    for path in paths:
        parent = root
        parts = path.split(".")
        for part in parts[:-1]:
            child = parent._modules.get(part)
            if child is None:
                child = nn.Module()
                parent.add_module(part, child)
            parent = child
        parent.add_module(parts[-1], unet.get_submodule(path))
    return root


def _embed(chunk: UnetChunk, step: Step, state: _State) -> None:
    """diffusers' own embedding methods, called on the skeleton (which holds the same modules)."""
    # The skeleton stands in for the UNet: it holds every module (and the config) these methods read.
    unet, cls, inputs = cast("UNet2DConditionModel", chunk.unet), chunk._unet_class, state.inputs
    sample = inputs[SAMPLE]
    emb = unet.time_embedding(cls.get_time_embed(unet, sample=sample, timestep=inputs[TIMESTEP]), None)
    added = {name: t for name, t in inputs.items() if name not in (SAMPLE, TIMESTEP, TEXT)}
    aug = cls.get_aug_embed(unet, emb=emb, encoder_hidden_states=inputs[TEXT], added_cond_kwargs=added)
    emb = emb + aug if aug is not None else emb
    activation = getattr(unet, "time_embed_act", None)  # registered in the embed step when the UNet has one
    if activation is not None:
        emb = activation(emb)
    state.emb = emb


def _conv_in(chunk: UnetChunk, step: Step, state: _State) -> None:
    state.hidden = chunk.unet.get_submodule("conv_in")(state.inputs[SAMPLE])
    _push(state)


def _push(state: _State) -> None:
    """Keep the hidden state as the next skip residual, plus its ControlNet residual when given
    (diffusers adds down_block_additional_residuals to the stored skips, not to the running state)."""
    control = state.inputs.get(residual_name(state.pushed))
    hidden = state.current()
    state.skips.append((state.pushed, hidden if control is None else hidden + control))
    state.pushed += 1


def _mid_residual(chunk: UnetChunk, step: Step, state: _State) -> None:
    control = state.inputs.get(residual_name(state.pushed))
    if control is not None:
        state.hidden = state.current() + control


def _resnet(chunk: UnetChunk, step: Step, state: _State) -> None:
    if step.pop:
        _, residual = state.skips.pop()
        state.hidden = torch.cat([state.current(), residual], dim=1)
    state.hidden = chunk.unet.get_submodule(step.modules[0])(state.hidden, state.emb)
    if step.push:
        _push(state)


def _attention(chunk: UnetChunk, step: Step, state: _State) -> None:
    attention = chunk.unet.get_submodule(step.modules[0])
    state.hidden = attention(state.hidden, encoder_hidden_states=state.inputs[TEXT], return_dict=False)[0]
    if step.push:
        _push(state)


def _downsampler(chunk: UnetChunk, step: Step, state: _State) -> None:
    state.hidden = chunk.unet.get_submodule(step.modules[0])(state.hidden)
    _push(state)


def _upsampler(chunk: UnetChunk, step: Step, state: _State) -> None:
    # diffusers passes an explicit size only for latents that do not divide by every upsampling;
    # recipes allow multiples of 8 only, and the chain-vs-whole check would catch a mismatch.
    state.hidden = chunk.unet.get_submodule(step.modules[0])(state.hidden)


def _out(chunk: UnetChunk, step: Step, state: _State) -> None:
    for path in step.modules:
        state.hidden = chunk.unet.get_submodule(path)(state.hidden)


_STEP_RUNNERS: dict[str, Callable[[UnetChunk, Step, _State], None]] = {
    "embed": _embed,
    "conv_in": _conv_in,
    "resnet": _resnet,
    "attention": _attention,
    "downsampler": _downsampler,
    "upsampler": _upsampler,
    "mid_residual": _mid_residual,
    "out": _out,
}


@dataclass(frozen=True)
class Chunks:
    """The two chunks of a UNet conversion module and where it was cut."""

    whole: nn.Module
    first: UnetChunk
    second: UnetChunk
    boundary: str  # name of chunk 2's first step
    parameter_bytes: tuple[int, int]

    def chain(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Chunk 1 then chunk 2, fed as the Swift package feeds them (by feature name)."""
        handed = dict(zip(self.first.output_names, self.first(*inputs), strict=False))
        handed |= {n: t for n, t in zip(self.first.input_names, inputs, strict=False) if n not in handed}
        return self.second(*(handed[name] for name in self.second.input_names))


def split_unet(module: nn.Module, input_names: list[str]) -> Chunks:
    """Cut a UNet conversion module (`NeuralEngineUnetModule`-like: `.unet` plus forward inputs) in two.

    `input_names` are the features the whole module is called with, in order (an SD UNet leaves the
    wrapper's optional SDXL inputs out).
    """
    unet = cast("UNet2DConditionModel", module.unet)  # NeuralEngineUnetModule's or ControlledUnetModule's
    steps = unet_steps(unet)
    boundary = balanced_boundary(unet, steps)
    first = UnetChunk(module, steps, 0, boundary, input_names)
    rest = steps[boundary:]
    pushed = sum(step.push for step in steps[:boundary])
    # ControlNet residuals of skips pushed in chunk 2, and of the mid block when chunk 2 adds it
    controls = {residual_name(i) for i in range(pushed, sum(step.push for step in steps))}
    controls |= {residual_name(pushed)} if any(step.kind == "mid_residual" for step in rest) else set()
    originals = [n for n in input_names if (n == TEXT and any(s.reads_text for s in rest)) or n in controls]
    second = UnetChunk(module, steps, boundary, len(steps), first.output_names + originals)
    sizes = [parameter_bytes(unet, s) for s in steps]
    return Chunks(module, first, second, steps[boundary].name, (sum(sizes[:boundary]), sum(sizes[boundary:])))
