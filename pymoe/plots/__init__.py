"""Figures, drawn only from result files under results/ (never computed or invented here)."""

from __future__ import annotations

from pathlib import Path

from .common import Report


def render_all(results_dir: Path = Path("results"), out_dir: Path | None = None) -> Report:
    """Render every figure whose result files exist into results/graphs; the report lists
    what was written and what was skipped for lack of a result file."""
    from .kernels import render_kernels
    from .offload import render_offload

    results_dir = Path(results_dir)
    out_dir = Path(out_dir) if out_dir is not None else results_dir / "graphs"
    report = Report()
    render_kernels(results_dir, out_dir, report)
    render_offload(results_dir, out_dir, report)
    return report
