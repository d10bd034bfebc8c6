"""`<name>-<version>.zip`: a bundle's manifest.json and Resources/, byte for byte reproducible.

Everything a zip records besides the files' bytes is fixed: entries sorted by name, one timestamp
(`SOURCE_DATE_EPOCH`, else 1980-01-01, the earliest a zip can hold), regular-file mode 0644 on a
Unix host, no directory entries, zlib's default deflate level. Two releases of byte-identical
bundles therefore give the same archive, whatever the machine's clock, umask or file order.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import os
import stat
import time
import zipfile
from pathlib import Path, PurePosixPath

from builder.build_info import build_date
from builder.errors import UserError

ZIP_EARLIEST = 315532800  # 1980-01-01T00:00:00Z
ZIP_LATEST = 4354819198  # 2107-12-31T23:59:58Z
_UNIX_HOST = 3
_FILE_MODE = (stat.S_IFREG | 0o644) << 16
_CHUNK = 1 << 20


def archive_name(name: str, version: str) -> str:
    return f"{name}-{version}.zip"


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def archive_time() -> tuple[int, int, int, int, int, int]:
    """The one timestamp every entry carries: SOURCE_DATE_EPOCH (UTC, read as the manifest's date is)
    when set, else 1980-01-01; clamped to what a zip can hold."""
    date = build_date()
    epoch = ZIP_EARLIEST if date is None else calendar.timegm(time.strptime(date, "%Y-%m-%dT%H:%M:%SZ"))
    return time.gmtime(min(max(epoch, ZIP_EARLIEST), ZIP_LATEST))[:6]


def bundle_files(bundle: Path) -> dict[str, Path]:
    """Archive path (relative to the bundle) -> file: manifest.json and every file the manifest lists,
    each checked against the manifest's sha256, so an archive never ships a file the build did not make."""
    manifest_path = bundle / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(f"{bundle} has no manifest.json", hint="build the recipe first (`sdbuild build`)")
    listed = json.loads(manifest_path.read_text())["files"]
    resources = bundle / "Resources"
    present = {p.relative_to(resources).as_posix() for p in resources.rglob("*") if p.is_file() or p.is_symlink()}
    unlisted = sorted(present - set(listed))
    if unlisted:
        raise UserError(
            f"{resources} holds files its manifest does not list: {', '.join(unlisted[:5])}",
            hint="remove them, or build again so the bundle is republished",
        )
    files = {"manifest.json": manifest_path}
    for name, entry in sorted(listed.items()):
        path = resources / PurePosixPath(name)
        if path.is_symlink() or not path.is_file():
            raise UserError(f"{path} is missing or not a regular file", hint="build again to republish the bundle")
        if path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            raise UserError(
                f"{path} differs from the digest its manifest records",
                hint="it was changed after the build; build again to republish the bundle",
            )
        files[f"Resources/{name}"] = path
    return files


def write_archive(bundle: Path, out_dir: Path, name: str, version: str) -> tuple[Path, str]:
    """Write `out_dir/<name>-<version>.zip` and its `.sha256` beside it, each atomically; returns the
    archive and its sha256. Entries sit under `<name>-<version>/`, so unpacking never scatters files."""
    files = bundle_files(bundle)
    when = archive_time()
    out_dir.mkdir(parents=True, exist_ok=True)
    archive = out_dir / archive_name(name, version)
    prefix = archive.name.removesuffix(".zip")
    partial = out_dir / f".{archive.name}.{os.getpid()}.partial"
    try:
        with zipfile.ZipFile(partial, "w") as zf:
            for relative in sorted(files):
                info = zipfile.ZipInfo(f"{prefix}/{relative}", date_time=when)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.create_system = _UNIX_HOST
                info.external_attr = _FILE_MODE
                info.file_size = files[relative].stat().st_size  # decides zip64 up front, as for a known size
                with files[relative].open("rb") as src, zf.open(info, "w") as dst:
                    while chunk := src.read(_CHUNK):
                        dst.write(chunk)
        digest = sha256_file(partial)
        os.replace(partial, archive)
    finally:
        partial.unlink(missing_ok=True)
    checksum = archive.with_name(archive.name + ".sha256")
    partial_checksum = out_dir / f".{checksum.name}.{os.getpid()}.partial"
    partial_checksum.write_text(f"{digest}  {archive.name}\n")
    os.replace(partial_checksum, checksum)
    return archive, digest
