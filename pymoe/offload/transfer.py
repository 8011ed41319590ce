"""`pymoe transfer`: how fast experts move, and how that compares with computing them.

Measured with PyTorch on the GPU: host->GPU copies from pinned and from pageable memory
(pinned also timed with CUDA events on the copy stream, i.e. without host latency),
GPU->GPU copies, and bringing experts in with a fresh allocation (the caching allocator
emptied first, so cudaMalloc runs) versus into a pre-allocated slot pool; for one expert and
for a batch of 10, over expert sizes 1-256 MiB and the presets' expert sizes. The peak is the
bandwidth of one 1 GiB pinned copy. Then compute vs transfer: for 1-16 tokens and 1 or 10
experts, the time to compute the experts (PyTorch expert FFN of the preset's shape, a
different expert's weights in each sample, as in an engine) against the time to load them
from pinned memory, with mean, std, 95% CI, Welch's t-test and Cohen's
d. Without a GPU it says so and measures host memory copies only.
"""

from __future__ import annotations

import itertools
import time

import numpy as np

from ..baselines import expert_ffn
from ..dtypes import torch_dtype
from ..stats import summarize
from .calibration import rotating_expert_weights, time_calls, time_queued_on_gpu
from .models import OffloadModel

MIB = 2**20
SIZES_MIB = (1, 2, 4, 8, 16, 32, 64, 128, 256)
COUNTS = (1, 10)
COMPUTE_TOKENS = (1, 2, 4, 8, 16)


def _entry(kind: str, size: int, count: int, raw_ms: list[float]) -> dict:
    s = summarize(raw_ms)
    return {"kind": kind, "bytes_per_expert": size, "experts": count, "raw_ms": raw_ms,
            **{f"{k}_ms": v for k, v in s.items() if k != "n"},
            "reps": s["n"], "gbps_median": size * count / (s["median"] * 1e6)}


def measure_transfers(models: list[OffloadModel], *, reps: int = 20, progress=None) -> dict:
    import torch

    say = progress or (lambda msg: None)
    gpu = torch.cuda.is_available()
    out: dict = {"gpu": torch.cuda.get_device_name(0) if gpu else None, "measurements": []}
    sizes = sorted({m * MIB for m in SIZES_MIB} | {m.expert_bytes for m in models})
    if not gpu:
        out["note"] = "no GPU: host memory copies only (no host->GPU, GPU->GPU or allocation figures)"
        for size in sizes:
            for count in COUNTS:
                say(f"host copy {size / MIB:.1f} MiB x {count}")
                src = [torch.ones(size, dtype=torch.uint8) for _ in range(count)]
                dst = [torch.empty(size, dtype=torch.uint8) for _ in range(count)]
                raw = time_calls(lambda dst=dst, src=src: [d.copy_(s) for d, s in zip(dst, src)], reps, lambda: None)
                out["measurements"].append(_entry("host->host", size, count, raw))
        return out

    sync = torch.cuda.synchronize
    say("peak: one 1 GiB pinned copy, one 512 MiB GPU copy")
    out.update(_peaks(torch, sync))
    stream = torch.cuda.Stream()
    for size in sizes:
        for count in COUNTS:
            say(f"{size / MIB:.1f} MiB x {count}")
            out["measurements"] += _one_size(torch, sync, stream, size, count, reps)
            torch.cuda.empty_cache()
    return out


def _peaks(torch, sync) -> dict:
    big = 1024 * MIB
    src = torch.ones(big, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(big, dtype=torch.uint8, device="cuda")
    h2d = time_calls(lambda: dst.copy_(src, non_blocking=True), 10, sync)
    d2d = time_calls(lambda: dst[: big // 2].copy_(dst[big // 2:]), 10, sync)
    return {"peak_h2d_pinned_gbps": big / (float(np.median(h2d)) * 1e6), "peak_h2d_raw_ms": h2d,
            "peak_d2d_gbps": big / (float(np.median(d2d)) * 1e6), "peak_d2d_raw_ms": d2d,  # read + write
            "peak_what": "1 GiB pinned host->GPU copy; 512 MiB GPU->GPU copy counted as read + write"}


def _device_timed(torch, fn, stream, reps: int) -> list[float]:
    """Device-clock ms of fn's copies on the copy stream, queued behind a sleep kernel: the
    copies themselves, without the host's launch and synchronisation latency that
    `time_calls` includes."""
    with torch.cuda.stream(stream):
        return time_queued_on_gpu(torch, fn, reps)


def _one_size(torch, sync, stream, size: int, count: int, reps: int) -> list[dict]:
    pinned = [torch.ones(size, dtype=torch.uint8, pin_memory=True) for _ in range(count)]
    pageable = [torch.ones(size, dtype=torch.uint8) for _ in range(count)]
    slots = [torch.empty(size, dtype=torch.uint8, device="cuda") for _ in range(count)]
    other = [torch.ones(size, dtype=torch.uint8, device="cuda") for _ in range(count)]

    def h2d(host):  # into the pre-allocated slot pool
        with torch.cuda.stream(stream):
            for d, s in zip(slots, host):
                d.copy_(s, non_blocking=True)

    def fresh():  # allocate each slot anew, cudaMalloc included, then copy into it
        torch.cuda.empty_cache()
        with torch.cuda.stream(stream):
            for s in pinned:
                torch.empty(size, dtype=torch.uint8, device="cuda").copy_(s, non_blocking=True)

    def d2d():
        for d, s in zip(slots, other):
            d.copy_(s)

    return [
        _entry("h2d_pinned", size, count, time_calls(lambda: h2d(pinned), reps, sync)),
        _entry("h2d_pinned_device_timed", size, count, _device_timed(torch, lambda: h2d(pinned), stream, reps)),
        _entry("h2d_pageable", size, count, time_calls(lambda: h2d(pageable), reps, sync)),
        _entry("d2d", size, count, time_calls(d2d, reps, sync)),
        _entry("h2d_pinned_fresh_alloc", size, count, time_calls(fresh, reps, sync)),
    ]


def compute_vs_transfer(models: list[OffloadModel], *, reps: int = 30, progress=None) -> list[dict]:
    """For each model, token count and expert count: compute time (PyTorch expert FFN,
    experts one after another) vs pinned host->GPU load time, compared with Welch's t-test."""
    import torch
    from scipy import stats as st

    say = progress or (lambda msg: None)
    gpu = torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    rows = []
    for model in models:
        dtype = torch_dtype(model.dtype) if gpu else torch.float32
        for count in COUNTS:
            rows += _compute_rows(torch, st, model, count, dev, dtype, gpu, sync, reps, say)
    return rows


def _compute_rows(torch, st, model, count, dev, dtype, gpu, sync, reps, say) -> list[dict]:
    # Each sample computes the next `count` of a rotating set of experts, so that no sample
    # reads weights the previous one left in the GPU's L2 cache.
    experts = rotating_expert_weights(torch, model, dev, dtype, at_least=2 * count)
    groups = itertools.cycle(range(len(experts) // count))
    host = [torch.ones(model.expert_bytes, dtype=torch.uint8, pin_memory=gpu) for _ in range(count)]
    slots = [torch.empty(model.expert_bytes, dtype=torch.uint8, device=dev) for _ in range(count)]
    load = time_calls(lambda: [d.copy_(s, non_blocking=gpu) for d, s in zip(slots, host)], reps, sync)
    rows = []
    for tokens in COMPUTE_TOKENS:
        say(f"{model.name}: {count} expert(s), {tokens} token(s)")
        x = torch.randn(tokens, model.d_model, device=dev, dtype=dtype)

        def compute(x=x):
            first = next(groups) * count
            for w_in, w_out in experts[first:first + count]:
                expert_ffn(x, w_in, w_out, model.activation)

        comp = time_calls(compute, reps, sync)
        c, t = np.asarray(comp), np.asarray(load)
        pooled = np.sqrt((c.var(ddof=1) + t.var(ddof=1)) / 2)
        rows.append({
            "model": model.name, "experts": count, "tokens": tokens,
            "compute": {**summarize(comp), "raw_ms": comp},
            "transfer": {**summarize(load), "raw_ms": load},
            "transfer_over_compute": float(t.mean() / c.mean()),
            "welch_p": float(st.ttest_ind(t, c, equal_var=False).pvalue),
            "cohens_d": float((t.mean() - c.mean()) / pooled) if pooled > 0 else float("inf"),
        })
    return rows


def run_transfer(models: list[OffloadModel], *, reps: int, out_dir, calibration_out, command: str, console=None):
    """Measure, print, write `<out_dir>/offload/<stamp>-transfer-<device>.json` and the
    simulator's calibration file. Returns (result, path)."""
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from ..results import provenance, result_header, slug, write_result
    from .calibration import default_calibration_path, measure_calibration, write_calibration

    console = console or Console()
    start = time.perf_counter()
    with console.status("measuring transfers") as status:
        def say(msg):
            status.update(msg)

        result = {**result_header("pymoe.transfer/1", command),
                  "models": [m.to_dict() for m in models], "reps": reps}
        result.update(measure_transfers(models, reps=reps, progress=say))
        result["compute_vs_transfer"] = compute_vs_transfer(models, progress=say)
        calibration = measure_calibration(models, reps=reps, progress=say)
    calibration.update(provenance(command))
    result["wall_s"] = round(time.perf_counter() - start, 1)
    device = result["gpu"] or "cpu"
    if result["gpu"] is None:
        console.print("[yellow]No GPU: measured host memory copies only; host->GPU, GPU->GPU and allocation "
                      "figures need a CUDA GPU.[/yellow]")
    peak = result.get("peak_h2d_pinned_gbps")
    table = Table(title=f"Expert transfers on {device}" + (f" (peak pinned host->GPU {peak:.1f} GB/s)" if peak else ""))
    for col in ("kind", "MiB/expert", "experts", "median ms", "GB/s", "% of peak"):
        table.add_column(col, justify="right")
    for m in result["measurements"]:
        pct = f"{100 * m['gbps_median'] / peak:.0f}%" if peak and m["kind"].startswith("h2d") else "-"
        table.add_row(m["kind"], f"{m['bytes_per_expert'] / MIB:.1f}", str(m["experts"]), f"{m['median_ms']:.3f}",
                      f"{m['gbps_median']:.1f}", pct)
    console.print(table)
    cvt = Table(title="Compute vs transfer (pinned), mean ± std ms")
    for col in ("model", "experts", "tokens", "compute", "transfer", "ratio", "Welch p", "Cohen's d"):
        cvt.add_column(col, justify="right")
    for r in result["compute_vs_transfer"]:
        cvt.add_row(r["model"], str(r["experts"]), str(r["tokens"]),
                    f"{r['compute']['mean']:.3f} ± {r['compute']['std']:.3f}",
                    f"{r['transfer']['mean']:.3f} ± {r['transfer']['std']:.3f}",
                    f"{r['transfer_over_compute']:.1f}x", f"{r['welch_p']:.1e}", f"{r['cohens_d']:.1f}")
    console.print(cvt)
    path = write_result(Path(out_dir) / "offload", f"transfer-{slug(device)}", result)
    cal_path = write_calibration(calibration, calibration_out or default_calibration_path(out_dir, device))
    console.print(f"wrote {path} and {cal_path}")
    return result, path
