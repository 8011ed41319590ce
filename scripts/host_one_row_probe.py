"""The native host call with one row per expert, in one parallel region or in two (issue 23).

pymoe_host_ffn's `ffn` runs a call whose experts have one row each (a batch-1 decode layer's
host call) in one parallel region (host_ffn.mojo, `_ffn_one_row`) when it is given float32
partials, and as the two grouped GEMMs (two regions, each waking the CPU kernels' worker pool)
when it is given none. This times both on the same group, buffers and rows, interleaved (their
order alternating), back to back and after `--gap-ms` idle before every call (an engine's host
worker waits between layers), for the offloading models' expert shapes at 1, 3 and 8 experts,
and checks that their outputs agree; beside each case its floor, the weight bytes over this
machine's read bandwidth measured first (pymoe.bench.ceilings). Writes
results/offload/<stamp>-host-one-row-<cpu>.json.

    python scripts/host_one_row_probe.py [--reps 80] [--gap-ms 2] [--out results/offload]
"""

import argparse
import time
from pathlib import Path

import torch

from pymoe import results
from pymoe.bench.ceilings import measure_ceilings
from pymoe.bench.timing import summarize
from pymoe.offload.host import HostExpertGroup, routing_arrays
from pymoe.offload.models import get_model

MODELS = ("switch", "qwen", "qwen3-30b-a3b")
EXPERTS = (1, 3, 8)  # experts per call, one row each
DISTINCT = 8  # experts in the group


def ffn_args(group: HostExpertGroup, x: torch.Tensor, experts: list[tuple[int, int]], one_row: bool):
    """(ffn's argument tuple, its output tensor, what must stay alive while the tuple is used):
    what HostExpertGroup._native_call passes, through the one-region path or not."""
    row_ids, offsets, weights, _, slot_to_row = routing_arrays(experts, group.num_experts)
    args, out = group.native_ffn_args(x[:weights.shape[0]], row_ids, offsets, weights, slot_to_row, one_row)
    return args, out, (row_ids, offsets, weights, slot_to_row)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=80)
    p.add_argument("--gap-ms", type=float, default=2.0)
    p.add_argument("--out", type=Path, default=Path("results/offload"))
    args = p.parse_args()
    payload = {**results.result_header("pymoe.host-one-row/1", "python scripts/host_one_row_probe.py "
                                       f"--reps {args.reps} --gap-ms {args.gap_ms}"),
               "what": "one native host call (ffn) with one row per expert: the one-region path against the "
                       "two grouped GEMMs, interleaved, host clock", "cases": []}
    payload["ceilings"] = measure_ceilings("cpu", min_seconds=0.5)
    read_gbps = payload["ceilings"]["read"]["gbps"]
    for name in MODELS:
        model = get_model(name)
        dt = torch.bfloat16 if model.dtype == "bfloat16" else torch.float32
        g = torch.Generator().manual_seed(0)
        weights = [(torch.randn(model.d_model, model.expert.w1_cols, generator=g) * 0.02,
                    torch.randn(model.d_ff, model.d_model, generator=g) * 0.02) for _ in range(DISTINCT)]
        group = HostExpertGroup(model, weights, backend="native")
        x = torch.randn(4, model.d_model, generator=g).to(dt)
        for count in EXPERTS:
            experts = [(i, 1) for i in range(count)]
            paths = {"two regions": ffn_args(group, x, experts, False),
                     "one region": ffn_args(group, x, experts, True)}
            for ffn_call, _, _ in paths.values():
                group._native.ffn(ffn_call)
            two, one = (paths[k][1].double() for k in ("two regions", "one region"))
            rel = float((one - two).norm() / two.norm())
            for gap in (0.0, args.gap_ms):
                samples = {k: [] for k in paths}
                for rep in range(args.reps):
                    for label in (paths if rep % 2 else reversed(list(paths))):
                        time.sleep(gap / 1e3)
                        start = time.perf_counter()
                        group._native.ffn(paths[label][0])
                        samples[label].append(time.perf_counter() - start)
                floor_ms = count * model.expert_bytes / read_gbps / 1e6
                case = {"model": name, "dtype": model.dtype, "experts": count, "rows_per_expert": 1, "gap_ms": gap,
                        "weight_bytes": count * model.expert_bytes, "floor_ms": floor_ms,
                        "relative_difference": rel, **{k: summarize(v) for k, v in samples.items()}}
                payload["cases"].append(case)
                print(f"{name} ({model.dtype}) {count} x 1 row, gap {gap:g} ms: " + ", ".join(
                    f"{k} {case[k]['median_s'] * 1e3:.3f} ms ({case[k]['q25_s'] * 1e3:.3f}-"
                    f"{case[k]['q75_s'] * 1e3:.3f})" for k in paths) + f"; floor {floor_ms:.3f} ms; outputs differ by "
                    f"{rel:.1e}", flush=True)
    cpu = results.slug(payload["machine"].get("cpu_model") or "cpu")
    print("wrote", results.write_result(args.out, f"host-one-row-{cpu}", payload))


if __name__ == "__main__":
    main()
