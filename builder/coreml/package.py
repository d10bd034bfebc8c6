"""Make saved `.mlpackage` folders reproducible and describe what they contain.

Two conversions of the same module differ only in the random item identifiers of `Manifest.json`,
the conversion-date metadata and the order protobuf writes map fields. Normalising those three
makes outputs byte-identical, so the cache's content digests mean something.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from pydantic import BaseModel

_SPEC_PATH = Path("Data/com.apple.CoreML/model.mlmodel")
WEIGHTS_DIR = Path("Data/com.apple.CoreML/weights")  # an ML Program package's weight file(s)
_DROPPED_METADATA = ("com.github.apple.coremltools.conversion_date",)
# Fixed namespace so item identifiers depend only on the item's path inside the package.
_NAMESPACE = uuid.UUID("6f1d2c9e-5b7a-4e8f-9c3d-2a1b0e4f7d61")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def normalize_mlpackage(package: Path) -> None:
    """Rewrite the package in place so identical inputs give identical bytes."""
    manifest_path = package / "Manifest.json"
    manifest = json.loads(manifest_path.read_text())
    renamed: dict[str, str] = {}
    entries = {}
    for old_id, entry in manifest["itemInfoEntries"].items():
        new_id = str(uuid.uuid5(_NAMESPACE, entry["path"])).upper()
        renamed[old_id] = new_id
        entries[new_id] = entry
    manifest["itemInfoEntries"] = dict(sorted(entries.items()))
    manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    _write_atomic(manifest_path, (json.dumps(manifest, indent=4, sort_keys=True) + "\n").encode())

    from coremltools.proto import Model_pb2

    spec_path = package / _SPEC_PATH
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_path.read_bytes())
    for key in _DROPPED_METADATA:
        if key in spec.description.metadata.userDefined:
            del spec.description.metadata.userDefined[key]
    _write_atomic(spec_path, spec.SerializeToString(deterministic=True))


def write_spec(package: Path, spec) -> None:
    """Store a model's spec (with the metadata set after conversion) in its package, in place.

    This is the part of `MLModel.save` that matters for a package the converter wrote where it
    belongs (`package_dir`); `save` would also copy the package, weights included.
    """
    _write_atomic(package / _SPEC_PATH, spec.SerializeToString())


def package_size(path: Path) -> int:
    """Bytes of all files under a saved model folder (`.mlpackage` or `.mlmodelc`)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class FeatureInfo(BaseModel):
    """One input or output as the saved model declares it."""

    name: str
    shape: list[int]
    dtype: str


class ModelInfo(BaseModel):
    """The interface of a saved model, read back from its spec (not from what we meant to write)."""

    inputs: list[FeatureInfo]
    outputs: list[FeatureInfo]


def _features(features) -> list[FeatureInfo]:
    from coremltools.proto import FeatureTypes_pb2

    names = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name
    return [
        FeatureInfo(
            name=f.name,
            shape=list(f.type.multiArrayType.shape),
            dtype=names(f.type.multiArrayType.dataType).lower(),
        )
        for f in features
    ]


def describe_mlpackage(package: Path) -> ModelInfo:
    """Read the input and output features of a saved `.mlpackage`."""
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString((package / _SPEC_PATH).read_bytes())
    return ModelInfo(inputs=_features(spec.description.input), outputs=_features(spec.description.output))
