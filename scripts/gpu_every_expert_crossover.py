"""Where moe_ffn's every-expert path beats the routed path on this GPU.

    python scripts/gpu_every_expert_crossover.py [--out results/gpu]

For the small, medium and large layer shapes (bf16; the small shape also in
fp32), builds two MoELayers on the same weights, one that always routes and one
that always runs every expert on every token (see kernels/moe_ffn.mojo), and
times both side by side at 1 to 256 tokens (host-timed calls to completion,
inputs already on the GPU, as `pymoe bench` times them). The crossover sets
pymoe.ops.EVERY_EXPERT_MAX_TOKENS. Writes one JSON file with the machine's
ceilings (including the MAX graph call floor), every raw timing and, per
point, the floor of reading all experts' weights once.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from pymoe.bench.ceilings import measure_ceilings
from pymoe.bench.timing import device_sync, measure, summarize
from pymoe.config import get_preset
from pymoe.dtypes import itemsize, torch_dtype
from pymoe.layer import MoELayer
from pymoe.results import file_stamp, result_header, write_result
from pymoe.weights import MoEWeights

TOKENS = (1, 4, 8, 16, 32, 64, 128, 256)
CASES = (("small", "bfloat16"), ("medium", "bfloat16"), ("large", "bfloat16"), ("small", "float32"))
PATHS = {"routed": (1, 0), "every_expert": (1, 1 << 20)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/gpu"))
    parser.add_argument("--min-seconds", type=float, default=0.3)
    args = parser.parse_args(argv)
    console = Console()
    start = time.perf_counter()
    result = {
        **result_header("pymoe.every_expert_crossover/1",
                        "python scripts/gpu_every_expert_crossover.py " + " ".join(argv)),
        "ceilings": {dt: measure_ceilings("gpu", torch_dtype(dt), min_seconds=args.min_seconds)
                     for dt in sorted({dt for _, dt in CASES})},
        "points": [],
    }
    sync = device_sync("gpu")
    for shape, dtype in CASES:
        config = get_preset(shape).config
        weights = MoEWeights.random(config, seed=1)
        layers = {}
        for path, token_range in PATHS.items():
            layer = MoELayer(config, weights, device="gpu", dtype=dtype, every_expert_tokens=token_range)
            layers[path] = layer
        ceil = result["ceilings"][dtype]
        all_weights_s = config.num_experts * config.expert_bytes(itemsize(dtype)) / (ceil["read"]["gbps"] * 1e9)
        table = Table(title=f"{shape} {dtype}: median ms per layer call (floor: all experts' weights read once "
                            f"= {all_weights_s * 1e3:.3f} ms; "
                            f"MAX call floor {ceil['max_call']['median_s'] * 1e3:.3f} ms)")
        for col in ("tokens", *PATHS, "every/routed"):
            table.add_column(col, justify="right")
        for tokens in TOKENS:
            x = torch.randn(tokens, config.d_model, device="cuda", dtype=torch_dtype(dtype))
            point = {"shape": shape, "dtype": dtype, "tokens": tokens, "all_weights_floor_s": all_weights_s}
            for path, layer in layers.items():
                def call(layer=layer, x=x):
                    return layer.forward_unchecked(x)

                point[path] = summarize(measure(call, min_seconds=args.min_seconds, sync=sync))
            result["points"].append(point)
            r, e = point["routed"]["median_s"], point["every_expert"]["median_s"]
            table.add_row(str(tokens), f"{r * 1e3:.3f}", f"{e * 1e3:.3f}", f"{e / r:.2f}")
        console.print(table)
        del layers
        torch.cuda.empty_cache()
    result["wall_s"] = time.perf_counter() - start  # ceilings, compiles and timings
    gpu = (result["machine"]["gpu"] or "gpu").replace(" ", "-")
    path = write_result(args.out, f"every-expert-crossover-{gpu}", result, stamp=file_stamp(result["date"]))
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
