"""Benchmark harness: machine ceilings, side-by-side timing, result files."""

from .ceilings import measure_ceilings
from .suite import IMPL_NAMES, IMPLEMENTATIONS, run_preset, write_bench_result

__all__ = ["IMPLEMENTATIONS", "IMPL_NAMES", "measure_ceilings", "run_preset", "write_bench_result"]
