"""Expert parallelism on 1, 2, 4, ... GPUs of one host: an all_to_all bandwidth benchmark, then
real models' MoE layers split over the GPUs, with the time split into phases.

    torchrun --nproc-per-node 4 scripts/bench_expert_parallel.py                # GPUs, NCCL, bfloat16
    torchrun --nproc-per-node 2 scripts/bench_expert_parallel.py --device cpu --tiny --out /tmp/ep
                                                                                # CPU, gloo: a check at tiny sizes

One process per device (torchrun). Every world size of --world-sizes (default 1, 2, 4, ...
up to the processes started) runs on the first ranks in a subgroup of its own, so one
launch on 4 GPUs measures 1, 2 and 4 of them on the same machine:

1. all_to_all bandwidth: torch.distributed.all_to_all_single with equal splits, each rank
   sending --a2a-mib MiB in all; algbw = bytes per rank / time and, as nccl-tests reports
   it for all-to-all, busbw = algbw * (W - 1) / W (the part that leaves the GPU).
2. the layers (--presets, default qwen3-235b-a22b and deepseek-v3) at --tokens tokens PER
   RANK (default 128, 16384, 65536; --tokens-total splits them over the ranks instead), with
   pymoe.parallel.ExpertParallelMoE: per rank the median call time and each phase's
   (routing, dispatch, shared, experts, combine) and the bytes its dispatch sent to other
   ranks; on 1 device also the single-device MoELayer on the same tokens, the baseline of
   per-device throughput. Each rank holds only its experts: expert e's weights come from a
   generator seeded with (--seed, e), so the float64 check before timing (the first
   --check-tokens tokens of every rank, once per layer and world size) rebuilds any expert.

Writes results/bench/<device>/<stamp>-<dtype>-expert-parallel-<N>procs.json (schema
pymoe.expert_parallel/1; rank 0 writes it, rewritten after every cell).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pymoe import MoEConfig, MoELayer, MoEWeights
from pymoe.bench.timing import summarize
from pymoe.config import get_preset
from pymoe.dtypes import itemsize, torch_dtype
from pymoe.parallel import EXPERT_WEIGHTS, ExpertParallelMoE, expert_range
from pymoe.results import file_stamp, result_header, write_result
from pymoe.routing import route
from pymoe.weights import optional_weight_shapes

SCHEMA = "pymoe.expert_parallel/1"
CHECK_TOL = {"float32": 1e-4, "bfloat16": 2e-2}  # as pymoe bench's check (median per token in bfloat16)
TINY_TOKENS = (8, 64, 256)


def tiny(config: MoEConfig) -> MoEConfig:
    """A preset's rules at a size a CPU runs in seconds (16 experts or fewer, narrow)."""
    return dataclasses.replace(config, d_model=64, d_ff=32, num_experts=min(config.num_experts, 16),
                               shared_d_ff=32 if config.shared_d_ff else 0)


# -- weights: each expert from its own generator, so any rank can rebuild any expert -----------

def _normal(shape, std: float, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(shape, generator=generator, device=device) * std).to(dtype)


def expert_tensors(config: MoEConfig, e: int, seed: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Expert e's w1, w2 (and b1, b2) [1, ...] (std 1/sqrt(fan_in); biases 0.1)."""
    s = (seed + 1) * 1_000_003 + 4 * e
    out = {"w1": _normal((1, config.d_model, config.expert_n), config.d_model**-0.5, s, device, dtype),
           "w2": _normal((1, config.d_ff, config.d_model), config.d_ff**-0.5, s + 1, device, dtype)}
    if config.expert_bias:
        out["b1"] = _normal((1, config.expert_n), 0.1, s + 2, device, dtype)
        out["b2"] = _normal((1, config.d_model), 0.1, s + 3, device, dtype)
    return out


def layer_weights(config: MoEConfig, experts: range, seed: int, device: torch.device, dtype: str) -> MoEWeights:
    """The replicated weights and the experts in `experts`, as torch tensors on `device`."""
    dt = torch_dtype(dtype)
    std = {"router_bias": 0.1, "selection_bias": 0.01, "shared_w1": config.d_model**-0.5,
           "shared_w2": max(config.shared_d_ff, 1)**-0.5, "shared_gate": config.d_model**-0.5}
    replicated = {"router": _normal((config.d_model, config.num_experts), config.d_model**-0.5, seed, device, dt)}
    for i, (name, shape) in enumerate(optional_weight_shapes(config).items()):
        if name not in EXPERT_WEIGHTS:
            f32 = name in ("router_bias", "selection_bias")
            replicated[name] = _normal(shape, std[name], seed + 1 + i, device, torch.float32 if f32 else dt)
    parts = [expert_tensors(config, e, seed, device, dt) for e in experts]
    stacked = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    return MoEWeights(**replicated, **stacked)


def reference_rows(config: MoEConfig, weights: MoEWeights, x: np.ndarray, seed: int, device) -> np.ndarray:
    """The float64 layer output of tokens x, rebuilding in float64 only the experts they use."""
    def f64(t):
        return t.detach().double().cpu().numpy()

    if config.capacity_factor is not None or config.weight_on_input:
        raise ValueError("the check covers the presets' layers: no capacity, no weight_on_input")
    from pymoe import reference as R

    x64 = x.astype(np.float64)
    logits = x64 @ f64(weights.router)
    if weights.router_bias is not None:
        logits = logits + f64(weights.router_bias)
    sel = None if weights.selection_bias is None else f64(weights.selection_bias)
    routing = route(logits, selection_bias=sel, **config.routing_rule)
    out = np.zeros_like(x64)
    dt = weights.router.dtype
    for e in np.unique(routing.ids):
        w = {k: f64(v[0]) for k, v in expert_tensors(config, int(e), seed, device, dt).items()}
        tokens, slot = np.nonzero(routing.ids == e)
        h = x64[tokens] @ w["w1"] + w.get("b1", 0.0)
        h = R.expert_activation(h, config.activation, config.swiglu_alpha, config.swiglu_limit)
        out[tokens] += routing.weights[tokens, slot, None] * (h @ w["w2"] + w.get("b2", 0.0))
    if config.shared_d_ff:
        shared = MoEWeights(weights.router, weights.w1, weights.w2, shared_w1=f64(weights.shared_w1),
                            shared_w2=f64(weights.shared_w2),
                            shared_gate=None if weights.shared_gate is None else f64(weights.shared_gate))
        out += R.shared_expert(x64, shared)
    return out


def check_error(out: np.ndarray, ref: np.ndarray, dtype: str) -> float:
    if dtype == "float32":
        return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
    per_token = np.linalg.norm(out - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-30)
    return float(np.median(per_token))


# -- measuring ----------------------------------------------------------------------------------

def timed(fn, sync, group, min_seconds: float, max_reps: int = 200) -> list:
    """fn()'s results and seconds over at least 3 calls and min_seconds (one untimed call
    first); every rank of `group` makes the same number of calls (rank 0 of the group decides)."""
    fn()
    results, start = [], time.perf_counter()
    while True:
        dist.barrier(group=group)
        t = time.perf_counter()
        value = fn()
        sync()
        results.append((time.perf_counter() - t, value))
        done = torch.tensor([len(results) >= 3 and (time.perf_counter() - start >= min_seconds
                                                    or len(results) >= max_reps)], dtype=torch.int32)
        if dist.get_backend(group) == "nccl":
            done = done.cuda()
        dist.broadcast(done, group_src=0, group=group)
        if bool(done.item()):
            return results


def all_to_all_bandwidth(group, world: int, mib: list[float], tdev, sync, min_seconds: float) -> list[dict]:
    rows = []
    for size in mib:
        n = int(size * 2**20) // 4 // world * world  # float32 elements, a multiple of the world size
        send = torch.ones(n, dtype=torch.float32, device=tdev)
        recv = torch.empty_like(send)
        times = [t for t, _ in timed(lambda recv=recv, send=send: dist.all_to_all_single(recv, send, group=group),
                                     sync, group, min_seconds)]
        stats = summarize(times)
        bytes_per_rank = n * 4
        rows.append({"world": world, "bytes_per_rank": bytes_per_rank, **stats,
                     "algbw_gbps": bytes_per_rank / stats["median_s"] / 1e9,
                     "busbw_gbps": bytes_per_rank * (world - 1) / world / stats["median_s"] / 1e9})
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="default: bfloat16 on the GPU, float32 on the CPU")
    parser.add_argument("--presets", default="qwen3-235b-a22b,deepseek-v3")
    parser.add_argument("--tokens", default=None, help="comma-separated, per rank (default 128,16384,65536; "
                                                       f"--tiny: {','.join(map(str, TINY_TOKENS))})")
    parser.add_argument("--tokens-total", action="store_true",
                        help="--tokens are the whole batch, split over the ranks")
    parser.add_argument("--world-sizes", default=None,
                        help="comma-separated (default 1, 2, 4, ... up to the processes)")
    parser.add_argument("--a2a-mib", default=None, help="all_to_all sizes per rank in MiB (default 1,4,16,64,256,1024; "
                                                        "--tiny: 0.0625,0.25,1)")
    parser.add_argument("--tiny", action="store_true", help="the presets' rules at tiny widths (a CPU check)")
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--check-tokens", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=3600.0,
                        help="the process group's timeout (ranks outside a world size wait in a barrier meanwhile)")
    parser.add_argument("--out", type=Path, default=None, help="folder (default results/bench/<device>)")
    args = parser.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if args.device == "gpu" else "float32")
    start = time.perf_counter()

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "gpu":
        torch.cuda.set_device(local_rank)
        tdev = torch.device("cuda", local_rank)
    else:
        tdev = torch.device("cpu")
    backend = "nccl" if args.device == "gpu" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout_s))
    rank, procs = dist.get_rank(), dist.get_world_size()
    worlds = ([int(w) for w in args.world_sizes.split(",")] if args.world_sizes
              else [w for w in (1 << i for i in range(8)) if w <= procs])
    if max(worlds) > procs:
        raise SystemExit(f"--world-sizes asks for {max(worlds)} ranks; torchrun started {procs}")
    groups = {w: dist.new_group(list(range(w))) for w in worlds}  # every rank creates every group, in order
    token_counts = [int(t) for t in args.tokens.split(",")] if args.tokens else (
        list(TINY_TOKENS) if args.tiny else [128, 16384, 65536])
    a2a_mib = [float(m) for m in args.a2a_mib.split(",")] if args.a2a_mib else (
        [0.0625, 0.25, 1.0] if args.tiny else [1, 4, 16, 64, 256, 1024])

    if args.device == "gpu":
        from max.driver import Accelerator

        accelerator = Accelerator(id=local_rank)

        def sync():
            accelerator.synchronize()
            torch.cuda.synchronize(tdev)
    else:
        def sync():
            pass

    command = f"torchrun --nproc-per-node {procs} scripts/bench_expert_parallel.py " + " ".join(argv)
    result = {**result_header(SCHEMA, command), "device": args.device, "dtype": dtype, "backend": backend,
              "processes": procs, "world_sizes": worlds, "tokens_are": "total" if args.tokens_total else "per_rank",
              "tiny": args.tiny, "all_to_all": [], "cells": []}
    folder = args.out or Path("results/bench") / args.device
    name = f"{dtype}-expert-parallel-{procs}procs{'-tiny' if args.tiny else ''}"
    stamp = file_stamp(result["date"])

    def save():
        if rank == 0:
            result["wall_s"] = time.perf_counter() - start
            write_result(folder, name, result, stamp=stamp)

    def say(text):
        if rank == 0:
            print(text, flush=True)

    for w in worlds:
        if rank < w:
            rows = all_to_all_bandwidth(groups[w], w, a2a_mib, tdev, sync, args.min_seconds)
            result["all_to_all"] += rows
            for row in rows:
                say(f"all_to_all W={w} {row['bytes_per_rank'] / 2**20:g} MiB/rank: {row['median_s'] * 1e3:.3f} ms, "
                    f"busbw {row['busbw_gbps']:.1f} GB/s")
        dist.barrier()
    save()

    for preset_name in args.presets.split(","):
        config = get_preset(preset_name).config
        if args.tiny:
            config = tiny(config)
        for w in worlds:
            dist.barrier()
            if rank >= w:
                continue
            group = groups[w]
            experts = expert_range(config.num_experts, w, rank)
            weights = layer_weights(config, experts, args.seed, tdev, dtype)
            built = time.perf_counter()
            layer = ExpertParallelMoE(config, weights, group=group, device=args.device, dtype=dtype,
                                      device_id=local_rank if args.device == "gpu" else None)
            build_s = time.perf_counter() - built
            single = MoELayer(config, weights, device=args.device, dtype=dtype) if w == 1 else None
            for n, tokens in enumerate(token_counts):
                per_rank = tokens // w if args.tokens_total else tokens
                gen = torch.Generator(device="cpu").manual_seed(args.seed * 7919 + 31 * rank + tokens)
                x_host = torch.randn(per_rank, config.d_model, generator=gen).to(torch_dtype(dtype))
                x = x_host.to(tdev)
                cell = {"preset": preset_name, "config": dataclasses.asdict(config), "world": w,
                        "tokens_per_rank": per_rank, "tokens_total": per_rank * w, "build_s": build_s}
                if n == 0:  # the float64 check, once per layer and world size, before timing
                    check_n = min(args.check_tokens, per_rank)
                    out = layer.run(x).out[:check_n].float().cpu().numpy()
                    ref = reference_rows(config, weights, x_host[:check_n].float().numpy(), args.seed, tdev)
                    err = check_error(out, ref, dtype)
                    cell["check"] = {"tokens": check_n, "error": err, "passed": err < CHECK_TOL[dtype]}
                    if not cell["check"]["passed"]:
                        print(f"rank {rank}: {preset_name} W={w} failed its check: error {err:.3g}", flush=True)
                def call(x=x, layer=layer):  # the phase times and row counts only, not every output
                    res = layer.run(x, check=False)
                    return res.times.as_dict(), res.rows_sent, res.rows_received

                runs = timed(call, sync, group, args.min_seconds)
                times = [t for t, _ in runs]
                phases = {k: float(np.median([r[0][k] for _, r in runs])) for k in runs[0][1][0]}
                _, rows_sent, rows_received = runs[-1][1]
                row_bytes = config.d_model * itemsize(dtype) + 8 * layer.pairs
                off_rank = sum(c for r, c in enumerate(rows_sent) if r != rank)
                mine = {"rank": rank, **summarize(times), "phases_median_s": phases, "rows_sent": rows_sent,
                        "rows_received": rows_received, "dispatch_bytes_off_rank": off_rank * row_bytes,
                        "combine_bytes_off_rank": sum(c for r, c in enumerate(rows_received) if r != rank)
                        * config.d_model * itemsize(dtype), "check": cell.get("check")}
                if single is not None:
                    mine["single_device"] = summarize([t for t, _ in timed(
                        lambda x=x, single=single: single.forward_unchecked(x).shape, sync, group,
                        args.min_seconds)])
                gathered = [None] * w
                dist.all_gather_object(gathered, mine, group=group)
                cell["ranks"] = gathered
                slowest = max(g["median_s"] for g in gathered)
                cell["slowest_rank_median_s"] = slowest
                cell["tokens_per_s_per_device"] = per_rank / slowest
                if rank == 0:
                    result["cells"].append(cell)
                    base = (f"; single-device MoELayer {mine['single_device']['median_s'] * 1e3:.3f} ms"
                            if single else "")
                    say(f"{preset_name} W={w} {per_rank} tokens/rank: {slowest * 1e3:.3f} ms (slowest rank), "
                        + ", ".join(f"{k[:-2]} {v * 1e3:.3f}" for k, v in phases.items()) + base)
                    save()
            del layer, single, weights
            if args.device == "gpu":
                torch.cuda.empty_cache()
    dist.barrier()
    save()
    if rank == 0:
        print(f"wrote {folder}/{stamp}-{name}.json", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
