"""What the scheduler needs from a remote cache and from an executor that runs stages on other
machines. `builder/remote/` implements both; the engine does not import it, so its code is in no
stage's cache key (stages that import the engine would otherwise be keyed on the Dask executor)."""

from __future__ import annotations

import queue
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from builder.engine.spec import StageSpec
from builder.engine.store import ActionRecord, Store

if TYPE_CHECKING:
    from builder.engine.runner import Job, Outcome

# done bytes, total bytes of one transfer
Progress = Callable[[int, int], None]


@dataclass
class Fetched:
    """The record now in the local store, or None; `problem` says why a remote entry was not used."""

    record: ActionRecord | None = None
    problem: str | None = None


class Remote(Protocol):
    @property
    def url(self) -> str: ...

    def fetch(self, key: str, store: Store, progress: Progress | None = None) -> Fetched: ...

    def upload(self, record: ActionRecord, folder: Path, progress: Progress | None = None) -> None: ...

    def has(self, key: str) -> bool: ...


class Executor(Protocol):
    @property
    def remote(self) -> Remote: ...

    def submit(
        self,
        spec: StageSpec,
        key: str,
        key_inputs: dict[str, Any],
        reason: str,
        upstream_keys: dict[str, str],
        threads: int | None,
        launch: tuple[str, int, list[str]],
        store: Store,
        outcomes: queue.Queue[Outcome],
    ) -> Job: ...
