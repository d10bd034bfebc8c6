"""Decides, for one stage, whether its output is cached and if not, why: shared by plan, explain and build."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from builder.engine.hashing import content_digest
from builder.engine.keys import action_key, describe_changes, key_inputs
from builder.engine.spec import StageSpec
from builder.engine.store import ActionRecord, Damage, Store, UnreadableRecord
from builder.errors import UserError


@dataclass
class Assessment:
    spec: StageSpec
    status: Literal["cached", "stale", "skipped"]
    reason: str
    key: str | None = None
    key_inputs: dict[str, Any] | None = None
    record: ActionRecord | None = None  # the record for `key`, when one could be read
    damage: Damage | None = None  # set when a record exists but its entry is unusable
    previous_key: str | None = None
    previous_key_inputs: dict[str, Any] | None = None


def external_paths(spec: StageSpec) -> dict[str, Path]:
    """Absolute paths, since the worker runs in another folder; symlinks are kept (names can matter)."""
    return {name: path.absolute() for name, path in spec.external_inputs.items()}


def assess(
    store: Store,
    spec: StageSpec,
    previous_key: str | None,
    upstream_digests: Mapping[str, str | None],
    skipped: set[str],
) -> Assessment:
    """`upstream_digests` maps stage id -> output digest, None while that stage is stale."""
    if spec.unavailable:
        return Assessment(spec, "skipped", spec.unavailable)

    digests = {name: upstream_digests[up] for name, up in spec.inputs.items() if up not in skipped}
    stale_upstreams = {name: spec.inputs[name] for name, digest in digests.items() if digest is None}
    externals = {name: _external_digest(store, spec, name, path) for name, path in external_paths(spec).items()}
    current = key_inputs(spec, digests, externals)

    previous = _previous_inputs(store, previous_key)
    found = Assessment(spec, "stale", "", key_inputs=current, previous_key=previous_key, previous_key_inputs=previous)
    if stale_upstreams:
        found.reason = _changes(spec, current, previous, stale_upstreams)
        return found

    found.key = action_key(current)
    try:
        found.record = store.load_record(found.key)
    except UnreadableRecord as problem:
        found.damage = Damage(str(problem))
    if found.record is not None:
        found.damage = store.check_object(found.record)
        if found.damage is None:
            found.status, found.reason = "cached", "up to date"
            return found
    if found.damage is not None:
        found.reason = found.damage.describe()
    elif previous_key == found.key:
        found.reason = "cached output missing"  # its record was deleted by hand
    else:
        found.reason = _changes(spec, current, previous, {})
    return found


def _external_digest(store: Store, spec: StageSpec, name: str, path: Path) -> str:
    try:
        return content_digest(path, store.memo, within=store.inputs_root)
    except UserError as problem:
        raise UserError(f"stage {spec.id} input '{name}': {problem.message}", problem.hint) from None


def _previous_inputs(store: Store, previous_key: str | None) -> dict[str, Any] | None:
    if previous_key is None:
        return None
    try:
        record = store.load_record(previous_key)
    except UnreadableRecord:
        return None
    return record.key_inputs if record else None


def _changes(
    spec: StageSpec, current: dict[str, Any], previous: dict[str, Any] | None, stale_upstreams: dict[str, str]
) -> str:
    if previous is None:
        return "never built"
    return "; ".join(describe_changes(spec, current, previous, stale_upstreams)) or "never built with these inputs"
