"""Kernel figures, from `pymoe bench` result files (measured)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..results import FigureList
from .common import Report, footer, listed_files, log_y, machine_label, of_schema, plt, provenance_line, save

IMPL_STYLE = {
    "pymoe": ("pymoe (Mojo kernels)", "#d62728"),
    "pymoe_fused_decode": ("pymoe, fused decode kernel", "#ff7f0e"),
    "torch_loop": ("PyTorch HF-style loop", "#1f77b4"),
    "torch_grouped": ("PyTorch _grouped_mm", "#17becf"),
    "max_dense": ("dense FFN in MAX", "#7f7f7f"),
    "torch_dense": ("dense FFN in PyTorch", "#bcbd22"),
    "max_builtin": ("MAX built-in MoE kernels", "#9467bd"),
}
PRESET_ORDER = ("small-decode", "medium-decode", "large-decode", "small", "medium", "large")
BENCH = "pymoe.bench/1"
ABLATION = "pymoe.ablation/1"
NEEDS_BENCH = "a pymoe bench result file (results/bench/*/*.json)"


def bench_runs(files: list[tuple[Path, dict]]) -> dict[str, list[tuple[dict, Path, dict]]]:
    """device -> [(run, path, file)], one run per preset of one token count at that count
    (runs with --tokens are left out; of two, the later listed file's), in preset order.
    Presets of several token counts (the real models') are drawn by the scaling figure."""
    from ..config import PRESETS

    newest: dict[tuple[str, str], tuple[dict, Path, dict]] = {}
    for path, data in of_schema(files, BENCH):
        for run in data["runs"]:
            preset = PRESETS.get(run["preset"])
            if preset is not None and preset.tokens == (run["tokens"],):
                newest[(data["device"], run["preset"])] = (run, path, data)
    out: dict[str, list] = {}
    for (device, _preset), item in newest.items():
        out.setdefault(device, []).append(item)
    for device in out:
        out[device].sort(key=lambda it: PRESET_ORDER.index(it[0]["preset"]) if it[0]["preset"] in PRESET_ORDER else 99)
    return dict(sorted(out.items()))


def _tick_labels(presets) -> list[str]:
    """'small-decode' -> 'small\ndecode': six presets side by side would overlap."""
    return [p.replace("-", "\n") for p in presets]


def _row(run: dict, name: str) -> dict | None:
    return next((r for r in run["rows"] if r["name"] == name and r["status"] == "ok"), None)


def _footer_for(fig, items) -> None:
    files = {}
    for _, path, data in items:
        files[path] = data
    lines = [f"measured: {machine_label(d)}, {d['dtype']} | " + provenance_line(p, d) for p, d in files.items()]
    footer(fig, *lines)


def _device_title(device: str, items) -> str:
    data = items[0][2]
    return f"{device.upper()}: {machine_label(data)}, {data['dtype']}"


def render_kernels(figures: FigureList, out_dir: Path, report: Report) -> None:
    for name, draw in (("moe_performance_gains.png", _gains), ("moe_throughput_comparison.png", _throughput),
                       ("efficiency_comparison.png", _efficiency), ("flop_reduction.png", _flop_reduction),
                       ("industry_comparison.png", _industry)):
        files = listed_files(figures, name, report, (BENCH,), NEEDS_BENCH)
        runs = bench_runs(files) if files else None
        if files and not runs:
            report.skip(name, "its files hold no run at a preset's own token count")
        if runs:
            draw(runs, out_dir, report)
    _dashboard(figures, out_dir, report)
    _scaling(figures, out_dir, report)
    _models_per_layer(figures, out_dir, report)


def _panels(runs, height=5.4):
    fig, axes = plt.subplots(1, len(runs), figsize=(max(10.0, 6.6 * len(runs)), height), squeeze=False)
    return fig, axes[0]


def _gains(runs, out_dir, report):
    fig, axes = _panels(runs)
    for ax, (device, items) in zip(axes, runs.items()):
        presets = [run["preset"] for run, _, _ in items]
        baselines = [n for n in IMPL_STYLE if n not in ("pymoe", "pymoe_fused_decode", "max_builtin")]
        width = 0.8 / len(baselines)
        for i, name in enumerate(baselines):
            vals = []
            for run, _, _ in items:
                ours, other = _row(run, "pymoe"), _row(run, name)
                vals.append(other["median_s"] / ours["median_s"] if ours and other else np.nan)
            label, color = IMPL_STYLE[name]
            bars = ax.bar(np.arange(len(presets)) + (i - (len(baselines) - 1) / 2) * width, vals, width,
                          label=f"vs {label}", color=color)
            ax.bar_label(bars, labels=[f"{v:.2g}x" if np.isfinite(v) else "" for v in vals], fontsize=6)
        ax.axhline(1.0, color="black", linewidth=0.8)
        log_y(ax)
        ax.set_xticks(np.arange(len(presets)), _tick_labels(presets))
        ax.set_ylabel("baseline time / pymoe time")
        ax.set_title(_device_title(device, items), fontsize=9)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.set_ylim(top=ax.get_ylim()[1] * 3)  # headroom so the legend covers no bar label
        ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.suptitle("Speedup of pymoe's MoE layer over each baseline, side by side in one run "
                 "(median times; below 1: pymoe is slower)", fontsize=11)
    _footer_for(fig, [it for items in runs.values() for it in items])
    save(fig, out_dir, "moe_performance_gains.png", report)


def _bars_per_impl(ax, items, value, ylabel):
    presets = [run["preset"] for run, _, _ in items]
    names = list(IMPL_STYLE)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = [value(run, _row(run, name)) if _row(run, name) else np.nan for run, _, _ in items]
        label, color = IMPL_STYLE[name]
        x = np.arange(len(presets)) + (i - (len(names) - 1) / 2) * width
        ax.bar(x, vals, width, label=label, color=color)
        for xi, run in zip(x, (run for run, _, _ in items)):
            row = next((r for r in run["rows"] if r["name"] == name), None)
            if row is not None and row["status"] != "ok":
                ax.text(xi, ax.get_ylim()[0] if ax.get_yscale() == "log" else 0, " failed", rotation=90,
                        fontsize=6, va="bottom", ha="center", color=color)
    ax.set_xticks(np.arange(len(presets)), _tick_labels(presets))
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", which="both", alpha=0.3)


def _throughput(runs, out_dir, report):
    fig, axes = _panels(runs)
    for ax, (device, items) in zip(axes, runs.items()):
        log_y(ax)
        _bars_per_impl(ax, items, lambda run, row: run["tokens"] / row["median_s"], "tokens per second")
        ax.set_title(_device_title(device, items), fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("Throughput of one MoE layer (E=8, top-2) and the dense FFN of equal parameters", fontsize=11)
    _footer_for(fig, [it for items in runs.values() for it in items])
    save(fig, out_dir, "moe_throughput_comparison.png", report)


def _industry(runs, out_dir, report):
    fig, axes = _panels(runs)
    for ax, (device, items) in zip(axes, runs.items()):
        _bars_per_impl(ax, items, lambda run, row: row["pct_of_floor"], "% of the roofline floor reached")
        # Headroom above 100% for the legend, so it covers no bar.
        ax.set_ylim(0, 145)
        ax.set_yticks(range(0, 101, 20))
        ax.set_title(_device_title(device, items) + " (floor: max(FLOPs/peak, weight bytes/bandwidth))",
                     fontsize=8)
        ax.legend(fontsize=7, loc="upper left", ncol=3)
    fig.suptitle("Every implementation measured side by side: fraction of the machine's limit "
                 "(MAX built-in MoE: failed to compile, recorded)", fontsize=10)
    _footer_for(fig, [it for items in runs.values() for it in items])
    save(fig, out_dir, "industry_comparison.png", report)


def _efficiency(runs, out_dir, report):
    fig, axes = plt.subplots(len(runs), 3, figsize=(14, 3.8 * len(runs)), squeeze=False)
    for i, (device, items) in enumerate(runs.items()):
        presets = [run["preset"] for run, _, _ in items]
        x = np.arange(len(presets))
        moe = [_row(run, "pymoe") for run, _, _ in items]
        dense = [_row(run, "max_dense") for run, _, _ in items]
        panels = (("median time (ms)", lambda r, run: r["median_s"] * 1e3),
                  ("GFLOP per call", lambda r, run: r["flops"] / 1e9),
                  ("MB of weights read per call", lambda r, run: r["weight_bytes"] / 1e6))
        for ax, (label, get) in zip(axes[i], panels):
            ax.bar(x - 0.2, [get(r, run) if r else np.nan for r, (run, _, _) in zip(moe, items)], 0.4,
                   label="MoE (pymoe)", color="#d62728")
            ax.bar(x + 0.2, [get(r, run) if r else np.nan for r, (run, _, _) in zip(dense, items)], 0.4,
                   label="dense FFN, same parameters (MAX)", color="#7f7f7f")
            log_y(ax)
            ax.set_xticks(x, _tick_labels(presets), fontsize=8)
            ax.set_title(f"{device.upper()}: {label}", fontsize=9)
            ax.grid(True, axis="y", which="both", alpha=0.3)
        axes[i][0].legend(fontsize=7)
    fig.suptitle("Dense vs MoE: the MoE layer does 1/4 of the FLOPs (top-2 of 8); decode reads the "
                 "same weights when every expert is used", fontsize=10)
    _footer_for(fig, [it for items in runs.values() for it in items])
    save(fig, out_dir, "efficiency_comparison.png", report)


def _flop_reduction(runs, out_dir, report):
    fig, axes = _panels(runs)
    for ax, (device, items) in zip(axes, runs.items()):
        presets = [run["preset"] for run, _, _ in items]
        x = np.arange(len(presets))
        theory = [run["work"]["dense"]["flops"] / run["work"]["moe"]["flops"] for run, _, _ in items]
        ax.bar(x - 0.27, theory, 0.27, label="FLOP reduction (dense FLOPs / MoE FLOPs)", color="#cccccc")
        for k, (dense, label, color) in enumerate((("max_dense", "measured: MAX dense time / pymoe time", "#d62728"),
                                                   ("torch_dense", "measured: PyTorch dense time / PyTorch "
                                                    "grouped MoE time", "#17becf"))):
            moe_name = "pymoe" if dense == "max_dense" else "torch_grouped"
            vals = []
            for run, _, _ in items:
                d, m = _row(run, dense), _row(run, moe_name)
                vals.append(d["median_s"] / m["median_s"] if d and m else np.nan)
            ax.bar(x + k * 0.27, vals, 0.27, label=label, color=color)
        ax.axhline(1, color="black", linewidth=0.8)
        log_y(ax)
        ax.set_xticks(x, _tick_labels(presets))
        ax.set_ylabel("ratio")
        ax.set_title(_device_title(device, items), fontsize=9)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Theoretical vs measured gain of sparsity over the dense FFN of equal parameters", fontsize=11)
    _footer_for(fig, [it for items in runs.values() for it in items])
    save(fig, out_dir, "flop_reduction.png", report)


def _dashboard(figures: FigureList, out_dir, report):
    from .offload import SWEEP, sweeps_by_model

    name = "moe_dashboard.png"
    files = listed_files(figures, name, report, (BENCH, ABLATION, SWEEP),
                         NEEDS_BENCH + " (and an ablation and the simulated sweeps, if there are)")
    runs = bench_runs(files) if files else None
    if files and not runs:
        report.skip(name, "its files hold no bench run at a preset's own token count")
    if not runs:
        return
    fig = plt.figure(figsize=(15, 10))
    grid = fig.add_gridspec(2, 2)
    used = [it for items in runs.values() for it in items]
    ax = fig.add_subplot(grid[0, 0])
    labels, values, colors = [], [], []
    for device, items in runs.items():
        for run, _, _ in items:
            ours = _row(run, "pymoe")
            best = min((r for r in run["rows"] if r["status"] == "ok" and r["kind"] == "moe" and r["name"] != "pymoe"),
                       key=lambda r: r["median_s"], default=None)
            if ours and best:
                labels.append(f"{device}\n{_tick_labels([run['preset']])[0]}")
                values.append(best["median_s"] / ours["median_s"])
                colors.append("#2ca02c" if values[-1] >= 1 else "#d62728")
    bars = ax.bar(labels, values, color=colors)
    ax.bar_label(bars, labels=[f"{v:.2f}x" for v in values], fontsize=7)
    ax.axhline(1, color="black", linewidth=0.8)
    log_y(ax)
    ax.set_ylabel("speedup over the best PyTorch MoE")
    ax.set_title("pymoe vs the best PyTorch MoE in the same run (red: pymoe slower)", fontsize=9)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(True, axis="y", which="both", alpha=0.3)

    ax = fig.add_subplot(grid[0, 1])
    labels, values = [], []
    for device, items in runs.items():
        for run, _, _ in items:
            ours = _row(run, "pymoe")
            if ours:
                labels.append(f"{device}\n{_tick_labels([run['preset']])[0]}")
                values.append(ours["pct_of_floor"])
    ax.bar(labels, values, color="#d62728")
    ax.set_ylim(0, 100)
    ax.set_ylabel("% of roofline floor")
    ax.set_title("pymoe: fraction of the machine's limit", fontsize=9)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(True, axis="y", alpha=0.3)

    ax = fig.add_subplot(grid[1, 0])
    ablations = of_schema(files, ABLATION)
    if ablations:
        path, data = ablations[-1]
        used_ablation = (path, data)
        ops = [c for c in data["ablation"] if c.get("status") == "ok"]
        names = sorted({c["op"] for c in ops}, key=[c["op"] for c in ops].index)
        rungs = [r for r in ("scalar", "simd", "specialized", "prepacked", "pooled")
                 if any(c["rung"] == r for c in ops)]
        width = 0.8 / len(rungs)
        for i, rung in enumerate(rungs):
            vals = []
            for op in names:
                scalar = next((c for c in ops if c["op"] == op and c["rung"] == "scalar" and c.get("median_s")), None)
                case = next((c for c in ops if c["op"] == op and c["rung"] == rung and c.get("median_s")), None)
                vals.append(scalar["median_s"] / case["median_s"] if scalar and case else np.nan)
            ax.bar(np.arange(len(names)) + (i - (len(rungs) - 1) / 2) * width, vals, width, label=rung)
        log_y(ax)
        ax.set_xticks(np.arange(len(names)), names, fontsize=8)
        ax.set_ylabel("speedup over the scalar rung")
        ax.set_title(f"CPU ablation: rungs {', '.join(rungs)}", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    else:
        used_ablation = None
        ax.text(0.5, 0.5, "no ablation result file", ha="center")

    ax = fig.add_subplot(grid[1, 1])
    sweeps = sweeps_by_model(files)
    combos = [(model, batch) for model in sweeps for batch in (1, 16)]
    strategies = [s for s in ("top-k", "multi-lookahead", "intelligent", "pre-gated", "expertflow", "oracle")]
    width = 0.8 / max(len(combos), 1)
    for i, (model, batch) in enumerate(combos):
        rows = {r["strategy"]: r for r in sweeps[model][1]["aggregates"]
                if r["dedup"] and r["batch_size"] == batch and "speedup_vs_on_demand" in r}
        ax.bar(np.arange(len(strategies)) + (i - (len(combos) - 1) / 2) * width,
               [rows[s]["speedup_vs_on_demand"]["mean"] if s in rows else np.nan for s in strategies], width,
               label=f"{model}, batch {batch}")
    if sweeps:
        ax.axhline(1, color="black", linewidth=0.8)
        ax.set_xticks(np.arange(len(strategies)), strategies, fontsize=8)
        ax.set_ylabel("SIMULATED speedup over On-Demand")
        ax.set_title("Offloading (SIMULATED, H100-calibrated): strategies vs On-Demand, cache 25%", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, axis="y", alpha=0.3)
    else:
        ax.text(0.5, 0.5, "no offloading result file", ha="center")
    fig.suptitle("pymoe at a glance (every bar from a result file; see the footer)", fontsize=12)
    lines = [f"measured: {machine_label(d)}, {d['dtype']} | {provenance_line(p, d)}"
             for p, d in {p: d for _, p, d in used}.items()]
    if used_ablation:
        lines.append("ablation: " + provenance_line(*used_ablation))
    lines += ["SIMULATED: " + provenance_line(p, d) for p, d in sweeps.values()]
    footer(fig, *lines)
    save(fig, out_dir, name, report)


def _scaling(figures: FigureList, out_dir: Path, report: Report) -> None:
    """Time vs tokens for one layer shape, from every listed bench run of it (any --tokens)."""
    name = "scaling_analysis.png"
    files = listed_files(figures, name, report, (BENCH,), "bench runs of one layer shape at three or more "
                         "token counts (pymoe bench --preset small --tokens N)")
    if files is None:
        return
    series: dict[tuple[str, str], dict[int, tuple[dict, Path, dict]]] = {}
    for path, data in files:
        for run in data["runs"]:
            base = run["preset"].removesuffix("-decode")
            series.setdefault((data["device"], base), {})[run["tokens"]] = (run, path, data)
    usable = {k: v for k, v in series.items() if len(v) >= 3}
    if not usable:
        report.skip(name, "needs bench runs of one layer shape at three or more token counts "
                    "(pymoe bench --preset small --tokens N)")
        return
    fig, axes = plt.subplots(1, len(usable), figsize=(max(11.0, 6.6 * len(usable)), 5.6), squeeze=False)
    used = []
    for ax, ((device, shape), runs) in zip(axes[0], sorted(usable.items())):
        tokens = sorted(runs)
        for impl in IMPL_STYLE:
            pts = [(t, _row(runs[t][0], impl)["median_s"] * 1e3) for t in tokens if _row(runs[t][0], impl)]
            if len(pts) >= 2:
                label, color = IMPL_STYLE[impl]
                ax.plot(*zip(*pts), marker="o", color=color, label=label)
        floor = [(t, _row(runs[t][0], "pymoe")["floor_s"] * 1e3) for t in tokens if _row(runs[t][0], "pymoe")]
        if floor:
            ax.plot(*zip(*floor), color="black", linestyle=":", label="roofline floor of the MoE layer")
        ax.set_xscale("log", base=2)
        ax.set_xticks(tokens, [str(t) for t in tokens])
        log_y(ax)
        ax.set_xlabel("tokens in the call (markers: measured)")
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"{device.upper()}: {shape} layer shape, {machine_label(runs[tokens[0]][2])}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        used += [(p, d) for _, p, d in runs.values()]
    fig.suptitle("Scaling with the number of tokens: decode (left of the knee) is bound by reading "
                 "weights, prefill by FLOPs", fontsize=10)
    files = {p: d for p, d in used}
    footer(fig, *[f"measured: {machine_label(d)}, {d['dtype']} | {provenance_line(p, d)}" for p, d in files.items()])
    save(fig, out_dir, name, report)


def _models_per_layer(figures: FigureList, out_dir: Path, report: Report) -> None:
    """Per-layer time inside a model (the 8-layer stack, and the stack replayed as a device
    graph) against tokens, pymoe beside torch._grouped_mm, with the layer's roofline floor: a
    panel per model preset of the listed `pymoe bench --stack --graph` runs."""
    name = "gpu_models_per_layer.png"
    files = listed_files(figures, name, report, (BENCH,), "pymoe bench --device gpu --preset MODEL --impl pymoe "
                         "--impl torch_grouped --stack --graph runs")
    if files is None:
        return
    panels: dict[str, dict[int, tuple[dict, Path, dict]]] = {}
    for path, data in files:
        if not data.get("stack"):
            continue
        for run in data["runs"]:
            panels.setdefault(run["preset"], {})[run["tokens"]] = (run, path, data)
    panels = {p: runs for p, runs in panels.items() if len(runs) >= 2}
    if not panels:
        report.skip(name, "its files hold no stacked (--stack) run at two or more token counts")
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(max(11.0, 5.2 * len(panels)), 5.4), squeeze=False)
    used = {}
    for ax, (preset, runs) in zip(axes[0], panels.items()):
        tokens = sorted(runs)
        for impl in ("pymoe", "torch_grouped"):
            label, color = IMPL_STYLE[impl]
            for kind, style, what in (("stack", "-", "8-layer stack"), ("graph", "--", "stack as a device graph")):
                pts = []
                for t in tokens:
                    row = _row(runs[t][0], impl)
                    timed = (row or {}).get(kind) or {}
                    if timed.get("status") == "ok" and timed.get("median_s"):
                        pts.append((t, timed["median_s"] / timed["layers"] * 1e3))
                if pts:
                    ax.plot(*zip(*pts), marker="o", linestyle=style, color=color, label=f"{label}, {what}")
        floor = [(t, _row(runs[t][0], "pymoe")["floor_s"] * 1e3) for t in tokens if _row(runs[t][0], "pymoe")]
        if floor:
            ax.plot(*zip(*floor), color="black", linestyle=":", label="roofline floor of one layer")
        config = runs[tokens[0]][0]["config"]
        ax.set_xscale("log", base=2)
        ax.set_xticks(tokens, [str(t) for t in tokens])
        log_y(ax)
        ax.set_xlabel("tokens per layer call (markers: measured)")
        ax.set_ylabel("ms per layer (median)")
        ax.set_title(f"{preset}: E {config['num_experts']}, top-{config['top_k']}, d_model {config['d_model']}\n"
                     f"{machine_label(runs[tokens[0]][2])}, {runs[tokens[0]][2]['dtype']}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
        used.update({p: d for _, p, d in runs.values()})
    fig.suptitle("Today's models' MoE layers on the GPU, per layer inside a model: pymoe against "
                 "torch._grouped_mm, side by side in one run (a missing point: not measured, e.g. not capturable)",
                 fontsize=10)
    footer(fig, *[f"measured: {provenance_line(p, d)}" for p, d in used.items()])
    save(fig, out_dir, name, report)
