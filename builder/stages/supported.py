"""What the recipe schema allows but this version cannot build, refused at plan time with the field
to change; and the one build setting derived from the family (the VAE's precision)."""

from __future__ import annotations

from pathlib import Path

from builder.recipe import LoadedRecipe
from builder.sd.contract import controlnet_name
from builder.sd.manifest import Precision
from builder.sd.presets import PRESETS
from builder.sd.settings import ANALYSED_COMPONENTS, COMPONENT_SETTINGS


def check_supported(loaded: LoadedRecipe) -> None:
    """Refuse, with the field to change, what the recipe schema allows but this version cannot build."""
    recipe = loaded.recipe
    if recipe.model.synthetic is not None and recipe.model.synthetic.preset not in PRESETS:
        raise loaded.error(
            "model.synthetic.preset",
            f"unknown synthetic preset '{recipe.model.synthetic.preset}'",
            f"use one of: {', '.join(sorted(PRESETS))}",
        )
    refiner = recipe.model.refiner
    if refiner is not None and refiner.synthetic is not None and refiner.synthetic.preset not in PRESETS:
        raise loaded.error(
            "model.refiner.synthetic.preset",
            f"unknown synthetic preset '{refiner.synthetic.preset}'",
            f"use one of: {', '.join(sorted(PRESETS))}",
        )
    for component in recipe.components.enabled():
        if component.value not in COMPONENT_SETTINGS:
            raise loaded.error(
                f"components.{component.value}",
                f"component {component.value} cannot be converted yet",
                f"remove it; supported: {', '.join(COMPONENT_SETTINGS)}",
            )
    for component, settings in recipe.components.enabled().items():
        if settings.compression.mode != "mixed":
            continue
        if component.value not in ANALYSED_COMPONENTS:
            raise loaded.error(
                f"components.{component.value}.compression.mode",
                "mixed-bit palettization is analysed for the UNets only (unet, unet_refiner)",
                "use mode: palettize with one nbits for this component",
            )
        check_mixed_recipe(settings.compression.recipe)
    for component, settings in recipe.components.enabled().items():
        if settings.compression.mode == "w8a8":
            _check_w8a8(loaded, component.value)
    for vae in ("vae_decoder", "vae_encoder"):
        settings = getattr(recipe.components, vae)
        if settings is not None and vae_precision(loaded) == "float32" and settings.compression.mode != "float16":
            raise loaded.error(
                f"components.{vae}.compression.mode",
                "the SDXL VAE overflows in float16, so it is converted in float32 and cannot be compressed",
                "use mode: float16 (the VAE then stays float32), or set model.vae to a float16-safe VAE "
                "such as madebyollin/sdxl-vae-fp16-fix",
            )
    if recipe.family.value == "sd3" and recipe.model.local is not None and recipe.model.local.path.is_file():
        raise loaded.error(
            "model.local.path",
            "single-file checkpoints are unpacked for sd and sdxl only",
            "give an SD3 diffusers folder (e.g. a snapshot of stabilityai/stable-diffusion-3-medium-diffusers)",
        )
    t5 = recipe.components.text_encoder_3
    synthetic = recipe.model.synthetic
    if t5 is not None and synthetic is not None and PRESETS[synthetic.preset].text_encoder_3 is None:
        with_t5 = sorted(name for name, preset in PRESETS.items() if preset.text_encoder_3 is not None)
        raise loaded.error(
            "components.text_encoder_3",
            f"synthetic preset '{synthetic.preset}' has no T5 text encoder",
            f"remove text_encoder_3 from components (the Swift pipeline runs without T5); presets with T5: "
            f"{', '.join(with_t5)}",
        )
    if t5 is not None and t5.compression.mode != "float16":
        raise loaded.error(
            "components.text_encoder_3.compression.mode",
            "T5 overflows in float16, so it is converted in float32 and cannot be compressed",
            "use mode: float16 (T5 then stays float32), or remove text_encoder_3 (the Swift pipeline runs without T5)",
        )
    if recipe.components.safety_checker is not None:
        _check_has_safety_checker(loaded)
    if recipe.model.controlnets:
        _check_controlnets(loaded)
        unet = recipe.components.unet
        if unet is not None and unet.compression.mode == "mixed":
            raise loaded.error(
                "components.unet.compression.mode",
                "mixed-bit recipes are analysed on the plain UNet, not the ControlledUnet built with ControlNets",
                "use mode: palettize with one nbits, or remove model.controlnets",
            )


def _check_w8a8(loaded: LoadedRecipe, component: str) -> None:
    """W8A8 quantizes a whole plain UNet in torch (builder/sd/w8a8)."""
    field = f"components.{component}.compression.mode"
    if component not in ANALYSED_COMPONENTS:
        raise loaded.error(
            field, "w8a8 is calibrated and analysed for the UNets only (unet, unet_refiner)", "use mode: quantize"
        )
    if loaded.recipe.chunk_unet:
        raise loaded.error(
            field,
            "a w8a8 UNet is quantized and converted whole; chunk_unet cuts the float module",
            "set chunk_unet: false, or use mode: quantize or palettize for a chunked UNet",
        )
    if loaded.recipe.model.controlnets:
        raise loaded.error(
            field,
            "w8a8 is analysed on the plain UNet, not the ControlledUnet built with ControlNets",
            "use mode: quantize or palettize, or remove model.controlnets",
        )


def component_precision(loaded: LoadedRecipe, component: str) -> Precision:
    """The Core ML compute precision of a component: the VAE's by family (vae_precision), float32 for
    SD3's T5 (T5 v1.1's feed-forward outputs overflow float16, which is why transformers keeps its
    `wo` layers in float32), float16 for every other."""
    if component in ("vae_decoder", "vae_encoder"):
        return vae_precision(loaded)
    return "float32" if component == "text_encoder_3" else "float16"


def vae_precision(loaded: LoadedRecipe) -> Precision:
    """SDXL's own VAE overflows in float16 and is converted in float32; a replacement VAE
    (model.vae, e.g. a float16-safe one) and SD's VAE are converted in float16."""
    recipe = loaded.recipe
    return "float32" if recipe.family.value == "sdxl" and recipe.model.vae is None else "float16"


def _check_controlnets(loaded: LoadedRecipe) -> None:
    """Known synthetic presets, and names that stay apart in Resources/controlnet/."""
    from builder.sd.presets import CONTROLNET_PRESETS

    seen: dict[str, int] = {}
    for index, source in enumerate(loaded.recipe.model.controlnets):
        field = f"model.controlnets.{index}"
        if source.synthetic is not None and source.synthetic.preset not in CONTROLNET_PRESETS:
            raise loaded.error(
                f"{field}.synthetic.preset",
                f"unknown synthetic ControlNet preset '{source.synthetic.preset}'",
                f"use one of: {', '.join(sorted(CONTROLNET_PRESETS))}",
            )
        name = controlnet_name(source)
        if name in seen:
            raise loaded.error(
                field,
                f"ControlNets {seen[name]} and {index} would both be controlnet/{name}",
                "list each ControlNet once (a local folder is named after its folder: rename one)",
            )
        seen[name] = index


def _check_has_safety_checker(loaded: LoadedRecipe) -> None:
    """A safety checker must exist in the source; hub pipelines are checked when downloaded."""
    source = loaded.recipe.model
    if source.synthetic is not None and PRESETS[source.synthetic.preset].safety_checker is None:
        missing = f"synthetic preset '{source.synthetic.preset}' has no safety checker"
    elif (
        source.local is not None and source.local.path.is_dir() and not (source.local.path / "safety_checker").is_dir()
    ):
        missing = f"{source.local.path} has no safety_checker/ folder"
    elif source.local is not None and source.local.path.is_file():
        missing = f"the single-file checkpoint {source.local.path.name} has no safety checker"
    else:
        return
    with_checker = sorted(name for name, preset in PRESETS.items() if preset.safety_checker is not None)
    raise loaded.error(
        "components.safety_checker",
        missing,
        "remove safety_checker from components (SD 2.x pipelines ship without one); "
        f"presets with one: {', '.join(with_checker)}",
    )


def check_mixed_recipe(path: Path) -> None:
    """Validate a mixed-bit recipe file before anything runs (its errors name its own lines)."""
    from builder.sd.mbp.recipe_file import load_recipe_file

    load_recipe_file(path)
