"""Shared helpers: a throw-away workspace with the project's recipes, and the CLI run as users run it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]


@dataclass
class Workspace:
    root: Path
    cache: Path

    def run(self, *args: str, env: dict[str, str] | None = None, check: bool = False) -> subprocess.CompletedProcess:
        """`sdbuild --workspace ROOT --cache-dir CACHE ARGS...` in a fresh interpreter."""
        command = [
            sys.executable,
            "-m",
            "builder.cli",
            "--workspace",
            str(self.root),
            "--cache-dir",
            str(self.cache),
            *args,
        ]
        done = subprocess.run(command, cwd=self.root, capture_output=True, text=True, env=os.environ | (env or {}))
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
        return done

    def build_json(self, recipe: str = "recipes/tiny-sd.yaml") -> dict:
        return json.loads(self.run("build", recipe, "--json", check=True).stdout)

    def plan_json(self, recipe: str = "recipes/tiny-sd.yaml") -> dict[str, dict]:
        return {e["id"]: e for e in json.loads(self.run("plan", recipe, "--json", check=True).stdout)}

    @property
    def bundle(self) -> Path:
        return self.root / "artifacts" / "tiny-sd" / "latest"


def make_workspace(root: Path) -> Workspace:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(PROJECT / "recipes", root / "recipes")
    return Workspace(root=root, cache=root / "cache")


@pytest.fixture(scope="session", autouse=True)
def manifests_follow_the_published_schema(tmp_path_factory: pytest.TempPathFactory):
    """Every manifest.json any test built (artifacts and cache objects alike) validates against the
    JSON Schema `sdbuild schema --manifest` publishes; checked once all tests have run."""
    yield
    import jsonschema

    from builder.sd.manifest import manifest_json_schema

    validator = jsonschema.Draft202012Validator(manifest_json_schema())
    problems = [
        f"{path}: {error.json_path}: {error.message}"
        for path in sorted(tmp_path_factory.getbasetemp().rglob("manifest.json"))
        if not path.is_symlink()
        for error in validator.iter_errors(json.loads(path.read_text()))
    ]
    assert not problems, "manifests that break the published schema:\n" + "\n".join(problems[:20])


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    return make_workspace(tmp_path / "ws")


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workspace, dict]:
    """One cold build of the default recipe, shared by the tests that only read its results."""
    ws = make_workspace(tmp_path_factory.mktemp("built"))
    return ws, ws.build_json()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small models: a second torch thread only adds synchronisation, badly so on a busy 2-core CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_stages_in_process(specs, done: dict, folder: Path) -> dict[str, Path]:
    """Run stage functions in this process, in order, without workers or cache: for tests that need
    many related builds fast. `done` (stage id, params and input folders -> output folder) is shared
    between calls, so a stage with the same params and inputs runs once. Returns stage id -> output
    folder for these specs."""
    import importlib

    produced: dict[str, Path] = {}
    for spec in specs:
        if spec.unavailable:
            continue
        inputs = {name: produced[up] for name, up in spec.inputs.items() if up in produced} | spec.external_inputs
        key = (spec.id, json.dumps(spec.params, sort_keys=True), json.dumps({n: str(p) for n, p in inputs.items()}))
        if key not in done:
            out = folder / str(len(done))
            out.mkdir()
            module, function = spec.function.split(":")
            getattr(importlib.import_module(module), function)(inputs, spec.params, out)
            done[key] = out
        produced[spec.id] = done[key]
    return produced


def resource_bytes(bundle: Path) -> dict[str, bytes]:
    resources = bundle / "Resources"
    return {p.relative_to(resources).as_posix(): p.read_bytes() for p in sorted(resources.rglob("*")) if p.is_file()}


def rewrite_and_trace(folder: Path, component: str, family: str, attention: str, work: Path) -> tuple[dict, dict]:
    """Run the rewrite and trace stages in this process on a pipeline `folder` (latent 16x16, batch 2):
    (trace summary, architecture plus the traced output folder as "traced")."""
    from builder.stages import rewrite, trace

    rewritten, traced = work / f"rewrite-{component}-{attention}", work / f"trace-{component}-{attention}"
    rewritten.mkdir()
    traced.mkdir()
    params = {
        "component": component,
        "family": family,
        "attention": attention,
        "latent_size": [16, 16],
        "batch_size": 2,
    }
    rewrite.run({"model": folder}, params, rewritten)
    summary = trace.run({"rewritten": rewritten}, {"component": component}, traced)
    return summary, json.loads((rewritten / "architecture.json").read_text()) | {"traced": str(traced)}


@pytest.fixture(scope="session")
def sdxl_built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workspace, dict]:
    """One build of recipes/tiny-sdxl.yaml (base, refiner, both VAEs), shared by the modules that read it."""
    ws = make_workspace(tmp_path_factory.mktemp("sdxl-built"))
    return ws, ws.build_json("recipes/tiny-sdxl.yaml")


CONTROLNET_RECIPE = """\
name: tiny-sd
version: 0.1.0
family: sd
model:
  synthetic: {preset: tiny-sd, seed: 0}
  controlnets:
    - synthetic: {preset: tiny-sd, seed: 0}
latent_size: [16, 16]
attention: ORIGINAL
compute_unit: CPU_AND_GPU
deployment_target: macOS13
components:
  text_encoder: {}
  unet: {}
  vae_decoder: {}
  controlnet:
    compression: {mode: palettize, nbits: 8}
"""


@pytest.fixture(scope="session")
def controlnet_builds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workspace, dict, dict]:
    """CONTROLNET_RECIPE (recipes/controlled.yaml) built with ORIGINAL, then with SPLIT_EINSUM in the
    same cache: (workspace, build reports, manifests) by attention. The SPLIT_EINSUM build is the one
    published and the recipe file as it stands."""
    ws = make_workspace(tmp_path_factory.mktemp("controlled"))
    recipe = ws.root / "recipes" / "controlled.yaml"
    recipe.write_text(CONTROLNET_RECIPE)
    results = {"ORIGINAL": ws.build_json("recipes/controlled.yaml")}
    manifests = {"ORIGINAL": json.loads((ws.bundle / "manifest.json").read_text())}
    recipe.write_text(CONTROLNET_RECIPE.replace("attention: ORIGINAL", "attention: SPLIT_EINSUM"))
    results["SPLIT_EINSUM"] = ws.build_json("recipes/controlled.yaml")
    manifests["SPLIT_EINSUM"] = json.loads((ws.bundle / "manifest.json").read_text())
    return ws, results, manifests


# The modules whose shared builds take longest (from `--durations` of the whole suite), longest first.
LONGEST_MODULES = (
    "test_mid_size.py",
    "test_w8a8.py",
    "test_controlnet.py",
    "test_matrix.py",
    "test_sdxl.py",
    "test_chunk.py",
    "test_mbp.py",
    "test_dask_executor.py",
)


# Modules reading the same session-scoped builds (`sdxl_built`, `controlnet_builds`) run on one worker,
# so that those builds are made once.
SHARING_BUILDS = ("test_controlnet.py", "test_sdxl.py", "test_generate.py")


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """`--dist loadfile`, with SHARING_BUILDS as one unit of work."""
    from xdist.scheduler import LoadFileScheduling

    class SharedBuildsScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = super()._split_scope(nodeid)
            return SHARING_BUILDS[0] if Path(module).name in SHARING_BUILDS else module

    return SharedBuildsScheduling(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest modules first, then the others holding `slow` tests, then the rest: the suite runs on
    two xdist workers, one module per worker at a time (`--dist loadfile`), and a long module left for
    last would run alone."""
    slow_modules = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> tuple[int, int]:
        if item.path.name in LONGEST_MODULES:
            return 0, LONGEST_MODULES.index(item.path.name)
        return (1 if item.path in slow_modules else 2), 0

    items.sort(key=rank)
