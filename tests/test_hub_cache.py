"""Hub sources through the standard Hugging Face cache: read offline, never fetched again, hard-linked
into the build cache without touching the user's cache, and `sdbuild fetch` for what is missing."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import make_workspace, resource_bytes
from hf_cache import REVISION, SD21_BASE, FakeHub, LoopbackHub, repo_folder, write_hf_cache

from builder.engine.store import Store
from builder.errors import UserError
from builder.hub.cache import HubRef, link_or_copy, link_snapshot
from builder.hub.layout import RepoKind, missing_files
from builder.sd.presets import get_preset
from builder.sd.synthetic import write_synthetic_pipeline

TINY = "  synthetic: {preset: tiny-sd, seed: 0}"


def _recipe(ws, name: str, source: str) -> str:
    """tiny-sd from another source; float16 and without the VAE encoder, to build in less time."""
    text = (ws.root / "recipes" / "tiny-sd.yaml").read_text().replace("name: tiny-sd", f"name: {name}")
    text = text.replace("  unet:\n    compression: {mode: palettize, nbits: 6}\n", "  unet: {}\n")
    text = text.replace("  vae_encoder: {}\n", "")
    (ws.root / "recipes" / f"{name}.yaml").write_text(text.replace(TINY, source))
    return f"recipes/{name}.yaml"


def _hub_recipe(ws, name: str = "tiny-hub") -> str:
    return _recipe(ws, name, f"  hub: {{id: {SD21_BASE}, revision: {REVISION}}}")


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """The tiny-sd pipeline's files (seed 0): the bytes the synthetic source writes."""
    folder = tmp_path_factory.mktemp("weights") / "tiny-sd"
    write_synthetic_pipeline(get_preset("tiny-sd"), 0, folder)
    return folder


@pytest.fixture
def hub(tmp_path):
    loopback = LoopbackHub()
    yield loopback
    loopback.close()


def _env(hf_cache: Path, hub: LoopbackHub, offline: bool = True) -> dict[str, str]:
    return {
        "HF_HUB_CACHE": str(hf_cache),
        "HF_HOME": str(hf_cache.parent / "hf-home"),
        "HF_HUB_OFFLINE": "1" if offline else "0",
        "HF_ENDPOINT": hub.endpoint,
    }


def _errors(done: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in done.stderr, done.stderr
    return [line for line in done.stderr.splitlines() if line.startswith("error:")]


def test_the_loopback_hub_sees_a_request(hub):
    with pytest.raises(OSError):
        urllib.request.urlopen(hub.endpoint + "/api/models", timeout=0.2)
    assert hub.attempts() == 1


def test_offline_build_from_the_hf_cache_equals_the_local_build(tiny_weights, tmp_path, hub):
    ws = make_workspace(tmp_path / "ws")
    # the local folder holds what the hub source takes for a recipe without a safety checker
    shutil.copytree(
        tiny_weights, ws.root / "models" / "tiny", ignore=shutil.ignore_patterns("safety_checker", "feature_extractor")
    )
    hf_cache = tmp_path / "hf" / "hub"
    snapshot = write_hf_cache(hf_cache, SD21_BASE, REVISION, tiny_weights)
    env = _env(hf_cache, hub)

    # An empty build cache, so the source stage's hard-linked output is the object stored (an earlier
    # output with the same bytes would serve instead).
    built_hub = json.loads(ws.run("build", _hub_recipe(ws), "--json", env=env, check=True).stdout)
    local = ws.run("build", _recipe(ws, "tiny-local", "  local: {path: ../models/tiny}"), "--json", env=env, check=True)
    built_local = json.loads(local.stdout)
    assert built_local["bundle"] != built_hub["bundle"]
    assert resource_bytes(Path(built_local["bundle"])) == resource_bytes(Path(built_hub["bundle"]))
    statuses = {s["id"]: s["status"] for s in built_local["stages"]}
    assert statuses["rewrite:unet"] == "hit"  # the local folder has the same bytes: same conversions
    assert hub.attempts() == 0  # nothing was fetched, nothing was even asked

    explained = json.loads(ws.run("explain", "recipes/tiny-hub.yaml", "source", env=env, check=True).stdout)
    output = Path(explained["output"])
    taken = sorted(p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file())
    assert taken == _read_files(tiny_weights)
    for relative in taken:
        blob = (snapshot / relative).resolve()
        assert os.stat(output / relative).st_ino == os.stat(blob).st_ino, relative
        assert os.stat(blob).st_mode & 0o200, f"the HF cache's blob {relative} lost its write permission"
    manifest = json.loads((Path(built_hub["bundle"]) / "manifest.json").read_text())
    source = manifest["sources"]["model"]
    assert source["kind"] == "hub" and source["id"] == SD21_BASE and source["revision"] == REVISION
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert source["files"][weights] == (snapshot / weights).resolve().name  # an LFS blob is named by its sha256
    assert sorted(source["files"]) == taken
    local_source = json.loads((Path(built_local["bundle"]) / "manifest.json").read_text())["sources"]["model"]
    assert local_source["kind"] == "local" and local_source["path"] == "../models/tiny"
    assert local_source["files"] == source["files"]
    assert local_source["digest"] == output.name  # the tree digest the build cache gives the same files


def test_offline_build_missing_from_the_cache_names_sdbuild_fetch(workspace, tmp_path, hub):
    done = workspace.run("build", _hub_recipe(workspace), env=_env(tmp_path / "hf" / "hub", hub))
    assert done.returncode == 2
    [error] = _errors(done)
    assert "tiny-hub.yaml:7: model.hub.id" in error and "sdbuild fetch" in error and "HF_HUB_OFFLINE" in error
    assert hub.attempts() == 0


def _take_snapshot(out: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The source stage's hub step in a fresh interpreter (the client reads its environment at import)."""
    code = (
        "import sys; from pathlib import Path; from builder.stages.source import take_snapshot; "
        "from builder.hub.cache import HubRef; from builder.hub.layout import RepoKind\n"
        "from builder.errors import UserError\n"
        "try:\n"
        f"    take_snapshot(HubRef({SD21_BASE!r}, {REVISION!r}, RepoKind.PIPELINE), Path(sys.argv[1]))\n"
        "except UserError as error:\n"
        "    sys.exit(error.message)"
    )
    return subprocess.run([sys.executable, "-c", code, str(out)], env=os.environ | env, capture_output=True, text=True)


def test_an_incomplete_cached_snapshot_names_what_it_lacks(tiny_weights, tmp_path, hub):
    hf_cache = tmp_path / "hf" / "hub"
    snapshot = write_hf_cache(hf_cache, SD21_BASE, REVISION, tiny_weights, tree_listing=False)
    (snapshot / "unet" / "diffusion_pytorch_model.safetensors").unlink()  # an interrupted download
    done = _take_snapshot(tmp_path / "out", _env(hf_cache, hub))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "the cached snapshot lacks unet/*.safetensors" in done.stderr and "sdbuild fetch" in done.stderr
    assert hub.attempts() == 0


def test_online_with_a_complete_cache_makes_no_request(tiny_weights, tmp_path, hub):
    """With a pinned commit whose file listing the client cached, the cache answers everything."""
    hf_cache = tmp_path / "hf" / "hub"
    write_hf_cache(hf_cache, SD21_BASE, REVISION, tiny_weights)
    done = _take_snapshot(tmp_path / "out", _env(hf_cache, hub, offline=False))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert hub.attempts() == 0


def _read_files(weights: Path) -> list[str]:
    """The repository files a recipe without a safety checker reads: not safety_checker/ and
    feature_extractor/, which the repository (like SD 1.5's) also holds."""
    files = sorted(p.relative_to(weights).as_posix() for p in weights.rglob("*") if p.is_file())
    assert any(f.startswith("safety_checker/") for f in files)
    return [f for f in files if not f.startswith(("safety_checker/", "feature_extractor/"))]


def test_fetch_downloads_into_the_hf_cache_once(workspace, tiny_weights, tmp_path, hub):
    """Only what the recipe reads is downloaded (not the safety checker it does not build), once."""
    hf_cache = tmp_path / "hf" / "hub"
    recipe = _hub_recipe(workspace)
    files = _read_files(tiny_weights)
    size = sum((tiny_weights / f).stat().st_size for f in files)
    with FakeHub(SD21_BASE, REVISION, tiny_weights) as fake:
        env = {"HF_HUB_CACHE": str(hf_cache), "HF_HOME": str(tmp_path / "hf-home"), "HF_ENDPOINT": fake.endpoint}
        env |= {"HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_secret_for_gated_repos"}
        first = workspace.run("fetch", recipe, "--json", env=env, check=True)
        report = json.loads(first.stdout)
        assert report["size_bytes"] == size and report["downloaded_bytes"] == size
        assert sorted(p.split(f"/resolve/{REVISION}/")[1] for p in fake.downloads()) == files
        assert "to download" in first.stderr and "HF_HUB_OFFLINE=1" in first.stderr
        assert fake.authorizations == {"Bearer hf_secret_for_gated_repos"}  # HF_TOKEN sent, and only to the Hub
        assert "hf_secret" not in first.stdout + first.stderr

        fake.requests.clear()
        again = json.loads(workspace.run("fetch", recipe, "--json", env=env, check=True).stdout)
        assert again["downloaded_bytes"] == 0 and fake.downloads() == []

    snapshot = Path(report["inputs"][0]["snapshot"])
    assert snapshot == repo_folder(hf_cache, SD21_BASE) / "snapshots" / REVISION
    weights = snapshot / "unet" / "diffusion_pytorch_model.safetensors"
    assert (
        weights.is_symlink()
        and weights.read_bytes() == (tiny_weights / "unet/diffusion_pytorch_model.safetensors").read_bytes()
    )
    # Offline now: the cache alone answers (the build's source stage reads it the same way).
    offline = json.loads(workspace.run("fetch", recipe, "--json", env=_env(hf_cache, hub), check=True).stdout)
    assert offline["size_bytes"] == size and offline["downloaded_bytes"] == 0 and hub.attempts() == 0


def test_fetch_offline_reports_what_the_cache_holds(workspace, tiny_weights, tmp_path, hub):
    hf_cache = tmp_path / "hf" / "hub"
    recipe = _hub_recipe(workspace)
    done = workspace.run("fetch", recipe, env=_env(hf_cache, hub))
    assert done.returncode == 2
    [error] = _errors(done)
    assert "model.hub" in error and "HF_HUB_OFFLINE" in error

    write_hf_cache(hf_cache, SD21_BASE, REVISION, tiny_weights)
    # HF_HOME alone places the cache at HF_HOME/hub, as the client does
    home = {"HF_HOME": str(hf_cache.parent), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": hub.endpoint}
    report = json.loads(workspace.run("fetch", recipe, "--json", env=home, check=True).stdout)
    assert report["cache"] == str(hf_cache)
    files = _read_files(tiny_weights)
    [fetched] = report["inputs"]
    assert fetched["repo_id"] == SD21_BASE and fetched["files"] == len(files) and fetched["downloaded_bytes"] == 0
    assert report["size_bytes"] == sum((tiny_weights / f).stat().st_size for f in files)
    assert hub.attempts() == 0

    none = workspace.run("fetch", "recipes/tiny-sd.yaml", "--json", env=_env(hf_cache, hub), check=True)
    assert json.loads(none.stdout)["inputs"] == [] and "nothing to fetch" in none.stderr


def test_store_leaves_a_shared_inode_as_its_owner_made_it(tmp_path):
    blob = tmp_path / "hf" / "blob"
    blob.parent.mkdir()
    blob.write_bytes(b"weights")
    blob.chmod(0o644)
    out = tmp_path / "out"
    out.mkdir()
    os.link(blob, out / "weights.safetensors")
    (out / "own.json").write_text("{}")
    store = Store(tmp_path / "store")
    published = store.publish(out, "digest", {})
    assert os.stat(blob).st_mode & 0o777 == 0o644
    assert os.stat(published / "own.json").st_mode & 0o222 == 0  # files of its own are read-only as before


def test_link_falls_back_to_a_copy_across_filesystems(tmp_path, monkeypatch):
    source = tmp_path / "blob"
    source.write_bytes(b"weights")

    def cross_device(*_):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    link_or_copy(source, tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == b"weights"
    assert os.stat(tmp_path / "copy").st_ino != os.stat(source).st_ino


def test_a_snapshot_entry_leading_out_of_its_blobs_is_refused(tiny_weights, tmp_path):
    snapshot = write_hf_cache(tmp_path / "hub", SD21_BASE, REVISION, tiny_weights)
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    (snapshot / "unet" / "config.json").unlink()
    (snapshot / "unet" / "config.json").symlink_to(secret)
    with pytest.raises(UserError, match="points outside its blobs"):
        link_snapshot(snapshot, HubRef(SD21_BASE, REVISION, RepoKind.PIPELINE), tmp_path / "out")


def test_missing_files_reads_the_pipeline_structure(tiny_weights, tmp_path):
    folder = tmp_path / "pipeline"
    shutil.copytree(tiny_weights, folder)
    assert missing_files(folder, RepoKind.PIPELINE) == []
    (folder / "tokenizer" / "merges.txt").unlink()
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.rename(folder / "vae" / "diffusion_pytorch_model.fp16.safetensors")  # a float16 copy does not count
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "text_encoder" / "model.safetensors").rename(folder / "text_encoder" / "model-00001-of-00002.safetensors")
    (folder / "text_encoder" / "model.safetensors.index.json").write_text(json.dumps(index))
    assert missing_files(folder, RepoKind.PIPELINE) == [
        "text_encoder/model-00002-of-00002.safetensors",
        "tokenizer/merges.txt",
        "vae/*.safetensors",
    ]
    assert missing_files(repo_folder(tmp_path, "none/none"), RepoKind.VAE) == ["config.json", "*.safetensors"]


def test_folders_the_recipe_never_reads_are_neither_fetched_nor_required(tmp_path, hub):
    """An SD3 snapshot cached without T5 (text_encoder_3, tokenizer_3: about 9 GB at full size) serves a
    recipe that does not build it; the same snapshot is incomplete for one that does."""
    from builder.hub.layout import unread_folders
    from builder.recipe import load_recipe
    from builder.stages.pipeline import build_graph

    weights = tmp_path / "tiny-sd3"
    write_synthetic_pipeline(get_preset("tiny-sd3"), 0, weights)
    assert (weights / "text_encoder_3").is_dir() and (weights / "tokenizer_3").is_dir()
    hf_cache = tmp_path / "hf" / "hub"
    snapshot = write_hf_cache(hf_cache, SD21_BASE, REVISION, weights, tree_listing=False)
    shutil.rmtree(snapshot / "text_encoder_3")  # as a download that skipped T5 leaves it
    shutil.rmtree(snapshot / "tokenizer_3")
    assert missing_files(snapshot, RepoKind.PIPELINE)[0].startswith("text_encoder_3/")
    unread = unread_folders(["text_encoder", "text_encoder_2", "mmdit", "vae_decoder"])
    assert unread == ("feature_extractor", "safety_checker", "text_encoder_3", "tokenizer_3")
    assert missing_files(snapshot, RepoKind.PIPELINE, unread) == []

    out = tmp_path / "out"
    taken = link_snapshot(snapshot, HubRef(SD21_BASE, REVISION, RepoKind.PIPELINE, unread), out)
    assert taken and not any(f.startswith(("text_encoder_3/", "tokenizer_3/")) for f in taken)
    assert (out / "transformer" / "config.json").is_file()

    # the recipe's source stage carries the folders it skips, keyed by `components`; T5 built: none of its
    ws = make_workspace(tmp_path / "ws")
    recipe = (ws.root / "recipes" / "sd3-medium-macos.yaml").read_text()
    assert "  text_encoder_3: {}" not in recipe
    source = build_graph(load_recipe(ws.root / "recipes" / "sd3-medium-macos.yaml", ws.root))["source"]
    assert source.params["unread"] == list(unread) and source.param_origins["unread"] == "components"
    with_t5 = recipe.replace("  text_encoder_2: {}\n", "  text_encoder_2: {}\n  text_encoder_3: {}\n")
    (ws.root / "recipes" / "with-t5.yaml").write_text(with_t5)
    source = build_graph(load_recipe(ws.root / "recipes" / "with-t5.yaml", ws.root))["source"]
    assert source.params["unread"] == ["feature_extractor", "safety_checker"]
