"""The Swift StableDiffusion package's Resources contract: file names, features and shapes.

The Swift side finds models by file name and features by name and reads no metadata, so a bundle
that drifts from this contract fails only at run time on a device. `check_models` turns that into a
build error.
"""

from __future__ import annotations

import re

from builder.coreml.package import ModelInfo
from builder.recipe.sources import ControlNetSource

RESOURCE_NAMES: dict[str, str] = {
    "text_encoder": "TextEncoder",
    "text_encoder_2": "TextEncoder2",
    "unet": "Unet",
    "vae_decoder": "VAEDecoder",
    "vae_encoder": "VAEEncoder",
    "safety_checker": "SafetyChecker",
}
CONTROLLED_UNET = "ControlledUnet"  # the UNet's name when the bundle has ControlNets
CONTROLNET_FOLDER = "controlnet"
RESIDUAL_PREFIX = "additional_residual_"
CONTROLNET_BATCH = 2  # ControlNet.swift always passes a (2,) timestep
TOKENIZER_FILES = ("vocab.json", "merges.txt")
LATENT_SCALE_FACTOR = {"sd": 0.18215, "sdxl": 0.13025}
REQUIRED_MODELS = {"sd": ("TextEncoder", "Unet", "VAEDecoder"), "sdxl": ("TextEncoder2", "Unet", "VAEDecoder")}
TEXT_LENGTH = 77
SAFETY_CHECKER_IMAGE_SIZE = 512  # hard-coded in SafetyChecker.swift


def controlnet_name(source: ControlNetSource) -> str:
    """The ControlNet's file name under Resources/controlnet/: words title-cased and joined.

    Hub: the repository id split on '/', '_' and '-' (lllyasviel/sd-controlnet-mlsd ->
    LllyasvielSdControlnetMlsd), as Apple's converter names it. Local: the folder's name, the same way.
    Synthetic: 'synthetic', the preset and 'seed<N>' (tiny-sd, seed 0 -> SyntheticTinySdSeed0).
    """
    if source.hub is not None:
        text = source.hub.id
    elif source.local is not None:
        text = source.local.path.name
    else:
        text = f"synthetic-{source.synthetic.preset}-seed{source.synthetic.seed}"
    return "".join(word.title() for word in re.split(r"[/_-]", text) if word)


def resource_name(component: str, controlled: bool) -> str:
    """The Resources name of a built component; ControlNets are labelled `controlnet.<Name>`."""
    if component.startswith(f"{CONTROLNET_FOLDER}."):
        return f"{CONTROLNET_FOLDER}/{component.split('.', 1)[1]}"
    if component == "unet" and controlled:
        return CONTROLLED_UNET
    return RESOURCE_NAMES[component]


def check_models(
    family: str, models: dict[str, ModelInfo], *, latent_size: tuple[int, int], batch_size: int
) -> list[str]:
    """Every way `models` (keyed by Resources name) breaks the contract; empty when it holds."""
    unet = CONTROLLED_UNET if CONTROLLED_UNET in models else "Unet"
    required = [unet if name == "Unet" else name for name in REQUIRED_MODELS[family]]
    problems = [f"missing required model {name}" for name in required if name not in models]
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
    if unet in models:
        info = models[unet]
        inputs = {i.name: i for i in info.inputs}
        missing = [n for n in ("sample", "timestep", "encoder_hidden_states") if n not in inputs]
        problems.extend(f"{unet}: no input named {name}" for name in missing)
        if not missing:
            sample = inputs["sample"].shape
            channels = sample[1] if len(sample) == 4 else "C"
            expect(unet, "sample shape", sample, [batch_size, channels, h, w])
            expect(unet, "timestep shape", inputs["timestep"].shape, [batch_size])
            hidden = inputs["encoder_hidden_states"].shape
            width = text_width if text_width is not None else (hidden[1] if len(hidden) == 4 else "C")
            expect(unet, "encoder_hidden_states shape (B, C, 1, 77)", hidden, [batch_size, width, 1, TEXT_LENGTH])
            expect(unet, "first output shape", info.outputs[0].shape, sample)
    controlnets = {name: info for name, info in models.items() if name.startswith(f"{CONTROLNET_FOLDER}/")}
    if controlnets and CONTROLLED_UNET not in models:
        problems.append(f"ControlNets {', '.join(sorted(controlnets))} need {CONTROLLED_UNET}, which is missing")
    if CONTROLLED_UNET in models:
        problems.extend(_controlnet_problems(models[CONTROLLED_UNET], controlnets, latent_size))
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
    if "SafetyChecker" in models:
        problems.extend(_safety_checker_problems(models["SafetyChecker"]))
    return problems


def _controlnet_problems(unet: ModelInfo, controlnets: dict[str, ModelInfo], latent_size: tuple[int, int]) -> list[str]:
    """ControlledUnet takes additional_residual_0..N-1; every ControlNet takes the UNet's sample, timestep
    and text states plus controlnet_cond (B, 3, 8h, 8w), and returns exactly those residuals, shape for
    shape, in float32 (ControlNet.swift sums several ControlNets' outputs as Float32 buffers)."""
    problems: list[str] = []
    h, w = latent_size
    unet_inputs = {i.name: i for i in unet.inputs}
    residuals = {name: i.shape for name, i in unet_inputs.items() if name.startswith(RESIDUAL_PREFIX)}
    expected_names = {f"{RESIDUAL_PREFIX}{i}" for i in range(len(residuals))}
    if not residuals:
        problems.append(f"{CONTROLLED_UNET}: no {RESIDUAL_PREFIX}<i> inputs")
    elif set(residuals) != expected_names:
        problems.append(f"{CONTROLLED_UNET}: residual inputs {sorted(residuals)} are not numbered 0..{len(residuals) - 1}")
    for name, info in sorted(controlnets.items()):
        inputs = {i.name: i for i in info.inputs}
        for feature in ("sample", "timestep", "encoder_hidden_states", "controlnet_cond"):
            if feature not in inputs:
                problems.append(f"{name}: no input named {feature}")
            elif feature == "timestep" and inputs[feature].shape != [CONTROLNET_BATCH]:
                problems.append(f"{name}: timestep shape is {inputs[feature].shape}, the Swift package needs [{CONTROLNET_BATCH}]")
            elif feature == "controlnet_cond":
                shape = inputs[feature].shape
                wanted = [CONTROLNET_BATCH, shape[1] if len(shape) == 4 else "C", 8 * h, 8 * w]
                if shape != wanted:
                    problems.append(f"{name}: controlnet_cond shape is {shape}, the Swift package needs {wanted}")
            elif feature in unet_inputs and inputs[feature].shape != unet_inputs[feature].shape:
                problems.append(
                    f"{name}: {feature} shape is {inputs[feature].shape}, {CONTROLLED_UNET} takes {unet_inputs[feature].shape}"
                )
        outputs = {o.name: o.shape for o in info.outputs}
        if outputs != residuals:
            problems.append(
                f"{name}: outputs {sorted(outputs.items())} do not line up with {CONTROLLED_UNET}'s residual inputs "
                f"{sorted(residuals.items())}"
            )
        not_float32 = sorted(o.name for o in info.outputs if o.dtype != "float32")
        if not_float32:
            problems.append(f"{name}: outputs {', '.join(not_float32)} are not float32, which the Swift package sums them as")
    return problems


def _safety_checker_problems(info: ModelInfo) -> list[str]:
    """SafetyChecker.swift resizes the image to clip_input's (square) shape, always sends 512 x 512
    float16 images and a (1,) adjustment, and reads has_nsfw_concepts[0] as a yes/no."""
    inputs = {i.name: i for i in info.inputs}
    problems = [f"SafetyChecker: no input named {name}" for name in ("clip_input", "images", "adjustment") if name not in inputs]

    def expect(model: str, what: str, actual: object, wanted: object) -> None:
        if actual != wanted:
            problems.append(f"{model}: {what} is {actual}, the Swift package needs {wanted}")
    if "clip_input" in inputs:
        shape = inputs["clip_input"].shape
        side = shape[2] if len(shape) == 4 else "S"
        expect("SafetyChecker", "clip_input shape", shape, [1, 3, side, side])
    if "images" in inputs:
        expect("SafetyChecker", "images shape", inputs["images"].shape, [1, SAFETY_CHECKER_IMAGE_SIZE, SAFETY_CHECKER_IMAGE_SIZE, 3])
        expect("SafetyChecker", "images dtype", inputs["images"].dtype, "float16")
    if "adjustment" in inputs:
        expect("SafetyChecker", "adjustment shape", inputs["adjustment"].shape, [1])
    outputs = {o.name: o for o in info.outputs}
    if "has_nsfw_concepts" not in outputs:
        problems.append("SafetyChecker: no output named has_nsfw_concepts")
    return problems
