"""Rules spanning several recipe fields, each reported against the field the user must change."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .enums import Attention, Family
from .violations import Violation

if TYPE_CHECKING:
    from .model import Recipe

SPLIT_EINSUM_V2_CHUNK = 512
"""SPLIT_EINSUM_V2 splits the attention queries in chunks of this length."""
MAX_IMAGE_SIDE = {Family.SD: 1536, Family.SDXL: 2048, Family.SD3: 2048}
"""Largest image side in pixels: twice the family's largest native resolution (SD 2.x 768, SDXL
1024, SD3 1024). Beyond it the models produce repeated content and converting needs tens of GiB."""


@dataclass(frozen=True)
class UnetLayout:
    """The resolutions a family's UNet works at, and which of them run attention."""

    levels: int
    """Resolutions: the latents are halved levels - 1 times, so they must divide by 2**(levels - 1)."""
    attention_levels: tuple[int, ...]
    """Levels with attention (the mid block's counts at the lowest level)."""

    @property
    def multiple(self) -> int:
        return 2 ** (self.levels - 1)


# SD 1.x/2.x: 4 levels, attention on the upper three and in the mid block.
SD_UNET = UnetLayout(levels=4, attention_levels=(0, 1, 2, 3))
# SDXL base: 3 levels, attention only on the lower two (mid block included).
SDXL_UNET = UnetLayout(levels=3, attention_levels=(1, 2))
# SDXL refiner: 4 levels, attention on levels 1 and 2 and in the mid block.
SDXL_REFINER_UNET = UnetLayout(levels=4, attention_levels=(1, 2, 3))
# SD3's MMDiT: one resolution, cut into 2 x 2 patches (so latents must be even), attention over all of them.
SD3_MMDIT = UnetLayout(levels=2, attention_levels=(1,))


def unet_layouts(recipe: Recipe) -> list[UnetLayout]:
    """The UNets (or SD3's MMDiT) the recipe builds, by family."""
    if recipe.family is Family.SD3:
        return [SD3_MMDIT]
    if recipe.family is not Family.SDXL:
        return [SD_UNET]
    return [SDXL_UNET] + ([SDXL_REFINER_UNET] if recipe.components.unet_refiner is not None else [])


def recipe_violations(recipe: Recipe) -> list[Violation]:
    size = _size_violations(recipe)
    if not size and recipe.attention is Attention.SPLIT_EINSUM_V2:
        size = _split_einsum_v2_violations(recipe)
    if recipe.family is Family.SD3:
        family = _sd3_violations(recipe)
    else:
        family = _sdxl_violations(recipe) if recipe.family is Family.SDXL else _sd_violations(recipe)
        family += _unet_family_violations(recipe)
    return size + family + _compression_violations(recipe)


def _compression_violations(recipe: Recipe) -> list[Violation]:
    """Compression the deployment target's Core ML cannot run: grouped lookup tables, per-block
    scales and joint compression exist from iOS18/macOS15 (constexpr_lut_to_dense v2,
    constexpr_blockwise_shift_scale); activation quantization (quantize/dequantize) from iOS17/macOS14."""
    target = recipe.deployment_target
    ios18 = target.major >= (18 if target.platform == "iOS" else 15)
    ios17 = target.major >= (17 if target.platform == "iOS" else 14)
    violations = []
    for component, settings in recipe.components.enabled().items():
        compression, path = settings.compression, f"components.{component.value}.compression"
        granularity = getattr(compression, "granularity", "per_tensor")
        if granularity in ("per_grouped_channel", "per_block") and not ios18:
            kind = "palettization" if granularity == "per_grouped_channel" else "quantization"
            violations.append(
                Violation(
                    f"{path}.granularity",
                    f"{granularity} {kind} needs iOS18 or macOS15; deployment_target is {target.value}",
                    f"use granularity: {'per_tensor' if kind == 'palettization' else 'per_channel'}, "
                    "or raise deployment_target to iOS18 / macOS15",
                )
            )
        if compression.mode == "w8a8" and not ios17:
            violations.append(
                Violation(
                    "deployment_target",
                    f"{path}.mode w8a8 quantizes activations with Core ML's quantize/dequantize ops, which need "
                    f"iOS17 or macOS14 or newer; deployment_target is {target.value}",
                    "raise deployment_target to iOS17 / macOS14 or newer (the A17 Pro and M4 Neural Engines run "
                    "W8A8 fastest), or use mode: quantize (8-bit weights only)",
                )
            )
        elif compression.mode == "w8a8" and compression.palettize is not None and not ios18:
            violations.append(
                Violation(
                    f"{path}.palettize",
                    "palettized weights on top of w8a8 are coremltools' joint compression (an int8 lookup table "
                    f"scaled by constexpr_blockwise_shift_scale), which needs iOS18 or macOS15; deployment_target "
                    f"is {target.value}",
                    "remove palettize (8-bit weights), or raise deployment_target to iOS18 / macOS15",
                )
            )
    return violations


def _written_size(recipe: Recipe) -> tuple[str, int, tuple[int, int]]:
    """The size field the user wrote, its pixels-per-latent scale, and its value."""
    if recipe.written_latent_size is not None:
        return "latent_size", 1, recipe.written_latent_size
    if recipe.written_image_size is None:
        raise ValueError("a recipe needs latent_size or image_size; _size_violations reports one with neither")
    return "image_size", 8, recipe.written_image_size


def _size_violations(recipe: Recipe) -> list[Violation]:
    if recipe.written_latent_size is not None and recipe.written_image_size is not None:
        return [
            Violation(
                "image_size",
                "give latent_size or image_size, not both",
                "remove one of them; image_size is 8 x latent_size",
            )
        ]
    if recipe.written_latent_size is None and recipe.written_image_size is None:
        return [
            Violation(
                "latent_size",
                "no size given",
                "add `latent_size: [64, 64]` (latents) or `image_size: [512, 512]` (pixels)",
            )
        ]
    field, scale, (height, width) = _written_size(recipe)
    largest = MAX_IMAGE_SIDE[recipe.family] // 8 * scale
    if max(height, width) > largest:
        return [
            Violation(
                field,
                f"{field} [{height}, {width}] is larger than {family_name(recipe.family)} supports "
                f"({largest} per side; {MAX_IMAGE_SIDE[recipe.family]} pixels)",
                f"use at most [{largest}, {largest}]; the family's native sizes are far below it",
            )
        ]
    multiple = max(layout.multiple for layout in unet_layouts(recipe))
    halvings = multiple.bit_length() - 1
    step = multiple * scale
    if height % step == 0 and width % step == 0:
        return []
    if scale == 8 and (height % 8 or width % 8):
        why = "is not a multiple of 8 (the VAE scales latents by 8)"
    elif scale == 8:
        why = (
            f"gives latents [{height // 8}, {width // 8}], not multiples of {multiple} "
            f"(the UNet halves them {halvings} times)"
        )
    else:
        why = f"is not a multiple of {multiple} (the UNet halves it {halvings} times)"
    below = [max(step, side // step * step) for side in (height, width)]
    above = [-(-side // step) * step for side in (height, width)]
    return [Violation(field, f"{field} [{height}, {width}] {why}", f"use multiples of {step}, e.g. {below} or {above}")]


def family_name(family: Family) -> str:
    return {Family.SD: "family sd", Family.SDXL: "family sdxl", Family.SD3: "family sd3"}[family]


def _long_unaligned_levels(height: int, width: int, layouts: list[UnetLayout]) -> list[tuple[int, int]]:
    """(level, attention sequence length) of UNet levels that SPLIT_EINSUM_V2 would truncate."""
    levels = sorted({level for layout in layouts for level in layout.attention_levels})
    lengths = [(level, (height >> level) * (width >> level)) for level in levels]
    return [(lvl, n) for lvl, n in lengths if n >= SPLIT_EINSUM_V2_CHUNK and n % SPLIT_EINSUM_V2_CHUNK]


def _split_einsum_v2_violations(recipe: Recipe) -> list[Violation]:
    layouts = unet_layouts(recipe)
    bad = _long_unaligned_levels(*recipe.latent_size, layouts)
    if not bad:
        return []
    field, scale, (height, width) = _written_size(recipe)
    levels = ", ".join(f"level {lvl} has length {n}" for lvl, n in bad)
    nearby = _nearby_split_einsum_v2_sizes(*recipe.latent_size, layouts)
    sizes = " or ".join(str([h * scale, w * scale]) for h, w in nearby)
    return [
        Violation(
            field,
            f"with attention SPLIT_EINSUM_V2 every UNet attention sequence must be shorter than "
            f"{SPLIT_EINSUM_V2_CHUNK} or a multiple of it, else it is silently truncated; {levels}",
            f"set {field} to {sizes} (sizes near yours that fit), or use attention SPLIT_EINSUM",
        )
    ]


def _nearby_split_einsum_v2_sizes(
    height: int, width: int, layouts: list[UnetLayout], count: int = 3
) -> list[tuple[int, int]]:
    """The latent sizes closest to (height, width) that SPLIT_EINSUM_V2 handles exactly."""
    step = max(layout.multiple for layout in layouts)
    sides = range(step, 2 * max(height, width) + step + 1, step)
    fitting = [(h, w) for h in sides for w in sides if not _long_unaligned_levels(h, w, layouts)]
    fitting.sort(key=lambda hw: (abs(hw[0] - height) + abs(hw[1] - width), -hw[0] * hw[1]))
    return fitting[:count]


def _sdxl_violations(recipe: Recipe) -> list[Violation]:
    violations = []
    if recipe.unet_batch_size != 2:
        violations.append(
            Violation(
                "unet_batch_size",
                "sdxl needs a batch-2 UNet: its Swift pipeline always uses classifier-free guidance",
                "set `unet_batch_size: 2`",
            )
        )
    target = recipe.deployment_target
    if target.major < (17 if target.platform == "iOS" else 14):
        violations.append(
            Violation(
                "deployment_target",
                f"sdxl needs iOS17 or macOS14 or newer, not {target.value}",
                "use one of: iOS17, iOS18, macOS14, macOS15",
            )
        )
    if recipe.components.safety_checker is not None:
        violations.append(
            Violation(
                "components.safety_checker",
                "the sdxl pipeline has no safety checker",
                "remove `safety_checker:` from components",
            )
        )
    if recipe.components.text_encoder_2 is None:
        violations.append(
            Violation(
                "components.text_encoder_2",
                "sdxl needs its second text encoder",
                "add `text_encoder_2: {}` under components",
            )
        )
    if recipe.components.unet_refiner is not None and recipe.model.refiner is None:
        violations.append(
            Violation(
                "components.unet_refiner",
                "unet_refiner is converted from model.refiner, which is not given",
                "add `refiner:` under model (hub, local or synthetic, like the model), or remove unet_refiner",
            )
        )
    if recipe.model.refiner is not None and recipe.components.unet_refiner is None:
        violations.append(
            Violation(
                "model.refiner",
                "model.refiner is given but components.unet_refiner is not built",
                "add `unet_refiner: {}` under components, or remove model.refiner",
            )
        )
    if recipe.model.controlnets:
        violations.append(
            Violation(
                "model.controlnets",
                "the sdxl pipeline of the Swift package runs no ControlNet",
                "remove `controlnets:` from model, or use family: sd",
            )
        )
    if recipe.components.controlnet is not None:
        violations.append(
            Violation(
                "components.controlnet",
                "the sdxl pipeline of the Swift package runs no ControlNet",
                "remove `controlnet:` from components",
            )
        )
    return violations


def _controlnet_violations(recipe: Recipe) -> list[Violation]:
    """ControlNets need a batch-2 UNet, and ControlNet settings need ControlNets."""
    violations = []
    if recipe.components.controlnet is not None and not recipe.model.controlnets:
        violations.append(
            Violation(
                "components.controlnet",
                "there is no ControlNet to build: model.controlnets is empty",
                "add ControlNets under model.controlnets (hub, local or synthetic), "
                "or remove `controlnet:` from components",
            )
        )
    if recipe.model.controlnets and recipe.unet_batch_size != 2:
        violations.append(
            Violation(
                "unet_batch_size",
                "ControlNets need a batch-2 UNet: the Swift package always runs them at batch 2 "
                "and adds their outputs to the UNet's inputs",
                "set `unet_batch_size: 2`, or remove model.controlnets",
            )
        )
    return violations


def _sd_violations(recipe: Recipe) -> list[Violation]:
    violations = []
    if recipe.model.refiner is not None:
        violations.append(
            Violation(
                "model.refiner",
                "only sdxl has a refiner",
                "remove `refiner:` or set `family: sdxl`",
            )
        )
    if recipe.components.unet_refiner is not None:
        violations.append(
            Violation(
                "components.unet_refiner",
                "only sdxl has a refiner UNet",
                "remove `unet_refiner:` or set `family: sdxl`",
            )
        )
    if recipe.components.text_encoder_2 is not None:
        violations.append(
            Violation(
                "components.text_encoder_2",
                "only sdxl has a second text encoder",
                "remove `text_encoder_2:` or set `family: sdxl`",
            )
        )
    violations.extend(_controlnet_violations(recipe))
    if recipe.components.text_encoder is None:
        violations.append(
            Violation(
                "components.text_encoder",
                "sd needs its text encoder",
                "add `text_encoder: {}` under components",
            )
        )
    return violations


def _unet_family_violations(recipe: Recipe) -> list[Violation]:
    """sd and sdxl denoise with a UNet; SD3's components are for family sd3 only."""
    violations = []
    if recipe.components.unet is None:
        violations.append(
            Violation(
                "components.unet", f"{family_name(recipe.family)} needs its UNet", "add `unet: {}` under components"
            )
        )
    for component in ("mmdit", "text_encoder_3"):
        if getattr(recipe.components, component) is not None:
            violations.append(
                Violation(
                    f"components.{component}",
                    f"only sd3 has {component}",
                    f"remove `{component}:` or set `family: sd3`",
                )
            )
    return violations


def _sd3_violations(recipe: Recipe) -> list[Violation]:
    """SD3 (StableDiffusion3Pipeline): two CLIP encoders, optional T5, the MMDiT and a 16-channel VAE;
    always batch 2 (classifier-free guidance), iOS17 / macOS14 or newer."""
    violations = []
    components = recipe.components
    for component, what in (
        ("text_encoder", "its first text encoder (CLIP-L)"),
        ("text_encoder_2", "its second text encoder (CLIP-G)"),
        ("mmdit", "its MMDiT denoiser"),
    ):
        if getattr(components, component) is None:
            violations.append(
                Violation(f"components.{component}", f"sd3 needs {what}", f"add `{component}: {{}}` under components")
            )
    for component, why in (
        ("unet", "sd3 denoises with the MMDiT, not a UNet"),
        ("unet_refiner", "sd3 has no refiner"),
        ("safety_checker", "the sd3 pipeline has no safety checker"),
        ("controlnet", "the sd3 pipeline of the Swift package runs no ControlNet"),
    ):
        if getattr(components, component) is not None:
            hint = "use `mmdit:` instead" if component == "unet" else f"remove `{component}:` from components"
            violations.append(Violation(f"components.{component}", why, hint))
    if recipe.model.refiner is not None:
        violations.append(Violation("model.refiner", "sd3 has no refiner", "remove `refiner:` from model"))
    if recipe.model.controlnets:
        violations.append(
            Violation(
                "model.controlnets",
                "the sd3 pipeline of the Swift package runs no ControlNet",
                "remove `controlnets:` from model",
            )
        )
    if recipe.unet_batch_size != 2:
        violations.append(
            Violation(
                "unet_batch_size",
                "sd3 needs a batch-2 MMDiT: its Swift pipeline always passes a (2,) timestep",
                "set `unet_batch_size: 2`",
            )
        )
    if recipe.attention is not Attention.ORIGINAL:
        violations.append(
            Violation(
                "attention",
                "the sd3 MMDiT has one attention form, for the GPU, where the Swift SD3 pipeline runs it; "
                f"{recipe.attention.value} is a Neural Engine rewrite of the UNet only",
                "set `attention: ORIGINAL`",
            )
        )
    target = recipe.deployment_target
    if target.major < (17 if target.platform == "iOS" else 14):
        violations.append(
            Violation(
                "deployment_target",
                f"sd3 needs iOS17 or macOS14 or newer, not {target.value}",
                "use one of: iOS17, iOS18, macOS14, macOS15",
            )
        )
    return violations
