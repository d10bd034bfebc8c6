"""The Swift StableDiffusion package's Resources contract: file names, features and shapes.

The Swift side finds models by file name and features by name and reads no metadata, so a bundle
that drifts from this contract fails only at run time on a device. `check_models` turns that into a
build error.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Literal

from builder.coreml.package import FeatureInfo, ModelInfo
from builder.recipe.sources import ControlNetSource
from builder.sd.tokenizer_files import MODEL_MAX_LENGTH

RESOURCE_NAMES: dict[str, str] = {
    "text_encoder": "TextEncoder",
    "text_encoder_2": "TextEncoder2",
    "text_encoder_3": "TextEncoderT5",
    "mmdit": "MultiModalDiffusionTransformer",
    "unet": "Unet",
    "unet_refiner": "UnetRefiner",
    "vae_decoder": "VAEDecoder",
    "vae_encoder": "VAEEncoder",
    "safety_checker": "SafetyChecker",
}
CONTROLLED_UNET = "ControlledUnet"  # the UNet's name when the bundle has ControlNets
PLAIN_UNET = "unet.plain"  # the component label of the plain UNet shipped beside ControlledUnet
CONTROLNET_FOLDER = "controlnet"
RESIDUAL_PREFIX = "additional_residual_"
CONTROLNET_BATCH = 2  # ControlNet.swift always passes a (2,) timestep
TOKENIZER_FILES = ("vocab.json", "merges.txt")
# SD3's T5 tokenizer: the Swift package loads TextEncoderT5 only when both files are present too
T5_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
LATENT_SCALE_FACTOR = {"sd": 0.18215, "sdxl": 0.13025, "sd3": 1.5305}
LATENT_SHIFT_FACTOR = {"sd3": 0.0609}  # SD3's decoder takes latents / scale + shift
MMDIT = "MultiModalDiffusionTransformer"
MMDIT_BATCH = 2  # MultiModalDiffusionTransformer.swift always passes a (2,) timestep
REQUIRED_MODELS = {
    "sd": ("TextEncoder", "Unet", "VAEDecoder"),
    "sdxl": ("TextEncoder2", "Unet", "VAEDecoder"),
    "sd3": ("TextEncoder", "TextEncoder2", MMDIT, "VAEDecoder"),
}
TEXT_LENGTH = MODEL_MAX_LENGTH
SAFETY_CHECKER_IMAGE_SIZE = 512  # hard-coded in SafetyChecker.swift
Pipeline = Literal["text-to-image", "image-to-image", "controlnet"]


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
    elif source.synthetic is not None:
        text = f"synthetic-{source.synthetic.preset}-seed{source.synthetic.seed}"
    else:
        raise ValueError("a ControlNet source needs one of hub, local or synthetic")
    return "".join(word.title() for word in re.split(r"[/_-]", text) if word)


def resource_name(component: str, controlled: bool) -> str:
    """The Resources name of a built component; ControlNets are labelled `controlnet.<Name>`."""
    if component.startswith(f"{CONTROLNET_FOLDER}."):
        return f"{CONTROLNET_FOLDER}/{component.split('.', 1)[1]}"
    if component == "unet" and controlled:
        return CONTROLLED_UNET
    if component == PLAIN_UNET:
        return RESOURCE_NAMES["unet"]
    return RESOURCE_NAMES[component]


def chunk_names(model: str) -> tuple[str, str]:
    """The two Resources names the Swift package loads instead of `model` when it is chunked."""
    return f"{model}Chunk1", f"{model}Chunk2"


def _present(models: dict[str, ModelInfo], name: str) -> bool:
    """`name` ships, whole or as both chunks."""
    return name in models or all(chunk in models for chunk in chunk_names(name))


class _Checker:
    """Collects contract problems of one bundle; one method per model type."""

    def __init__(self, models: dict[str, ModelInfo], latent_size: tuple[int, int], batch_size: int):
        self.models = models
        self.latent_size = latent_size
        self.batch_size = batch_size
        self.problems: list[str] = []

    def expect(self, model: str, what: str, actual: object, wanted: object) -> None:
        if actual != wanted:
            self.problems.append(f"{model}: {what} is {actual}, the Swift package needs {wanted}")

    def text_encoder(self, name: str, hidden: str) -> tuple[int | None, int | None]:
        """Check a text encoder; its (hidden width, pooled width), None where unreadable."""
        info = self.models[name]
        self.expect(name, "first input shape", info.inputs[0].shape, [1, TEXT_LENGTH])
        self.expect(name, "first input dtype", info.inputs[0].dtype, "float32")
        outputs = {o.name: o for o in info.outputs}
        width = pooled = None
        if hidden not in outputs:
            self.problems.append(f"{name}: no output named {hidden}")
        else:
            shape = outputs[hidden].shape
            width = shape[-1] if len(shape) == 3 else None
            self.expect(name, f"{hidden} shape", shape, [1, TEXT_LENGTH, width or "C"])
        if "pooled_outputs" in outputs:
            shape = outputs["pooled_outputs"].shape
            pooled = shape[-1] if len(shape) == 2 else None
            self.expect(name, "pooled_outputs shape", shape, [1, pooled or "C"])
        elif hidden == "hidden_embeds":  # SDXL reads both; SD 1.x/2.x only the hidden states
            self.problems.append(f"{name}: no output named pooled_outputs")
        return width, pooled

    def unet(self, name: str, text_width: int | None, time_ids: int | None = None, pooled: int | None = None) -> None:
        """Check a UNet, whole or chunked; SDXL ones (time_ids given) also take text_embeds (B, pooled)
        and time_ids. A chunked UNet's inputs are chunk 1's and its noise prediction chunk 2's first output."""
        first, second = chunk_names(name)
        if name in self.models and (first in self.models or second in self.models):
            self.problems.append(f"{name} and {first}/{second} are both present; ship the whole UNet or its chunks")
        if (first in self.models) != (second in self.models):
            self.problems.append(f"{first} and {second} must ship together")
        if name in self.models:
            shown, info, last = name, self.models[name], self.models[name]
        elif first in self.models and second in self.models:
            shown, info, last = first, self.models[first], self.models[second]
            self.handover(first, second)
        else:
            return
        b, (h, w) = self.batch_size, self.latent_size
        inputs = {i.name: i for i in info.inputs}
        required = ("sample", "timestep", "encoder_hidden_states") + (("text_embeds", "time_ids") if time_ids else ())
        missing = [n for n in required if n not in inputs]
        self.problems.extend(f"{shown}: no input named {n}" for n in missing)
        if missing:
            return
        sample = inputs["sample"].shape
        channels = sample[1] if len(sample) == 4 else "C"
        self.expect(shown, "sample shape", sample, [b, channels, h, w])
        self.expect(shown, "timestep shape", inputs["timestep"].shape, [b])
        hidden = inputs["encoder_hidden_states"].shape
        width = text_width if text_width is not None else (hidden[1] if len(hidden) == 4 else "C")
        self.expect(shown, "encoder_hidden_states shape (B, C, 1, 77)", hidden, [b, width, 1, TEXT_LENGTH])
        what = "first output shape" if last is info else f"noise prediction ({second}'s first output) shape"
        self.expect(shown, what, last.outputs[0].shape, sample)
        if time_ids:
            embeds = inputs["text_embeds"].shape
            self.expect(shown, "text_embeds shape", embeds, [b, pooled or (embeds[-1] if len(embeds) == 2 else "C")])
            self.expect(shown, "time_ids shape", inputs["time_ids"].shape, [b, time_ids])

    def handover(self, first_name: str, second_name: str) -> None:
        """Every chunk 2 input must be a chunk 1 output or a UNet input of the same name and shape."""
        first, second = self.models[first_name], self.models[second_name]
        available = {i.name: i.shape for i in first.inputs} | {o.name: o.shape for o in first.outputs}
        for feature in second.inputs:
            if feature.name not in available:
                self.problems.append(
                    f"{second_name}: input {feature.name} is neither an output nor an input of {first_name}"
                )
            elif feature.shape != available[feature.name]:
                self.problems.append(
                    f"{second_name}: input {feature.name} has shape {feature.shape}, {first_name} gives "
                    f"{available[feature.name]}"
                )

    def vae(self) -> None:
        h, w = self.latent_size
        latent_channels = None
        if "VAEDecoder" in self.models:
            info = self.models["VAEDecoder"]
            self.expect("VAEDecoder", "first input name", info.inputs[0].name, "z")
            z = info.inputs[0].shape
            latent_channels = z[1] if len(z) == 4 else None
            self.expect("VAEDecoder", "z shape", z, [1, latent_channels or "C", h, w])
            self.expect("VAEDecoder", "first output shape", info.outputs[0].shape, [1, 3, 8 * h, 8 * w])
        if "VAEEncoder" in self.models:
            info = self.models["VAEEncoder"]
            self.expect("VAEEncoder", "first input shape", info.inputs[0].shape, [1, 3, 8 * h, 8 * w])
            out = info.outputs[0].shape
            channels = 2 * latent_channels if latent_channels else (out[1] if len(out) == 4 else "2C")
            self.expect("VAEEncoder", "first output shape (mean and logvar)", out, [1, channels, h, w])


def check_models(
    family: str, models: dict[str, ModelInfo], *, latent_size: tuple[int, int], batch_size: int
) -> list[str]:
    """Every way `models` (keyed by Resources name) breaks the contract; empty when it holds."""
    check = _Checker(models, latent_size, batch_size)
    unet = CONTROLLED_UNET if _present(models, CONTROLLED_UNET) else "Unet"
    required = [unet if name == "Unet" else name for name in REQUIRED_MODELS[family]]
    check.problems += [f"missing required model {name}" for name in required if not _present(models, name)]
    if family == "sdxl":
        _check_sdxl(check)
    elif family == "sd3":
        _check_sd3(check)
    else:
        text_width = check.text_encoder("TextEncoder", "last_hidden_state")[0] if "TextEncoder" in models else None
        check.unet(unet, text_width)
        if unet == CONTROLLED_UNET and _present(models, "Unet"):  # the plain UNet shipped beside it
            check.unet("Unet", text_width)
            plain = [m for n in ("Unet", *chunk_names("Unet")) if (m := models.get(n)) is not None]
            if any(i.name.startswith(RESIDUAL_PREFIX) for m in plain for i in m.inputs):
                check.problems.append(f"Unet: takes {RESIDUAL_PREFIX}<i> inputs; only {CONTROLLED_UNET} may")
        _check_controlnets(check)
    check.vae()
    if "SafetyChecker" in models:
        check.problems += _safety_checker_problems(models["SafetyChecker"])
    return check.problems


def _check_sdxl(check: _Checker) -> None:
    """SDXL: the base Unet reads both encoders' hidden states side by side and 6 time_ids; the refiner
    (UnetRefiner, or a Unet without TextEncoder: the Swift pipeline then runs refiner-only) reads the
    second encoder's alone and 5 time_ids. Both take the second encoder's pooled output as text_embeds."""
    models = check.models
    first = check.text_encoder("TextEncoder", "hidden_embeds") if "TextEncoder" in models else None
    second_width, pooled = (
        check.text_encoder("TextEncoder2", "hidden_embeds") if "TextEncoder2" in models else (None, None)
    )
    if first is not None:
        base_width = first[0] + second_width if first[0] is not None and second_width is not None else None
        check.unet("Unet", base_width, time_ids=6, pooled=pooled)
    else:
        check.unet("Unet", second_width, time_ids=5, pooled=pooled)
    check.unet("UnetRefiner", second_width, time_ids=5, pooled=pooled)


def _check_sd3(check: _Checker) -> None:
    """SD3: both CLIP encoders give penultimate states and pooled outputs; the MMDiT reads their states
    side by side (zero-padded to T5's width) then T5's 77 on the token axis, and both pooled outputs
    concatenated. TextEncoderT5, when shipped, returns (1, C, 1, L) states of which the Swift side keeps 77."""
    models = check.models
    first = check.text_encoder("TextEncoder", "hidden_embeds") if "TextEncoder" in models else (None, None)
    second = check.text_encoder("TextEncoder2", "hidden_embeds") if "TextEncoder2" in models else (None, None)
    t5_width = _check_t5(check) if "TextEncoderT5" in models else None
    if MMDIT not in models:
        return
    info = models[MMDIT]
    inputs = {i.name: i.shape for i in info.inputs}
    required = ("latent_image_embeddings", "timestep", "token_level_text_embeddings", "pooled_text_embeddings")
    missing = [name for name in required if name not in inputs]
    check.problems += [f"{MMDIT}: no input named {name}" for name in missing]
    if missing:
        return
    b, (h, w) = MMDIT_BATCH, check.latent_size
    latents = inputs["latent_image_embeddings"]
    channels = latents[1] if len(latents) == 4 else "C"
    check.expect(MMDIT, "latent_image_embeddings shape", latents, [b, channels, h, w])
    check.expect(MMDIT, "timestep shape", inputs["timestep"], [b])
    tokens = inputs["token_level_text_embeddings"]
    width = t5_width or (tokens[1] if len(tokens) == 4 else "C")
    check.expect(MMDIT, "token_level_text_embeddings shape", tokens, [b, width, 1, 2 * TEXT_LENGTH])
    clip_widths = [first[0], second[0]]
    if isinstance(width, int) and all(clip_widths) and sum(w for w in clip_widths if w) > width:
        check.problems.append(f"{MMDIT}: text width {width} cannot hold both CLIP encoders' states {clip_widths}")
    pooled = [first[1], second[1]]
    wanted = sum(p for p in pooled if p) if all(pooled) else inputs["pooled_text_embeddings"][1]
    check.expect(MMDIT, "pooled_text_embeddings shape", inputs["pooled_text_embeddings"], [b, wanted, 1, 1])
    check.expect(MMDIT, "first output shape", info.outputs[0].shape if info.outputs else None, latents)
    if "VAEDecoder" in models:
        z = models["VAEDecoder"].inputs[0].shape
        check.expect("VAEDecoder", "latent channels", z[1] if len(z) == 4 else None, channels)


def _check_t5(check: _Checker) -> int | None:
    """TextEncoderT5: float32 ids (1, L) with L >= 77, output encoder_hidden_states (1, C, 1, L); its width C."""
    info = check.models["TextEncoderT5"]
    ids = info.inputs[0].shape
    length = ids[1] if len(ids) == 2 else None
    if length is None or length < TEXT_LENGTH:
        check.problems.append(f"TextEncoderT5: first input shape is {ids}, the Swift package needs [1, L], L >= 77")
    check.expect("TextEncoderT5", "first input dtype", info.inputs[0].dtype, "float32")
    outputs = {o.name: o.shape for o in info.outputs}
    if "encoder_hidden_states" not in outputs:
        check.problems.append("TextEncoderT5: no output named encoder_hidden_states")
        return None
    shape = outputs["encoder_hidden_states"]
    width = shape[1] if len(shape) == 4 else None
    check.expect("TextEncoderT5", "encoder_hidden_states shape", shape, [1, width or "C", 1, length or "L"])
    return width


def _check_controlnets(check: _Checker) -> None:
    """ControlNets need the ControlledUnet (whole or chunked), whose residual inputs they feed."""
    models = check.models
    controlnets = {name: info for name, info in models.items() if name.startswith(f"{CONTROLNET_FOLDER}/")}
    parts = [CONTROLLED_UNET] if CONTROLLED_UNET in models else [n for n in chunk_names(CONTROLLED_UNET) if n in models]
    if controlnets and not parts:
        check.problems.append(f"ControlNets {', '.join(sorted(controlnets))} need {CONTROLLED_UNET}, which is missing")
    if parts:
        inputs = {i.name: i for part in parts for i in models[part].inputs}
        check.problems += _controlnet_problems(inputs, controlnets, check.latent_size)


def _controlnet_problems(
    unet_inputs: dict[str, FeatureInfo], controlnets: dict[str, ModelInfo], latent_size: tuple[int, int]
) -> list[str]:
    """ControlledUnet takes additional_residual_0..N-1; every ControlNet takes the UNet's sample, timestep
    and text states plus controlnet_cond (B, 3, 8h, 8w), and returns exactly those residuals, shape for
    shape, in float32 (ControlNet.swift sums several ControlNets' outputs as Float32 buffers)."""
    problems: list[str] = []
    h, w = latent_size
    residuals = {name: i.shape for name, i in unet_inputs.items() if name.startswith(RESIDUAL_PREFIX)}
    expected_names = {f"{RESIDUAL_PREFIX}{i}" for i in range(len(residuals))}
    if not residuals:
        problems.append(f"{CONTROLLED_UNET}: no {RESIDUAL_PREFIX}<i> inputs")
    elif set(residuals) != expected_names:
        problems.append(
            f"{CONTROLLED_UNET}: residual inputs {sorted(residuals)} are not numbered 0..{len(residuals) - 1}"
        )
    for name, info in sorted(controlnets.items()):
        inputs = {i.name: i for i in info.inputs}
        for feature in ("sample", "timestep", "encoder_hidden_states", "controlnet_cond"):
            if feature not in inputs:
                problems.append(f"{name}: no input named {feature}")
            elif feature == "timestep" and inputs[feature].shape != [CONTROLNET_BATCH]:
                problems.append(
                    f"{name}: timestep shape is {inputs[feature].shape}, the Swift package needs [{CONTROLNET_BATCH}]"
                )
            elif feature == "controlnet_cond":
                shape = inputs[feature].shape
                wanted = [CONTROLNET_BATCH, shape[1] if len(shape) == 4 else "C", 8 * h, 8 * w]
                if shape != wanted:
                    problems.append(f"{name}: controlnet_cond shape is {shape}, the Swift package needs {wanted}")
            elif feature in unet_inputs and inputs[feature].shape != unet_inputs[feature].shape:
                problems.append(
                    f"{name}: {feature} shape is {inputs[feature].shape}, "
                    f"{CONTROLLED_UNET} takes {unet_inputs[feature].shape}"
                )
        outputs = {o.name: o.shape for o in info.outputs}
        if outputs != residuals:
            problems.append(
                f"{name}: outputs {sorted(outputs.items())} do not line up with {CONTROLLED_UNET}'s residual inputs "
                f"{sorted(residuals.items())}"
            )
        not_float32 = sorted(o.name for o in info.outputs if o.dtype != "float32")
        if not_float32:
            problems.append(
                f"{name}: outputs {', '.join(not_float32)} are not float32, which the Swift package sums them as"
            )
    return problems


def _safety_checker_problems(info: ModelInfo) -> list[str]:
    """SafetyChecker.swift resizes the image to clip_input's (square) shape, always sends 512 x 512
    float16 images and a (1,) adjustment, and reads has_nsfw_concepts[0] as a yes/no."""
    inputs = {i.name: i for i in info.inputs}
    problems = [
        f"SafetyChecker: no input named {name}" for name in ("clip_input", "images", "adjustment") if name not in inputs
    ]

    def expect(model: str, what: str, actual: object, wanted: object) -> None:
        if actual != wanted:
            problems.append(f"{model}: {what} is {actual}, the Swift package needs {wanted}")

    if "clip_input" in inputs:
        shape = inputs["clip_input"].shape
        side = shape[2] if len(shape) == 4 else "S"
        expect("SafetyChecker", "clip_input shape", shape, [1, 3, side, side])
    if "images" in inputs:
        expect(
            "SafetyChecker",
            "images shape",
            inputs["images"].shape,
            [1, SAFETY_CHECKER_IMAGE_SIZE, SAFETY_CHECKER_IMAGE_SIZE, 3],
        )
        expect("SafetyChecker", "images dtype", inputs["images"].dtype, "float16")
    if "adjustment" in inputs:
        expect("SafetyChecker", "adjustment shape", inputs["adjustment"].shape, [1])
    outputs = {o.name: o for o in info.outputs}
    if "has_nsfw_concepts" not in outputs:
        problems.append("SafetyChecker: no output named has_nsfw_concepts")
    return problems


def supported_pipelines(models: Iterable[str]) -> list[Pipeline]:
    """What the Swift package can run with these Resources names: text-to-image with Unet (or its
    chunks), ControlNet with ControlledUnet, image-to-image with either and VAEEncoder."""
    shipped = set(models)

    def present(name: str) -> bool:
        return name in shipped or all(chunk in shipped for chunk in chunk_names(name))

    plain, controlled = present("Unet"), present(CONTROLLED_UNET)
    pipelines: list[Pipeline] = ["text-to-image"] if plain else []
    if (plain or controlled) and "VAEEncoder" in shipped:
        pipelines.append("image-to-image")
    if controlled:
        pipelines.append("controlnet")
    return pipelines
