"""Offloading figures, from `pymoe simulate` result files (all SIMULATED, labelled so), the
trained model's training logs (measured) and the real engine's result files (measured, with
the simulator's times for the same runs beside them, labelled so)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..results import FigureList
from .common import (
    STRATEGY_ORDER,
    STRATEGY_STYLE,
    Report,
    footer,
    listed_files,
    log_y,
    of_schema,
    plt,
    provenance_line,
    save,
)

SWEEP = "pymoe.offload-sim/1"
ENGINE = "pymoe.offload-engine/2"
LM_TRAINING = "pymoe.lm-training/1"
NEEDS_SWEEP = "a pymoe simulate result file (results/offload/*-simulated-*.json)"


def sweeps_by_model(files: list[tuple[Path, dict]]) -> dict[str, tuple[Path, dict]]:
    """model name -> (path, data) of its simulated sweep (of two, the later listed), switch first."""
    by_model = {data["model"]["name"]: (path, data) for path, data in of_schema(files, SWEEP)}
    return dict(sorted(by_model.items(), key=lambda kv: kv[0] != "switch"))


def _listed_sweeps(figures: FigureList, name: str, report: Report, needs: str = NEEDS_SWEEP):
    files = listed_files(figures, name, report, (SWEEP,), needs)
    return sweeps_by_model(files) if files else None


def _rows(data: dict, dedup: bool = True) -> dict[str, list[dict]]:
    by = {}
    for row in data["aggregates"]:
        if row["dedup"] == dedup:
            by.setdefault(row["strategy"], []).append(row)
    return {s: sorted(by[s], key=lambda r: r["batch_size"]) for s in STRATEGY_ORDER if s in by} | \
        {s: rows for s, rows in by.items() if s not in STRATEGY_ORDER}


def _sim_title(data: dict) -> str:
    m = data["model"]
    return (f"{m['name']}: {m['num_experts']} experts x {m['num_layers']} layers, top-{m['top_k']}, "
            f"{m['expert_bytes'] / 2**20:.1f} MiB/expert; cache {data['cache_fraction']:.0%} "
            f"({data['cache_bytes'] / 2**30:.1f} GiB)")


def _sim_footer(fig, sweeps) -> None:
    lines = ["SIMULATED: cost model calibrated by measurement on "
             + ", ".join(sorted({d['calibration']['device'] for _, d in sweeps})) + "; expert FFN time only "
             "(attention not modelled)",
             "traces: " + ", ".join(sorted({Path(d['trace']['path']).name for _, d in sweeps}))]
    lines += [provenance_line(p, d) for p, d in sweeps]
    footer(fig, *lines)


def _per_strategy(figures, out_dir, report, name, metric, ylabel, *, logy=False, scale=1.0, ci=True,
                  ylim=None, reference=None, evictions=False):
    sweeps = _listed_sweeps(figures, name, report, NEEDS_SWEEP + (" run with --eviction" if evictions else ""))
    if not sweeps:
        return
    fig, axes = plt.subplots(1, len(sweeps), figsize=(max(11.0, 6.4 * len(sweeps)), 5.6), squeeze=False)
    for ax, (_, (_path, data)) in zip(axes[0], sweeps.items()):
        for strategy, rows in _rows(data).items():
            if rows[0].get(metric) is None:
                continue
            b = [r["batch_size"] for r in rows]
            mean = np.array([r[metric]["mean"] for r in rows]) * scale
            style = STRATEGY_STYLE.get(strategy, {})
            if ci and all("ci95_low" in r[metric] for r in rows):
                lo = mean - np.array([r[metric]["ci95_low"] for r in rows]) * scale
                hi = np.array([r[metric]["ci95_high"] for r in rows]) * scale - mean
                ax.errorbar(b, mean, yerr=[lo, hi], label=strategy, capsize=2, markersize=5, **style)
            else:
                ax.plot(b, mean, label=strategy, markersize=5, **style)
        if reference:
            reference(ax, data)
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8, 16, 32, 64], labels=["1", "2", "4", "8", "16", "32", "64"])
        if logy:
            log_y(ax)
        if ylim:
            ax.set_ylim(*ylim)
        ax.set_xlabel("batch size (requests decoding together)")
        ax.set_ylabel(ylabel)
        ax.set_title(_sim_title(data), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    # Below the axes: inside them, every corner holds some strategy's line.
    axes[0][0].legend(fontsize=8, ncol=4, loc="upper left", bbox_to_anchor=(0.0, -0.16))
    fig.suptitle(f"SIMULATED: {ylabel.split(' (')[0]} by batch size (mean of "
                 f"{next(iter(sweeps.values()))[1]['runs_per_config']} seeded runs, 95% CI)", fontsize=11)
    _sim_footer(fig, list(sweeps.values()))
    save(fig, out_dir, name, report)


def _compute_floor(ax, data):
    """Per-step expert compute with every expert resident: what no strategy can beat."""
    rows = _rows(data)["on-demand"]
    b = [r["batch_size"] for r in rows]
    ax.plot(b, [np.nan] * len(b))  # keep colours aligned
    runs = [r for r in data["runs"] if r["strategy"] == "on-demand" and r["dedup"]]
    floor = [np.mean([r["compute_only_ms"] / r["steps"] for r in runs if r["batch_size"] == x]) for x in b]
    ax.plot(b, floor, color="black", linestyle=":", label="all experts on GPU (compute only)")


def render_offload(figures: FigureList, out_dir: Path, report: Report) -> None:
    _per_strategy(figures, out_dir, report, "offload_latency_vs_batch.png", "ms_per_step",
                  "ms per decode step", logy=True, reference=_compute_floor)
    _per_strategy(figures, out_dir, report, "offload_hit_rate_vs_batch.png", "hit_rate",
                  "cache hit rate (expert ready when its layer starts)", ylim=(0, 1.02))
    _per_strategy(figures, out_dir, report, "offload_speedup.png", "speedup_vs_on_demand",
                  "speedup over On-Demand (same cache)", logy=True)
    _per_strategy(figures, out_dir, report, "offload_scalability.png", "tokens_per_s",
                  "throughput (tokens/s)", logy=True)
    _per_strategy(figures, out_dir, report, "offload_eviction_policies.png", "speedup_vs_on_demand",
                  "speedup of each eviction policy over LRU (On-Demand)", logy=True, evictions=True)
    _tail_latency(figures, out_dir, report)
    _dedup(figures, out_dir, report)
    _pareto(figures, out_dir, report)
    _load_balancing(figures, out_dir, report)
    _simulated_vs_measured(figures, out_dir, report)
    _hybrid_vs_batch(figures, out_dir, report)


def _tail_latency(figures, out_dir, report):
    name = "offload_tail_latency.png"
    sweeps = _listed_sweeps(figures, name, report)
    if not sweeps:
        return
    batches = (1, 16)
    fig, axes = plt.subplots(len(sweeps), len(batches), figsize=(12, 1.4 + 4.0 * len(sweeps)), squeeze=False)
    for i, (_, (_path, data)) in enumerate(sweeps.items()):
        rows = _rows(data)
        for j, batch in enumerate(batches):
            ax = axes[i][j]
            names = [s for s in rows if any(r["batch_size"] == batch for r in rows[s])]
            x = np.arange(len(names))
            for k, (pct, shade) in enumerate((("p50", 0.35), ("p95", 0.65), ("p99", 1.0))):
                vals = [next(r for r in rows[s] if r["batch_size"] == batch)[f"step_{pct}_ms"]["mean"] for s in names]
                ax.bar(x + (k - 1) * 0.27, vals, 0.27, label=pct.upper(), color=(0.12, 0.47, 0.71, shade))
            ax.set_xticks(x, names, rotation=20, fontsize=8)
            ax.set_ylabel("ms per decode step")
            ax.set_title(f"{data['model']['name']}, batch {batch}", fontsize=9)
            ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("SIMULATED: step latency percentiles (mean over seeded runs)", fontsize=11)
    _sim_footer(fig, list(sweeps.values()))
    save(fig, out_dir, name, report)


def _dedup(figures, out_dir, report):
    name = "offload_dedup_savings.png"
    sweeps = _listed_sweeps(figures, name, report, NEEDS_SWEEP + " run with --dedup both")
    if sweeps is None:
        return
    if not any(d["dedup_savings"] and "bandwidth_savings" in d["dedup_savings"][0] for _, d in sweeps.values()):
        report.skip(name, "no sweep with --dedup both")
        return
    fig, axes = plt.subplots(1, len(sweeps), figsize=(max(10.0, 6.4 * len(sweeps)), 4.6), squeeze=False)
    for ax, (_, (_path, data)) in zip(axes[0], sweeps.items()):
        rows = data["dedup_savings"]
        b = [r["batch_size"] for r in rows]
        for key, label, style in (("expert_reuse", "expert requests served by another request's copy", "o-"),
                                  ("bandwidth_savings", "host->GPU bytes saved", "s-"),
                                  ("memory_savings", "peak working-set memory saved", "^-")):
            if key in rows[0]:
                ax.plot(b, [100 * r[key]["mean"] for r in rows], style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(b, [str(x) for x in b])
        ax.set_ylim(0, 100)
        ax.set_xlabel("batch size")
        ax.set_ylabel("% saved by deduplicating experts across the batch")
        ax.set_title(_sim_title(data), fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("SIMULATED: batch deduplication (On-Demand, with vs without; mean of seeded runs)", fontsize=11)
    _sim_footer(fig, list(sweeps.values()))
    save(fig, out_dir, name, report)


def _pareto(figures, out_dir, report):
    name = "offload_pareto.png"
    needs = "sweeps at two or more --cache-fraction values for one model"
    files = listed_files(figures, name, report, (SWEEP,), needs)
    if files is None:
        return
    by_model = {}
    for path, data in files:
        by_model.setdefault(data["model"]["name"], {})[data["cache_fraction"]] = (path, data)
    usable = {m: v for m, v in by_model.items() if len(v) >= 2}
    if not usable:
        report.skip(name, "needs " + needs)
        return
    fig, axes = plt.subplots(1, len(usable), figsize=(max(11.0, 6.4 * len(usable)), 6.0), squeeze=False)
    used = []
    for ax, (model, fractions) in zip(axes[0], sorted(usable.items())):
        for batch in (1, 16):
            for strategy in STRATEGY_ORDER:
                pts = []
                for _frac, (_path, data) in sorted(fractions.items()):
                    row = next((r for r in data["aggregates"] if r["strategy"] == strategy and r["dedup"]
                                and r["batch_size"] == batch and "speedup_vs_on_demand" in r), None)
                    base = next((r for r in data["aggregates"] if r["strategy"] == "on-demand" and r["dedup"]
                                 and r["batch_size"] == batch), None)
                    if row and base:
                        pts.append((data["cache_bytes"] / 2**30, row["ms_per_step"]["mean"]))
                if pts:
                    style = dict(STRATEGY_STYLE.get(strategy, {}))
                    style["linestyle"] = "-" if batch == 1 else ":"
                    ax.plot(*zip(*pts), label=f"{strategy}, batch {batch}", markersize=4, **style)
        used += list(fractions.values())
        log_y(ax)
        ax.set_xlabel("GPU expert cache (GiB)")
        ax.set_ylabel("ms per decode step (lower is better)")
        ax.set_title(f"{model}: latency vs cache memory", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=6, ncol=2)
    fig.suptitle("SIMULATED: latency-memory trade-off by strategy", fontsize=11)
    _sim_footer(fig, used)
    save(fig, out_dir, name, report)


def _load_balancing(figures, out_dir, report):
    name = "load_balancing.png"
    needs = "training logs with and without the auxiliary loss (pymoe trace lm [--no-aux-loss])"
    logs = listed_files(figures, name, report, (LM_TRAINING,), needs)
    if logs is None:
        return
    by_preset = {}
    for path, data in logs:
        by_preset.setdefault(data["preset"], {})[data["config"]["aux_loss_coef"] > 0] = (path, data)
    pairs = {p: v for p, v in by_preset.items() if True in v and False in v}
    if not pairs:
        report.skip(name, "needs " + needs)
        return
    fig, axes = plt.subplots(2, len(pairs), figsize=(6.2 * len(pairs), 7.2), squeeze=False)
    used = []
    for j, (preset, runs) in enumerate(sorted(pairs.items())):
        for aux, (path, data) in sorted(runs.items(), reverse=True):
            used.append((path, data))
            cps = data["checkpoints"]
            steps = [c["step"] for c in cps]
            label = "with Switch aux loss (0.01)" if aux else "without aux loss"
            color = "#2ca02c" if aux else "#d62728"
            axes[0][j].plot(steps, [c["balance"] for c in cps], color=color, label=f"{label}: balance")
            axes[0][j].plot(steps, [c["max_share"] for c in cps], color=color, linestyle="--",
                            label=f"{label}: busiest expert's share")
            axes[0][j].plot(steps, [c["dead_fraction"] for c in cps], color=color, linestyle=":",
                            label=f"{label}: experts with no token")
            final = np.array(cps[-1]["tokens_per_expert"], dtype=float)
            share = np.sort(final / final.sum(axis=1, keepdims=True), axis=1)[:, ::-1].mean(axis=0)
            axes[1][j].bar(np.arange(len(share)) + (0 if aux else 0.45), 100 * share, 0.45, color=color, label=label)
        e = data["config"]["num_experts"]
        axes[0][j].set_title(f"{preset} ({e} experts, {data['config']['num_layers']} layers, "
                             f"top-{data['config']['top_k']}): utilization over training", fontsize=9)
        axes[0][j].set_xlabel("training step")
        axes[0][j].set_ylabel("fraction (mean over layers)")
        axes[0][j].set_ylim(0, 1)
        axes[0][j].grid(True, alpha=0.3)
        axes[0][j].legend(fontsize=6)
        axes[1][j].axhline(100 / e, color="black", linestyle=":", label="uniform")
        axes[1][j].set_yscale("log")
        axes[1][j].set_xlabel("expert rank (busiest first), last 25 steps")
        axes[1][j].set_ylabel("% of routed tokens")
        axes[1][j].legend(fontsize=7)
        axes[1][j].grid(True, axis="y", alpha=0.3)
    fig.suptitle("Load balancing in pymoe's trained MoE LM (measured; balance = exp(entropy)/E)", fontsize=11)
    footer(fig, *[provenance_line(p, d) for p, d in used])
    save(fig, out_dir, name, report)


def _simulated_vs_measured(figures, out_dir, report):
    name = "offload_simulated_vs_measured.png"
    files = listed_files(figures, name, report, (ENGINE,),
                         "`pymoe serve-offloaded` results (the real engine on a GPU)")
    if files is None:
        return
    # Runs with injected prefetch failures test the fallback, not the cost model.
    failures = [path.as_posix() for path, data in files if data.get("prefetch_failure_rate")]
    if failures:
        report.fail(name, f"lists {', '.join(failures)}, a run with injected prefetch failures, which the "
                    "simulator does not model")
        return
    newest = {data["model"]["name"]: (path, data) for path, data in files}  # of two, the later listed
    fig, axes = plt.subplots(1, len(newest), figsize=(max(11.0, 6.4 * len(newest)), 6.6), squeeze=False)
    markers = dict(zip((1, 4, 16, 64), ("o", "s", "^", "D")))
    for ax, (model, (_path, data)) in zip(axes[0], sorted(newest.items())):
        lo, hi = np.inf, 0.0
        for run in data["runs"]:
            sim, real = run["simulated"]["ms_per_step"], run["measured"]["ms_per_step"]
            lo, hi = min(lo, sim, real), max(hi, sim, real)
            style = STRATEGY_STYLE.get(run["strategy"], {})
            ax.scatter(sim, real, color=style.get("color", "black"), marker=markers.get(run["batch_size"], "x"), s=40)
        line = np.array([lo * 0.8, hi * 1.25])
        ax.plot(line, line, color="black", linewidth=0.8, label="measured = simulated")
        ax.fill_between(line, line * 0.9, line * 1.1, color="grey", alpha=0.2, label="within 10%")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
        log_y(ax)
        ax.set_xlabel("SIMULATED ms per decode step")
        ax.set_ylabel("MEASURED ms per decode step (real engine)")
        ax.set_title(f"{model}: {sum(abs(r['relative_error']) <= 0.1 for r in data['runs'])} of "
                     f"{len(data['runs'])} runs within 10%", fontsize=9)
        for strategy in STRATEGY_ORDER:
            if any(r["strategy"] == strategy for r in data["runs"]):
                ax.scatter([], [], color=STRATEGY_STYLE[strategy]["color"], label=strategy)
        for batch, marker in markers.items():
            ax.scatter([], [], color="grey", marker=marker, label=f"batch {batch}")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("Simulator vs the real offloading engine (same trace, strategy, batch and decisions)", fontsize=11)
    footer(fig, *[f"measured on {d['machine'].get('gpu')} | " + provenance_line(p, d) for p, d in newest.values()])
    save(fig, out_dir, name, report)


# Transfer-only strategies in greys (dashed), Oracle in black (dotted): the baselines; the
# strategies with a host miss policy in colours (solid): what the figure is about.
_TRANSFER_GREYS = ("#4d4d4d", "#8a8a8a", "#b5b5b5")
_HOST_COLOURS = ("#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#17becf", "#8c564b", "#e377c2")
_MARKERS = ("o", "s", "D", "^", "v", "P", "X")


def _hybrid_styles(labels: list[str]) -> dict[str, dict]:
    """label -> plot style, the same in every panel; transfer-only first, then Oracle, then hybrid."""
    from ..offload.strategies import make_strategy

    kinds = {label: make_strategy(label) for label in labels}
    transfer = [s for s in labels if not kinds[s].host_compute and not kinds[s].uses_future]
    oracle = [s for s in labels if not kinds[s].host_compute and kinds[s].uses_future]
    host = [s for s in labels if kinds[s].host_compute]
    styles = {s: dict(color=_TRANSFER_GREYS[i % len(_TRANSFER_GREYS)], marker=_MARKERS[i % len(_MARKERS)],
                      linestyle="--", label=f"{s} (transfer-only)") for i, s in enumerate(transfer)}
    styles |= {s: dict(color="black", marker="*", markersize=9, linestyle=":",
                       label=f"{s} (transfer-only; knows the future: the bound on prefetching and eviction)")
               for s in oracle}
    styles |= {s: dict(color=_HOST_COLOURS[i % len(_HOST_COLOURS)], marker=_MARKERS[i % len(_MARKERS)],
                       linestyle="-", linewidth=2,
                       label=f"{s} (host computes misses{'; knows the future' if kinds[s].uses_future else ''})")
               for i, s in enumerate(host)}
    return styles


def _speedups(rows: list[dict]) -> str:
    """'1: 2.10x, 16: 1.30x' (best hybrid over best practical transfer-only, per batch size)."""
    return ", ".join(f"{r['batch_size']}: " + (f"{r['speedup_vs_transfer']:.2f}x" if r["speedup_vs_transfer"] else "-")
                     for r in rows)


def engines_with_host(files: list[tuple[Path, dict]]) -> dict[str, tuple[Path, dict]]:
    """model name -> (path, data) of its engine file with a run of a host miss policy (of two,
    the later listed): a file of transfer-only runs does not answer transfer-only vs hybrid."""
    from ..offload.strategies import make_strategy

    return {data["model"]["name"]: (path, data) for path, data in files
            if any(make_strategy(r["strategy"]).host_compute for r in data["runs"])}


def _hybrid_vs_batch(figures, out_dir, report):
    name = "offload_hybrid_vs_batch.png"
    needs = ("real-engine runs with a host miss policy (hybrid[predicted], ...) beside transfer-only ones: "
             "scripts/gpu_check_offload_engine.sh, or pymoe serve-offloaded --strategy ... on a GPU")
    files = listed_files(figures, name, report, (ENGINE,), needs)
    if files is None:
        return
    failures = [path.as_posix() for path, data in files
                if data.get("prefetch_failure_rate") or data.get("host_failure_rate")]
    if failures:
        report.fail(name, f"lists {', '.join(failures)}, a run with injected failures, whose times are the "
                    "fallbacks', not the strategies'")
        return
    from ..offload.engine import hybrid_summary  # the engine module imports torch: only this figure needs it

    newest = engines_with_host(files)
    if not newest:
        report.skip(name, f"no engine file that {figures.path.as_posix()} lists for it has a run with a host "
                    f"miss policy; it needs {needs}")
        return
    labels = list(dict.fromkeys(r["strategy"] for _, d in newest.values() for r in d["runs"]))
    styles = _hybrid_styles(labels)
    order = list(styles)  # legend order: transfer-only, Oracle, hybrid
    fig, axes = plt.subplots(1, len(newest), figsize=(max(11.0, 6.4 * len(newest)), 7.4), squeeze=False)
    for ax, (_model, (_path, data)) in zip(axes[0], sorted(newest.items())):
        batches = sorted({r["batch_size"] for r in data["runs"]})
        for strategy in sorted({r["strategy"] for r in data["runs"]}, key=order.index):
            runs = sorted((r for r in data["runs"] if r["strategy"] == strategy), key=lambda r: r["batch_size"])
            b = np.array([r["batch_size"] for r in runs], dtype=float)
            style = dict(styles[strategy])
            ax.plot(b, [r["measured"]["ms_per_step"] for r in runs], markersize=style.pop("markersize", 6), **style)
            # The simulator's time for the same run: a faint hollow marker just right of the measured one.
            ax.plot(b * 1.08, [r["simulated"]["ms_per_step"] for r in runs], linestyle="none",
                    marker=style["marker"], markerfacecolor="none", markeredgecolor=style["color"], alpha=0.45,
                    markersize=6)
        ax.plot([], [], linestyle="none", marker="o", markerfacecolor="none", markeredgecolor="grey",
                label="SIMULATED, same run (hollow, faint)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(x) for x in batches])
        ax.xaxis.set_minor_locator(plt.NullLocator())
        log_y(ax)
        ax.set_xlabel("batch size (requests decoding together)")
        ax.set_ylabel("MEASURED ms per decode step (real engine; lower is better)")
        m = data["model"]
        cut = len(data.get("skipped", []))
        left_out = f"; time limit left out {cut} run{'s' if cut > 1 else ''}" if cut else ""
        ax.set_title(f"{m['name']}: {m['num_experts']} experts x {m['num_layers']} layers, top-{m['top_k']}; cache "
                     f"{data['cache_fraction']:.0%} ({data['cache_experts']} experts), "
                     f"{data.get('max_steps') or 'all'} steps/run{left_out}\n"
                     f"best hybrid over best transfer-only (Oracle aside), by batch: "
                     f"{_speedups(hybrid_summary(data))}", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        # Below the axes, as in the sweeps' figures: inside, the lines fill every corner.
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.14))
    gpus = ", ".join(sorted({str(d["machine"].get("gpu")) for _, d in newest.values()}))
    fig.suptitle(f"MEASURED on the real offloading engine ({gpus}): ms per decode step, transfer-only strategies "
                 "(grey, dashed; Oracle dotted) vs hybrid (host CPU computes missed experts; colour, solid)",
                 fontsize=10)
    footer(fig, "Lines and filled markers: MEASURED (CUDA events; expert FFNs only, attention not run). Hollow faint "
                "markers just right of them: SIMULATED (cost model, same trace, strategy, batch and decisions).",
           "traces: " + ", ".join(sorted({Path(d["trace"]).name for _, d in newest.values()})),
           *[f"measured on {d['machine'].get('gpu')}, host experts on {d['machine'].get('cpu_model')} "
             f"({d['machine'].get('logical_cpus', '?')} CPUs, {d.get('host_backend', 'graph')} backend, "
             f"{d.get('host_handoff', 'thread')} hand-off), "
             f"{'routing read back per layer' if d.get('routing_readback') else 'routing known from the trace'} | "
             + provenance_line(p, d)
             for p, d in newest.values()])
    save(fig, out_dir, name, report)
