"""Bundle stage: the Swift-ready `Resources/` folder plus `manifest.json`.

Models are copied under the contract's names (compiled `.mlmodelc` where the compile stage ran,
else `.mlpackage`), their interfaces read back from the saved files and checked against the
contract, and every file's digest recorded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from pydantic import BaseModel

from builder.coreml.package import describe_mlpackage, package_size
from builder.errors import UserError
from builder.sd.contract import LATENT_SCALE_FACTOR, RESOURCE_NAMES, TEXT_LENGTH, TOKENIZER_FILES, check_models
from builder.sd.manifest import FileEntry, Manifest, ModelEntry


class BundleParams(BaseModel):
    name: str
    version: str
    recipe_digest: str
    family: str
    latent_size: tuple[int, int]
    unet_batch_size: int
    attention: str
    compute_unit: str
    deployment_target: str
    components: dict[str, dict]  # component -> its compression settings
    precision: dict[str, str] = {}  # component -> Core ML compute precision
    tools: dict[str, str]
    sdbuild_version: str


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _time_ids_length(unet: ModelEntry | None) -> int | None:
    """Length of the Unet's time_ids input (SDXL), read back from the saved model."""
    time_ids = next((i for i in unet.inputs if i.name == "time_ids"), None) if unet else None
    return time_ids.shape[-1] if time_ids else None


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
    tokenizer = folders[0]
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer / name, resources / name)

    models: dict[str, ModelEntry] = {}
    for component, compression in p.components.items():
        resource_name = RESOURCE_NAMES[component]
        package = inputs[f"model.{component}"] / "model.mlpackage"
        compiled = f"compiled.{component}" in inputs
        if compiled:
            shipped = resources / f"{resource_name}.mlmodelc"
            shutil.copytree(inputs[f"compiled.{component}"] / "model.mlmodelc", shipped)
        else:
            shipped = resources / f"{resource_name}.mlpackage"
            shutil.copytree(package, shipped)
        interface = describe_mlpackage(package)
        report = inputs[f"model.{component}"] / "report.json"
        precision = p.precision.get(component, "float16")
        bits = {"float16": 32.0 if precision == "float32" else 16.0}.get(compression["mode"])  # uncompressed
        if report.is_file():
            bits = round(json.loads(report.read_text())["bits_per_weight"], 4)
        check = json.loads((inputs[f"check.{component}"] / "check.json").read_text())
        verified = inputs.get(f"verify.{component}")
        verification = json.loads((verified / "check.json").read_text()) if verified else {}
        models[resource_name] = ModelEntry(
            component=component,
            path=shipped.name,
            compiled=compiled,
            compression=compression,
            precision=precision,
            size_bytes=package_size(shipped),
            bits_per_weight=bits,
            inputs=interface.inputs,
            outputs=interface.outputs,
            psnr_db=check["psnr_db"],
            read_back_psnr_db=verification.get("read_back_psnr_db"),
            mixed_bit=verification.get("mixed_bit"),
        )

    problems = check_models(p.family, models, latent_size=p.latent_size, batch_size=p.unet_batch_size)
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
        text_sequence_length=TEXT_LENGTH,
        time_ids_length=_time_ids_length(models.get("Unet")),
        refiner="UnetRefiner" in models,
        attention=p.attention,
        compute_unit=p.compute_unit,
        deployment_target=p.deployment_target,
        compiled=all(m.compiled for m in models.values()),
        models=models,
        files=files,
        tools=p.tools,
    )
    (out / "manifest.json").write_text(manifest.model_dump_json(indent=2) + "\n")
    return {"files": len(files), "size_bytes": sum(f.size for f in files.values())}
