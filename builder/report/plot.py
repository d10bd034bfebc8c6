"""PSNR against size for candidate compression recipes, with the chosen bundle highlighted.

Candidates come from the compression analysis as a JSON (or YAML) list; the plot is drawn with
matplotlib's Agg backend and saved without metadata, so the same points give the same PNG bytes.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, NonNegativeInt, TypeAdapter

_MB = 1e6


class Candidate(BaseModel):
    """One compression recipe the analysis measured: its UNet's size and output PSNR."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    average_bits: float | None  # None when the bundle's manifest does not record it
    size_bytes: NonNegativeInt
    psnr_db: float


def load_candidates(path: Path) -> list[Candidate]:
    """The candidate list in `path` (JSON, or YAML, which reads JSON too)."""
    import yaml

    return TypeAdapter(list[Candidate]).validate_python(yaml.safe_load(path.read_text()))


def _label(candidate: Candidate) -> str:
    bits = "" if candidate.average_bits is None else f" ({candidate.average_bits:.2f} bits)"
    return candidate.name + bits


def psnr_vs_size_figure(candidates: list[Candidate], chosen: Candidate):
    """The figure: candidates as labelled points, `chosen` as a larger highlighted one."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=100)
    axes = figure.add_subplot()
    axes.scatter(
        [c.size_bytes / _MB for c in candidates], [c.psnr_db for c in candidates], color="tab:blue", label="candidates"
    )
    for c in candidates:
        axes.annotate(_label(c), (c.size_bytes / _MB, c.psnr_db), fontsize=7, xytext=(4, 3), textcoords="offset points")
    axes.scatter(
        [chosen.size_bytes / _MB],
        [chosen.psnr_db],
        s=160,
        marker="*",
        color="tab:red",
        zorder=3,
        label=f"this bundle: {_label(chosen)}",
    )
    axes.set_xlabel("UNet size (MB)")
    axes.set_ylabel("UNet output PSNR vs float16 (dB)")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def save_png(figure, path: Path) -> None:
    """Save without the `Software` text chunk, whose matplotlib version would change the bytes."""
    figure.savefig(path, format="png", metadata={"Software": None})
