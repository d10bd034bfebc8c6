"""Compile stage: `.mlpackage` to `.mlmodelc` with Xcode's Core ML compiler (macOS only).

The compiler's exit status is not the whole story: the compiled folder must hold what the Core ML
runtime reads for an ML Program (every sdbuild model is one), or the Swift package would fail at
load time on the user's device instead of here.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from builder.coreml.package import WEIGHTS_DIR
from builder.errors import UserError
from builder.stages.tools import xcrun

COMPILED_NAME = "model.mlmodelc"
# What `coremlcompiler compile` writes for an ML Program besides metadata.json and analytics/: the
# compiled model description, the program text, and the weights when the package has any.
_PROGRAM_FILES = ("coremldata.bin", "model.mil")
_WEIGHT_FILE = "weights/weight.bin"


def missing_files(package: Path, compiled: Path) -> list[str]:
    """Files a compiled ML Program lacks (absent or empty), relative to the `.mlmodelc` folder."""
    expected = [*_PROGRAM_FILES]
    if (package / WEIGHTS_DIR / "weight.bin").is_file():
        expected.append(_WEIGHT_FILE)
    return [name for name in expected if not (compiled / name).is_file() or (compiled / name).stat().st_size == 0]


def run(inputs: dict[str, Path], params: dict, out: Path) -> dict:
    package = inputs["model"] / "model.mlpackage"
    command = [xcrun(), "coremlcompiler", "compile", str(package), str(out)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip()[-500:] or "no output"
        raise UserError(
            f"xcrun coremlcompiler failed (exit {done.returncode}): {said}",
            hint="check that Xcode (not only the command line tools) is installed and selected with xcode-select",
        )
    compiled = out / COMPILED_NAME
    if not compiled.is_dir():
        raise UserError(
            f"xcrun coremlcompiler exited 0 but wrote no {COMPILED_NAME}",
            hint="run `xcrun coremlcompiler compile` on the package by hand to see what it does",
        )
    missing = missing_files(package, compiled)
    if missing:
        raise UserError(
            f"xcrun coremlcompiler exited 0 but {COMPILED_NAME} lacks {', '.join(missing)} (an ML Program needs them)",
            hint="update Xcode; the compiled model would not load in the Swift package",
        )
    return {"compiled": True, "files": sum(1 for f in compiled.rglob("*") if f.is_file())}
