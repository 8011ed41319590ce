"""Per-kernel GPU time of one MoELayer call, from the PyTorch profiler (CUPTI).

    python scripts/profile_gpu_layer.py qwen3-30b-a3b:16 qwen3-30b-a3b:16384 small
    python scripts/profile_gpu_layer.py qwen3-30b-a3b:1:fused      (MoELayer(fused_decode=True))

For each preset (with `:tokens`, that batch size; else the preset's first; with `:fused`, the
layer with the fused decode kernel):
bf16 layer on the GPU, 3 warm-up calls, 10 host-timed calls, then 5 profiled calls;
prints the host-timed ms per call, the profiler's
table of CUDA kernels (MAX's kernels appear as mojo_pkg_<hash>, cuBLAS's as
nvjet_*; the CUDA times in the table are totals over the 5 calls) and the last call's
kernels in launch order with their times (the order names them: the router GEMM and the
gate first, the combine last).
"""

import sys
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from pymoe.bench.workload import random_weights
from pymoe.config import get_preset
from pymoe.layer import MoELayer

PROFILED_CALLS = 5


def main(presets: list[str]) -> None:
    for spec in presets:
        name, _, rest = spec.partition(":")
        tokens, _, variant = rest.partition(":")
        if variant not in ("", "fused"):
            raise SystemExit(f"{spec}: the third part can only be 'fused'")
        preset = get_preset(name)
        weights, _ = random_weights(preset.config, "gpu", "bfloat16", seed=1)
        layer = MoELayer(preset.config, weights, device="gpu", dtype="bfloat16", fused_decode=variant == "fused")
        x = torch.randn(int(tokens or preset.tokens[0]), preset.config.d_model, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            layer.forward_unchecked(x)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            layer.forward_unchecked(x)
        torch.cuda.synchronize()
        print(spec, "host-timed ms/call", (time.perf_counter() - start) / 10 * 1e3)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(PROFILED_CALLS):
                layer.forward_unchecked(x)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
        print_last_call(prof, PROFILED_CALLS)


def print_last_call(prof, calls: int) -> None:
    """The kernels of the last of `calls` profiled calls, in the order they ran, with their GPU times."""
    kernels = sorted((e.time_range.start, e.time_range.elapsed_us(), e.name) for e in prof.events()
                     if e.device_type == DeviceType.CUDA)
    per_call = len(kernels) // calls
    last = kernels[-per_call:] if per_call else []
    print(f"last call, {per_call} kernels in launch order (us, gap since the previous one ended):")
    end = None
    for start, us, name in last:
        gap = "" if end is None else f" (+{start - end:.1f})"
        print(f"  {us:9.1f}{gap:>10}  {name[:70]}")
        end = start + us


if __name__ == "__main__":
    main(sys.argv[1:] or ["small-decode", "small"])
