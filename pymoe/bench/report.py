"""Readable tables of benchmark results (printing only; numbers come from the result dicts),
and the one-line text that a result row records for a failure."""

from __future__ import annotations

import re

from rich.console import Console
from rich.table import Table


def _ms(s: float) -> str:
    return f"{s * 1e3:,.1f}" if s >= 0.01 else f"{s * 1e3:.3f}"


def ceilings_table(ceilings: dict) -> Table:
    t = Table(title="Machine ceilings (measured in this run)")
    for col in ("limit", "value", "how"):
        t.add_column(col)
    mm = ceilings["matmul"]
    t.add_row("matmul peak", f"{mm['gflops']:,.1f} GFLOP/s",
              f"{mm['via']} {mm['dtype']} {'x'.join(map(str, mm['shape']))}")
    t.add_row("read bandwidth", f"{ceilings['read']['gbps']:,.1f} GB/s", ceilings["read"]["via"])
    t.add_row("copy bandwidth", f"{ceilings['copy']['gbps']:,.1f} GB/s", ceilings["copy"]["via"])
    if "max_call" in ceilings:  # result files before 2026-11-23 lack it
        call = ceilings["max_call"]
        t.add_row("MAX graph call", f"{_ms(call['median_s'])} ms",
                  f"{call['via']}, {'x'.join(map(str, call['shape']))}")
    return t


def _router_extras(config: dict) -> str:
    """What a run's layer has beyond a softmax top-k router and plain experts (result files
    before issue 21 record none of it)."""
    extras = []
    if config.get("scoring", "softmax") != "softmax":
        extras.append(config["scoring"])
    if config.get("n_group", 1) > 1:
        extras.append(f"{config['topk_group']} of {config['n_group']} groups")
    for key, label in (("router_bias", "router bias"), ("selection_bias", "selection bias"),
                       ("expert_bias", "expert biases"), ("weight_on_input", "weight on input")):
        if config.get(key):
            extras.append(label)
    if config.get("routed_scaling_factor", 1.0) != 1.0:
        extras.append(f"scaling {config['routed_scaling_factor']:g}")
    if config.get("activation") == "clamped_swiglu":
        extras.append("clamped swiglu")
    if config.get("shared_d_ff"):
        extras.append(f"shared expert {config['shared_d_ff']}{' gated' if config.get('shared_gate') else ''}")
    return f" ({', '.join(extras)})" if extras else ""


def _per_layer_cells(part: dict | None) -> list[str]:
    """A row's `stack` or `graph` columns: ms per layer (IQR), % of the one-layer floor, pymoe
    speedup (blank for a row without it)."""
    if part is None:
        return ["", "", ""]
    if part["status"] != "ok":
        color = "yellow" if part["status"] == "skipped" else "red"
        return [f"[{color}]{part['status']}[/{color}] (see below)", "", ""]
    layers = part["layers"]
    return [f"{_ms(part['per_layer_s'])} ({_ms(part['q25_s'] / layers)}-{_ms(part['q75_s'] / layers)})",
            f"{part['pct_of_floor']:.0f}%",
            f"{part['pymoe_speedup']:.2f}x" if "pymoe_speedup" in part else ""]


def _graph_heading(stack: int | None) -> str:
    return "ms/layer as a device graph (IQR)" if not stack else f"ms/layer, {stack}-layer stack as a device graph (IQR)"


def run_table(run: dict, device: str, dtype: str, stack: int | None = None, graph: bool = False) -> Table:
    """One cell's rows; with `stack` (the run's layers in one call), the stacked columns too;
    with `graph`, the device-graph columns."""
    w = run["work"]
    title = (
        f"{run['preset']} ({run['regime']}): {run['tokens']} tokens, d_model {run['config']['d_model']}, "
        f"E={run['config']['num_experts']} top-{run['config']['top_k']}{_router_extras(run['config'])}, "
        f"{device} {dtype}; "
        f"{w['experts_used']} experts used"
    )
    t = Table(title=title)
    cols = ["implementation", "median ms (IQR)", "GFLOP/s (% peak)", "weights GB/s (% read bw)",
            "% of floor", "pymoe speedup", "compile s", "check err"]
    extra = []
    if stack:
        extra += [f"ms/layer in {stack}-layer stack (IQR)", "stack % of floor", "stack pymoe speedup"]
    if graph:
        extra += [_graph_heading(stack), "graph % of floor", "graph pymoe speedup"]
    cols[2:2] = extra
    for c in cols:
        t.add_column(c, justify="left" if c == "implementation" else "right")
    failures = []
    for r in run["rows"]:
        if r["status"] != "ok":
            color = "yellow" if r["status"] == "skipped" else "red"
            t.add_row(r["name"], f"[{color}]{r['status']}[/{color}] (see below)", *[""] * (len(cols) - 2))
            failures.append(f"{r['name']}: {r['error']}")
            continue
        st, gr = r.get("stack"), r.get("graph")
        if st is not None and st["status"] != "ok":
            failures.append(f"{r['name']} in the stack: {st['error']}")
        if gr is not None and gr["status"] != "ok":
            failures.append(f"{r['name']} as a device graph: {gr['error']}")
        t.add_row(
            r["name"],
            f"{_ms(r['median_s'])} ({_ms(r['q25_s'])}-{_ms(r['q75_s'])})",
            *(_per_layer_cells(st) if stack else []),
            *(_per_layer_cells(gr) if graph else []),
            f"{r['gflops']:,.1f} ({r['pct_peak']:.0f}%)",
            f"{r['gbps']:,.1f} ({r['pct_bw']:.0f}%)",
            f"{r['pct_of_floor']:.0f}% of {_ms(r['floor_s'])} ms",
            f"{r['pymoe_speedup']:.2f}x" if "pymoe_speedup" in r else "",
            f"{r['compile_s']:.1f}",
            f"{r['check_rel_err']:.1e}",
        )
    if failures:
        t.caption = "\n".join(failures)
    return t


def print_result(result: dict, console: Console | None = None) -> None:
    console = console or Console()
    console.print(ceilings_table(result["ceilings"]))
    stack = result.get("stack")  # result files before issue 22 have no stacked timings
    graph = bool(result.get("graph"))  # nor, before graph mode, device-graph timings
    for run in result["runs"]:
        console.print(run_table(run, result["device"], result["dtype"], stack, graph))
    console.print(
        "GFLOP/s count the FLOPs each row must do (MoE rows: the routed experts + router; dense rows: "
        "the whole FFN). Weights GB/s count the weights each row must read once (MoE: the experts used). "
        "floor = max(FLOPs / matmul peak, weight bytes / read bandwidth); pymoe speedup = row time / pymoe time."
    )
    if stack:
        console.print(
            f"ms/layer in {stack}-layer stack = the time of one call running {stack} layers in sequence (each "
            f"after an RMS norm, all on one set of weights; pymoe: one MAX graph) / {stack}; its % of floor is "
            "against one layer's floor."
        )
    if graph:
        what = f"the {stack}-layer stack" if stack else "the single call"
        console.print(
            f"{_graph_heading(stack).removesuffix(' (IQR)')} = {what} captured once as a device graph (pymoe: MAX's "
            "Model.capture; PyTorch: torch.cuda.CUDAGraph) for this batch size and replayed: no host work per "
            f"kernel launch and no MAX call overhead. Per layer: the replay's time / {stack or 1}; its % of floor "
            "is against one layer's floor."
        )


def _rate(r: dict) -> str:
    if "gflops" in r:
        return f"{r['gflops']:,.1f} GFLOP/s ({r['pct_peak']:.0f}% peak)"
    if "gbps" in r:
        return f"{r['gbps']:,.1f} GB/s ({r['pct_bw']:.0f}% copy bw)"
    return ""


def ablation_table(result: dict) -> Table:
    t = Table(title=f"Optimisation ablation, {result['preset']} layer shape, cpu float32 "
                    f"(expert matmul and layer on {result['matmul_tokens']} tokens, others on {result['tokens']})")
    cols = ("op", "rung", "median ms (IQR)", "vs scalar", "step gain", "rate (% of ceiling)", "pool allocs/call",
            "check err")
    for c in cols:
        t.add_column(c, justify="left" if c in ("op", "rung") else "right")
    failures = []
    for r in result["ablation"]:
        if r["status"] != "ok":
            t.add_row(r["op"], r["rung"], f"[red]{r['status']}[/red]", *[""] * (len(cols) - 3))
            failures.append(f"{r['op']} {r['rung']}: {r['error']}")
            continue
        t.add_row(
            r["op"], r["rung"],
            f"{_ms(r['median_s'])} ({_ms(r['q25_s'])}-{_ms(r['q75_s'])})",
            f"{r['speedup_vs_scalar']:.1f}x" if "speedup_vs_scalar" in r else "",
            f"{r['step_gain']:.2f}x" if "step_gain" in r else "",
            _rate(r),
            f"{r['pool_allocations_per_call']:g}" if "pool_allocations_per_call" in r else "",
            f"{r['check_rel_err']:.1e}",
        )
    if failures:
        t.caption = "\n".join(failures)
    return t


def routing_table(result: dict) -> Table:
    s = result.get("routing_summary")
    title = f"Routing overhead, production ops, {result['preset']} on {result['tokens']} tokens"
    if s:
        title += f": gate + dispatch + combine = {s['routing_pct_of_layer']:.1f}% of the layer"
    t = Table(title=title)
    for c in ("op", "median ms (IQR)", "% of layer", "rate (% of ceiling)"):
        t.add_column(c, justify="left" if c == "op" else "right")
    layer = next((r for r in result["routing"] if r["op"] == "layer" and r["status"] == "ok"), None)
    for r in result["routing"]:
        if r["status"] != "ok":
            t.add_row(r["op"], f"[red]{r['status']}[/red]: {r['error']}", "", "")
            continue
        pct = f"{100 * r['median_s'] / layer['median_s']:.2f}%" if layer else ""
        t.add_row(r["op"], f"{_ms(r['median_s'])} ({_ms(r['q25_s'])}-{_ms(r['q75_s'])})", pct, _rate(r))
    return t


def print_ablation(result: dict, console: Console | None = None) -> None:
    console = console or Console()
    console.print(ceilings_table(result["ceilings"]))
    console.print(ablation_table(result))
    for rung, note in result["rungs"].items():
        console.print(f"  {rung}: {note}")
    console.print(routing_table(result))


def error_summary(exc: BaseException) -> str:
    """An exception as the one line a result row keeps in its `error` field: the
    message's first line and up to two later lines that name an error."""
    text = f"{type(exc).__name__}: {exc}".strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    msg = lines[0] if lines else type(exc).__name__
    # MAX compile errors put the useful part further down; keep a short tail.
    tail = [ln.strip() for ln in lines[1:] if re.search(r"error|not|fail", ln, re.I)][:2]
    return " | ".join([msg[:300], *[t[:200] for t in tail]])
