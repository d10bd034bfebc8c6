"""The Swift StableDiffusion package's Resources contract: file names, features and shapes.

The Swift side finds models by file name and features by name and reads no metadata, so a bundle
that drifts from this contract fails only at run time on a device. `check_models` turns that into a
build error.
"""

from __future__ import annotations

from builder.coreml.package import ModelInfo

RESOURCE_NAMES: dict[str, str] = {
    "text_encoder": "TextEncoder",
    "text_encoder_2": "TextEncoder2",
    "unet": "Unet",
    "vae_decoder": "VAEDecoder",
    "vae_encoder": "VAEEncoder",
    "safety_checker": "SafetyChecker",
}
UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")
UNET_MODELS = ("Unet",)  # Resources names of UNets, each shipped whole or as Chunk1 + Chunk2
TOKENIZER_FILES = ("vocab.json", "merges.txt")
LATENT_SCALE_FACTOR = {"sd": 0.18215, "sdxl": 0.13025}
REQUIRED_MODELS = {"sd": ("TextEncoder", "Unet", "VAEDecoder"), "sdxl": ("TextEncoder2", "Unet", "VAEDecoder")}
TEXT_LENGTH = 77


def chunk_names(model: str) -> tuple[str, str]:
    """The two Resources names the Swift package loads instead of `model` when it is chunked."""
    return f"{model}Chunk1", f"{model}Chunk2"


def check_models(
    family: str, models: dict[str, ModelInfo], *, latent_size: tuple[int, int], batch_size: int
) -> list[str]:
    """Every way `models` (keyed by Resources name) breaks the contract; empty when it holds."""
    problems = [
        f"missing required model {name}"
        for name in REQUIRED_MODELS[family]
        if name not in models and not all(chunk in models for chunk in chunk_names(name))
    ]
    h, w = latent_size

    def expect(model: str, what: str, actual: object, wanted: object) -> None:
        if actual != wanted:
            problems.append(f"{model}: {what} is {actual}, the Swift package needs {wanted}")

    text_width = None
    if "TextEncoder" in models:
        info = models["TextEncoder"]
        expect("TextEncoder", "first input shape", info.inputs[0].shape, [1, TEXT_LENGTH])
        expect("TextEncoder", "first input dtype", info.inputs[0].dtype, "float32")
        outputs = {o.name: o for o in info.outputs}
        if "last_hidden_state" not in outputs:
            problems.append("TextEncoder: no output named last_hidden_state")
        else:
            shape = outputs["last_hidden_state"].shape
            text_width = shape[-1] if len(shape) == 3 else None
            expect("TextEncoder", "last_hidden_state shape", shape, [1, TEXT_LENGTH, text_width or "C"])
    for unet in UNET_MODELS:
        first, second = chunk_names(unet)
        if unet in models and (first in models or second in models):
            problems.append(f"{unet} and {first}/{second} are both present; ship the whole UNet or its chunks")
        if (first in models) != (second in models):
            problems.append(f"{first} and {second} must ship together")
        if unet in models:
            problems += _unet_problems(unet, models[unet], models[unet], text_width, latent_size, batch_size)
        elif first in models and second in models:
            problems += _unet_problems(first, models[first], models[second], text_width, latent_size, batch_size)
            problems += _handover_problems(first, models[first], second, models[second])
    latent_channels = None
    if "VAEDecoder" in models:
        info = models["VAEDecoder"]
        expect("VAEDecoder", "first input name", info.inputs[0].name, "z")
        z = info.inputs[0].shape
        latent_channels = z[1] if len(z) == 4 else None
        expect("VAEDecoder", "z shape", z, [1, latent_channels or "C", h, w])
        expect("VAEDecoder", "first output shape", info.outputs[0].shape, [1, 3, 8 * h, 8 * w])
    if "VAEEncoder" in models:
        info = models["VAEEncoder"]
        expect("VAEEncoder", "first input shape", info.inputs[0].shape, [1, 3, 8 * h, 8 * w])
        out = info.outputs[0].shape
        channels = 2 * latent_channels if latent_channels else (out[1] if len(out) == 4 else "2C")
        expect("VAEEncoder", "first output shape (mean and logvar)", out, [1, channels, h, w])
    return problems


def _unet_problems(
    name: str, entry: ModelInfo, last: ModelInfo, text_width: int | None, latent_size: tuple[int, int], batch_size: int
) -> list[str]:
    """A UNet's inputs (`entry`: the whole UNet or chunk 1) and noise prediction (`last`'s first output)."""
    problems: list[str] = []
    h, w = latent_size

    def expect(what: str, actual: object, wanted: object) -> None:
        if actual != wanted:
            problems.append(f"{name}: {what} is {actual}, the Swift package needs {wanted}")

    inputs = {i.name: i for i in entry.inputs}
    missing = [n for n in UNET_INPUTS if n not in inputs]
    problems.extend(f"{name}: no input named {n}" for n in missing)
    if missing:
        return problems
    sample = inputs["sample"].shape
    channels = sample[1] if len(sample) == 4 else "C"
    expect("sample shape", sample, [batch_size, channels, h, w])
    expect("timestep shape", inputs["timestep"].shape, [batch_size])
    hidden = inputs["encoder_hidden_states"].shape
    width = text_width if text_width is not None else (hidden[1] if len(hidden) == 4 else "C")
    expect("encoder_hidden_states shape (B, C, 1, 77)", hidden, [batch_size, width, 1, TEXT_LENGTH])
    expect("first output shape" if last is entry else "noise prediction (chunk 2's first output) shape",
           last.outputs[0].shape, sample)
    return problems


def _handover_problems(first_name: str, first: ModelInfo, second_name: str, second: ModelInfo) -> list[str]:
    """Every chunk 2 input must be a chunk 1 output or a UNet input of the same name and shape."""
    available = {i.name: i.shape for i in first.inputs} | {o.name: o.shape for o in first.outputs}
    problems = []
    for feature in second.inputs:
        if feature.name not in available:
            problems.append(f"{second_name}: input {feature.name} is neither an output nor an input of {first_name}")
        elif feature.shape != available[feature.name]:
            problems.append(
                f"{second_name}: input {feature.name} has shape {feature.shape}, {first_name} gives "
                f"{available[feature.name]}"
            )
    return problems
