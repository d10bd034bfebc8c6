"""`sdbuild fetch`: download every hub input of a recipe into the Hugging Face cache, so that a later
build (on this machine, or one sharing the cache) works with `HF_HUB_OFFLINE=1`, as `dvc fetch` does."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from builder.errors import UserError, first_line
from builder.hub.cache import HubRef, hub_cache_dir, not_cached, snapshot
from builder.hub.layout import RepoKind, allow_patterns, ignore_patterns, missing_files, unread_folders, wanted
from builder.hub.lora import cached_lora
from builder.recipe import LoadedRecipe
from builder.recipe.sources import ControlNetSource, ModelSource, RefinerSource, VaeSource


class HubInput(BaseModel):
    """One hub repository a recipe reads, and the recipe field that names it."""

    field: str
    repo_id: str
    revision: str
    kind: RepoKind
    weight_name: str | None = None  # a LoRA: its one file
    unread: tuple[str, ...] = ()  # pipeline folders the recipe never reads

    @property
    def ref(self) -> HubRef:
        return HubRef(self.repo_id, self.revision, self.kind, self.unread)


class Fetched(BaseModel):
    """What `fetch` found or downloaded for one input."""

    field: str
    repo_id: str
    revision: str
    files: int
    size_bytes: int  # every file a conversion reads
    downloaded_bytes: int  # of those, what the cache lacked
    snapshot: str  # the snapshot folder in the Hugging Face cache


def hub_inputs(loaded: LoadedRecipe) -> list[HubInput]:
    """The recipe's hub sources: the model, its refiner, a replacement VAE, its ControlNets and LoRAs."""
    model = loaded.recipe.model
    sources: list[tuple[str, ModelSource | RefinerSource | VaeSource | ControlNetSource | None, RepoKind]]
    sources = [("model", model, RepoKind.PIPELINE), ("model.refiner", model.refiner, RepoKind.PIPELINE)]
    sources += [("model.vae", model.vae, RepoKind.VAE)]
    sources += [(f"model.controlnets.{i}", c, RepoKind.CONTROLNET) for i, c in enumerate(model.controlnets)]
    unread = unread_folders(c.value for c in loaded.recipe.components.enabled())
    return [
        HubInput(
            field=f"{field}.hub",
            repo_id=source.hub.id,
            revision=source.hub.revision,
            kind=kind,
            unread=unread if field == "model" else (),
        )
        for field, source, kind in sources
        if source is not None and source.hub is not None
    ] + [
        HubInput(
            field=f"model.loras.{i}.hub",
            repo_id=lora.hub.id,
            revision=lora.hub.revision,
            kind=RepoKind.LORA,
            weight_name=lora.hub.weight_name,
        )
        for i, lora in enumerate(model.loras)
        if lora.hub is not None
    ]


def fetch(item: HubInput, announce: Callable[[HubInput, int, int, int], None]) -> Fetched:
    """Bring `item`'s files into the Hugging Face cache; `announce(item, files, size, to_download)` is
    called once the sizes are known, before any download starts."""
    from huggingface_hub import constants, snapshot_download

    if constants.HF_HUB_OFFLINE:  # nothing may be downloaded: say whether the cache already holds it
        try:
            if item.weight_name is not None:
                size = cached_lora(item.ref, item.weight_name, download=False).stat().st_size
                announce(item, 1, size, 0)
                folder = hub_cache_dir() / f"models--{item.repo_id.replace('/', '--')}" / "snapshots" / item.revision
                return Fetched(**_named(item), files=1, size_bytes=size, downloaded_bytes=0, snapshot=str(folder))
            folder = snapshot(item.ref)
        except UserError:
            raise UserError(
                f"{item.ref} is not (completely) in the Hugging Face cache ({hub_cache_dir()}) and HF_HUB_OFFLINE "
                "is set, so `sdbuild fetch` cannot download it",
                hint="unset HF_HUB_OFFLINE (or set it to 0) on a machine that reaches the Hub",
            ) from None
        files = _cached_files(folder, item)
        size = sum(path.stat().st_size for path in files)
        announce(item, len(files), size, 0)
        return Fetched(**_named(item), files=len(files), size_bytes=size, downloaded_bytes=0, snapshot=str(folder))
    arguments: dict[str, Any] = {
        "revision": item.revision,
        "allow_patterns": [item.weight_name] if item.weight_name is not None else allow_patterns(item.kind),
        "ignore_patterns": ignore_patterns(item.unread),
    }
    try:
        planned = snapshot_download(item.repo_id, dry_run=True, **arguments)
    except Exception as error:  # unreachable, gated, no such repository or revision
        raise not_cached(item.ref, first_line(error)) from None
    size = sum(f.file_size or 0 for f in planned)
    to_download = sum(f.file_size or 0 for f in planned if f.will_download)
    announce(item, len(planned), size, to_download)
    try:
        folder = Path(snapshot_download(item.repo_id, **arguments))
    except Exception as error:
        raise not_cached(item.ref, first_line(error)) from None
    if item.weight_name is not None:
        missing = [] if (folder / item.weight_name).is_file() else [item.weight_name]
    else:
        missing = missing_files(folder, item.kind, item.unread)
    if missing:
        raise UserError(
            f"{item.ref} has no {', '.join(missing[:3])}; sdbuild reads safetensors weights, configs and tokenizer "
            "files only",
            hint="pin a revision (or repository) with safetensors weights",
        )
    return Fetched(
        **_named(item), files=len(planned), size_bytes=size, downloaded_bytes=to_download, snapshot=str(folder)
    )


def _named(item: HubInput) -> dict:
    return {"field": item.field, "repo_id": item.repo_id, "revision": item.revision}


def _cached_files(folder: Path, item: HubInput) -> list[Path]:
    return [
        p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and wanted(p.relative_to(folder).as_posix(), item.kind, item.unread)
    ]
