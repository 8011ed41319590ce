"""`pymoe bench`: ceilings, then every preset at each of its token counts side by side, with progress;
writes one result file."""

from __future__ import annotations

import os
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ..config import get_preset
from ..dtypes import torch_dtype
from ..results import command_line, file_stamp, result_header, write_result
from ..runtime import check_device_dtype
from .ceilings import measure_ceilings
from .report import print_result
from .suite import (
    DEFAULT_IMPL_NAMES,
    IMPL_NAMES,
    bench_file_name,
    check_graph,
    check_stack,
    run_preset,
    write_bench_result,
)
from .workload import check_memory

# MAX's GPU memory manager may take most of the card (about 90%, as we read MAX; not measured),
# and capturing a device graph maps its whole budget at once. The bench runs PyTorch beside MAX
# in one process (the weights and the baselines are PyTorch's): with the default, mixtral-8x7b's
# --graph run left PyTorch a few GB and every pymoe capture failed with CUDA out of memory
# (results/bench/gpu/20261207T040908Z-bfloat16-mixtral-8x7b-stack8-graph.json). pymoe's own GPU
# buffers at the presets' sizes come to a few GB by our count, so the bench caps MAX at half the
# card unless the variable is set already. MAX reads it when the process makes its first GPU
# context: a caller that made one before run_bench keeps the budget it had.
MAX_GPU_MEMORY_ENV = "MODULAR_DEVICE_CONTEXT_MEMORY_MANAGER_SIZE_PERCENT"
BENCH_MAX_GPU_MEMORY_PERCENT = "50"

DEFAULT_PRESETS = ("small-decode", "small")


def run_bench(
    presets: tuple[str, ...] = DEFAULT_PRESETS,
    *,
    tokens: int | tuple[int, ...] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    impls: tuple[str, ...] = DEFAULT_IMPL_NAMES,
    min_seconds: float = 1.0,
    stack: int | None = None,
    graph: bool = False,
    out_dir: Path | None = Path("results"),
    command: str | None = None,
    console: Console | None = None,
) -> tuple[dict, Path | None]:
    """Measure the ceilings, run each preset at each token count (None: the preset's own),
    with `stack` = L each row also as L layers in one call and with `graph` (GPU only) what is
    timed also as a device graph (pymoe/bench/suite.py), print the tables, write the result file
    (again after every cell, so that a run cut short keeps what it measured; `complete` says
    whether it ended)."""
    tokens = (tokens,) if isinstance(tokens, int) else tokens
    if tokens is not None and (not tokens or min(tokens) < 1):
        raise ValueError(f"token counts must be >= 1, got {tokens}")
    for name in presets:
        get_preset(name)  # unknown names fail before anything runs
    unknown = set(impls) - set(IMPL_NAMES)
    if unknown:
        raise ValueError(f"unknown implementation(s) {sorted(unknown)}; choose from {IMPL_NAMES}")
    check_stack(stack)
    check_graph(graph, device)
    check_device_dtype(device, dtype)
    if device == "gpu":
        os.environ.setdefault(MAX_GPU_MEMORY_ENV, BENCH_MAX_GPU_MEMORY_PERCENT)
    console = console or Console()
    for name in presets:  # weights that do not fit fail here, before anything is allocated
        plan = check_memory(get_preset(name), device, dtype)
        dense = "" if plan.dense_fits else "; the dense baseline's weights would not fit beside them: no dense rows"
        console.print(f"{name}: {plan.describe()}{dense}")
    result = {
        **result_header("pymoe.bench/1", command or command_line()),
        "device": device,
        "dtype": dtype,
        "stack": stack,  # layers in one call of each row's `stack` (None: single calls only)
        "graph": graph,  # whether rows also have a `graph`: what is timed, as a device graph
        # MAX_GPU_MEMORY_ENV's value, % of the card (None: MAX's default), which MAX applies
        # unless the process had a GPU context before the run
        "max_gpu_memory_percent": os.environ.get(MAX_GPU_MEMORY_ENV) if device == "gpu" else None,
        "complete": False,
        "runs": [],
    }
    file_name = bench_file_name(dtype, presets, tokens, stack, graph)
    path = None
    start = time.perf_counter()

    def save(run: dict) -> None:
        nonlocal path
        result["runs"].append(run)
        result["wall_s"] = time.perf_counter() - start
        if out_dir is not None:
            path = write_bench_result(result, out_dir, file_name)

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("measuring the machine's ceilings", total=None)
        result["ceilings"] = measure_ceilings(device, torch_dtype(dtype), min_seconds=min_seconds)
        for name in presets:

            def show(what: str, name=name) -> None:
                bar.update(task, description=f"{name}: {what}")

            run_preset(name, tokens=tokens, device=device, dtype=dtype, ceilings=result["ceilings"],
                       impls=impls, min_seconds=min_seconds, stack=stack, graph=graph, progress=show,
                       on_run=save)
    result["wall_s"] = time.perf_counter() - start  # the whole run: compiles, references, timings
    result["complete"] = True
    print_result(result, console)
    if out_dir is not None:
        path = write_bench_result(result, out_dir, file_name)
        console.print(f"wrote {path}")
    return result, path


def run_ablation(
    preset: str = "small",
    *,
    tokens: int | None = None,
    matmul_tokens: int | None = None,
    min_seconds: float = 1.0,
    out_dir: Path | None = Path("results"),
    command: str | None = None,
    console: Console | None = None,
) -> tuple[dict, Path | None]:
    """The optimisation ablation and the routing breakdown on CPU (see ablation.py)."""
    from .ablation import DEFAULT_MATMUL_TOKENS, RUNG_NOTES, ablation_cases, routing_cases, routing_summary, run_cases
    from .report import print_ablation

    p = get_preset(preset)
    tokens = p.tokens[0] if tokens is None else tokens
    matmul_tokens = min(DEFAULT_MATMUL_TOKENS, tokens) if matmul_tokens is None else matmul_tokens
    if tokens < 1 or matmul_tokens < 1:
        raise ValueError(f"token counts must be >= 1, got tokens={tokens}, matmul tokens={matmul_tokens}")
    console = console or Console()
    result = {
        **result_header("pymoe.ablation/1", command or command_line()),
        "device": "cpu",
        "dtype": "float32",
        "preset": preset,
        "tokens": tokens,
        "matmul_tokens": matmul_tokens,
        "rungs": RUNG_NOTES,
    }
    start = time.perf_counter()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("measuring the machine's ceilings", total=None)
        result["ceilings"] = measure_ceilings("cpu", torch_dtype("float32"), min_seconds=min_seconds)

        def show(what: str) -> None:
            bar.update(task, description=f"{what}: compile, check, time")

        result["ablation"] = run_cases(ablation_cases(p.config, tokens, matmul_tokens), result["ceilings"],
                                       min_seconds, progress=lambda s: show("ablation " + s))
        result["routing"] = run_cases(routing_cases(p.config, tokens), result["ceilings"], min_seconds,
                                      progress=lambda s: show("routing " + s))
    result["routing_summary"] = routing_summary(result["routing"])
    result["wall_s"] = time.perf_counter() - start  # the whole run: compiles, references, timings
    print_ablation(result, console)
    path = None
    if out_dir is not None:
        path = write_result(Path(out_dir) / "bench" / "cpu", f"float32-ablation-{preset}", result,
                            stamp=file_stamp(result["date"]))
        console.print(f"wrote {path}")
    return result, path
