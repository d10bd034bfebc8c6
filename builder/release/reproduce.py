"""Rebuild a release archive from the recipe its manifest records and compare, file by file.

The archive is untrusted input: it is never extracted. Entries are hashed as they stream out,
the manifest's recipe files are written only to plain relative paths inside a fresh workspace,
and every path is checked before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import platform
import zipfile
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path, PurePosixPath

from builder.errors import UserError

_MANIFEST_LIMIT = 64 << 20  # a manifest is kilobytes; refuse to inflate a hostile one into memory
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Archive:
    path: Path
    manifest: dict
    digests: dict[str, str]  # bundle-relative name (manifest.json, Resources/...) -> sha256 of the entry


@dataclass(frozen=True)
class Difference:
    name: str
    archived: str | None  # sha256 in the archive; None: the archive lacks the file
    rebuilt: str | None  # sha256 of the rebuilt file; None: the rebuild did not make it


def _entry_sha256(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> str:
    """The entry's sha256, or what is wrong with it: a damaged entry (bad CRC, broken deflate stream)
    is a file that differs, not an unreadable archive."""
    digest = hashlib.sha256()
    try:
        with zf.open(info) as entry:
            while chunk := entry.read(_CHUNK):
                digest.update(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError) as problem:
        return f"damaged ({problem})"
    return digest.hexdigest()


def read_archive(path: Path) -> Archive:
    """The archive's manifest and the sha256 of every file in it, keyed without the top folder."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = [info for info in zf.infolist() if not info.is_dir()]
            manifests = [i for i in infos if PurePosixPath(i.filename).parts[1:] == ("manifest.json",)]
            if len(manifests) != 1:
                raise UserError(
                    f"{path} is not an sdbuild release archive (no single <name>-<version>/manifest.json in it)",
                    hint="pass a .zip written by `sdbuild release`",
                )
            prefix = PurePosixPath(manifests[0].filename).parts[0]
            if manifests[0].file_size > _MANIFEST_LIMIT:
                raise UserError(f"{path}: manifest.json is {manifests[0].file_size} bytes, too large to be one")
            manifest = json.loads(zf.read(manifests[0]))
            digests = {}
            for info in infos:
                parts = PurePosixPath(info.filename).parts
                if parts[0] != prefix or len(parts) < 2:
                    raise UserError(f"{path}: entry {info.filename!r} lies outside {prefix}/")
                digests["/".join(parts[1:])] = _entry_sha256(zf, info)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as problem:
        raise UserError(
            f"cannot read {path}: {problem}", hint="pass a complete .zip written by `sdbuild release`"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as problem:
        raise UserError(f"{path}: manifest.json is not JSON: {problem}") from None
    return Archive(path, manifest, digests)


def check_checksum_file(archive: Path) -> str | None:
    """A problem with `<archive>.sha256` when it sits beside the archive and disagrees, else None."""
    checksum = archive.with_name(archive.name + ".sha256")
    if not checksum.is_file():
        return None
    recorded = checksum.read_text().split()[:1]
    with archive.open("rb") as f:
        actual = hashlib.file_digest(f, "sha256").hexdigest()
    if recorded != [actual]:
        return f"{checksum.name} records {recorded[0] if recorded else 'nothing'}, the archive's sha256 is {actual}"
    return None


def _relative(path: object, field: str) -> PurePosixPath:
    """A plain relative path (no root, no '..', no backslash) or a UserError naming the manifest field."""
    text = path if isinstance(path, str) else ""
    candidate = PurePosixPath(text)
    parts = candidate.parts
    if not parts or "\\" in text or candidate.is_absolute() or ".." in parts or ":" in parts[0]:
        raise UserError(
            f"the archive's manifest field {field} is {path!r}, not a relative path inside a workspace",
            hint="sdbuild rebuilds only recipes recorded inside their workspace; this archive cannot be reproduced",
        )
    return candidate


def write_recipe(manifest: dict, root: Path) -> Path:
    """Write the recipe, its bases and the files it reads from the manifest into `root`; the recipe's path."""
    recipe = manifest.get("recipe")
    if not isinstance(recipe, dict) or not isinstance(recipe.get("text"), str):
        raise UserError(
            "the archive's manifest does not record the recipe's text, so there is nothing to rebuild from",
            hint="release the bundle again with an sdbuild that records the recipe (manifest schema_version 2)",
        )
    local = [name for name, source in _sources(manifest.get("sources") or {}) if source.get("kind") == "local"]
    if local:
        raise UserError(
            f"the archive was built from local model files ({', '.join(local)}), which it does not hold",
            hint="reproduce releases of hub or synthetic models; for a local model, rebuild its recipe in the "
            "workspace that holds the files and compare the bundle with `sdbuild release`'s sha256",
        )
    files = [("recipe.path", recipe.get("path"), recipe["text"])]
    for key in ("extends", "includes"):
        for index, entry in enumerate(recipe.get(key) or []):
            files.append((f"recipe.{key}.{index}.path", entry.get("path"), entry.get("text")))
    for field, path, text in files:
        if not isinstance(text, str):
            raise UserError(f"the archive's manifest records no text for {field}")
        target = root.joinpath(*_relative(path, field).parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return root.joinpath(*_relative(recipe.get("path"), "recipe.path").parts)


def source_date_epoch(manifest: dict) -> str | None:
    """SOURCE_DATE_EPOCH for the rebuild: the manifest's `date` (set when the release had one) in seconds."""
    date = manifest.get("date")
    if not isinstance(date, str):
        return None
    try:
        when = datetime.strptime(date, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise UserError(f"the archive's manifest date {date!r} is not YYYY-MM-DDTHH:MM:SSZ") from None
    return str(int(when.timestamp()))


def _sources(sources: dict) -> list[tuple[str, dict]]:
    named = [(name, source) for name, source in sources.items() if isinstance(source, dict)]
    controlnets = sources.get("controlnets") or []
    return named + [(f"controlnets.{i}", s) for i, s in enumerate(controlnets) if isinstance(s, dict)]


def bundle_digests(bundle: Path) -> dict[str, str]:
    """sha256 of manifest.json and of every file under Resources/, named as in an archive."""
    files = {"manifest.json": bundle / "manifest.json"}
    resources = bundle / "Resources"
    files |= {f"Resources/{p.relative_to(resources).as_posix()}": p for p in resources.rglob("*") if p.is_file()}
    digests = {}
    for name, path in files.items():
        with path.open("rb") as f:
            digests[name] = hashlib.file_digest(f, "sha256").hexdigest()
    return digests


def compare(archived: dict[str, str], rebuilt: dict[str, str]) -> list[Difference]:
    return [
        Difference(name, archived.get(name), rebuilt.get(name))
        for name in sorted(set(archived) | set(rebuilt))
        if archived.get(name) != rebuilt.get(name)
    ]


def manifest_fields_differing(archived: dict, rebuilt: dict) -> list[str]:
    """Top-level manifest fields whose values differ, to say why manifest.json differs."""
    return sorted(key for key in set(archived) | set(rebuilt) if archived.get(key) != rebuilt.get(key))


def _installed(name: str) -> str:
    if name == "python":
        return platform.python_version()
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def environment_notes(manifest: dict) -> list[str]:
    """Versions the archive was built with that differ from what is installed here: the likeliest
    reason for a difference. The manifest's environment (every package) when it has one, else its tools."""
    environment = manifest.get("environment") or {}
    recorded = dict(environment.get("packages") or manifest.get("tools") or {})
    if "python" in environment:
        recorded["python"] = environment["python"]
    notes = []
    for name, version in sorted(recorded.items()):
        installed = _installed(name)
        if installed != version and installed.split("+")[0] != version:
            notes.append(f"{name}: archive built with {version}, this environment has {installed}")
    return notes
