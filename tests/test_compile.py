"""The compile stage and the bundle's `.mlmodelc` branch, on Linux, with a fake `xcrun` on PATH.

The fake stands in for Xcode's `xcrun coremlcompiler`: it writes the tree a compiled ML Program
has (coremldata.bin, model.mil, metadata.json, analytics/, weights/weight.bin), or fails, or
leaves a file out, as each test asks. `SDBUILD_XCRUN` is the seam that lets the stage run here.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import Workspace

from builder.cli import main
from builder.stages.tools import XCRUN_VARIABLE, compile_unavailable

# argv: xcrun coremlcompiler compile PACKAGE OUT  |  xcrun coremlcompiler version
FAKE_XCRUN = """#!{python}
import hashlib, shutil, sys
from pathlib import Path

MODE = {mode!r}
args = sys.argv[1:]
if args == ["coremlcompiler", "version"]:
    print("fake-coremlcompiler-1 ({mode})")
    sys.exit(0)
assert args[:2] == ["coremlcompiler", "compile"], args
package, out = Path(args[2]), Path(args[3])
if MODE == "fail":
    print("coremlcompiler: error: fake failure compiling " + package.name, file=sys.stderr)
    sys.exit(1)
compiled = out / (package.stem + ".mlmodelc")
(compiled / "analytics").mkdir(parents=True)
spec = (package / "Data/com.apple.CoreML/model.mlmodel").read_bytes()
(compiled / "coremldata.bin").write_bytes(hashlib.sha256(spec).digest())
(compiled / "analytics" / "coremldata.bin").write_bytes(b"analytics")
(compiled / "metadata.json").write_text("[]")
if MODE != "no-mil":
    (compiled / "model.mil").write_text("program(1.0)\\n{{\\n}}\\n")
weights = package / "Data/com.apple.CoreML/weights"
if weights.is_dir():
    shutil.copytree(weights, compiled / "weights")
print(compiled)
"""


def _fake_xcrun(folder: Path, mode: str) -> Path:
    folder.mkdir()
    program = folder / "xcrun"
    program.write_text(FAKE_XCRUN.format(python=sys.executable, mode=mode))
    program.chmod(0o755)
    return folder


@pytest.fixture
def compiling(built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A workspace on a copy of the default build's cache (only compile and bundle are left to run),
    and a function that puts a fake xcrun of the given mode on PATH and builds."""
    ws, _ = built
    copy = Workspace(root=tmp_path / "ws", cache=tmp_path / "cache")
    shutil.copytree(ws.root / "recipes", copy.root / "recipes")
    shutil.copytree(ws.cache, copy.cache, symlinks=True)

    def build(mode: str, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
        bin_folder = _fake_xcrun(tmp_path / f"bin-{mode}", mode)
        monkeypatch.setenv("PATH", f"{bin_folder}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.setenv(XCRUN_VARIABLE, "xcrun")
        capsys.readouterr()
        recipe = str(copy.root / "recipes" / "tiny-sd.yaml")
        code = main(["--workspace", str(copy.root), "--cache-dir", str(copy.cache), "build", recipe])
        out, err = capsys.readouterr()
        return code, out, err

    return copy, build


def test_compiled_bundle_ships_mlmodelc_folders(compiling, capsys):
    ws, build = compiling
    code, _, err = build("ok", capsys)
    assert code == 0, err
    bundle = ws.root / "artifacts" / "tiny-sd" / "latest"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["compiled"] is True
    names = {"TextEncoder", "Unet", "VAEDecoder", "VAEEncoder"}
    assert {name: entry["path"] for name, entry in manifest["models"].items()} == {
        name: f"{name}.mlmodelc" for name in names
    }
    assert all(entry["compiled"] for entry in manifest["models"].values())
    shipped = sorted(p.name for p in (bundle / "Resources").iterdir() if p.is_dir())
    assert shipped == sorted(f"{name}.mlmodelc" for name in names)
    for name in names:
        assert f"{name}.mlmodelc/model.mil" in manifest["files"]
        assert f"{name}.mlmodelc/weights/weight.bin" in manifest["files"]
        # The interface is still read back from the package the compiler was given.
        assert manifest["models"][name]["inputs"]
    assert "not compiled" not in err


def test_a_failing_compiler_is_one_clear_error(compiling, capsys):
    _, build = compiling
    code, _, err = build("fail", capsys)
    assert code == 2
    assert "compile:" in err and "xcrun coremlcompiler failed (exit 1)" in err
    assert "fake failure compiling model.mlpackage" in err
    assert "Traceback" not in err


def test_an_incomplete_compiled_model_is_refused(compiling, capsys):
    _, build = compiling
    code, _, err = build("no-mil", capsys)
    assert code == 2
    assert "lacks model.mil" in err
    assert "Traceback" not in err


def test_compiling_needs_macos_unless_the_seam_is_named(monkeypatch, tmp_path):
    monkeypatch.delenv(XCRUN_VARIABLE, raising=False)
    if sys.platform != "darwin":
        assert compile_unavailable() == "needs macOS (xcrun coremlcompiler)"
    monkeypatch.setenv(XCRUN_VARIABLE, str(tmp_path / "no-such-xcrun"))
    assert "names no executable program" in compile_unavailable()
