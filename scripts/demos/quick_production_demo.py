"""Quick production demo (a few minutes on a 2-core CPU): build a MoE layer and check it
against the float64 reference, time the small preset's shape against the dense baseline and
PyTorch side by side, and replay one SIMULATED offloading scenario.

A thin wrapper over the library: `pymoe check`, `pymoe bench`, `pymoe simulate` do the same
with more options. Writes one bench result file under results/bench/.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pymoe.bench.runner import run_bench
from pymoe.check import check_preset
from pymoe.offload.sweep import run_sweep
from pymoe.results import REPO_ROOT

# On a CPU the small shape runs on 2048 of its 16384 tokens so that the demo stays short;
# `pymoe bench --preset small` runs all of them.
CPU_TOKENS = 2048
TRACE = Path("results/traces/lm-switch-aux.npz")
CALIBRATION = Path("results/offload/calibration-NVIDIA-H100-80GB-HBM3.json")


def gpu_present() -> bool:
    from max.driver import accelerator_count

    return accelerator_count() > 0


def main() -> int:
    console = Console()
    console.rule("1. correctness: the MoE layer against the float64 reference")
    if not check_preset("small-decode"):
        console.print("[red]the layer does not match the reference; stopping[/]")
        return 1

    gpu = gpu_present()
    device, dtype = ("gpu", "bfloat16") if gpu else ("cpu", "float32")
    tokens = None if gpu else CPU_TOKENS
    console.rule(f"2. speed: small shape on {device} ({dtype}), side by side")
    result, path = run_bench(("small",), tokens=tokens, device=device, dtype=dtype,
                             impls=("pymoe", "max_dense", "torch_loop", "torch_grouped"), min_seconds=0.5,
                             command="python scripts/demos/quick_production_demo.py", console=console)
    run = result["runs"][0]
    table = Table(title=f"pymoe vs baselines, {run['tokens']} tokens (medians; file {path})")
    for col in ("implementation", "median", "% of roofline floor", "pymoe faster by"):
        table.add_column(col, justify="right")
    for row in run["rows"]:
        if row["status"] == "ok":
            table.add_row(row["label"], f"{row['median_s'] * 1e3:.1f} ms", f"{row['pct_of_floor']:.0f}%",
                          "" if row["name"] == "pymoe" else f"{row['pymoe_speedup']:.2f}x")
    console.print(table)

    console.rule("3. expert offloading: one SIMULATED scenario (switch, cache = 25% of experts)")
    root = Path.cwd() if (Path.cwd() / TRACE).is_file() else REPO_ROOT
    if not (root / TRACE).is_file() or not (root / CALIBRATION).is_file():
        console.print(f"{TRACE} or {CALIBRATION} not found: run from a pymoe checkout (see HOW_TO_RUN.md)")
        return 0
    run_sweep(root / TRACE, "switch", root / CALIBRATION, strategies=("on-demand", "top-k", "expertflow", "oracle"),
              batch_sizes=(1, 16), runs=2, out_dir=None, console=console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
