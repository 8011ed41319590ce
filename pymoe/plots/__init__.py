"""Figures, drawn only from the result files that results/figures.toml lists for them
(never computed or invented here)."""

from __future__ import annotations

from pathlib import Path

from ..results import FigureList
from .common import Report


def render_all(results_dir: Path = Path("results"), out_dir: Path | None = None) -> Report:
    """Render every figure that <results_dir>/figures.toml lists files for into
    <results_dir>/graphs (or out_dir). The report lists what was written, what was skipped and
    why, the errors (a listed file missing or of the wrong kind) and notes on newer result
    files that the list leaves out. FigureListError if figures.toml itself is malformed."""
    from .kernels import render_kernels
    from .offload import render_offload

    results_dir = Path(results_dir)
    out_dir = Path(out_dir) if out_dir is not None else results_dir / "graphs"
    figures = FigureList.read(results_dir)
    report = Report()
    render_kernels(figures, out_dir, report)
    render_offload(figures, out_dir, report)
    for figure in figures.unknown_figures():
        report.fail(figure, f"{figures.path.as_posix()} lists it, but pymoe draws no figure of that name")
    report.notes += figures.newer_unlisted()
    return report
