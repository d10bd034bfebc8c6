"""What the engine tells its caller: plan entries, stage results, explanations, gc reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel


class PlanEntry(BaseModel):
    id: str
    stage: str
    component: str | None
    status: Literal["cached", "stale", "skipped"]
    reason: str
    key: str | None  # None while an upstream stage is stale or the stage is skipped


class StageResult(BaseModel):
    """One stage's part in a build. For a hit, seconds/memory/summary are those of the build that made it;
    a remote-hit is a hit downloaded from the remote cache."""

    id: str
    stage: str
    component: str | None
    status: Literal["hit", "remote-hit", "built", "skipped"]
    seconds: float
    cpu_seconds: float | None = None
    peak_memory_bytes: int | None
    output: Path | None
    digest: str | None
    summary: dict[str, Any] | None
    reason: str


class Explanation(BaseModel):
    """Why a stage is cached or stale: its key inputs now, and those of the last key built for it."""

    id: str
    stage: str
    component: str | None
    status: Literal["cached", "stale", "skipped"]
    reason: str
    key: str | None
    key_inputs: dict[str, Any] | None  # input digests are None where an upstream stage is stale
    previous_key: str | None
    previous_key_inputs: dict[str, Any] | None
    output: Path | None


class GcReport(BaseModel):
    removed_targets: list[str]
    removed_actions: int
    removed_objects: int
    freed_bytes: int
