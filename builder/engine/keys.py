"""Action keys and the human explanation of why one key differs from the last one built."""

from __future__ import annotations

import json
import platform
from typing import Any

from builder.engine.code import stage_code
from builder.engine.hashing import canonical_json, sha256_json
from builder.engine.spec import StageSpec

_VALUE_WIDTH = 60


def key_inputs(
    spec: StageSpec, input_digests: dict[str, str | None], external_digests: dict[str, str]
) -> dict[str, Any]:
    """Everything the output depends on. Id and component are left out, so identical work is shared.

    The code is part of it (`engine.code`): the digest of every project module the stage function
    reaches through imports, and the versions of the third-party distributions they import, so
    editing what a stage runs makes it stale without anyone bumping a version.

    An input digest is None while its upstream stage is stale (not known until it is rebuilt).
    Stage outputs and external paths are both keyed by content alone, in one map, so a folder on
    disk and a stage output with the same bytes give the same key. Round-tripped through JSON so
    values compare equal to those read back from a record.
    """
    code = stage_code(spec.function)
    inputs = {
        "stage": spec.stage,
        "version": spec.version,
        "params": spec.params,
        "inputs": input_digests | external_digests,
        "tools": {"python": platform.python_version()} | code.packages | spec.tools,
        "code": code.modules,
    }
    return json.loads(canonical_json(inputs))


def action_key(inputs: dict[str, Any]) -> str:
    return sha256_json(inputs)


def _show(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text if len(text) <= _VALUE_WIDTH else text[: _VALUE_WIDTH - 3] + "..."


def _param_changes(path: str, old: dict[str, Any], new: dict[str, Any], name: str) -> list[str]:
    """Changes of one param; nested mappings are compared leaf by leaf so the reason names the leaf."""
    if name not in old:
        return [f"{path} added = {_show(new[name])}"]
    if name not in new:
        return [f"{path} removed (was {_show(old[name])})"]
    before, after = old[name], new[name]
    if before == after:
        return []
    if isinstance(before, dict) and isinstance(after, dict):
        return [
            c for key in sorted(set(before) | set(after)) for c in _param_changes(f"{path}.{key}", before, after, key)
        ]
    return [f"{path} changed {_show(before)} -> {_show(after)}"]


def describe_changes(
    spec: StageSpec, current: dict[str, Any], previous: dict[str, Any], stale_upstreams: dict[str, str]
) -> list[str]:
    """Each difference between two key inputs, phrased for a user; `stale_upstreams` maps input -> stage id."""
    changes: list[str] = []
    if current["stage"] != previous.get("stage"):
        changes.append(f"stage changed {previous.get('stage')} -> {current['stage']}")
    if current["version"] != previous.get("version"):
        changes.append(f"implementation version changed {previous.get('version')} -> {current['version']}")

    old_params, new_params = previous.get("params", {}), current["params"]
    for name in sorted(set(old_params) | set(new_params)):
        origin = f" ({spec.param_origins[name]})" if name in spec.param_origins else ""
        changes.extend(f"{change}{origin}" for change in _param_changes(f"params.{name}", old_params, new_params, name))

    old, new = previous.get("inputs", {}), current["inputs"]
    for name in sorted(set(old) | set(new)):
        if name in stale_upstreams:
            changes.append(f"input '{name}' changed (upstream {stale_upstreams[name]} is stale)")
        elif name not in old:
            changes.append(f"input '{name}' added")
        elif name not in new:
            changes.append(f"input '{name}' removed")
        elif old[name] != new[name]:
            changes.append(f"input '{name}' content changed")

    old_code, new_code = previous.get("code", {}), current["code"]
    changed = sorted(name for name in set(old_code) | set(new_code) if old_code.get(name) != new_code.get(name))
    for name in changed:
        if name not in old_code:
            changes.append(f"code: now imports {name}")
        elif name not in new_code:
            changes.append(f"code: no longer imports {name}")
        else:
            changes.append(f"code of {name} changed")

    old_tools, new_tools = previous.get("tools", {}), current["tools"]
    for name in sorted(set(old_tools) | set(new_tools)):
        if name not in old_tools:
            changes.append(f"tool {name} added ({new_tools[name]})")
        elif name not in new_tools:
            changes.append(f"tool {name} removed (was {old_tools[name]})")
        elif old_tools[name] != new_tools[name]:
            changes.append(f"tool {name} changed {old_tools[name]} -> {new_tools[name]}")
    return changes
