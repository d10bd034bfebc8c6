"""The cache folder's layout: content-addressed objects, action records, per-target indexes, tmp."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from builder.engine.files import remove_tree, set_writable, write_json_atomic
from builder.engine.hashing import DigestMemo, FileDigest, NotRegularFile, list_files
from builder.errors import UserError

_TARGET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ActionRecord(BaseModel):
    """What one action produced, plus the key's inputs so a later build can say what changed."""

    key: str
    key_inputs: dict[str, Any]
    output_digest: str
    files: dict[str, FileDigest]
    summary: dict[str, Any] | None = None
    seconds: float
    cpu_seconds: float | None = None  # the worker's own user + system time
    peak_memory_bytes: int | None = None
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))


@dataclass(frozen=True)
class Damage:
    """What is wrong with a cached entry; `detail` is None when the object is missing altogether."""

    detail: str | None = None

    def describe(self, *, past: bool = False) -> str:
        if self.detail is None:
            return "cached output missing"
        return f"cached output {'was' if past else 'is'} corrupt ({self.detail})"


class UnreadableRecord(Exception):
    """An action record exists but cannot be parsed; treated like a corrupt cache entry."""


class Store:
    def __init__(self, root: Path, inputs_root: Path | None = None):
        self.root = root
        # External inputs (and every link inside them) must lead inside this folder; None: anywhere.
        self.inputs_root = inputs_root
        self.objects = root / "objects"
        self.actions = root / "actions"
        self.index_dir = root / "index"
        self.tmp = root / "tmp"
        self.lock_file = root / "lock"
        self.memo = DigestMemo(root / "digests.json")

    def object_path(self, digest: str) -> Path:
        return self.objects / digest

    def record_path(self, key: str) -> Path:
        return self.actions / f"{key}.json"

    def load_record(self, key: str) -> ActionRecord | None:
        path = self.record_path(key)
        try:
            return ActionRecord.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except (ValidationError, ValueError) as problem:
            raise UnreadableRecord(f"action record {path.name} is unreadable") from problem

    def record_keys(self) -> list[str]:
        if not self.actions.is_dir():
            return []
        return sorted(p.stem for p in self.actions.glob("*.json"))

    def write_record(self, record: ActionRecord) -> None:
        """Called only once the object is in place, so a record always points at a whole object."""
        write_json_atomic(self.record_path(record.key), record.model_dump(mode="json"))

    def discard(self, key: str, digest: str | None) -> None:
        """Forget a bad cache entry: record first, so no record ever points at a missing object."""
        self.record_path(key).unlink(missing_ok=True)
        if digest is not None:
            remove_tree(self.object_path(digest))

    def publish(self, folder: Path, digest: str, files: dict[str, FileDigest]) -> Path:
        """Move a finished output folder into objects/ in one rename; identical content is kept once."""
        destination = self.object_path(digest)
        set_writable(folder, False)
        self.objects.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(folder, destination)
        except OSError:
            if not destination.is_dir():
                raise
            remove_tree(folder)  # same digest, same bytes: the existing object serves
            return destination
        for rel, digest_of_file in files.items():
            path = destination / rel
            self.memo.remember(path, os.stat(path), digest_of_file.sha256)
        return destination

    def check_object(self, record: ActionRecord, *, trust_memo: bool = True) -> Damage | None:
        """None when the object matches its record; memoised digests make this a stat per file."""
        root = self.object_path(record.output_digest)
        if not root.is_dir():
            return Damage()
        try:
            present = set(list_files(root, follow_symlinks=False))
        except NotRegularFile as problem:
            return Damage(str(problem))
        unexpected = sorted(present - set(record.files))
        if unexpected:
            return Damage(f"{unexpected[0]}: unexpected file")
        for rel, expected in sorted(record.files.items()):
            if rel not in present:
                return Damage(f"{rel}: missing")
            actual = self.memo.digest(root / rel, trust_memo=trust_memo)
            if actual.size != expected.size:
                return Damage(f"{rel}: size {actual.size} != {expected.size}")
            if actual.sha256 != expected.sha256:
                return Damage(f"{rel}: sha256 mismatch")
            if actual.executable != expected.executable:
                return Damage(f"{rel}: executable bit changed")
        return None

    def index_path(self, target: str) -> Path:
        if not _TARGET_NAME.match(target):
            raise UserError(
                f"invalid build target name '{target}'",
                "use letters, digits, '.', '_' and '-' only (it names a file in the cache)",
            )
        return self.index_dir / f"{target}.json"

    def load_index(self, target: str) -> dict[str, str]:
        path = self.index_path(target)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            return {}  # written atomically, so only a hand edit gets here; it only costs explanations

    def save_index(self, target: str, index: dict[str, str]) -> None:
        write_json_atomic(self.index_path(target), index)

    def targets(self) -> list[str]:
        if not self.index_dir.is_dir():
            return []
        return sorted(p.stem for p in self.index_dir.glob("*.json"))
