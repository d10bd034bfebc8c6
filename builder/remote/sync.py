"""`sdbuild push` and `sdbuild pull`: move cache entries to and from the remote without building."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel

from builder.engine import Engine, Graph
from builder.engine.lock import CacheLock
from builder.engine.planner import assess
from builder.engine.store import UnreadableRecord
from builder.remote.cache import Progress, RemoteCache


class Moved(BaseModel):
    """One entry's fate in a push or pull."""

    id: str  # a stage id for pull, an action key for push
    status: Literal["pulled", "pushed", "local", "present", "missing", "unusable", "skipped"]
    detail: str = ""


def pull(
    engine: Engine, graph: Graph, remote: RemoteCache, progress: Callable[[str], Progress | None] | None = None
) -> list[Moved]:
    """Download, in dependency order, each stage of `graph` the local cache lacks and the remote holds.

    A stage neither holds stops its dependants: their keys depend on its output. The recipe's index
    then names what was pulled, so `plan` and `explain` read as after a build.
    """
    store = engine.store
    moved: list[Moved] = []
    with CacheLock(store.lock_file):
        index = store.load_index(engine.target)
        digests: dict[str, str | None] = {}
        skipped: set[str] = set()
        for spec in graph.order():
            found = assess(store, spec, index.get(spec.id), digests, skipped)
            if found.status == "skipped":
                skipped.add(spec.id)
                moved.append(Moved(id=spec.id, status="skipped", detail=found.reason))
                continue
            if found.status == "cached":
                assert found.record is not None
                digests[spec.id] = found.record.output_digest
                moved.append(Moved(id=spec.id, status="local"))
                continue
            digests[spec.id] = None
            if found.key is None:
                moved.append(Moved(id=spec.id, status="missing", detail="an upstream stage is in neither cache"))
                continue
            if found.damage is not None:
                store.discard(found.key, found.record.output_digest if found.record else None)
            fetched = remote.fetch(found.key, store, progress(spec.id) if progress else None)
            if fetched.record is None:
                status: Literal["unusable", "missing"] = "unusable" if fetched.problem else "missing"
                moved.append(Moved(id=spec.id, status=status, detail=fetched.problem or "not in the remote cache"))
                continue
            digests[spec.id] = fetched.record.output_digest
            index[spec.id] = found.key
            moved.append(Moved(id=spec.id, status="pulled"))
        store.save_index(engine.target, index)
        store.memo.save()
    return moved


def push(
    engine: Engine,
    remote: RemoteCache,
    keys: list[str] | None = None,
    progress: Callable[[str], Progress | None] | None = None,
) -> list[Moved]:
    """Upload the local entries `keys` (None: every entry) the remote lacks; damaged ones are left out."""
    store = engine.store
    moved: list[Moved] = []
    with CacheLock(store.lock_file):
        for key in store.record_keys() if keys is None else keys:
            try:
                record = store.load_record(key)
            except UnreadableRecord as problem:
                moved.append(Moved(id=key, status="unusable", detail=str(problem)))
                continue
            if record is None:
                moved.append(Moved(id=key, status="missing", detail="not in the local cache"))
                continue
            damage = store.check_object(record)
            if damage is not None:
                moved.append(Moved(id=key, status="unusable", detail=damage.describe()))
            elif remote.has(key):
                moved.append(Moved(id=key, status="present"))
            else:
                remote.upload(record, store.object_path(record.output_digest), progress(key) if progress else None)
                moved.append(Moved(id=key, status="pushed"))
        store.memo.save()
    return moved
