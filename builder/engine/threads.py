"""How many threads each stage's worker runs: the cores to the build's longest chain, one to the rest.

A worker capped at cores/jobs threads for a whole build leaves cores idle once the stages beside it
finish (a full-size UNet ran on one of two cores after the text encoder ended). Giving a running
stage more cores later would be faster still, but a thread count changes float results at the
1e-6 level (reductions split differently), so a stage's outputs, and the PSNR figures a manifest
records, would depend on timing. Instead each stage's count is fixed by the graph and the machine:
a stage on the longest chain of work that spreads over threads gets every core and is never kept
waiting for one; any other stage gets one thread and starts when at most one thread more than the
cores would then run (waiting for a wholly free core left the SDXL VAE, long at 768x768 but light,
to run after the whole UNet chain). The same recipe on the same machine therefore computes the
same bytes, however the stages interleave.

Threads set by the user (OMP_NUM_THREADS, MKL_NUM_THREADS) are left alone.
"""

from __future__ import annotations

import os
import sys

from threadpoolctl import threadpool_limits

from builder.engine.spec import StageSpec

USER_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def user_fixed() -> bool:
    """Whether the user chose the thread counts themselves (then they are not changed)."""
    return any(os.environ.get(name) for name in USER_VARIABLES)


def chain_lengths(order: list[StageSpec]) -> tuple[dict[str, int], dict[str, int]]:
    """Per stage, the longest chain of work from the build's start to it and from it to the end, both
    counting the stage itself. Work is measured in memory estimates, the engine's only measure of a
    stage's size."""
    dependants: dict[str, list[str]] = {spec.id: [] for spec in order}
    for spec in order:
        for upstream in spec.inputs.values():
            dependants[upstream].append(spec.id)
    to_end: dict[str, int] = {}
    for spec in reversed(order):
        to_end[spec.id] = spec.memory_estimate_bytes + max((to_end[d] for d in dependants[spec.id]), default=0)
    from_start: dict[str, int] = {}
    for spec in order:
        before = max((from_start[up] for up in spec.inputs.values()), default=0)
        from_start[spec.id] = spec.memory_estimate_bytes + before
    return from_start, to_end


def critical_path(order: list[StageSpec]) -> set[str]:
    """The stages on a longest chain of the graph."""
    from_start, to_end = chain_lengths(order)
    total = {spec.id: from_start[spec.id] + to_end[spec.id] - spec.memory_estimate_bytes for spec in order}
    longest = max(total.values(), default=0)
    return {stage_id for stage_id, length in total.items() if length == longest}


def plan_threads(order: list[StageSpec], cores: int) -> dict[str, int]:
    """Threads per stage: every core for a stage on the critical path whose work spreads over threads,
    one for any other."""
    critical = critical_path(order)
    return {spec.id: cores if spec.parallel and spec.id in critical else 1 for spec in order}


def apply(threads: int) -> None:
    """In the worker, before the stage runs: size the thread pools of the libraries loaded (torch's
    intra-op pool, OpenMP and BLAS pools), and of those the stage loads later (their variables)."""
    for name in USER_VARIABLES:
        os.environ[name] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    threadpool_limits(limits=threads)
