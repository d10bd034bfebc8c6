"""What quantizing each layer alone (W8A8) costs the workload's final latents.

Apple's schedule treats every layer separately: prepare the whole UNet with that one layer W8A8,
calibrate it over every calibration sample, finalize, run the test prompts. Calibration runs the
float model (fake quantization is off until the milestones turn it on), so each layer's observers
see exactly the float activations a model with all layers observed would see. The shared schedule
uses that: one model with every layer observed, calibrated once; then each layer's fake quantizers
(its weights', its inputs', its outputs') are switched on alone while the workload runs.

Fake quantizers sit on tensors, and one tensor may feed several consumers: a layer alone quantizes
its own input edge, not its sibling's (q, k and v projections read one normed tensor). So before
switching, every activation fake quantizer with several consumers is copied, one per consumer,
ranges included; a layer then owns the copies on the edges it reads and every edge its output feeds.
`single_layer_scores` is Apple's schedule for one layer, the oracle the shared one is tested against.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import fx, nn

from builder.sd.mbp.analysis import Probe, Scores
from builder.sd.w8a8.quantizer import Prepared, sensitivity_config
from builder.sd.w8a8.unet import Layer, QuantizableUnet


def _is_quantizer(module: nn.Module | None) -> bool:
    from torch.ao.quantization import FakeQuantizeBase

    return isinstance(module, FakeQuantizeBase)


def split_shared_quantizers(model: fx.GraphModule) -> int:
    """Give every consumer of an activation fake quantizer its own copy (same ranges), and every
    call of one its own module (the quantizer shares one instance between ops whose output keeps
    its input's range); returns how many copies were made. The model computes exactly what it did."""
    copies = 0
    seen: set[int] = set()
    for node in list(model.graph.nodes):
        if node.op != "call_module" or not _is_quantizer(model.get_submodule(node.target)):
            continue
        if id(model.get_submodule(node.target)) in seen:  # a second call of one instance
            name = f"{node.target.replace('.', '_')}_at_{node.name}"
            model.add_submodule(name, copy.deepcopy(model.get_submodule(node.target)))
            node.target = name
            copies += 1
        seen.add(id(model.get_submodule(node.target)))
        for user in list(node.users)[1:]:
            name = f"{node.target.replace('.', '_')}_for_{user.name}"
            model.add_submodule(name, copy.deepcopy(model.get_submodule(node.target)))
            seen.add(id(model.get_submodule(name)))
            with model.graph.inserting_after(node):
                twin = model.graph.call_module(name, node.args)
            user.replace_input_with(node, twin)
            copies += 1
    model.recompile()
    return copies


def _owner(node: fx.Node, layers: set[str]) -> str | None:
    """The layer a graph node belongs to: a layer's own module call, or an op inside an attention core."""
    if node.op == "call_module" and node.target in layers:
        return node.target
    for scope in reversed(list(node.meta.get("nn_module_stack", {}))):
        if scope in layers:
            return scope
    return None


def layer_quantizers(model: fx.GraphModule, layers: Sequence[Layer]) -> dict[str, list[str]]:
    """Layer name -> the fake quantizers that quantizing it alone switches on: on every edge it
    reads or its output feeds, and its weights'. Call after `split_shared_quantizers`."""
    names = {layer.name for layer in layers}
    owned: dict[str, list[str]] = {layer.name: [] for layer in layers}
    for node in model.graph.nodes:
        if node.op != "call_module" or not _is_quantizer(model.get_submodule(node.target)):
            continue
        producer = node.args[0] if isinstance(node.args[0], fx.Node) else None
        owners = {_owner(producer, names) if producer is not None else None}
        owners |= {_owner(user, names) for user in node.users}
        for owner in owners:
            if owner is not None:
                owned[owner].append(node.target)
    for layer in layers:
        weight = f"{layer.name}.weight_fake_quant"
        if layer.kind == "conv" and _is_quantizer(dict(model.named_modules()).get(weight)):
            owned[layer.name].append(weight)
    return owned


class SharedSchedule:
    """Every layer observed in one prepared model, calibrated once (or given recorded ranges); each
    layer then measured with only its own fake quantizers on."""

    def __init__(self, prepared: Prepared, layers: Sequence[Layer], probe: Path):
        self.model = prepared.model
        prepared.freeze()
        split_shared_quantizers(self.model)
        self.switches = layer_quantizers(self.model, layers)
        self.quantizers = {
            node.target: self.model.get_submodule(node.target)
            for node in self.model.graph.nodes
            if node.op == "call_module" and _is_quantizer(self.model.get_submodule(node.target))
        } | {name: self.model.get_submodule(name) for names in self.switches.values() for name in names}
        for quantizer in self.quantizers.values():
            quantizer.disable_fake_quant()
        self.probe = Probe(self.model, probe, [])  # every quantizer off: the float reference

    def scores(self, layer: str) -> Scores:
        switched = [self.quantizers[name] for name in self.switches[layer]]
        for quantizer in switched:
            quantizer.enable_fake_quant()
        try:
            return self.probe.scores_of(self.model)
        finally:
            for quantizer in switched:
                quantizer.disable_fake_quant()


def single_layer_scores(
    unet: QuantizableUnet,
    layer: str,
    example: Sequence[torch.Tensor],
    samples: Sequence[Sequence[torch.Tensor]],
    probe: Probe,
) -> Scores:
    """Apple's schedule for one layer: prepared alone, calibrated over every sample, finalized,
    scored on `probe` (whose reference is the float model)."""
    prepared = Prepared(unet, sensitivity_config([layer]), example)
    prepared.calibrate(samples)
    return probe.scores_of(prepared.finalize())


def measure(
    schedule: SharedSchedule, layers: Sequence[Layer], progress: Callable[[str, Scores], None] | None = None
) -> dict[str, float]:
    """Layer name -> latent PSNR with that layer alone W8A8."""
    measured = {}
    for layer in layers:
        scores = schedule.scores(layer.name)
        measured[layer.name] = round(scores.latent_psnr_db, 3)
        if progress is not None:
            progress(layer.name, scores)
    return measured
