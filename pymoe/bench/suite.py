"""The side-by-side benchmark: every implementation on the same inputs and weights.

For one preset (a layer) on one device, the weights are made once (pymoe/bench/workload.py:
where they fit, on the device) and each token count is a cell: each implementation is built
(compile time kept apart), checked against the float64 reference on the first tokens of the
batch, then timed (warm-up, repetitions, median and spread), with the roofline floor from
the machine's measured ceilings beside it. Rows that cannot run (weights that do not fit, a
dense FFN whose floor alone is too long, MAX's built-in kernels on a router they lack) are
recorded as skipped, with the reason. Data flows one way: this module measures and returns
plain dicts; the CLI prints them (report.py) and writes them to results/ (write_bench_result).

With `stack` = L, each row is also timed as L layers in sequence in one call, each after an
RMS norm (for pymoe one MAX graph, runtime.moe_graph_spec's `stack`; for PyTorch one Python
call), all bound to the one set of weights, and the row's `stack` records the whole call's
timings and the time per layer (median / L): a model pays the MAX call's fixed cost once per
graph, not once per layer. One set of weights serves every layer because L copies of the
large presets would not fit (deepseek-v3: 22.5 GB each in bf16), and it gives the stack no
cache advantage: each layer's input is the previous layer's output, so the layers route to
different experts, and one layer's experts at the presets' own token counts (75 MB for
qwen3-30b-a3b at 1 token, the least) outgrow a GPU's L2 (50 MB on the H100). The stack is
checked against L single calls with the norm between them, made by the row's single-call
function that the float64 reference check passed.

With `graph` (GPU only), each row that has a graph form is also timed as a device graph (a
CUDA graph) of what the run times: the L-layer stack with `stack`, else the single call,
captured once for the cell's batch size and replayed, in the row's `graph`. A replay launches
the recorded kernels without the host work of launching each one and without the MAX call's
fixed cost, which at decode sizes are most of a call: serving engines (vLLM, MAX's own
pipelines) capture their decode steps so. Both sides get it: pymoe through MAX's device
graphs (MoELayer.capture), the PyTorch rows through torch.cuda.CUDAGraph. A graph is fixed
to one batch size (an engine captures one per size it serves), so each cell captures its
own. Rows that cannot be captured say why: the HF-style loop reads the experts it hits back
to the host, MAX's dense and built-in rows have no graph form here, and pymoe refuses the
layers whose kernels read back to the host (pymoe.ops.gpu_capture_refusal). The replay is
checked against the eager function's output on the timed batch before it is timed.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import results
from ..baselines import TorchDenseFFN, TorchMoE
from ..config import PRESETS, get_preset
from ..dtypes import itemsize, torch_dtype
from ..layer import DenseFFN, MoELayer
from ..ops import fused_decode_tokens, gpu_capture_refusal
from ..runtime import STACK_RMS_EPS
from .report import error_summary
from .timing import device_sync, measure, peak_rss_during, summarize
from .workload import (
    Workload,
    check_memory,
    make_workload,
    moe_params,
    random_weights,
    reference_dense,
    reference_moe,
    routing,
)

# Tokens checked against the float64 reference before timing: the whole batch up to this
# many, else this many rows spread over the timed batch's output (see _check_batch).
CHECK_TOKENS = 32
# Pass criteria of that check: relative Frobenius error (fp32), median
# per-token relative error (bf16, where a few tokens may legitimately route
# differently after rounding).
CHECK_TOL = {"float32": 1e-4, "bfloat16": 2e-2}
# A dense row is skipped when one call's roofline floor alone is longer than this: the dense
# FFN of a many-expert layer at prefill sizes (DeepSeek-V3: 524288 wide) takes minutes a call.
DENSE_MAX_FLOOR_S = 2.0
# Batches up to this many tokens are decode steps (one new token per sequence), larger ones
# prefill chunks.
DECODE_MAX_TOKENS = 128

__all__ = ["CHECK_TOKENS", "CHECK_TOL", "DEFAULT_IMPL_NAMES", "IMPLEMENTATIONS", "IMPL_NAMES", "Impl", "Workload",
           "check_graph", "check_stack", "make_workload", "run_cell", "run_impl", "run_preset", "work_model",
           "write_bench_result"]


@dataclass(frozen=True)
class Impl:
    name: str
    label: str
    kind: str  # "moe" or "dense": which FLOPs/bytes and which reference apply
    build: Callable[[Workload], tuple[Callable, float]]  # -> (fn(x) -> out, compile seconds)
    # Why it cannot run this cell (None: it can); asked before building.
    unsupported: Callable[[Workload], str | None] = lambda w: None
    # (w, L) -> (fn(x) -> out of L layers in sequence in one call, compile seconds); None:
    # no stacked form (MAX's dense and built-in rows: one graph per call only).
    build_stack: Callable[[Workload, int], tuple[Callable, float]] | None = None
    # (w, L or None) -> (graph, compile seconds): the row's timed call (with L, its L-layer
    # stack) captured as a device graph for w.tokens tokens; graph(x) replays it, and it has
    # capture_seconds and release(). None: no graph form.
    build_graph: Callable[[Workload, int | None], tuple[Callable, float]] | None = None
    # (w, L or None) -> why the row's graph cannot be captured on this cell (None: it can);
    # asked before building. For a row without build_graph: why it has no graph form.
    graph_unsupported: Callable[[Workload, int | None], str | None] = lambda w, layers: None
    # Whether a bench without --impl runs it (False: an opt-in row, named with --impl).
    by_default: bool = True


def _torch_device(device: str) -> str:
    return "cuda" if device == "gpu" else "cpu"


def _torch_tensor(x, device: str, dtype: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return torch.from_numpy(x).to(device=_torch_device(device), dtype=torch_dtype(dtype))


def _torch_in(fn, device: str, dtype: str):
    return lambda x: fn(_torch_tensor(x, device, dtype))


# Timed calls skip pymoe's input validation (a NaN scan), as the PyTorch
# baselines do none; the reference check before timing goes through it.
def _pymoe_builders(**layer_args):
    """(call, stack, graph) builders of the pymoe rows; `layer_args` go to MoELayer."""
    def layer(w: Workload) -> MoELayer:
        return MoELayer(w.config, w.moe_weights, device=w.device, dtype=w.dtype, **layer_args)

    def call(w: Workload):
        built = layer(w)
        return built.forward_unchecked, built.compile_seconds

    def stack(w: Workload, layers: int):
        return layer(w).stack(layers)

    def graph(w: Workload, layers: int | None):
        built = layer(w)
        captured = built.capture(w.tokens, layers=layers)
        return captured, built.compile_seconds + captured.compile_seconds

    return call, stack, graph


_build_pymoe, _build_pymoe_stack, _build_pymoe_graph = _pymoe_builders()
_build_fused, _build_fused_stack, _build_fused_graph = _pymoe_builders(fused_decode=True)


def _fused_unsupported(w: Workload) -> str | None:
    """The fused decode row exists only where it differs from the pymoe row."""
    most = fused_decode_tokens(w.config, w.device, w.dtype)
    if not most:
        return "the fused decode kernel takes 16-bit GPU layers without a capacity factor only"
    if w.tokens > most:
        return f"the fused decode kernel takes at most {most} tokens (this cell is the pymoe row)"
    return None


def _pymoe_graph_unsupported(w: Workload, layers: int | None) -> str | None:
    # The layers the bench builds take MoELayer's defaults (pooled, the default every-expert range).
    return gpu_capture_refusal(w.config, w.dtype, w.tokens)


def _build_max_dense(w: Workload):
    dense = DenseFFN(w.config, w.dense_weights, device=w.device, dtype=w.dtype)
    return dense.forward_unchecked, dense.compile_seconds


def _build_torch(style: str):
    def build(w: Workload):
        moe = TorchMoE(w.config, w.moe_weights, _torch_device(w.device), torch_dtype(w.dtype), style)
        return _torch_in(moe, w.device, w.dtype), 0.0

    return build


def _build_torch_dense(w: Workload):
    dense = TorchDenseFFN(w.config, w.dense_weights, _torch_device(w.device), torch_dtype(w.dtype))
    return _torch_in(dense, w.device, w.dtype), 0.0


def _stack_torch(build):
    """A PyTorch row's stacked form: its layer L times in one Python call, each after the RMS
    norm that pymoe's stacked graph has (F.rms_norm: one fused kernel on a GPU, as MAX's)."""

    def build_stack(w: Workload, layers: int):
        fn, seconds = build(w)

        @torch.inference_mode()
        def stack(x):
            x = _torch_tensor(x, w.device, w.dtype)
            for _ in range(layers):
                # The norm in float32, as _single_calls and MAX's rms_norm compute it: a bf16
                # norm rounds differently, flips near-tie routings, and 8 layers amplify that.
                x = fn(F.rms_norm(x.float(), (w.config.d_model,), eps=STACK_RMS_EPS).to(x.dtype))
            return x

        return stack, seconds

    return build_stack


class TorchGraph:
    """A PyTorch row's call captured as a torch.cuda.CUDAGraph for inputs of one shape: the
    PyTorch side of `pymoe bench --graph` (pymoe's is runtime.DeviceGraph, called alike).

    Built as torch's CUDA-graph docs prescribe: a static input tensor (zeros), warm-up calls
    on a side stream (cuBLAS handles and workspaces, the caching allocator's blocks), then
    the capture of one call into the graph's private memory pool. A call copies x into the
    static input and replays; it returns the static output, which the next call overwrites."""

    WARMUP_CALLS = 3

    def __init__(self, fn: Callable, shape: tuple[int, int], dtype: torch.dtype):
        start = time.perf_counter()
        self.static_x = torch.zeros(shape, device="cuda", dtype=dtype)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP_CALLS):
                fn(self.static_x)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = fn(self.static_x)
        # Host seconds of the warm-up and the capture.
        self.capture_seconds = time.perf_counter() - start

    def __call__(self, x):
        if tuple(x.shape) != tuple(self.static_x.shape):
            raise ValueError(f"captured for x of shape {list(self.static_x.shape)}, got {list(x.shape)}")
        self.static_x.copy_(torch.as_tensor(x))
        self.graph.replay()
        return self.static_out

    def release(self) -> None:
        self.graph.reset()
        self.static_x = self.static_out = None


def _graph_torch(build):
    """A PyTorch row's graph form: its single call (`layers` None) or its stack of `layers`
    (_stack_torch) captured as a TorchGraph for the cell's batch."""

    def build_graph(w: Workload, layers: int | None):
        fn, seconds = build(w) if layers is None else _stack_torch(build)(w, layers)
        return TorchGraph(fn, (w.tokens, w.config.d_model), torch_dtype(w.dtype)), seconds

    return build_graph


def _no_graph(reason: str):
    return lambda w, layers: reason


def _build_max_builtin(w: Workload):
    from .max_builtin import MaxBuiltinMoE

    moe = MaxBuiltinMoE(w.config, w.moe_weights, device=w.device, dtype=w.dtype)
    return moe, moe.compile_seconds


def _max_builtin_unsupported(w: Workload) -> str | None:
    from .max_builtin import unsupported

    return unsupported(w.config)


def _dense_unsupported(w: Workload) -> str | None:
    return w.dense_skipped


_MAX_NO_GRAPH = _no_graph("no graph form: MAX's dense and built-in rows are timed as calls only")

IMPLEMENTATIONS = (
    Impl("pymoe", "pymoe MoE (Mojo kernels in a MAX graph)", "moe", _build_pymoe, build_stack=_build_pymoe_stack,
         build_graph=_build_pymoe_graph, graph_unsupported=_pymoe_graph_unsupported),
    Impl("pymoe_fused_decode", "pymoe MoE, fused decode kernel (MoELayer(fused_decode=True); opt-in)", "moe",
         _build_fused, _fused_unsupported, build_stack=_build_fused_stack, build_graph=_build_fused_graph,
         graph_unsupported=_pymoe_graph_unsupported, by_default=False),
    Impl("max_dense", "dense FFN in MAX (ops.matmul)", "dense", _build_max_dense, _dense_unsupported,
         graph_unsupported=_MAX_NO_GRAPH),
    Impl("torch_loop", "PyTorch MoE, HF-style expert loop", "moe", _build_torch("loop"),
         build_stack=_stack_torch(_build_torch("loop")),
         graph_unsupported=_no_graph("the HF-style loop reads the experts it hits back to the host (.tolist()), "
                                     "which a CUDA graph cannot capture")),
    Impl("torch_grouped", "PyTorch MoE, torch._grouped_mm", "moe", _build_torch("grouped"),
         build_stack=_stack_torch(_build_torch("grouped")), build_graph=_graph_torch(_build_torch("grouped"))),
    Impl("torch_dense", "dense FFN in PyTorch", "dense", _build_torch_dense, _dense_unsupported,
         build_stack=_stack_torch(_build_torch_dense), build_graph=_graph_torch(_build_torch_dense)),
    Impl("max_builtin", "MAX built-in MoE kernels (max.nn.kernels)", "moe", _build_max_builtin,
         _max_builtin_unsupported, graph_unsupported=_MAX_NO_GRAPH),
)
IMPL_NAMES = tuple(i.name for i in IMPLEMENTATIONS)
# What a bench without --impl runs: every row but the opt-in ones (the fused decode kernel has
# not run on a GPU yet; it is timed only when asked for).
DEFAULT_IMPL_NAMES = tuple(i.name for i in IMPLEMENTATIONS if i.by_default)


def _to_numpy(out) -> np.ndarray:
    if isinstance(out, torch.Tensor):
        return out.detach().float().cpu().numpy()
    return np.asarray(out, dtype=np.float32)


def _check_batch(w: Workload) -> tuple[np.ndarray, np.ndarray | None]:
    """(the batch the reference check runs the layer on, the rows of its output compared; None:
    all). Up to CHECK_TOKENS tokens, the whole batch. Beyond, the whole timed batch with
    CHECK_TOKENS rows spread over it compared: the kernels a call runs are chosen by its size
    (tiles by rows per expert), so a check on a smaller batch would pass kernels the timed call
    never runs. A row's output depends on its token alone, except with a capacity factor (what
    is dropped depends on the batch); there the first CHECK_TOKENS tokens alone."""
    if w.tokens <= CHECK_TOKENS:
        return w.x, None
    if w.config.capacity_factor is not None:
        return w.x[:CHECK_TOKENS], None
    return w.x, np.linspace(0, w.tokens - 1, CHECK_TOKENS).round().astype(np.int64)


def _take(out, rows: np.ndarray | None) -> np.ndarray:
    """The rows of a call's output (torch or numpy) as float32 numpy."""
    if rows is not None:
        out = out[torch.from_numpy(rows).to(out.device)] if isinstance(out, torch.Tensor) else np.asarray(out)[rows]
    return _to_numpy(out)


def _reference(w: Workload, kind: str) -> np.ndarray:
    """The float64 reference on the rows _check_batch compares, computed once per cell and kind."""
    if kind not in w.references:
        batch, rows = _check_batch(w)
        x = batch if rows is None else batch[rows]  # each row depends on its token alone (_check_batch)
        w.references[kind] = (reference_moe(x, w.moe_weights, w.config) if kind == "moe"
                              else reference_dense(x, w.dense_weights, w.config.activation))
    return w.references[kind]


def _check(out: np.ndarray, ref: np.ndarray, dtype: str) -> tuple[float, bool]:
    if dtype == "float32":
        err = float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
    else:
        per_token = np.linalg.norm(out - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-30)
        err = float(np.median(per_token))
    return err, err < CHECK_TOL[dtype]


def work_model(w: Workload) -> dict:
    """FLOPs and weight bytes each kind of implementation must at least spend: for the MoE,
    the router's, the experts the batch uses (with their biases) and the shared expert's."""
    cfg, size = w.config, itemsize(w.dtype)
    used = int(np.unique(routing(w.x, w.moe_weights, cfg).ids).size)
    router_bytes = (cfg.d_model + cfg.router_bias + cfg.selection_bias) * cfg.num_experts * size
    expert_bytes = cfg.expert_bytes(size) + cfg.expert_bias * (cfg.expert_n + cfg.d_model) * size
    shared_bytes = cfg.shared_expert.nbytes(size) + cfg.shared_gate * cfg.d_model * size if cfg.shared_d_ff else 0
    router_flops = 2 * w.tokens * cfg.d_model * cfg.num_experts
    return {
        "experts_used": used,
        "moe": {
            "flops": cfg.active_flops(w.tokens) + router_flops,
            "weight_bytes": used * expert_bytes + router_bytes + shared_bytes,
        },
        "dense": {
            "flops": 2 * w.tokens * cfg.dense_shape.params,
            "weight_bytes": cfg.dense_shape.nbytes(size),
        },
    }


def floor_seconds(work: dict, ceilings: dict) -> tuple[float, str]:
    """The roofline floor max(FLOPs / matmul peak, weight bytes / read bandwidth), and which bound it is."""
    compute = work["flops"] / (ceilings["matmul"]["gflops"] * 1e9)
    memory = work["weight_bytes"] / (ceilings["read"]["gbps"] * 1e9)
    return max(compute, memory), "compute" if compute >= memory else "memory"


def _roofline(row: dict, work: dict, ceilings: dict) -> None:
    """Add achieved rates, the floor time and the fraction of it reached."""
    flops, nbytes, t = work["flops"], work["weight_bytes"], row["median_s"]
    peak = ceilings["matmul"]["gflops"] * 1e9
    bw = ceilings["read"]["gbps"] * 1e9
    floor, bound = floor_seconds(work, ceilings)
    row.update(
        flops=flops,
        weight_bytes=nbytes,
        gflops=flops / t / 1e9,
        pct_peak=100 * flops / t / peak,
        gbps=nbytes / t / 1e9,
        pct_bw=100 * nbytes / t / bw,
        floor_s=floor,
        floor_bound=bound,
        pct_of_floor=100 * floor / t,
    )


def skip_reason(impl: Impl, w: Workload, work: dict, ceilings: dict) -> str | None:
    """Why `impl` does not run on this cell, or None."""
    reason = impl.unsupported(w)
    if reason is None and impl.kind == "dense":
        floor, _ = floor_seconds(work["dense"], ceilings)
        if floor > DENSE_MAX_FLOOR_S:
            reason = (f"the dense FFN of the experts' size ({w.config.d_ff_dense} wide) has a floor of {floor:.1f} s "
                      f"a call at {w.tokens} tokens (more than {DENSE_MAX_FLOOR_S:g} s)")
    return reason


def _build_check_time(rec: dict, build: Callable[[], tuple[Callable, float]], check_x: np.ndarray,
                      rows: np.ndarray | None, expected: np.ndarray, against: str, x, dtype: str, min_seconds: float,
                      sync) -> Callable | None:
    """Build, check the `rows` of its output on check_x (None: all) against `expected`, then
    time on x, recording each step in `rec` (a failure is recorded, not raised: a failing
    baseline is a result); returns the function when every step passed, else None."""
    try:
        fn, compile_s = build()
    except Exception as exc:
        rec.update(status="failed", error=error_summary(exc), phase="build")
        return None
    rec["compile_s"] = compile_s
    try:
        err, ok = _check(_take(fn(check_x), rows), expected, dtype)
        rec.update(check_tokens=len(expected), check_batch_tokens=len(check_x), check_rel_err=err,
                   check_tol=CHECK_TOL[dtype])
        if not ok:
            rec.update(status="wrong", error=f"relative error {err:.3g} against {against}")
            return None
        rec.update(summarize(measure(lambda: fn(x), min_seconds=min_seconds, sync=sync)))
    except Exception as exc:
        rec.update(status="failed", error=error_summary(exc), phase="run")
        return None
    return fn


def _single_calls(fn: Callable, x: np.ndarray, layers: int, d_model: int) -> np.ndarray:
    """What a stack of `layers` must give on x: the single-call `fn` `layers` times, each
    after the stack's RMS norm (computed here in float32)."""
    y = torch.from_numpy(x)
    for _ in range(layers):
        y = torch.from_numpy(_to_numpy(fn(F.rms_norm(y, (d_model,), eps=STACK_RMS_EPS).numpy())))
    return y.numpy()


def _graph_skip_reason(impl: Impl, w: Workload, stack: int | None, eager_passed: bool) -> str | None:
    """Why the row's graph is not timed on this cell (None: it is)."""
    reason = impl.graph_unsupported(w, stack)
    if reason is None and impl.build_graph is None:
        reason = "no graph form"
    if reason is None and not eager_passed:
        what = "call" if stack is None else "stack (see the row's stack)"
        reason = f"the eager {what} did not pass, so its graph has nothing to be checked against"
    return reason


def _time_graph(rec: dict, impl: Impl, w: Workload, x, expected: np.ndarray, stack: int | None,
                min_seconds: float, sync) -> None:
    """Capture the row's graph, check its replay on x against `expected`, time it (into rec,
    as _build_check_time), and release it whatever happened."""
    graphs = []

    def build():
        graph, compile_s = impl.build_graph(w, stack)
        graphs.append(graph)
        rec["capture_s"] = graph.capture_seconds
        return graph, compile_s

    what = "call" if stack is None else f"{stack}-layer stack"
    try:
        _build_check_time(rec, build, x, None, expected, f"the eager {what} on the timed batch", x, w.dtype,
                          min_seconds, sync)
    finally:
        for graph in graphs:
            graph.release()


def run_impl(impl: Impl, w: Workload, work: dict, ceilings: dict, min_seconds: float, sync=None,
             stack: int | None = None, graph: bool = False) -> dict:
    """One row: built, checked against the float64 reference (on the timed batch, up to
    CHECK_TOKENS rows of it: _check_batch), timed, with its roofline; with `stack` = L, its
    `stack` too; with `graph`, its `graph`: what the run times (the stack with `stack`, else
    the single call) as a device graph (see the module's doc; the GPU only, which run_cell
    checks)."""
    row = {"name": impl.name, "label": impl.label, "kind": impl.kind, "status": "ok", "error": None}
    reason = skip_reason(impl, w, work, ceilings)
    if reason:
        row.update(status="skipped", error=reason)
        return row
    check_x, rows = _check_batch(w)
    # On the GPU every implementation gets the batch already on the device.
    x = w.x if w.device == "cpu" else torch.from_numpy(w.x).to("cuda", torch_dtype(w.dtype))
    fn = _build_check_time(row, lambda: impl.build(w), check_x, rows, _reference(w, impl.kind),
                           "the float64 reference", x, w.dtype, min_seconds, sync)
    if fn is None:
        return row
    if w.device == "cpu":
        row["peak_rss_delta_mib"] = peak_rss_during(lambda: fn(x))
    _roofline(row, work[impl.kind], ceilings)
    # From here on `fn` is what the run times: the single call, or with `stack` the stack
    # (None when that did not pass), which `graph` captures.
    if stack is not None:
        st = row["stack"] = {"layers": stack, "status": "ok", "error": None}
        if impl.build_stack is None:
            st.update(status="skipped", error="no stacked form: MAX's dense and built-in rows are one graph per call")
            fn = None
        else:
            expected = _single_calls(fn, check_x, stack, w.config.d_model)
            expected = expected if rows is None else expected[rows]
            fn = None  # the single call's copy of the weights goes before the stack's comes
            gc.collect()
            fn = _build_check_time(st, lambda: impl.build_stack(w, stack), check_x, rows, expected,
                                   f"{stack} single calls", x, w.dtype, min_seconds, sync)
            if fn:
                st["per_layer_s"] = st["median_s"] / stack
                st["pct_of_floor"] = 100 * row["floor_s"] / st["per_layer_s"]
    if not graph:
        return row
    gr = row["graph"] = {"layers": stack or 1, "status": "ok", "error": None}
    reason = _graph_skip_reason(impl, w, stack, fn is not None)
    if reason:
        gr.update(status="skipped", error=reason)
        return row
    try:
        expected = _to_numpy(fn(x))  # the eager function's output on the timed batch
    except Exception as exc:  # recorded, not raised, as every failure of a row
        gr.update(status="failed", error=error_summary(exc), phase="eager")
        return row
    fn = None  # its copy of the weights goes before the graph's comes
    gc.collect()
    _time_graph(gr, impl, w, x, expected, stack, min_seconds, sync)
    if gr["status"] == "ok":
        gr["per_layer_s"] = gr["median_s"] / gr["layers"]
        gr["pct_of_floor"] = 100 * row["floor_s"] / gr["per_layer_s"]
    return row


def _check_impls(impls: tuple[str, ...]) -> None:
    unknown = set(impls) - set(IMPL_NAMES)
    if unknown:
        raise ValueError(f"unknown implementation(s) {sorted(unknown)}; choose from {IMPL_NAMES}")


def check_stack(stack: int | None) -> None:
    """A ValueError unless `stack` is None (single calls only) or a layer count >= 1."""
    if stack is not None and (not isinstance(stack, int) or stack < 1):
        raise ValueError(f"stack must be a number of layers >= 1, got {stack!r}")


def check_graph(graph: bool, device: str) -> None:
    """A ValueError for `graph` off the GPU: device graphs are CUDA graphs."""
    if graph and device != "gpu":
        raise ValueError(f"graph mode times device (CUDA) graphs, which run on the GPU only; got device {device!r}")


def run_cell(w: Workload, *, ceilings: dict, impls: tuple[str, ...] = DEFAULT_IMPL_NAMES, min_seconds: float = 1.0,
             stack: int | None = None, graph: bool = False, progress: Callable[[str], None] | None = None) -> dict:
    """Benchmark every implementation in `impls` on one cell (with `stack` = L, each also as
    L layers in one call; with `graph`, what is timed also as a device graph); returns its run dict."""
    _check_impls(impls)
    check_graph(graph, w.device)
    work = work_model(w)
    sync = device_sync(w.device)
    chosen = [impl for impl in IMPLEMENTATIONS if impl.name in impls]
    if w.device == "gpu":
        # MAX keeps the device memory its graphs used for later graphs, so
        # PyTorch (which can hand its cache back) runs first: at the large
        # preset, MAX's pools would otherwise leave PyTorch too little.
        chosen.sort(key=lambda impl: not impl.name.startswith("torch"))
    by_name = {}
    for impl in chosen:
        if progress:
            progress(impl.name)
        by_name[impl.name] = run_impl(impl, w, work, ceilings, min_seconds, sync, stack, graph)
        gc.collect()  # this implementation's copy of the weights goes before the next one's comes
        if w.device == "gpu":
            torch.cuda.empty_cache()
    rows = [by_name[impl.name] for impl in IMPLEMENTATIONS if impl.name in by_name]
    pymoe = next((r for r in rows if r["name"] == "pymoe" and r["status"] == "ok"), None)
    for r in rows:
        if pymoe and r["status"] == "ok":
            r["pymoe_speedup"] = r["median_s"] / pymoe["median_s"]
    for part in ("stack", "graph"):
        ours = pymoe.get(part) if pymoe else None
        for r in rows:
            if ours and ours["status"] == "ok" and r.get(part, {}).get("status") == "ok":
                r[part]["pymoe_speedup"] = r[part]["per_layer_s"] / ours["per_layer_s"]
    cfg, size = w.config, itemsize(w.dtype)
    return {
        "preset": w.preset.name,
        "description": w.preset.description,
        "tokens": w.tokens,
        "regime": "decode" if w.tokens <= DECODE_MAX_TOKENS else "prefill",
        # Every field of the MoEConfig: shape, router, experts, shared expert.
        "config": dataclasses.asdict(cfg),
        "weights": {"bytes": moe_params(cfg) * size,
                    "made_on": "host (numpy float32)" if w.device == "cpu" else "gpu (torch, run dtype)"},
        "work": work,
        "rows": rows,
    }


def run_preset(
    preset_name: str,
    *,
    tokens: int | tuple[int, ...] | None,
    device: str,
    dtype: str,
    ceilings: dict,
    impls: tuple[str, ...] = DEFAULT_IMPL_NAMES,
    min_seconds: float = 1.0,
    stack: int | None = None,
    graph: bool = False,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    on_run: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Benchmark every implementation in `impls` on one preset at each token count (None: the
    preset's own), the weights made once; with `stack` = L, each also as L layers in one call;
    with `graph` (GPU only), what is timed also as a device graph (see the module's doc).
    Returns one run dict per token count. A preset whose weights do not fit raises a
    ValueError before anything is allocated. `on_run` gets each run as it ends."""
    _check_impls(impls)
    check_stack(stack)
    check_graph(graph, device)
    preset = get_preset(preset_name)
    counts = preset.tokens if tokens is None else ((tokens,) if isinstance(tokens, int) else tuple(tokens))
    if not counts or min(counts) < 1:
        raise ValueError(f"token counts must be >= 1, got {counts}")
    plan = check_memory(preset, device, dtype)
    want_dense = plan.dense_fits and any(i in impls for i in ("max_dense", "torch_dense"))
    if progress:
        progress(f"making the weights ({plan.describe()})")
    weights = random_weights(preset.config, device, dtype, seed + 1, dense=want_dense)
    runs = []
    for count in counts:
        w = make_workload(preset_name, count, device, dtype, seed, weights=weights)

        def show(impl: str, count=count) -> None:
            if progress:
                progress(f"{count} tokens: {impl} (build, check, time)")

        run = run_cell(w, ceilings=ceilings, impls=impls, min_seconds=min_seconds, stack=stack, graph=graph,
                       progress=show)
        run["memory"] = {"need_bytes": plan.need_bytes, "have_bytes": plan.have_bytes, "note": plan.describe()}
        runs.append(run)
        if on_run:
            on_run(run)
        del w
    return runs


def _name_part(preset: str, tokens: tuple[int, ...] | None) -> str:
    own = PRESETS[preset].tokens if preset in PRESETS else None
    return preset if tokens is None or tuple(tokens) == own else f"{preset}@{','.join(map(str, tokens))}"


def _mode_part(stack: int | None, graph: bool) -> str:
    return ("" if stack is None else f"-stack{stack}") + ("-graph" if graph else "")


def bench_file_name(dtype: str, presets: tuple[str, ...], tokens: tuple[int, ...] | None,
                    stack: int | None = None, graph: bool = False) -> str:
    """<dtype>-<presets>[-stack<L>][-graph]: the presets' names joined by "_", each with
    @<token counts> where the run overrides its own (float32-qwen3-30b-a3b@1,16), then the
    stack depth of a --stack run (bfloat16-qwen3-30b-a3b-stack8) and -graph for a --graph run
    (bfloat16-qwen3-30b-a3b-stack8-graph)."""
    return f"{dtype}-{'_'.join(_name_part(p, tokens) for p in presets)}{_mode_part(stack, graph)}"


def write_bench_result(result: dict, out_dir: Path, name: str | None = None) -> Path:
    """Write one result file: results/bench/<device>/<stamp>-<name>.json, stamped with the
    run's start, `name` by default from the presets and token counts of its runs. Writing it
    again as the run goes on replaces the same file."""
    if name is None:
        counts: dict[str, list[int]] = {}
        for run in result["runs"]:
            counts.setdefault(run["preset"], []).append(run["tokens"])
        name = (f"{result['dtype']}-{'_'.join(_name_part(p, tuple(t)) for p, t in counts.items())}"
                f"{_mode_part(result.get('stack'), bool(result.get('graph')))}")
    return results.write_result(Path(out_dir) / "bench" / result["device"], name, result,
                                stamp=results.file_stamp(result["date"]))
