"""A generic cached build engine: stages are pure functions run in worker processes, outputs are
content-addressed, and every stale stage comes with the reason it is stale."""

from builder.engine.engine import Engine
from builder.engine.events import Event, Heartbeat, StageFinished, StageStarted, WorkersReady
from builder.engine.reports import Explanation, GcReport, PlanEntry, StageResult
from builder.engine.spec import GIB, Graph, StageSpec

__all__ = [
    "GIB",
    "Engine",
    "Event",
    "Explanation",
    "GcReport",
    "Graph",
    "Heartbeat",
    "PlanEntry",
    "StageFinished",
    "StageResult",
    "StageSpec",
    "StageStarted",
    "WorkersReady",
]
