"""The bundle's UNet rebuilt in torch from the pipeline it came from, float16 first, then as compressed."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from builder.sd.components import kind
from builder.sd.manifest import Manifest, ModelEntry
from builder.sd.read_back import SOURCES_FILE, Sources, float16_weights, load_compressed, load_sources


def unet_entries(manifest: Manifest) -> list[ModelEntry]:
    """The bundle's UNet: `Unet`, or `UnetChunk1` and `UnetChunk2`."""
    return [entry for entry in manifest.models.values() if entry.component == "unet"]


@dataclass
class ReadBackUnet:
    """The UNet conversion module with float16 weights, until `compress` writes the bundle's
    compressed weights over them in place (one module in memory, not two)."""

    module: nn.Module
    packages: list[Path]
    sources: Sources  # compressed const -> module tensor(s), from the verify stages
    compressed_weights: int = 0

    def compress(self) -> int:
        """Load every compressed weight of the bundle's UNet package(s); returns how many."""
        self.compressed_weights = sum(load_compressed(self.module, p, self.sources) for p in self.packages)
        return self.compressed_weights


def load_read_back_unet(bundle: Path, pipeline: Path, verified: Iterable[Path]) -> ReadBackUnet:
    """The float16 torch UNet of `bundle`, built from the `pipeline` folder it was made from.

    `verified` are the UNet's verify stage outputs (none for a float16 UNet), whose weight maps say
    where each compressed weight goes. A chunked UNet is read back from both chunks into the one
    whole module (chunks keep its names).
    """
    manifest = Manifest.model_validate_json((bundle / "manifest.json").read_text())
    k = kind("unet")
    module = float16_weights(k.wrap(k.load(pipeline, k.subfolder), manifest.attention).eval())
    sources: Sources = {}
    for folder in verified:
        sources |= load_sources(folder / SOURCES_FILE)
    packages = [bundle / "Resources" / entry.path for entry in unet_entries(manifest)]
    return ReadBackUnet(module, packages, sources)
