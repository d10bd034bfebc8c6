"""Bundle stage: the Swift-ready `Resources/` folder plus `manifest.json`.

Models are copied under the contract's names (compiled `.mlmodelc` where the compile stage ran,
else `.mlpackage`), their interfaces read back from the saved files and checked against the
contract, and every file's digest recorded, with the build's provenance (params, and the sources'
file digests from the provenance stages).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from builder.coreml.package import WEIGHTS_DIR, ModelInfo, describe_mlpackage, package_size
from builder.errors import UserError
from builder.sd.contract import (
    CONTROLNET_FOLDER,
    LATENT_SCALE_FACTOR,
    LATENT_SHIFT_FACTOR,
    T5_TOKENIZER_FILES,
    TEXT_LENGTH,
    TOKENIZER_FILES,
    check_models,
    chunk_names,
    resource_name,
    supported_pipelines,
)
from builder.sd.manifest import (
    ChunkEntry,
    Environment,
    FileEntry,
    Manifest,
    ModelEntry,
    Precision,
    RecipeRecord,
    SdbuildInfo,
    ShippedCompression,
    Sources,
    VariantRecord,
)
from builder.stages.params import BundleParams
from builder.stages.provenance import with_digests


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _time_ids_length(models: dict[str, ModelEntry]) -> int | None:
    """Length of the base UNet's time_ids input (SDXL), read back from the saved model."""
    unet = models.get("Unet") or models.get(chunk_names("Unet")[0])
    time_ids = next((i for i in unet.inputs if i.name == "time_ids"), None) if unet else None
    return time_ids.shape[-1] if time_ids else None


def _ship(
    inputs: dict[str, Path],
    key: str,
    component: str,
    compression: ShippedCompression,
    precision: Precision,
    resources: Path,
    name: str,
) -> ModelEntry:
    """Copy one model (`key`: component, or component.chunkN) into Resources and describe it."""
    package = inputs[f"model.{key}"] / "model.mlpackage"
    compiled = f"compiled.{key}" in inputs
    shipped = resources / f"{name}.{'mlmodelc' if compiled else 'mlpackage'}"
    shipped.parent.mkdir(exist_ok=True)  # controlnet/<Name>
    shutil.copytree(inputs[f"compiled.{key}"] / "model.mlmodelc" if compiled else package, shipped)
    interface = describe_mlpackage(package)
    report = inputs[f"model.{key}"] / "report.json"
    bits = {"float16": 32.0 if precision == "float32" else 16.0}.get(compression.mode)  # uncompressed
    if report.is_file():
        bits = round(json.loads(report.read_text())["bits_per_weight"], 4)
    check = json.loads((inputs[f"check.{key}"] / "check.json").read_text())
    if key.endswith(".chunk1"):  # a chunk is scored by the chain, which chunk 2's stage checks
        check["psnr_db"] = json.loads((inputs[f"check.{component}.chunk2"] / "check.json").read_text())["psnr_db"]
    verified = inputs.get(f"verify.{key}")
    verification = json.loads((verified / "check.json").read_text()) if verified else {}
    chunk = check.get("chunk")
    if chunk is not None:
        chunk = ChunkEntry(
            **chunk,
            weight_bytes=package_size(package / WEIGHTS_DIR),
            chain_read_back_psnr_db=verification.get("chain_read_back_psnr_db"),
        )
    return ModelEntry(
        component=component,
        path=shipped.relative_to(resources).as_posix(),
        compiled=compiled,
        compression=compression,
        precision=precision,
        size_bytes=package_size(shipped),
        bits_per_weight=bits,
        inputs=interface.inputs,
        outputs=interface.outputs,
        psnr_db=check["psnr_db"],
        decisions_match=check.get("decisions_match"),
        read_back_psnr_db=verification.get("read_back_psnr_db"),
        mixed_bit=verification.get("mixed_bit"),
        w8a8=verification.get("w8a8"),
        chunk=chunk,
    )


def _copy_t5_tokenizer(folder: Path, resources: Path) -> None:
    """tokenizer.json and tokenizer_config.json of SD3's tokenizer_3/ folder."""
    missing = [name for name in T5_TOKENIZER_FILES if not (folder / name).is_file()]
    if missing:
        raise UserError(
            f"the model's tokenizer_3/ folder lacks {', '.join(missing)}, which the Swift package needs to run T5",
            hint="use a complete SD3 diffusers folder (its T5 tokenizer saves both), "
            "or remove components.text_encoder_3",
        )
    for name in T5_TOKENIZER_FILES:
        shutil.copyfile(folder / name, resources / name)


def run(inputs: dict[str, Path], params: dict, out: Path) -> dict:
    p = BundleParams.model_validate(params)
    resources = out / "Resources"
    resources.mkdir()
    # SDXL refiner checkpoints have only the second tokenizer (same vocabulary and merges).
    folders = [inputs["tokenizer"] / t for t in ("tokenizer", "tokenizer_2") if (inputs["tokenizer"] / t).is_dir()]
    if not folders:
        raise UserError(
            "the model has no tokenizer/ (or tokenizer_2/) folder to take vocab.json and merges.txt from",
            hint="use a complete diffusers pipeline folder",
        )
    for name in TOKENIZER_FILES:
        shutil.copyfile(folders[0] / name, resources / name)
    if "text_encoder_3" in p.components:  # SD3's T5 runs only when its tokenizer files ship beside it
        _copy_t5_tokenizer(inputs["tokenizer"] / "tokenizer_3", resources)

    models: dict[str, ModelEntry] = {}
    controlled = any(c.startswith(f"{CONTROLNET_FOLDER}.") for c in p.components)  # then the UNet is ControlledUnet
    for component, compression in p.components.items():
        name = resource_name(component, controlled)
        parts = zip((".chunk1", ".chunk2"), chunk_names(name), strict=False) if component in p.chunked else [("", name)]
        for part, shipped_name in parts:
            precision = p.precision.get(component, "float16")
            models[shipped_name] = _ship(
                inputs, f"{component}{part}", component, compression, precision, resources, shipped_name
            )
    shipped: dict[str, ModelInfo] = dict(models)
    problems = check_models(p.family, shipped, latent_size=p.latent_size, batch_size=p.unet_batch_size)
    if problems:
        raise UserError("the bundle breaks the Swift package's contract: " + "; ".join(problems))

    files = {
        f.relative_to(resources).as_posix(): FileEntry(sha256=_sha256(f), size=f.stat().st_size)
        for f in sorted(resources.rglob("*"))
        if f.is_file()
    }
    h, w = p.latent_size
    manifest = Manifest(
        name=p.name,
        version=p.version,
        recipe_digest=p.recipe_digest,
        sdbuild_version=p.sdbuild_version,
        family=p.family,
        latent_size=(h, w),
        image_size=(8 * h, 8 * w),
        unet_batch_size=p.unet_batch_size,
        latent_scale_factor=LATENT_SCALE_FACTOR[p.family],
        latent_shift_factor=LATENT_SHIFT_FACTOR.get(p.family),
        text_sequence_length=TEXT_LENGTH,
        time_ids_length=_time_ids_length(models),
        refiner=any(name in models for name in ("UnetRefiner", chunk_names("UnetRefiner")[0])),
        pipelines=supported_pipelines(models),
        attention=p.attention,
        compute_unit=p.compute_unit,
        deployment_target=p.deployment_target,
        compiled=all(m.compiled for m in models.values()),
        models=models,
        files=files,
        tools=p.tools,
        recipe=RecipeRecord.model_validate(p.recipe),
        sdbuild=SdbuildInfo.model_validate(p.sdbuild),
        sources=Sources.model_validate(with_digests(p.sources, inputs)),
        environment=Environment.model_validate(p.environment),
        date=p.date,
        variant=VariantRecord.model_validate(p.variant) if p.variant is not None else None,
    )
    # A bundle outside a matrix has no `variant` key at all, as before matrices existed.
    shown = manifest.model_dump_json(indent=2, exclude={"variant"} if manifest.variant is None else None)
    (out / "manifest.json").write_text(shown + "\n")
    return {"files": len(files), "size_bytes": sum(f.size for f in files.values())}
