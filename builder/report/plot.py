"""PSNR against size for candidate compression recipes, with the chosen bundle highlighted.

Two panels, one per metric of the analysis workload: the final latents of its short denoising
trajectories (what mixed-bit targets are set in) and its first UNet call alone (what a one-call
read-back measures). Candidates come from the compression analysis as a JSON (or YAML) list; the
plot is drawn with matplotlib's Agg backend and saved without metadata, so the same points give the
same PNG bytes.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, NonNegativeInt, TypeAdapter

_MB = 1e6


class Candidate(BaseModel):
    """One compression recipe measured on the analysis workload: its UNet's size and both PSNRs
    against float16 (None where it was not measured)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    average_bits: float | None  # None when the bundle's manifest does not record it
    size_bytes: NonNegativeInt
    psnr_db: float | None  # the workload's final latents (Apple's mixed-bit metric)
    single_call_psnr_db: float | None = None  # the workload's first UNet call alone


def load_candidates(path: Path) -> list[Candidate]:
    """The candidate list in `path` (JSON, or YAML, which reads JSON too)."""
    import yaml

    return TypeAdapter(list[Candidate]).validate_python(yaml.safe_load(path.read_text()))


def _label(candidate: Candidate) -> str:
    bits = "" if candidate.average_bits is None else f" ({candidate.average_bits:.2f} bits)"
    return candidate.name + bits


# (Candidate field, the panel's y label): the two metrics side by side, never on one axis.
METRICS = (
    ("psnr_db", "final latents PSNR vs float16 (dB)"),
    ("single_call_psnr_db", "single UNet call PSNR vs float16 (dB)"),
)


def psnr_vs_size_figure(candidates: list[Candidate], chosen: Candidate):
    """The figure: one panel per metric (`METRICS`), candidates as labelled points, `chosen` as a
    larger highlighted one; a point is drawn only in the panels whose metric it has."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.5), dpi=100)
    for field, label in METRICS:
        axes = figure.add_subplot(1, len(METRICS), len(figure.axes) + 1)
        measured = [c for c in candidates if getattr(c, field) is not None]
        axes.scatter(
            [c.size_bytes / _MB for c in measured],
            [getattr(c, field) for c in measured],
            color="tab:blue",
            label="candidates",
        )
        for c in measured:
            point = (c.size_bytes / _MB, getattr(c, field))
            axes.annotate(_label(c), point, fontsize=7, xytext=(4, 3), textcoords="offset points")
        value = getattr(chosen, field)
        if value is not None:
            axes.scatter(
                [chosen.size_bytes / _MB],
                [value],
                s=160,
                marker="*",
                color="tab:red",
                zorder=3,
                label=f"this bundle: {_label(chosen)}",
            )
        axes.set_xlabel("UNet size (MB)")
        axes.set_ylabel(label)
        axes.grid(True, alpha=0.3)
        if measured or value is not None:
            axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def save_png(figure, path: Path) -> None:
    """Save without the `Software` text chunk, whose matplotlib version would change the bytes."""
    figure.savefig(path, format="png", metadata={"Software": None})
