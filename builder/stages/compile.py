"""Compile stage: `.mlpackage` to `.mlmodelc` with Xcode's Core ML compiler (macOS only)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from builder.errors import UserError


def run(inputs: dict[str, Path], params: dict, out: Path) -> dict:
    package = inputs["model"] / "model.mlpackage"
    done = subprocess.run(
        ["xcrun", "coremlcompiler", "compile", str(package), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    compiled = out / "model.mlmodelc"
    if done.returncode != 0 or not compiled.is_dir():
        shutil.rmtree(compiled, ignore_errors=True)
        raise UserError(
            f"xcrun coremlcompiler failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()[-500:]}",
            hint="check that Xcode (not only the command line tools) is installed and selected with xcode-select",
        )
    return {"compiled": True}
