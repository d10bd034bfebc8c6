"""Progress events a build sends to its caller (e.g. a rich progress display)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from builder.engine.reports import StageResult


class StageStarted(BaseModel):
    id: str
    stage: str
    component: str | None
    reason: str


class Heartbeat(BaseModel):
    """Sent about every half second for each running stage."""

    id: str
    elapsed_seconds: float
    rss_bytes: int | None  # None where the platform has no /proc


class StageFinished(BaseModel):
    result: StageResult


class WorkersReady(BaseModel):
    """The zygote has imported the stage modules; every worker forked from now on starts at once."""

    import_seconds: float


class Transfer(BaseModel):
    """Bytes of one stage's output moved to or from the remote cache so far."""

    id: str
    direction: Literal["download", "upload"]
    done_bytes: int
    total_bytes: int


class RemoteWarning(BaseModel):
    """Something about the remote cache the user should know that does not stop the build."""

    message: str


Event = StageStarted | Heartbeat | StageFinished | WorkersReady | Transfer | RemoteWarning
