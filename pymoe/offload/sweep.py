"""`pymoe simulate`: every strategy x batch size x seeded run on one trace, aggregated with
confidence intervals and written to `results/offload/`. Every time in the output is
SIMULATED (cost model from a measured calibration file), and the files say so. A strategy
may be a label with a miss policy (`hybrid+intelligent[predicted]`, see strategies.py)."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..dtypes import ITEMSIZE
from ..results import command_line, provenance, write_result
from ..stats import compare_paired, summarize
from .calibration import load_calibration
from .models import get_model
from .simulator import cache_capacity, simulate
from .strategies import STRATEGIES, make_strategy
from .trace import load_trace

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
SIMULATED = "SIMULATED: times come from a cost model calibrated by measurement, not from running a model"
AGGREGATED = ("ms_per_step", "step_p50_ms", "step_p95_ms", "step_p99_ms", "layer_p99_ms", "tokens_per_s",
              "hit_rate", "covered_rate", "precision", "recall", "bytes_moved", "peak_cache_bytes",
              "peak_working_set_bytes")


def _finite(values):
    return [v for v in values if v is not None and np.isfinite(v)]


def aggregate(runs: list[dict]) -> list[dict]:
    """Per (strategy, batch, dedup): summaries over seeds, speedup over On-Demand and the
    fraction of Oracle's speedup (both paired by seed), and the paired test against On-Demand."""
    by = {}
    for r in runs:
        by.setdefault((r["strategy"], r["batch_size"], r["dedup"]), {})[r["seed"]] = r
    rows = []
    for (strategy, batch, dedup), seeds in sorted(by.items(), key=lambda kv: (kv[0][1], not kv[0][2], kv[0][0])):
        base = by.get(("on-demand", batch, dedup), {})
        oracle = by.get(("oracle", batch, dedup), {})
        row = {"strategy": strategy, "batch_size": batch, "dedup": dedup, "runs": len(seeds)}
        for metric in AGGREGATED:
            values = _finite([seeds[s][metric] for s in sorted(seeds)])
            row[metric] = summarize(values) if values else None
        common = sorted(set(seeds) & set(base))
        if common:
            speedup = [base[s]["total_ms"] / seeds[s]["total_ms"] for s in common]
            row["speedup_vs_on_demand"] = summarize(speedup)
            if strategy != "on-demand" and len(common) > 1:
                row["vs_on_demand"] = compare_paired([seeds[s]["ms_per_step"] for s in common],
                                                     [base[s]["ms_per_step"] for s in common])
            both = sorted(set(common) & set(oracle))
            if both:
                row["fraction_of_oracle_speedup"] = summarize(
                    [(base[s]["total_ms"] / seeds[s]["total_ms"]) / (base[s]["total_ms"] / oracle[s]["total_ms"])
                     for s in both])
        rows.append(row)
    return rows


def dedup_savings(runs: list[dict]) -> list[dict]:
    """Per batch size: experts requested by all tokens vs distinct experts (memory of the
    layer's working set) and bytes moved without vs with dedup (On-Demand, paired by seed)."""
    out = []
    for batch in sorted({r["batch_size"] for r in runs}):
        on = {r["seed"]: r for r in runs if r["strategy"] == "on-demand" and r["batch_size"] == batch and r["dedup"]}
        off = {r["seed"]: r for r in runs
               if r["strategy"] == "on-demand" and r["batch_size"] == batch and not r["dedup"]}
        if not on:
            continue
        row = {"batch_size": batch,
               "expert_reuse": summarize([1 - r["unique_experts"] / r["expert_requests"] for r in on.values()])}
        common = sorted(set(on) & set(off))
        if common:
            row["bandwidth_savings"] = summarize([1 - on[s]["bytes_moved"] / off[s]["bytes_moved"]
                                                  if off[s]["bytes_moved"] else 0.0 for s in common])
            row["memory_savings"] = summarize([1 - on[s]["peak_working_set_bytes"] / off[s]["peak_working_set_bytes"]
                                               for s in common])
            row["speedup"] = summarize([off[s]["total_ms"] / on[s]["total_ms"] for s in common])
        out.append(row)
    return out


def run_sweep(trace_path: Path, model_name: str, calibration_path: Path, *,
              strategies: tuple[str, ...] | None = None, batch_sizes=BATCH_SIZES, runs: int = 5,
              cache_fraction: float = 0.25, requests: int = 8, dedup: str = "both",
              train_fraction: float = 0.25, memory: str = "pinned", evictions: tuple[str, ...] | None = None,
              out_dir: Path | None = Path("results"), routing_readback: bool = False,
              command: str | None = None, console: Console | None = None) -> tuple[dict, Path | None]:
    """Simulate every strategy (None: all that the trace supports) at every batch size;
    `evictions` runs each strategy once per eviction policy instead of with its own;
    `routing_readback` charges each layer the calibrated routing readback gap (simulator.py)."""
    console = console or Console()
    model = get_model(model_name)
    trace = load_trace(trace_path)
    if strategies is None:
        strategies = tuple(name for name, cls in STRATEGIES.items()
                           if trace.pregate is not None or not cls.needs_pregate)
        left_out = sorted(set(STRATEGIES) - set(strategies))
        if left_out:
            console.print(f"{trace_path} has no pre-gate signal: leaving out {', '.join(left_out)}")
    if dedup not in ("on", "off", "both"):
        raise ValueError(f"dedup must be on, off or both, got {dedup!r}")
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    trace.check_shape(model.num_experts, model.num_layers, model.top_k, f"model {model.name}")
    calibration = load_calibration(calibration_path)
    calibration.compute_curve(model)  # a missing shape fails here, before any run
    readback_ms = calibration.readback_ms() if routing_readback else 0.0  # likewise a missing readback
    profile, evaluation = trace.split(train_fraction)
    capacity = cache_capacity(model, fraction=cache_fraction)
    need = min(model.num_experts, max(batch_sizes) * model.top_k)
    if capacity < need:
        raise ValueError(f"cache of {capacity} experts ({cache_fraction:.0%}) is smaller than one layer's need "
                         f"at batch {max(batch_sizes)} ({need})")
    if any(b > evaluation.num_requests for b in batch_sizes):
        raise ValueError(f"the trace's evaluation split has {evaluation.num_requests} requests; "
                         f"batch sizes up to {max(batch_sizes)} need more")
    modes = {"on": (True,), "off": (False,), "both": (True, False)}[dedup]
    fitted = {}
    for name in strategies:
        for eviction in evictions or (None,):
            strategy = make_strategy(name, eviction)  # an unknown name fails here, before any fit
            if strategy.needs_pregate and trace.pregate is None:
                raise ValueError(f"strategy {name} needs the pre-gate signal; {trace_path} has none")
            strategy.fit(profile)
            fitted[strategy.label] = strategy
    host = any(s.host_compute for s in fitted.values())
    if host:
        calibration.host_compute_curve(model)  # an old file without host timings fails here
    result = {
        "schema": "pymoe.offload-sim/1",
        "simulated": SIMULATED,
        **provenance(command or command_line()),
        "model": model.to_dict(),
        "trace": {"path": str(trace_path), "meta": trace.meta, "requests": trace.num_requests,
                  "profile_requests": profile.num_requests, "evaluation_requests": evaluation.num_requests},
        "calibration": {"path": str(calibration_path), "device": calibration.device,
                        "transfer": {m: {k: calibration.data["transfer"][m][k]
                                         for k in ("gbps", "latency_ms", "start_latency_ms")}
                                     for m in ("pinned", "pageable")},
                        "expert_transfer_ms": calibration.transfer_ms(model.expert_bytes, memory),
                        "expert_compute_ms_1_token": calibration.compute_curve(model)(1),
                        **({"host_compute": {k: calibration.data["host_compute"][model.shape_key()][k]
                                             for k in ("rows", "experts", "median_ms", "call_ms", "expert_ms",
                                                       "gap_ms", "dtype", "what")
                                             if k in calibration.data["host_compute"][model.shape_key()]},
                            "expert_host_compute_ms_1_row": calibration.host_compute_curve(model)(1),
                            "host_call_ms": calibration.host_call_ms(model),
                            "rows_transfer_ms_1_token": calibration.rows_transfer_ms(
                                model.d_model * ITEMSIZE[model.dtype], memory)} if host else {})},
        "routing_readback": routing_readback, "readback_ms": readback_ms,
        "memory": memory, "cache_fraction": cache_fraction, "cache_experts": capacity,
        "cache_bytes": capacity * model.expert_bytes, "requests_per_run": requests, "runs_per_config": runs,
        "batch_sizes": list(batch_sizes), "strategies": list(fitted), "runs": [],
    }
    start = time.perf_counter()
    total = len(batch_sizes) * runs * len(fitted) * len(modes)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("simulating", total=total)
        for batch in batch_sizes:
            for seed in range(runs):
                for mode in modes:
                    for name in fitted:
                        bar.update(task, description=f"{model.name} batch {batch} run {seed} {name}"
                                   f"{'' if mode else ' (no dedup)'}")
                        run = simulate(evaluation, model, fitted[name], calibration, capacity=capacity,
                                       batch_size=batch, requests=max(batch, requests), seed=seed, dedup=mode,
                                       memory=memory, routing_readback=routing_readback)
                        result["runs"].append(run.summary())
                        bar.advance(task)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    result["aggregates"] = aggregate(result["runs"])
    result["dedup_savings"] = dedup_savings(result["runs"])
    print_sweep(result, console)
    path = None
    if out_dir is not None:
        path = write_sweep(result, Path(out_dir), Path(trace_path).stem)
        console.print(f"wrote {path} (+ .csv)")
    return result, path


def write_sweep(result: dict, out_dir: Path, trace_stem: str) -> Path:
    """Write `<out_dir>/offload/<stamp>-simulated-<model>-<trace>-cache<percent>[-evictions][-readback].json`
    and, beside it, a .csv of the aggregates."""
    cache = int(round(result["cache_fraction"] * 100))
    policies = "-evictions" if any("[" in name for name in result["strategies"]) else ""
    readback = "-readback" if result.get("routing_readback") else ""
    path = write_result(out_dir / "offload",
                        f"simulated-{result['model']['name']}-{trace_stem}-cache{cache}{policies}{readback}", result)
    with path.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["simulated", "strategy", "batch_size", "dedup", "runs", "ms_per_step_mean",
                         "ms_per_step_ci95_low", "ms_per_step_ci95_high", "step_p99_ms", "hit_rate",
                         "speedup_vs_on_demand", "fraction_of_oracle_speedup", "gib_moved"])
        for row in result["aggregates"]:
            ms = row["ms_per_step"]
            writer.writerow([True, row["strategy"], row["batch_size"], row["dedup"], row["runs"],
                             f"{ms['mean']:.4f}", f"{ms['ci95_low']:.4f}", f"{ms['ci95_high']:.4f}",
                             f"{row['step_p99_ms']['mean']:.4f}", f"{row['hit_rate']['mean']:.4f}",
                             f"{row.get('speedup_vs_on_demand', {}).get('mean', float('nan')):.4f}",
                             f"{row.get('fraction_of_oracle_speedup', {}).get('mean', float('nan')):.4f}",
                             f"{row['bytes_moved']['mean'] / 2**30:.3f}"])
    return path


def print_sweep(result: dict, console: Console) -> None:
    model, cal = result["model"], result["calibration"]
    table = Table(caption="ms/step: mean over runs (one step = one token for every request in the batch); "
                  "hit: expert ready when its layer started; covered: resident or already on its way",
                  title=(f"SIMULATED {model['name']}: cache {result['cache_experts']} experts "
                         f"({result['cache_fraction']:.0%}, {result['cache_bytes'] / 2**30:.1f} GiB), "
                         f"expert {model['expert_bytes'] / 2**20:.1f} MiB: "
                         f"transfer {cal['expert_transfer_ms']:.3f} ms, "
                         f"compute {cal['expert_compute_ms_1_token']:.3f} ms/1 token" +
                         (f", host call {cal.get('host_call_ms', 0.0):.3f} ms + "
                          f"{cal['expert_host_compute_ms_1_row']:.3f} ms per expert of 1 row"
                          if "expert_host_compute_ms_1_row" in cal else "") + f" ({cal['device']})"))
    for col in ("strategy", "batch", "ms/step", "±95%", "p99", "hit", "covered", "speedup", "of oracle"):
        table.add_column(col, justify="left" if col == "strategy" else "right", no_wrap=True)
    for row in result["aggregates"]:
        if not row["dedup"]:
            continue
        ms = row["ms_per_step"]
        speed = row.get("speedup_vs_on_demand")
        frac = row.get("fraction_of_oracle_speedup")
        table.add_row(row["strategy"], str(row["batch_size"]), f"{ms['mean']:.2f}",
                      f"{ms['ci95_high'] - ms['mean']:.2f}",
                      f"{row['step_p99_ms']['mean']:.2f}", f"{row['hit_rate']['mean']:.3f}",
                      f"{row['covered_rate']['mean']:.3f}",
                      f"{speed['mean']:.2f}x" if speed else "-", f"{frac['mean']:.0%}" if frac else "-")
    console.print(table)
    if result["dedup_savings"]:
        dd = Table(title="SIMULATED batch deduplication (On-Demand): savings vs loading per request")
        for col in ("batch", "expert reuse", "bandwidth saved", "memory saved", "speedup"):
            dd.add_column(col, justify="right")
        for row in result["dedup_savings"]:
            def pct(key, row=row):
                return f"{row[key]['mean']:.1%}" if key in row else "-"
            dd.add_row(str(row["batch_size"]), pct("expert_reuse"), pct("bandwidth_savings"),
                       pct("memory_savings"), f"{row['speedup']['mean']:.2f}x" if "speedup" in row else "-")
        console.print(dd)
