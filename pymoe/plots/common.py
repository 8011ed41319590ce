"""What every figure shares: its result files (from results/figures.toml), the provenance
footer, saving."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from ..results import FigureList, FigureListError  # noqa: E402

STRATEGY_ORDER = ("on-demand", "on-demand[predicted]", "top-k", "multi-lookahead", "intelligent", "intelligent-learned",
                  "pre-gated", "expertflow", "expertflow[predicted]", "oracle")
STRATEGY_STYLE = {
    "on-demand": dict(color="#444444", marker="o", linestyle="-"),
    "top-k": dict(color="#1f77b4", marker="s", linestyle="-"),
    "multi-lookahead": dict(color="#17becf", marker="v", linestyle="-"),
    "intelligent": dict(color="#2ca02c", marker="^", linestyle="-"),
    "intelligent-learned": dict(color="#8c564b", marker="X", linestyle="-"),
    "pre-gated": dict(color="#9467bd", marker="D", linestyle="-"),
    "expertflow": dict(color="#ff7f0e", marker="P", linestyle="-"),
    "on-demand[predicted]": dict(color="#e377c2", marker="o", linestyle="--"),
    "expertflow[predicted]": dict(color="#bcbd22", marker="P", linestyle="--"),
    "oracle": dict(color="#d62728", marker="*", linestyle="--"),
}


@dataclass
class Report:
    """What `render_all` made, what it did not make and why (`missing`: nothing listed or not
    enough to draw; `errors`: figures.toml names a file that is missing or of the wrong
    kind), and notes on newer result files that figures.toml leaves out."""

    written: list[Path] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def skip(self, figure: str, why: str) -> None:
        self.missing.append((figure, why))

    def fail(self, figure: str, why: str) -> None:
        self.errors.append((figure, why))


def listed_files(figures: FigureList, figure: str, report: Report, schemas: tuple[str, ...],
                 needs: str) -> list[tuple[Path, dict]] | None:
    """The result files figures.toml lists for the figure, read; None, with the reason in the
    report, if it lists none (`needs` says what run makes one) or a listed file is missing."""
    try:
        files = figures.load(figure, schemas)
    except FigureListError as err:
        report.fail(figure, str(err))
        return None
    if not files:
        where = figures.path.as_posix() + ("" if figures.exists else " (no such file)")
        report.skip(figure, f"{where} lists no result file for it; it needs {needs}")
        return None
    return files


def of_schema(files: list[tuple[Path, dict]], schema: str) -> list[tuple[Path, dict]]:
    return [(path, data) for path, data in files if data["schema"] == schema]


def machine_label(data: dict) -> str:
    m = data.get("machine", {})
    gpu = m.get("gpu")
    cpu = m.get("cpu_model", "unknown CPU")
    return f"{gpu}" if data.get("device") == "gpu" and gpu else f"{cpu} ({m.get('logical_cpus', '?')} CPUs)"


def log_y(ax) -> None:
    """Log scale with plain numbers (0.1, 1, 4) instead of powers of ten."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1000 else f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def footer(fig, *lines: str) -> None:
    """Provenance lines at the bottom, then lay the axes out above them and below the title."""
    height = fig.get_size_inches()[1]
    bottom = (0.15 + 0.14 * len(lines)) / height
    fig.text(0.01, 0.005, "\n".join(lines), fontsize=7, color="#555555", va="bottom", ha="left")
    fig.tight_layout(rect=(0, bottom, 1, 1 - 0.45 / height))


def provenance_line(path: Path, data: dict) -> str:
    commit = (data.get("commit") or "unknown")[:9]
    dirty = " (dirty tree)" if data.get("dirty") else ""
    return f"{path.as_posix()} | run {data.get('date', '?')[:16]} | commit {commit}{dirty}"


def save(fig, out_dir: Path, name: str, report: Report) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    fig.savefig(path, dpi=130)
    plt.close(fig)
    report.written.append(path)
