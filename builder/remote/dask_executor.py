"""`--executor dask`: the same scheduler and stage functions, with each stale stage run on a Dask worker.

The client's scheduler (engine.scheduler) decides what is stale exactly as for a local build and
hands each ready stage here instead of starting a local worker process. The Dask task, on some
worker, downloads the stage's inputs from the remote cache (verified), runs the stage function in a
worker process as a local build does, and uploads the output (objects, then record) before it
returns; the client then downloads the entry into its own store. A worker that dies mid-stage loses
nothing but the attempt: Dask gives the task to another worker, which starts it afresh.

Tasks are annotated with resources, so Dask places them only on workers that declare enough: the
stage's memory estimate as `memory` (bytes), plus the spec's own `resources` (e.g. `macos` for
compile stages). Stages reading external inputs (paths on the client's disk) run on the client.
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from builder.engine import runner
from builder.engine.files import remove_tree
from builder.engine.hashing import tree_digest
from builder.engine.launch import Launcher, Spawner, Zygote
from builder.engine.spec import StageSpec
from builder.engine.store import ActionRecord, Store
from builder.engine.threads import USER_VARIABLES
from builder.errors import StageFailed, UserError
from builder.remote.cache import RemoteCache

MEMORY = "memory"
_LOCAL_WORKERS = 2


class DaskExecutor:
    """A Dask client: to `scheduler` (tcp://host:port), or to a LocalCluster of processes on loopback
    started here (and stopped on exit) whose workers share the machine's `memory_bytes`."""

    def __init__(
        self,
        remote: RemoteCache,
        scheduler: str | None,
        *,
        memory_bytes: int,
        work_dir: Path,
        workers: int = _LOCAL_WORKERS,
    ):
        self.remote = remote
        self.scheduler = scheduler
        self.memory_bytes = memory_bytes
        self.work_dir = work_dir
        self.workers = workers
        self.cluster: Any = None
        self.client: Any = None
        self.environment: dict[str, str | None] = {}

    def __enter__(self) -> DaskExecutor:
        from distributed import Client, LocalCluster

        if self.scheduler is None:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            # Starting a nanny (also one replacing a killed worker) writes its variables
            # (OMP_NUM_THREADS=1, ...) into this process's environment too: ours are put back, or this
            # build (and the next one in this process) would plan and run with one thread.
            self.environment = {name: os.environ.get(name) for name in _nanny_variables()}
            try:
                self.cluster = LocalCluster(
                    n_workers=self.workers,
                    threads_per_worker=1,
                    processes=True,
                    host="127.0.0.1",
                    dashboard_address=None,  # no dashboard; its HTTP routes on a free loopback port
                    scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                    local_directory=str(self.work_dir),
                    resources={MEMORY: self.memory_bytes // self.workers},
                )
            finally:
                self._restore_environment()
            self.client = Client(self.cluster)
        else:
            try:
                self.client = Client(self.scheduler, timeout="30s")
            except OSError as problem:
                raise UserError(
                    f"cannot reach the Dask scheduler {self.scheduler}: {problem}",
                    "start one with `dask scheduler` and pass its address (tcp://HOST:8786)",
                ) from None
        return self

    def _restore_environment(self) -> None:
        for name, value in self.environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    def __exit__(self, *_: object) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
            self._restore_environment()

    def resources(self, spec: StageSpec) -> dict[str, float]:
        return {MEMORY: float(spec.memory_estimate_bytes), **spec.resources}

    def check_placeable(self, spec: StageSpec) -> None:
        """Dask would hold a task no worker can take forever: say so now, with what to start."""
        workers = self.client.scheduler_info().get("workers", {}).values()
        needed = self.resources(spec)
        if any(all(w.get("resources", {}).get(n, 0) >= amount for n, amount in needed.items()) for w in workers):
            return
        wanted = " ".join(f"{n}={amount:g}" for n, amount in needed.items())
        raise UserError(
            f"stage {spec.id} needs a Dask worker with resources {wanted}, and none of the "
            f"{len(workers)} worker(s) declares that much",
            f'start a worker with `dask worker {self.scheduler or "tcp://HOST:8786"} --resources "{wanted}"`',
        )

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
        outcomes: queue.Queue[runner.Outcome],
    ) -> runner.Job:
        """Start `spec` on the cluster; its Outcome (with the entry downloaded into `store`) is queued.

        `threads` is the count a local build here would give the stage (None: the user fixed them):
        float results depend on it, so it travels with the task instead of following the worker's
        cores (Dask's nanny sets OMP_NUM_THREADS=1 on its workers). `launch` is how a local build here
        starts stage processes (fork from a zygote or spawn), the thread count their libraries are
        imported with and the modules a zygote imports: the worker starts the stage the same way, as
        what is imported first and with how many threads can change float results too."""
        self.check_placeable(spec)
        payload = {
            "spec": spec.model_dump(mode="json"),
            "key": key,
            "key_inputs": key_inputs,
            "reason": reason,
            "upstream_keys": upstream_keys,
            "threads": threads,
            "launch": list(launch),
            "environment": {name: os.environ.get(name) for name in _nanny_variables()},
            "remote": self.remote.url,
        }
        future = self.client.submit(
            run_on_worker, payload, key=f"sdbuild-{spec.id}-{key[:12]}", pure=False, resources=self.resources(spec)
        )
        job = runner.Job(
            spec=spec,
            key=key,
            key_inputs=key_inputs,
            reason=reason,
            folder=store.tmp / f"dask-{uuid.uuid4().hex[:8]}",  # nothing is written there: the work is remote
            process=_TaskProcess(future),
        )
        threading.Thread(
            target=self._collect, args=(job, future, store, outcomes), name=f"dask {spec.id}", daemon=True
        ).start()
        return job

    def _collect(self, job: runner.Job, future: Any, store: Store, outcomes: queue.Queue[runner.Outcome]) -> None:
        """In a thread: wait for the task, then download its entry (verified) into the client's store."""
        try:
            reply = future.result()
            if "error" in reply:
                error = StageFailed(reply["error"], reply.get("hint"), stage_id=job.spec.id, expected=reply["expected"])
                outcomes.put(runner.Outcome(job, job.elapsed, error=error))
                return
            fetched = self.remote.fetch(job.key, store)
            if fetched.record is None:
                why = fetched.problem or "its entry is missing from the remote cache"
                raise RuntimeError(f"built on a Dask worker, but {why}")
            outcomes.put(runner.Outcome(job, job.elapsed, record=fetched.record))
        except Exception as problem:  # a killed worker too often (KilledWorker), a cancelled build, the remote
            error = StageFailed(
                f"stage {job.spec.id} failed on the Dask cluster: {type(problem).__name__}: {problem}",
                "stages that finished are cached (locally and in the remote), so a rebuild resumes here",
                stage_id=job.spec.id,
            )
            outcomes.put(runner.Outcome(job, job.elapsed, error=error))


class _TaskProcess:
    """A Dask future seen as the scheduler's WorkerProcess (no pid: it runs on another machine)."""

    def __init__(self, future: Any):
        self.future = future
        self.pid: int | None = None

    def poll(self) -> int | None:
        return 0 if self.future.done() else None

    def wait(self) -> int:
        from distributed import wait

        wait(self.future)
        return 0

    def kill(self) -> None:
        self.future.cancel()


def run_on_worker(payload: dict[str, Any]) -> dict[str, Any]:
    """The Dask task: inputs from the remote, the stage in a worker process, the output to the remote.

    A failed stage comes back as {"error", "hint", "expected"} rather than raised, so Dask does not
    retry a stage that would only fail again; a worker dying is what Dask retries.
    """
    spec = StageSpec.model_validate(payload["spec"])
    key: str = payload["key"]
    remote = RemoteCache(payload["remote"])
    record, _ = remote.lookup(key)
    if record is not None:  # an earlier attempt finished and uploaded before its worker died
        return {"key": key}
    store = Store(_worker_cache())
    store.tmp.mkdir(parents=True, exist_ok=True)
    inputs: dict[str, Path] = {}
    for name, upstream in payload["upstream_keys"].items():
        fetched = remote.fetch(upstream, store)
        if fetched.record is None:
            why = fetched.problem or "missing from the remote cache"
            return {"error": f"stage {spec.id} input '{name}': {why}", "hint": None, "expected": False}
        inputs[name] = store.object_path(fetched.record.output_digest)
    folder = runner.work_folder(store.tmp / uuid.uuid4().hex[:8], spec.id)
    folder.parent.mkdir(parents=True)
    threads: int | None = payload["threads"]
    mode, import_threads, modules = payload["launch"]
    env = _stage_environment(import_threads, payload["environment"])
    launcher: Launcher
    if mode == "fork":
        launcher = Zygote(modules, env, runner.python_path(), folder.parent / "zygote")
    else:
        launcher = Spawner(env)
    try:
        job = runner.start(spec, key, payload["key_inputs"], payload["reason"], inputs, folder, launcher, threads)
        outcome = runner.wait(job)
        if outcome.error is not None:
            return {"error": outcome.error.message, "hint": outcome.error.hint, "expected": outcome.error.expected}
        assert outcome.files is not None and outcome.result is not None
        digest = tree_digest(outcome.files)
        store.publish(job.out, digest, outcome.files)
        record = ActionRecord(
            key=key,
            key_inputs=payload["key_inputs"],
            output_digest=digest,
            files=outcome.files,
            summary=outcome.result.summary,
            seconds=round(outcome.seconds, 3),
            cpu_seconds=outcome.result.cpu_seconds,
            peak_memory_bytes=outcome.result.peak_memory_bytes,
        )
        store.write_record(record)
        remote.upload(record, store.object_path(digest))
    finally:
        launcher.close()
        remove_tree(folder.parent)
        store.memo.save()
    return {"key": key}


def _worker_cache() -> Path:
    """This worker's own cache of inputs it downloaded, in its Dask local directory."""
    try:
        from distributed import get_worker

        return Path(get_worker().local_directory) / "sdbuild-cache"
    except ValueError:  # not inside a worker (called directly)
        return Path(tempfile.gettempdir()) / "sdbuild-dask-cache"


def _nanny_variables() -> list[str]:
    """The variables Dask's nanny sets in its workers (OMP_NUM_THREADS=1 and friends)."""
    import dask

    return sorted(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {})


def _stage_environment(import_threads: int, client: dict[str, str | None]) -> dict[str, str]:
    """The stage process's environment: the worker's, with the nanny's thread and memory variables
    as the client has them (set or not) and the thread count a local build imports libraries with,
    so the stage computes what a local worker would (BLAS thread counts change float results)."""
    env = runner.worker_env(import_threads)
    for name, value in client.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    if not any(client.get(name) for name in USER_VARIABLES):  # as runner.worker_env does locally
        for name in USER_VARIABLES:
            env[name] = str(import_threads)
    return env


@contextmanager
def dask_executor(
    remote: RemoteCache | None, scheduler: str | None, cache_dir: Path, memory_bytes: int
) -> Iterator[DaskExecutor]:
    """The executor for `--executor dask`, its scratch folder removed afterwards.

    Workers exchange stage outputs through a remote cache. A cluster of other machines needs one
    they can all reach (`--remote`); a LocalCluster without one gets a file:// remote in the
    scratch folder, since its workers share this machine's disk.
    """
    if remote is None and scheduler is not None:
        raise UserError(
            "`--executor dask --scheduler ...` needs a remote cache its workers can reach",
            "pass --remote s3://bucket/prefix (or a file:// folder every worker mounts) or set SDBUILD_REMOTE",
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".dask-", dir=cache_dir))
    try:
        if remote is None:
            remote = RemoteCache((scratch / "remote").as_uri())
        with DaskExecutor(remote, scheduler, memory_bytes=memory_bytes, work_dir=scratch / "workers") as executor:
            yield executor
    finally:
        remove_tree(scratch)
