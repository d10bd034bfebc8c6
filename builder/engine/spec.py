"""What a build is made of: stage specs and the graph that orders them. No knowledge of what stages do."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from builder.errors import UserError

GIB = 1 << 30


class StageSpec(BaseModel):
    """One unit of cached work. Everything that can change its output must be in a field below."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(min_length=1)
    stage: str = Field(min_length=1)
    component: str | None = None
    # The code the function runs is keyed by its digest (engine.code); this salt only forces a rebuild of
    # entries whose code and inputs did not change (say, after a library was found nondeterministic).
    version: str = ""
    function: str = Field(pattern=r"^[\w.]+:\w+$")
    params: dict[str, Any] = {}
    param_origins: dict[str, str] = {}
    inputs: dict[str, str] = {}
    external_inputs: dict[str, Path] = {}
    tools: dict[str, str] = {}
    memory_estimate_bytes: int = Field(default=GIB, ge=0)
    # Whether the stage's work spreads over threads (torch, k-means); False for work one core does
    # (a conversion, copying files), which is then given one thread (`engine.threads`).
    parallel: bool = True
    unavailable: str | None = None
    # What a machine must have to run the stage besides memory, for executors that place stages on
    # machines (the Dask executor's worker resources), e.g. {"macos": 1} for the Core ML compiler.
    resources: dict[str, float] = {}

    @field_validator("params")
    @classmethod
    def _params_are_json(cls, params: dict[str, Any]) -> dict[str, Any]:
        try:
            json.dumps(params, allow_nan=False)
        except (TypeError, ValueError) as problem:
            raise ValueError(f"params must be plain JSON values (they are part of the cache key): {problem}") from None
        return params

    @model_validator(mode="after")
    def _input_names_unique(self) -> StageSpec:
        shared = sorted(set(self.inputs) & set(self.external_inputs))
        if shared:
            raise ValueError(f"input names used both as stage and external inputs: {', '.join(shared)}")
        return self


class Graph:
    """Stage specs by id, in insertion order; `order()` checks references and cycles."""

    def __init__(self, stages: Iterable[StageSpec] = ()):
        self._stages: dict[str, StageSpec] = {}
        for spec in stages:
            self.add(spec)

    def add(self, spec: StageSpec) -> None:
        if spec.id in self._stages:
            raise UserError(f"duplicate stage id '{spec.id}'", "every stage in a build needs its own id")
        self._stages[spec.id] = spec

    def __getitem__(self, stage_id: str) -> StageSpec:
        try:
            return self._stages[stage_id]
        except KeyError:
            known = ", ".join(self._stages) or "none"
            raise UserError(f"unknown stage '{stage_id}'", f"stages in this build: {known}") from None

    def __contains__(self, stage_id: object) -> bool:
        return stage_id in self._stages

    def __iter__(self) -> Iterator[StageSpec]:
        return iter(self._stages.values())

    def __len__(self) -> int:
        return len(self._stages)

    def order(self) -> list[StageSpec]:
        """Topological order; among stages that are ready at the same time, insertion order wins."""
        for spec in self:
            for name, upstream in spec.inputs.items():
                if upstream not in self._stages:
                    raise UserError(
                        f"stage '{spec.id}' input '{name}' refers to unknown stage '{upstream}'",
                        "inputs must name the id of another stage in the same build",
                    )
        placed: dict[str, StageSpec] = {}
        remaining = list(self)
        while remaining:
            ready = next((s for s in remaining if all(u in placed for u in s.inputs.values())), None)
            if ready is None:
                cycle = ", ".join(s.id for s in remaining)
                raise UserError(f"a dependency cycle blocks these stages: {cycle}", "remove an input in the cycle")
            placed[ready.id] = ready
            remaining.remove(ready)
        return list(placed.values())
