"""The full suite, with progress, writing result files under results/: every benchmark
preset this machine can hold (CPU float32, or GPU bfloat16 when MAX sees a GPU), the CPU
ablation, and the SIMULATED offloading sweeps on the committed traces. Hours on a 2-core CPU
(the large prefill dominates); pass preset names to run fewer, e.g.
`python scripts/demos/standalone_performance_test.py small-decode small`.

A thin wrapper over `pymoe bench`, `pymoe bench --ablation` and `pymoe simulate`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console

from pymoe.bench.runner import run_ablation, run_bench
from pymoe.config import PRESETS
from pymoe.offload.sweep import run_sweep
from pymoe.results import machine_info

CALIBRATION = Path("results/offload/calibration-NVIDIA-H100-80GB-HBM3.json")
SWEEPS = (("results/traces/lm-switch-aux.npz", "switch"), ("results/traces/lm-qwen-aux.npz", "qwen"))


def fits(name: str, bytes_available: float, dtype_bytes: int) -> bool:
    """Weights of the MoE layer and of the dense baseline, plus the largest activation
    ([tokens, d_ff] per expert slot), under half of the memory available."""
    preset = PRESETS[name]
    c = preset.config
    weights = 2 * c.num_experts * 2 * c.d_model * c.d_ff * dtype_bytes
    activations = max(preset.tokens) * c.top_k * c.d_ff * dtype_bytes * 3
    return weights + activations < 0.5 * bytes_available


def main(argv: list[str]) -> int:
    from max.driver import accelerator_count

    console = Console()
    gpu = accelerator_count() > 0
    device, dtype, dtype_bytes = ("gpu", "bfloat16", 2) if gpu else ("cpu", "float32", 4)
    if gpu:
        import torch

        available = torch.cuda.get_device_properties(0).total_memory
    else:
        available = (machine_info()["memory_gib"] or 8) * 2**30
    presets = tuple(argv) or tuple(name for name in PRESETS if fits(name, available, dtype_bytes))
    skipped = [name for name in PRESETS if name not in presets]
    left_out = f"; left out: {', '.join(skipped)}" if skipped else ""
    console.print(f"presets on {device}: {', '.join(presets)}{left_out}")
    command = "python scripts/demos/standalone_performance_test.py " + " ".join(argv)
    for name in presets:  # one result file per preset, so a long run keeps what it finished
        run_bench((name,), device=device, dtype=dtype, command=command, console=console)
    if not gpu:
        run_ablation("small", command=command)
    for trace, model in SWEEPS:
        if Path(trace).is_file() and CALIBRATION.is_file():
            run_sweep(Path(trace), model, CALIBRATION, command=command, console=console)
        else:
            console.print(f"{trace} or {CALIBRATION} missing: run from a pymoe checkout")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
