"""`sdbuild build FOLDER|MATRIX-RECIPE` and `sdbuild status`: many bundles in one graph, and one
table saying which are built, stale (and why) or never built.

The engine keeps one index per target (the last key of each stage id, which `plan` and `status`
compare against to say what changed). A set build runs under a target of its own, so before it the
members' indexes are joined into it under the combined ids, and after it they are split back, so
each recipe and variant keeps its own history whether it was built alone or with others.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from rich.console import Console
from rich.table import Table

from builder.artifacts import bundle_folder
from builder.engine import Engine, Graph, PlanEntry, StageResult
from builder.engine.lock import CacheLock
from builder.engine.store import Store
from builder.errors import StageFailed
from builder.recipe import LoadedRecipe, load_recipes
from builder.stages.recipe_set import member_id, set_graph, split_id

SET_TARGET = "recipe_set"
"""The index a set build runs under; recipe names have no '_' and variant targets hold a '.', so no
recipe's target is this."""

if TYPE_CHECKING:  # the CLI imports this module lazily, inside its commands
    from builder.cli import Workspace


def build_set(
    args: argparse.Namespace, workspace: Workspace, console: Console, members: list[LoadedRecipe], started: float
) -> int:
    """Build every member in one graph, then publish each bundle; `--json` lists every stage with
    the recipe and variant it belongs to."""
    from builder.cli import Progress, _executor, _located, _preflight, _publish

    _check_distinct(workspace, members)
    combined, own = set_graph(members)
    for loaded in members:
        _preflight(workspace, loaded, own[loaded.target], args)
    console.print(f"[bold]sdbuild[/] {len(members)} bundle(s), {len(combined)} stages  cache {workspace.cache}")
    engine = workspace.engine_for(SET_TARGET)
    _join_indexes(engine.store, members)
    progress = Progress(console)
    try:
        with _executor(args, workspace) as executor, progress.live:
            by_id = {r.id: r for r in engine.build(combined, jobs=args.jobs, on_event=progress, executor=executor)}
    except StageFailed as failure:
        target, stage_id = split_id(failure.stage_id or "")
        failed = next((m for m in members if m.target == target), None)
        if failed is None:
            raise
        own_failure = StageFailed(failure.message, failure.hint, stage_id=stage_id, expected=failure.expected)
        raise _located(own_failure, failed, own[target]) from None
    finally:
        _split_indexes(engine.store, members)
    bundles = {
        m.target: _publish(workspace, m, engine.output_path(by_id[member_id(m.target, "bundle")])) for m in members
    }
    results = list(by_id.values())
    seconds = time.monotonic() - started
    built = sum(r.status == "built" for r in results)
    console.print(
        f"[bold green]done[/] in {seconds:.1f} s: {len(members)} bundle(s), "
        f"{built} of {len(results)} stage(s) built (equal stages run once)"
    )
    if args.json:
        print(json.dumps(_build_report(members, bundles, results, seconds), indent=2))
    return 0


def _build_report(
    members: list[LoadedRecipe], bundles: dict[str, Path], results: list[StageResult], seconds: float
) -> dict:
    by_target = {m.target: m for m in members}
    stages = []
    for r in results:
        target, stage_id = split_id(r.id)
        loaded = by_target[target]
        stages.append(
            {
                "id": r.id,
                "recipe": loaded.recipe.name,
                "variant": loaded.variant.name if loaded.variant else None,
                "stage_id": stage_id,
                "stage": r.stage,
                "component": r.component,
                "status": r.status,
                "seconds": round(r.seconds, 3) if r.status == "built" else 0.0,
                "peak_memory_bytes": r.peak_memory_bytes if r.status == "built" else None,
                "built_seconds": round(r.seconds, 3) if r.status == "hit" else None,
                "digest": r.digest,
                "reason": r.reason,
            }
        )
    return {
        "seconds": round(seconds, 3),
        "stages_in_graph": len(results),
        "stages_built": sum(r.status == "built" for r in results),
        "bundles": [
            {
                "recipe": m.recipe.name,
                "version": m.recipe.version,
                "variant": m.variant.name if m.variant else None,
                "settings": m.variant.settings if m.variant else {},
                "bundle": str(bundles[m.target]),
            }
            for m in members
        ],
        "stages": stages,
    }


def _check_distinct(workspace: Workspace, members: list[LoadedRecipe]) -> None:
    """Two members may not share a cache index or publish into the same (or each other's) folder."""
    seen: dict[Path, LoadedRecipe] = {}
    for loaded in members:
        dest = bundle_folder(workspace.artifacts, loaded)
        for other_dest, other in seen.items():
            if dest == other_dest or dest.is_relative_to(other_dest) or other_dest.is_relative_to(dest):
                raise loaded.error(
                    "name",
                    f"{loaded.label} {loaded.recipe.version} would publish into "
                    f"{other_dest.relative_to(workspace.root)}/, where {other.path.name} publishes {other.label}",
                    hint="give each recipe in the folder its own name (or version)",
                )
        seen[dest] = loaded


def _join_indexes(store: Store, members: list[LoadedRecipe]) -> None:
    with CacheLock(store.lock_file):
        joined = {
            member_id(m.target, stage_id): key for m in members for stage_id, key in store.load_index(m.target).items()
        }
        store.save_index(SET_TARGET, joined)


def _split_indexes(store: Store, members: list[LoadedRecipe]) -> None:
    with CacheLock(store.lock_file):
        joined = store.load_index(SET_TARGET)
        for m in members:
            index = store.load_index(m.target)
            index.update({split_id(cid)[1]: key for cid, key in joined.items() if split_id(cid)[0] == m.target})
            store.save_index(m.target, index)
        store.index_path(SET_TARGET).unlink(missing_ok=True)


@dataclass(frozen=True)
class Status:
    loaded: LoadedRecipe
    status: Literal["built", "stale", "never built"]
    reason: str
    bundle: Path


def status(args: argparse.Namespace, workspace: Workspace, console: Console) -> int:
    """One row per recipe and variant of a file or folder (default `recipes/`)."""
    path = Path(args.recipes) if args.recipes is not None else workspace.root / "recipes"
    members = load_recipes(path, workspace.root)
    _, own = set_graph(members)
    rows = [status_of(workspace.engine_for(m.target), workspace.artifacts, m, own[m.target]) for m in members]
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "recipe": row.loaded.recipe.name,
                        "variant": row.loaded.variant.name if row.loaded.variant else None,
                        "version": row.loaded.recipe.version,
                        "file": row.loaded.path.relative_to(workspace.root).as_posix(),
                        "bundle": str(row.bundle),
                        "status": row.status,
                        "reason": row.reason,
                    }
                    for row in rows
                ],
                indent=2,
            )
        )
        return 0
    table = Table(title=f"{len(rows)} bundle(s) in {path}")
    for column in ("recipe", "variant", "version", "status", "why"):
        table.add_column(column)
    colours = {"built": "green", "stale": "yellow", "never built": "red"}
    for row in rows:
        variant = row.loaded.variant.name if row.loaded.variant else ""
        coloured = f"[{colours[row.status]}]{row.status}"
        table.add_row(row.loaded.recipe.name, variant, row.loaded.recipe.version, coloured, row.reason)
    console.print(table)
    return 0


def status_of(engine: Engine, artifacts: Path, loaded: LoadedRecipe, graph: Graph) -> Status:
    """Built: the published bundle is the one the recipe builds now. Never built: nothing published
    and no stage of it ever built. Stale otherwise, with the first cause in a few words. `engine`
    keeps its index under the recipe's target."""
    dest = bundle_folder(artifacts, loaded)
    published = dest / "manifest.json"
    entries = engine.plan(graph)
    bundle = next(e for e in entries if e.id == "bundle")
    if bundle.status == "cached" and bundle.key is not None:
        record = engine.store.load_record(bundle.key)
        cached = engine.store.object_path(record.output_digest) / "manifest.json" if record else None
        if published.is_file() and cached is not None and published.read_bytes() == cached.read_bytes():
            return Status(loaded, "built", "", dest)
        why = "published bundle is another build's" if published.is_file() else "built, not published"
        return Status(loaded, "stale", why + ": run `sdbuild build`", dest)
    if not published.is_file() and not engine.store.load_index(loaded.target):
        return Status(loaded, "never built", "", dest)
    return Status(loaded, "stale", _first_cause(entries, graph), dest)


def _first_cause(entries: list[PlanEntry], graph: Graph) -> str:
    """The stale stages whose inputs are all up to date are where a change entered; the first one's
    first reason, and how many others there are."""
    stale = {e.id for e in entries if e.status == "stale"}
    roots = [e for e in entries if e.id in stale and not set(graph[e.id].inputs.values()) & stale]
    if not roots:
        return ""
    text = f"{roots[0].id}: {roots[0].reason.split('; ')[0]}"
    return text + (f" (+{len(roots) - 1} more)" if len(roots) > 1 else "")
