"""Runs a build: decides each stage once its inputs are known, starts stale ones in workers within the
job and memory limits, and publishes what they produce."""

from __future__ import annotations

import os
import queue
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from builder.engine import runner
from builder.engine import threads as thread_share
from builder.engine.elsewhere import Executor, Progress, Remote
from builder.engine.events import (
    Event,
    Heartbeat,
    RemoteWarning,
    StageFinished,
    StageStarted,
    Transfer,
    WorkersReady,
)
from builder.engine.files import remove_tree
from builder.engine.hashing import tree_digest
from builder.engine.launch import Launcher, Spawner, Zygote, worker_mode
from builder.engine.memory import process_rss_bytes
from builder.engine.planner import Assessment, assess, external_paths
from builder.engine.reports import StageResult
from builder.engine.spec import StageSpec
from builder.engine.store import ActionRecord, Store
from builder.errors import StageFailed

HEARTBEAT_SECONDS = 0.5


class Scheduler:
    def __init__(
        self,
        store: Store,
        target: str,
        order: list[StageSpec],
        *,
        jobs: int,
        memory_budget_bytes: int,
        emit: Callable[[Event], None],
        remote: Remote | None = None,
        executor: Executor | None = None,
    ):
        self.store = store
        self.remote = remote
        self.executor = executor
        self.target = target
        self.jobs = jobs
        self.cores = os.cpu_count() or 1
        self.threads = max(1, self.cores // jobs)  # what the zygote's libraries start with
        # Longest remaining chain first; threads per stage fixed by the graph (engine.threads).
        self.priority = thread_share.chain_lengths(order)[1]
        self.critical = thread_share.critical_path(order)
        self.stage_threads = None if thread_share.user_fixed() else thread_share.plan_threads(order, self.cores)
        self.worker_mode = worker_mode()
        self.launcher: Launcher | None = None
        self.told_workers_ready = False
        self.budget = memory_budget_bytes
        self.emit = emit
        self.index = store.load_index(target)
        self.modules = sorted({spec.function.partition(":")[0] for spec in order})  # what a cold build's zygote imports
        if executor is not None:  # memory is the cluster's, which Dask's resources account for
            self.budget = 1 << 62
        self.pending = deque(order)
        self.ready: deque[Assessment] = deque()
        self.running: dict[str, runner.Job] = {}
        self.outcomes: queue.Queue[runner.Outcome] = queue.Queue()
        self.results: dict[str, StageResult] = {}
        # Stages under other ids doing identical work (same key) wait for the first and then hit.
        self.built: dict[str, ActionRecord] = {}
        self.waiting: dict[str, list[Assessment]] = {}

    def run(self) -> dict[str, StageResult]:
        """Results by stage id. On a failure, running stages finish and are cached before it is raised."""
        failure: StageFailed | None = None
        next_beat = time.monotonic() + HEARTBEAT_SECONDS
        try:
            while True:
                if failure is None:
                    self._decide_ready_stages()
                    self._admit()
                if not self.running:
                    break
                try:
                    outcome = self.outcomes.get(timeout=max(0.0, next_beat - time.monotonic()))
                except queue.Empty:
                    pass
                else:
                    self._tell_workers_ready()
                    del self.running[outcome.job.spec.id]
                    if outcome.error is not None:
                        failure = failure or outcome.error
                    else:
                        self._publish(outcome)
                if time.monotonic() >= next_beat:
                    self._tell_workers_ready()
                    self._heartbeat()
                    next_beat = time.monotonic() + HEARTBEAT_SECONDS
        finally:
            for job in self.running.values():
                runner.stop(job)
            if self.launcher is not None:
                self.launcher.close()
        if failure is not None:
            raise failure
        return self.results

    def _decide_ready_stages(self) -> None:
        """Settle every pending stage whose upstream stages have results; hits and skips finish at once."""
        progressed = True
        while progressed:
            progressed = False
            for spec in list(self.pending):
                if all(up in self.results for up in spec.inputs.values()):
                    self.pending.remove(spec)
                    self._decide(spec)
                    progressed = True

    def _decide(self, spec: StageSpec) -> None:
        skipped = {i for i, r in self.results.items() if r.status == "skipped"}
        digests = {i: r.digest for i, r in self.results.items() if r.status != "skipped"}
        found = assess(self.store, spec, self.index.get(spec.id), digests, skipped)
        if found.status == "skipped":
            self._finish(self._result(spec, "skipped", found.reason))
        elif found.status == "cached":
            assert found.key is not None and found.record is not None
            self._hit(spec, found.key, found.record)
        else:
            if found.damage is not None:
                assert found.key is not None
                self.store.discard(found.key, found.record.output_digest if found.record else None)
                found.reason = found.damage.describe(past=True)
            if self.remote is not None and found.key is not None and self._remote_hit(found):
                return
            self.ready.append(found)

    def _remote_hit(self, found: Assessment) -> bool:
        """Download a stale stage's output from the remote cache when it holds the key (verified there)."""
        assert self.remote is not None and found.key is not None
        spec = found.spec
        fetched = self.remote.fetch(found.key, self.store, self._transfer(spec.id, "download"))
        if fetched.record is None:
            if fetched.problem is not None:
                self.emit(
                    RemoteWarning(
                        message=f"remote entry {found.key[:12]} of {spec.id}: {fetched.problem}; "
                        "rebuilding the stage, whose upload replaces the entry"
                    )
                )
            return False
        self.built[found.key] = fetched.record
        self._remember(spec.id, found.key)
        self._finish(self._result(spec, "remote-hit", "downloaded from the remote cache", fetched.record))
        return True

    def _transfer(self, stage_id: str, direction: Literal["download", "upload"]) -> Progress:
        def report(done: int, total: int) -> None:
            self.emit(Transfer(id=stage_id, direction=direction, done_bytes=done, total_bytes=total))

        return report

    def _admit(self) -> None:
        """Start ready stages, longest remaining chain first, while jobs and memory allow (one too big
        for the budget runs alone). A stage on the critical path never waits for a core; any other
        (one thread) starts when at most one thread more than the cores would then run, so the
        machine stays busy beside the critical path without oversubscribing it further."""
        self.ready = deque(sorted(self.ready, key=lambda found: -self.priority[found.spec.id]))
        for found in list(self.ready):
            if len(self.running) >= self.jobs:
                return
            spec = found.spec
            in_use = sum(job.spec.memory_estimate_bytes for job in self.running.values())
            if self.running and in_use + spec.memory_estimate_bytes > self.budget:
                return
            threads = self.stage_threads[spec.id] if self.stage_threads is not None else None
            busy = sum(job.threads or 0 for job in self.running.values())
            off_path = spec.id not in self.critical and self.executor is None  # a cluster's cores are not ours
            if threads is not None and off_path and busy + threads > self.cores + 1:
                continue
            self.ready.remove(found)
            self._start(found, threads)

    def _start(self, found: Assessment, threads: int | None) -> None:
        spec = found.spec
        assert found.key is not None and found.key_inputs is not None
        if found.key in self.built:
            self._hit(spec, found.key, self.built[found.key])
            return
        if any(job.key == found.key for job in self.running.values()):
            self.waiting.setdefault(found.key, []).append(found)
            return
        inputs: dict[str, Path] = {
            name: self.store.object_path(digest)
            for name, up in spec.inputs.items()
            if (digest := self.results[up].digest) is not None
        }
        if self.executor is not None and not spec.external_inputs:  # external paths exist only here
            upstream = {name: self.index[up] for name, up in spec.inputs.items() if self.results[up].digest is not None}
            job = self.executor.submit(
                spec,
                found.key,
                found.key_inputs,
                found.reason,
                upstream,
                threads,
                (self.worker_mode, self.threads, self.modules),
                self.store,
                self.outcomes,
            )
            self.running[spec.id] = job
            self.emit(StageStarted(id=spec.id, stage=spec.stage, component=spec.component, reason=found.reason))
            return
        inputs.update(external_paths(spec))
        folder = runner.work_folder(self.store.tmp, spec.id)
        job = runner.start(
            spec, found.key, found.key_inputs, found.reason, inputs, folder, self._launcher(spec), threads
        )
        self.running[spec.id] = job
        runner.watch(job, self.outcomes)
        self.emit(StageStarted(id=spec.id, stage=spec.stage, component=spec.component, reason=found.reason))

    def _launcher(self, starting: StageSpec) -> Launcher:
        """Made at the first stale stage, so a build with nothing to do starts no process.

        The zygote imports the modules of every stage that may still run: this one, those ready,
        and those not yet decided (most of which an upstream change makes stale too).
        """
        if self.launcher is None:
            env = runner.worker_env(self.threads)
            if self.worker_mode == "fork":
                candidates = [starting, *(a.spec for a in self.ready), *self.pending]
                modules = sorted({spec.function.partition(":")[0] for spec in candidates})
                self.launcher = Zygote(modules, env, runner.python_path(), self.store.tmp / "zygote")
            else:
                self.launcher = Spawner(env)
        return self.launcher

    def _publish(self, outcome: runner.Outcome) -> None:
        """Object first, then record, then index: a crash between steps leaves only unreferenced objects."""
        job = outcome.job
        if outcome.record is not None:  # built on a Dask worker, uploaded there, downloaded by its watcher
            self._built(job, outcome.record)
            return
        assert outcome.files is not None and outcome.result is not None
        digest = tree_digest(outcome.files)
        self.store.publish(job.out, digest, outcome.files)
        record = ActionRecord(
            key=job.key,
            key_inputs=job.key_inputs,
            output_digest=digest,
            files=outcome.files,
            summary=outcome.result.summary,
            seconds=round(outcome.seconds, 3),
            cpu_seconds=outcome.result.cpu_seconds,
            peak_memory_bytes=outcome.result.peak_memory_bytes,
        )
        self.store.write_record(record)
        if self.remote is not None:
            self.remote.upload(record, self.store.object_path(digest), self._transfer(job.spec.id, "upload"))
        remove_tree(job.folder)  # its log and temporary files; a failed stage's folder stays for its log
        self._built(job, record)

    def _built(self, job: runner.Job, record: ActionRecord) -> None:
        self.built[job.key] = record
        self._remember(job.spec.id, job.key)
        self._finish(self._result(job.spec, "built", job.reason, record))
        for twin in self.waiting.pop(job.key, []):
            self._hit(twin.spec, job.key, record)

    def _hit(self, spec: StageSpec, key: str, record: ActionRecord) -> None:
        """A local hit the remote lacks (built before the remote was set) is uploaded, so others hit it too."""
        if self.remote is not None and not self.remote.has(key):
            self.remote.upload(record, self.store.object_path(record.output_digest), self._transfer(spec.id, "upload"))
        self._remember(spec.id, key)
        self._finish(self._result(spec, "hit", "cached", record))

    def _remember(self, stage_id: str, key: str) -> None:
        if self.index.get(stage_id) != key:
            self.index[stage_id] = key
            self.store.save_index(self.target, self.index)

    def _tell_workers_ready(self) -> None:
        imported = self.launcher.import_seconds if self.launcher is not None else None
        if imported is not None and not self.told_workers_ready:
            self.told_workers_ready = True
            self.emit(WorkersReady(import_seconds=imported))

    def _heartbeat(self) -> None:
        for stage_id, job in self.running.items():
            rss = process_rss_bytes(job.process.pid) if job.process.pid is not None else None
            self.emit(Heartbeat(id=stage_id, elapsed_seconds=job.elapsed, rss_bytes=rss))

    def _result(
        self,
        spec: StageSpec,
        status: Literal["hit", "remote-hit", "built", "skipped"],
        reason: str,
        record: ActionRecord | None = None,
    ) -> StageResult:
        return StageResult(
            id=spec.id,
            stage=spec.stage,
            component=spec.component,
            status=status,
            seconds=record.seconds if record else 0.0,
            cpu_seconds=record.cpu_seconds if record else None,
            peak_memory_bytes=record.peak_memory_bytes if record else None,
            output=self.store.object_path(record.output_digest) if record else None,
            digest=record.output_digest if record else None,
            summary=record.summary if record else None,
            reason=reason,
        )

    def _finish(self, result: StageResult) -> None:
        self.results[result.id] = result
        self.emit(StageFinished(result=result))
