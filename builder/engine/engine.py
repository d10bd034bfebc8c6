"""The engine's front door: plan, build, explain, verify and gc over one cache folder and one target."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from builder.engine import code
from builder.engine.elsewhere import Executor, Remote
from builder.engine.events import Event
from builder.engine.files import remove_tree
from builder.engine.keys import action_key
from builder.engine.lock import CacheLock
from builder.engine.memory import available_memory_bytes
from builder.engine.planner import Assessment, assess
from builder.engine.reports import Explanation, GcReport, PlanEntry, StageResult
from builder.engine.scheduler import Scheduler
from builder.engine.spec import Graph
from builder.engine.store import ActionRecord, Damage, Store, UnreadableRecord
from builder.errors import UserError


class Engine:
    """`target` names this build's index (e.g. the recipe), which remembers what each stage id last used.
    `inputs_root`, when given, is the folder external inputs are read from: a path or link in them
    leading elsewhere is refused before any stage reads it. `remote`, when given, is looked up before
    a stale stage runs and receives what is built."""

    def __init__(self, cache_dir: Path, target: str, inputs_root: Path | None = None, remote: Remote | None = None):
        self.store = Store(Path(cache_dir).absolute(), inputs_root.resolve() if inputs_root else None)
        self.target = target
        self.remote = remote
        self.store.index_path(target)  # reject a bad target name before any work

    def plan(self, graph: Graph) -> list[PlanEntry]:
        entries = [
            PlanEntry(
                id=a.spec.id,
                stage=a.spec.stage,
                component=a.spec.component,
                status=a.status,
                reason=a.reason,
                key=a.key,
            )
            for a in self._assess_all(graph)
        ]
        self.store.memo.save()
        return entries

    def explain(self, graph: Graph, stage_id: str) -> Explanation:
        graph[stage_id]  # a clear error for an unknown id
        found = next(a for a in self._assess_all(graph) if a.spec.id == stage_id)
        self.store.memo.save()
        cached = found.record if found.status == "cached" else None
        return Explanation(
            id=found.spec.id,
            stage=found.spec.stage,
            component=found.spec.component,
            status=found.status,
            reason=found.reason,
            key=found.key,
            key_inputs=found.key_inputs,
            previous_key=found.previous_key,
            previous_key_inputs=found.previous_key_inputs,
            output=self.store.object_path(cached.output_digest) if cached is not None else None,
        )

    def build(
        self,
        graph: Graph,
        *,
        jobs: int = 2,
        memory_budget_bytes: int | None = None,
        on_event: Callable[[Event], None] | None = None,
        executor: Executor | None = None,
    ) -> list[StageResult]:
        """Run what is stale, up to `jobs` stages at once whose memory estimates fit the budget together
        (on `executor`'s cluster when given, whose remote cache becomes this engine's).

        Raises StageFailed for the first stage that fails; everything finished before stays cached.
        """
        if jobs < 1:
            raise UserError(f"jobs must be at least 1, got {jobs}", "pass --jobs 1 or more")
        if executor is not None:
            self.remote = executor.remote
        order = graph.order()
        budget = available_memory_bytes() if memory_budget_bytes is None else memory_budget_bytes
        code.forget()
        with CacheLock(self.store.lock_file):
            self._clean_tmp()
            scheduler = Scheduler(
                self.store,
                self.target,
                order,
                jobs=jobs,
                memory_budget_bytes=budget,
                emit=on_event or (lambda _: None),
                remote=self.remote,
                executor=executor,
            )
            try:
                results = scheduler.run()
            finally:
                self.store.memo.save()
        return [results[spec.id] for spec in order]

    def output_path(self, result_or_digest: StageResult | str) -> Path:
        if isinstance(result_or_digest, str):
            return self.store.object_path(result_or_digest)
        if result_or_digest.digest is None:
            raise UserError(
                f"stage {result_or_digest.id} has no output ({result_or_digest.status}: {result_or_digest.reason})"
            )
        return self.store.object_path(result_or_digest.digest)

    def verify(self, *, full: bool = False) -> list[str]:
        """Problems found in the whole cache; `full` re-hashes every file instead of trusting the memo."""
        problems: list[str] = []
        checked: dict[str, Damage | None] = {}
        for key in self.store.record_keys():
            try:
                record = self.store.load_record(key)
            except UnreadableRecord as problem:
                problems.append(str(problem))
                continue
            if record is None:
                continue  # deleted while we looked
            label = f"action {key[:12]} ({record.key_inputs.get('stage', '?')})"
            if action_key(record.key_inputs) != key:
                problems.append(f"{label}: record does not match its key")
            if record.output_digest not in checked:
                checked[record.output_digest] = self.store.check_object(record, trust_memo=not full)
            damage = checked[record.output_digest]
            if damage is not None:
                problems.append(f"{label}: {damage.describe()}")
        self.store.memo.save()
        return problems

    def gc(self, keep_targets: list[str] | None = None) -> GcReport:
        """Delete actions and objects no kept target's index refers to; `None` keeps every target."""
        store = self.store
        with CacheLock(store.lock_file):
            self._clean_tmp()
            targets = store.targets()
            dropped = [t for t in targets if keep_targets is not None and t not in keep_targets]
            for target in dropped:
                store.index_path(target).unlink()
            live_keys = {key for t in targets if t not in dropped for key in store.load_index(t).values()}
            removed_actions = 0
            live_objects: set[str] = set()
            for key in store.record_keys():
                record = _readable(store, key) if key in live_keys else None
                if record is None:
                    store.record_path(key).unlink()
                    removed_actions += 1
                else:
                    live_objects.add(record.output_digest)
            removed_objects = freed = 0
            for folder in sorted(store.objects.iterdir()) if store.objects.is_dir() else []:
                if folder.name not in live_objects:
                    freed += _size(folder)
                    remove_tree(folder)
                    removed_objects += 1
            store.memo.forget_missing()
            store.memo.save()
        return GcReport(
            removed_targets=dropped, removed_actions=removed_actions, removed_objects=removed_objects, freed_bytes=freed
        )

    def _assess_all(self, graph: Graph) -> list[Assessment]:
        """Assess in topological order; a stale stage's output digest is unknown, so its dependants are stale too."""
        code.forget()
        index = self.store.load_index(self.target)
        digests: dict[str, str | None] = {}
        skipped: set[str] = set()
        found: list[Assessment] = []
        for spec in graph.order():
            assessment = assess(self.store, spec, index.get(spec.id), digests, skipped)
            if assessment.status == "skipped":
                skipped.add(spec.id)
            else:
                cached = assessment.record if assessment.status == "cached" else None
                digests[spec.id] = cached.output_digest if cached is not None else None
            found.append(assessment)
        return found

    def _clean_tmp(self) -> None:
        """Work folders of an earlier build that died; only called while holding the lock."""
        remove_tree(self.store.tmp)
        self.store.tmp.mkdir(parents=True)


def _readable(store: Store, key: str) -> ActionRecord | None:
    try:
        return store.load_record(key)
    except UnreadableRecord:
        return None


def _size(folder: Path) -> int:
    return sum(os.lstat(os.path.join(d, n)).st_size for d, _, names in os.walk(folder) for n in names)
