"""`pymoe bench --ablation`: the optimisation breakdown, measured one step at a time.

Each op (softmax, relu, gate, expert matmul, the whole layer) runs in rungs
that add one optimisation at a time (ablation_kernels/ablation.mojo documents
them; that Mojo package is loaded only by the graphs built here):

    scalar       one element at a time, op parameters read at run time
    simd         explicit SIMD vectors, op parameters still read at run time
    specialized  SIMD + compile-time parameters (the production kernels)
    prepacked    expert matmul and layer: + expert weights pre-packed once at
                 load (the CPU layer's layout), so no call packs them
    pooled       layer only: + the buffer pool for the experts' intermediates

Every rung is checked against the float64 reference before it is timed, on
the same inputs, in the same process, one after another. The routing
breakdown then times the production gate, dispatch and combine at the
preset's full token count against the whole layer: the routing overhead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .. import reference as R
from ..config import MoEConfig
from ..weights import MoEWeights
from .report import error_summary
from .timing import measure, peak_rss_during, summarize

RUNG_NOTES = {
    "scalar": "one element at a time; op parameters (k, renormalize, activation) read at run time",
    "simd": "explicit SIMD vectors; op parameters still read at run time",
    "specialized": "SIMD + op parameters, row length or register tile fixed at compile time (production kernel)",
    "prepacked": "specialized + expert weights pre-packed once at load, not per call (the CPU layer's layout)",
    "pooled": "prepacked + buffer pool for the experts' intermediates (production layer)",
}
# The expert matmul and the layer run the scalar rung, which is ~100x slower
# than production, so they use fewer tokens than the preset by default.
DEFAULT_MATMUL_TOKENS = 256
ACT_CODES = {"none": 0, "relu": 1, "silu": 2, "swiglu": 3}
# The Mojo package of the rungs below production: benchmark subjects, kept out
# of the production package so that user graphs never load them.
ABLATION_KERNELS = "ablation_kernels"


@dataclass
class Case:
    op: str
    rung: str
    tokens: int
    build: Callable[[], object]  # -> compiled MAX model
    inputs: list  # NumPy arrays (uploaded once before timing) or MAX Buffers
    check: Callable[[list[np.ndarray]], float]  # model outputs -> error against the reference
    tol: float
    flops: int = 0  # work the op must do, for the rate beside its time
    nbytes: int = 0
    pool: object | None = None  # the layer's BufferPool: its buffers are per-call inputs
    pool_rows: int = 0  # rows the pool must hold (tokens * top_k)
    note: str = ""


def _graph(name: str, input_types, forward):
    """Compile a CPU graph of `forward` over tensor inputs of `input_types`."""
    from max.graph import Graph

    from .. import ops as mops
    from ..runtime import session_and_device_ref

    session, _ = session_and_device_ref("cpu")
    kernels = [mops.KERNELS_DIR, mops.find_kernels_dir(ABLATION_KERNELS)]
    with Graph(name, input_types=input_types, custom_extensions=kernels) as g:
        g.output(*forward(*(v.tensor for v in g.inputs)))
    return session.load(g)


def _types(*specs):
    """TensorTypes on the CPU from (dtype, shape) pairs."""
    from max.graph import DeviceRef, TensorType

    return [TensorType(dt, shape, DeviceRef.CPU()) for dt, shape in specs]


def _params(*values: int):
    from max.dtype import DType
    from max.graph import DeviceRef, ops

    return ops.constant(np.array(values, np.int32), DType.int32, DeviceRef.CPU())


def _runtime_gate(xv, rv, cfg: MoEConfig, simd: bool):
    """The ablation gate (top-k from the output shape, renormalize at run
    time): the same five outputs as ops.moe_gate."""
    from max.dtype import DType
    from max.graph import TensorType

    from .. import ops as mops

    f32, i32, t, dev = DType.float32, DType.int32, xv.shape[0], xv.device
    k, e = cfg.top_k, cfg.num_experts
    outs = [TensorType(f32, [t, k], dev), TensorType(i32, [t, k], dev), TensorType(i32, [e], dev),
            TensorType(f32, [e], dev), TensorType(f32, [2], dev)]
    return mops.custom_op("pymoe_ablation_moe_gate", [xv, rv, _params(int(cfg.renormalize))], outs, {"simd": simd})


# ------------------------------------------------------------------ the ops


def _softmax_cases(logits: np.ndarray) -> list[Case]:
    from max.dtype import DType
    from max.graph import TensorType

    from .. import ops as mops

    f32 = DType.float32
    t, e = logits.shape
    types = _types((f32, ["t", e]))
    ref = R.softmax(logits)

    def same(x):
        return [TensorType(f32, x.shape, x.device)]

    forwards = {
        "scalar": lambda x: mops.custom_op("pymoe_ablation_softmax_scalar", [x], same(x)),
        "simd": lambda x: [mops.softmax(x)],
        "specialized": lambda x: mops.custom_op("pymoe_ablation_softmax_fixed", [x], same(x), {"cols": e}),
    }
    notes = {"simd": "pymoe_softmax (production; row length at run time)",
             "specialized": "row length E fixed at compile time: one SIMD value per row"}
    return [
        Case("softmax", rung, t, (lambda f=f, r=rung: _graph(f"ablation_softmax_{r}", types, f)), [logits],
             lambda outs: R.relative_error(outs[0], ref), 1e-5, nbytes=2 * logits.nbytes, note=notes.get(rung, ""))
        for rung, f in forwards.items()
    ]


def _relu_cases(h: np.ndarray) -> list[Case]:
    from max.dtype import DType
    from max.graph import TensorType

    from .. import ops as mops

    f32 = DType.float32
    types = _types((f32, ["r", h.shape[1]]))
    ref = R.relu(h)

    def runtime(simd: bool):
        return lambda x: mops.custom_op("pymoe_ablation_activation", [x, _params(ACT_CODES["relu"])],
                                        [TensorType(f32, x.shape, x.device)], {"simd": simd})

    forwards = {"scalar": runtime(False), "simd": runtime(True), "specialized": lambda x: [mops.relu(x)]}
    return [
        Case("relu", rung, h.shape[0], (lambda f=f, r=rung: _graph(f"ablation_relu_{r}", types, f)), [h],
             lambda outs: R.relative_error(outs[0], ref), 0.0, nbytes=2 * h.nbytes,
             note="pymoe_relu (production)" if rung == "specialized" else "")
        for rung, f in forwards.items()
    ]


def _gate_cases(x: np.ndarray, router: np.ndarray, cfg: MoEConfig) -> list[Case]:
    from max.dtype import DType

    from .. import ops as mops

    f32 = DType.float32
    d, e, k = cfg.d_model, cfg.num_experts, cfg.top_k
    types = _types((f32, ["t", d]), (f32, [d, e]))
    ref = R.moe_gate(x, router, k, cfg.renormalize)

    def runtime(simd: bool):
        return lambda xv, rv: _runtime_gate(xv, rv, cfg, simd)

    def production(xv, rv):
        return list(mops.moe_gate(xv, rv, top_k=k, renormalize=cfg.renormalize))

    def check(outs) -> float:
        if not np.array_equal(outs[1], ref.topk_ids) or not np.array_equal(outs[2], ref.expert_counts):
            return float("inf")  # a different routing is wrong, however small the weight error
        return max(R.relative_error(outs[0], ref.topk_weights), R.relative_error(outs[3], ref.router_prob_mean))

    forwards = {"scalar": runtime(False), "simd": runtime(True), "specialized": production}
    flops = 2 * x.shape[0] * d * e
    return [
        Case("gate", rung, x.shape[0], (lambda f=f, r=rung: _graph(f"ablation_gate_{r}", types, f)),
             [x, router], check, 1e-5, flops=flops,
             note="pymoe_moe_gate (production; top_k, renormalize compile-time)" if rung == "specialized" else "")
        for rung, f in forwards.items()
    ]


def _matmul_cases(x: np.ndarray, w: MoEWeights, cfg: MoEConfig) -> list[Case]:
    from max.dtype import DType
    from max.graph import TensorType

    from .. import ops as mops
    from ..runtime import layer_weight_buffers

    f32, i32 = DType.float32, DType.int32
    d, e, t = cfg.d_model, cfg.num_experts, x.shape[0]
    act = "relu" if cfg.activation == "relu" else "swiglu"
    gate = R.moe_gate(x, w.router, cfg.top_k, cfg.renormalize)
    disp = R.moe_dispatch(gate.topk_ids, e, cfg.capacity_factor)
    ids, offs = disp.sorted_token_ids.astype(np.int32), disp.expert_offsets.astype(np.int32)
    ref = R.moe_expert_matmul(x, ids, offs, w.w1, activation=act, gather=True)
    types = _types((f32, ["t", d]), (i32, ["m"]), (i32, [e + 1]), (f32, [e, d, cfg.expert_n]))

    def runtime(simd: bool):
        def forward(xv, iv, ov, wv):
            out = TensorType(f32, [iv.shape[0], cfg.d_ff], xv.device)
            return mops.custom_op("pymoe_ablation_moe_expert_matmul", [xv, iv, ov, wv, _params(ACT_CODES[act], 1)],
                                  [out], {"simd": simd})
        return forward

    def production(packed: bool):
        def forward(xv, iv, ov, wv):
            return [mops.moe_expert_matmul(xv, iv, ov, wv, activation=act, gather=True, packed=packed)]
        return forward

    forwards = {"scalar": runtime(False), "simd": runtime(True), "specialized": production(False),
                "prepacked": production(True)}
    packed_w1 = layer_weight_buffers(cfg, w, "cpu", "float32", packed=True)[1]
    flops = 2 * int(offs[-1]) * d * cfg.expert_n
    notes = {"specialized": "pymoe_moe_expert_matmul (production): + MRxNR register tile, packing, cache blocks",
             "prepacked": "the same op on weights from pack_expert_weights (as MoELayer on the CPU)"}
    return [
        Case("expert matmul", rung, t, (lambda f=f, r=rung: _graph(f"ablation_matmul_{r}", types, f)),
             [x, ids, offs, packed_w1 if rung == "prepacked" else w.w1], lambda outs: R.relative_error(outs[0], ref),
             1e-5, flops=flops, note=notes.get(rung, ""))
        for rung, f in forwards.items()
    ]


def _layer_cases(x: np.ndarray, w: MoEWeights, cfg: MoEConfig) -> list[Case]:
    from max.dtype import DType
    from max.graph import TensorType

    from .. import ops as mops
    from ..runtime import BufferPool, compile_moe_graph, driver_device, layer_weight_buffers

    f32 = DType.float32
    d, e, k, t = cfg.d_model, cfg.num_experts, cfg.top_k, x.shape[0]
    act = "relu" if cfg.activation == "relu" else "swiglu"
    ref = R.moe_layer(x, w, cfg).out
    types = _types((f32, ["tokens", d]), (f32, [d, e]), (f32, [e, d, cfg.expert_n]), (f32, [e, cfg.d_ff, d]))

    def runtime(simd: bool):
        def forward(xv, rv, w1v, w2v):
            weights, ids = _runtime_gate(xv, rv, cfg, simd)[:2]
            disp = mops.moe_dispatch(ids, num_experts=e, capacity_factor=cfg.capacity_factor)
            slots = disp.sorted_token_ids.shape[0]
            h = mops.custom_op("pymoe_ablation_moe_expert_matmul",
                               [xv, disp.sorted_token_ids, disp.expert_offsets, w1v, _params(ACT_CODES[act], 1)],
                               [TensorType(f32, [slots, cfg.d_ff], xv.device)], {"simd": simd})[0]
            y = mops.custom_op("pymoe_ablation_moe_expert_matmul",
                               [h, disp.sorted_token_ids, disp.expert_offsets, w2v, _params(ACT_CODES["none"], 0)],
                               [TensorType(f32, [slots, d], xv.device)], {"simd": simd})[0]
            return [mops.moe_combine(y, weights, disp.slot_to_row)]
        return forward

    inputs = [x, w.router, w.w1, w.w2]
    flops = cfg.active_flops(t) + 2 * t * d * e
    check = lambda outs: R.relative_error(outs[0], ref)  # noqa: E731
    intermediates = f"graph allocates h and y ({t * k * (cfg.d_ff + d) * 4 / 2**20:.0f} MiB) on every call"
    cases = [
        Case("layer", rung, t, (lambda r=rung: _graph(f"ablation_layer_{r}", types, runtime(r == "simd"))),
             inputs, check, 1e-5, flops=flops, note=intermediates)
        for rung in ("scalar", "simd")
    ]
    cases.append(Case("layer", "specialized", t, lambda: compile_moe_graph(cfg, "cpu", "float32", False, packed=False),
                      inputs, check, 1e-5, flops=flops,
                      note="production ops, weights as given (packed per call); " + intermediates))
    packed = [x, *layer_weight_buffers(cfg, w, "cpu", "float32", packed=True)]
    cases.append(Case("layer", "prepacked", t, lambda: compile_moe_graph(cfg, "cpu", "float32", False), packed,
                      check, 1e-5, flops=flops, note="MoELayer(pooled=False); " + intermediates))
    pool = BufferPool((cfg.expert_n, d), "float32", driver_device("cpu"))
    cases.append(Case("layer", "pooled", t, lambda: compile_moe_graph(cfg, "cpu", "float32", True), packed,
                      check, 1e-5, flops=flops, pool=pool, pool_rows=t * k,
                      note="MoELayer(pooled=True): h and y live in a BufferPool"))
    return cases


# ---------------------------------------------------------------- the runs


def _run_case(case: Case, ceilings: dict, min_seconds: float) -> dict:
    from max.driver import Buffer

    row = {"op": case.op, "rung": case.rung, "tokens": case.tokens, "note": case.note, "status": "ok"}
    start = time.perf_counter()
    model = case.build()
    row["compile_s"] = time.perf_counter() - start
    bufs = [Buffer.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a for a in case.inputs]

    def call():
        # As MoELayer.run does: ask the pool for buffers on every call.
        return model.execute(*bufs, *(case.pool.buffers(case.pool_rows) if case.pool else []))

    err = case.check([o.to_numpy() for o in call()])
    row.update(check_rel_err=err, check_tol=case.tol)
    if not err <= case.tol:
        row.update(status="wrong", error=f"error {err:.3g} against the float64 reference")
        return row
    pool = case.pool
    allocs_before = pool.allocations if pool else None
    times = measure(call, min_seconds=min_seconds)
    row.update(summarize(times))
    if pool is not None:
        row["pool_allocations_per_call"] = (pool.allocations - allocs_before) / (len(times) + 1)
        row["pool_bytes"] = pool.nbytes
    if case.op == "layer":
        row["peak_rss_delta_mib"] = peak_rss_during(call)
    t = row["median_s"]
    if case.flops:
        row.update(gflops=case.flops / t / 1e9, pct_peak=100 * case.flops / t / 1e9 / ceilings["matmul"]["gflops"])
    if case.nbytes:
        row.update(gbps=case.nbytes / t / 1e9, pct_bw=100 * case.nbytes / t / 1e9 / ceilings["copy"]["gbps"])
    return row


def add_speedups(rows: list[dict]) -> None:
    """Speedup of each rung over the op's scalar rung and over the rung before it."""
    for op in dict.fromkeys(r["op"] for r in rows):
        prev = None
        base = next((r for r in rows if r["op"] == op and r["rung"] == "scalar" and r["status"] == "ok"), None)
        for r in (r for r in rows if r["op"] == op):
            if r["status"] != "ok":
                prev = None
                continue
            if base:
                r["speedup_vs_scalar"] = base["median_s"] / r["median_s"]
            if prev:
                r["step_gain"] = prev["median_s"] / r["median_s"]
            prev = r


def ablation_cases(cfg: MoEConfig, tokens: int, matmul_tokens: int, seed: int = 0) -> list[Case]:
    """Every (op, rung) case of the ablation for one layer shape: softmax (of
    the router logits), relu and gate on `tokens` tokens, the expert matmul
    (w1, gathered, fused activation) and the layer on `matmul_tokens`."""
    rng = np.random.default_rng(seed)
    w = MoEWeights.random(cfg, seed=seed + 1)
    x = rng.standard_normal((tokens, cfg.d_model), dtype=np.float32)
    logits = (x @ w.router).astype(np.float32)
    xm = x[:matmul_tokens]
    h = rng.standard_normal((tokens, cfg.d_model), dtype=np.float32)
    return [
        *_softmax_cases(logits),
        *_relu_cases(h),
        *_gate_cases(x, w.router, cfg),
        *_matmul_cases(xm, w, cfg),
        *_layer_cases(xm, w, cfg),
    ]


def routing_cases(cfg: MoEConfig, t: int, seed: int = 0) -> list[Case]:
    """Production gate, dispatch, combine and the whole (pooled) layer on `t`
    tokens: what routing costs next to the experts' work."""
    from max.dtype import DType

    from .. import ops as mops
    from ..runtime import BufferPool, compile_moe_graph, driver_device, layer_weight_buffers

    f32, i32 = DType.float32, DType.int32
    d, e, k = cfg.d_model, cfg.num_experts, cfg.top_k
    rng = np.random.default_rng(seed)
    w = MoEWeights.random(cfg, seed=seed + 1)
    x = rng.standard_normal((t, d), dtype=np.float32)
    gate = R.moe_gate(x, w.router, k, cfg.renormalize)
    disp = R.moe_dispatch(gate.topk_ids, e, cfg.capacity_factor)
    y = rng.standard_normal((t * k, d), dtype=np.float32)
    tw = gate.topk_weights.astype(np.float32)
    ids = gate.topk_ids.astype(np.int32)
    s2r = disp.slot_to_row.astype(np.int32)
    pool = BufferPool((cfg.expert_n, d), "float32", driver_device("cpu"))

    def gate_check(outs):
        return R.relative_error(outs[0], gate.topk_weights) if np.array_equal(outs[1], gate.topk_ids) else float("inf")

    def dispatch_check(outs):
        same = all(np.array_equal(o, r) for o, r in zip(outs, (disp.sorted_token_ids, disp.expert_offsets, s2r)))
        return 0.0 if same else float("inf")

    combine_ref = R.moe_combine(y, tw, s2r)
    layer_ref = R.moe_layer(x[:256], w, cfg).out
    cases = [
        Case("gate", "routing", t, lambda: _graph("routing_gate", _types((f32, ["t", d]), (f32, [d, e])),
                                                  lambda xv, rv: list(mops.moe_gate(xv, rv, top_k=k,
                                                                                    renormalize=cfg.renormalize))),
             [x, w.router], gate_check, 1e-5, flops=2 * t * d * e),
        Case("dispatch", "routing", t, lambda: _graph("routing_dispatch", _types((i32, ["t", k])),
                                                      lambda iv: list(mops.moe_dispatch(
                                                          iv, num_experts=e, capacity_factor=cfg.capacity_factor))),
             [ids], dispatch_check, 0.0),
        Case("combine", "routing", t, lambda: _graph("routing_combine",
                                                     _types((f32, ["m", d]), (f32, ["t", k]), (i32, ["m"])),
                                                     lambda yv, wv, sv: [mops.moe_combine(yv, wv, sv)]),
             [y, tw, s2r], lambda outs: R.relative_error(outs[0], combine_ref), 1e-5, nbytes=y.nbytes + t * d * 4),
    ]
    layer = Case("layer", "routing", t, lambda: compile_moe_graph(cfg, "cpu", "float32", True),
                 [x, *layer_weight_buffers(cfg, w, "cpu", "float32", packed=True)],
                 lambda outs: R.relative_error(outs[0][:256], layer_ref), 1e-5,
                 flops=cfg.active_flops(t) + 2 * t * d * e, pool=pool, pool_rows=t * k,
                 note="the production layer (pooled); checked on its first 256 tokens")
    return [*cases, layer]


def routing_summary(rows: list[dict]) -> dict | None:
    by_op = {r["op"]: r for r in rows if r["status"] == "ok"}
    if not {"gate", "dispatch", "combine", "layer"} <= by_op.keys():
        return None
    routing = sum(by_op[o]["median_s"] for o in ("gate", "dispatch", "combine"))
    return {"routing_s": routing, "layer_s": by_op["layer"]["median_s"],
            "routing_pct_of_layer": 100 * routing / by_op["layer"]["median_s"]}


def run_cases(cases: list[Case], ceilings: dict, min_seconds: float,
              progress: Callable[[str], None] | None = None) -> list[dict]:
    rows = []
    for case in cases:
        if progress:
            progress(f"{case.op}: {case.rung} ({case.tokens} tokens)")
        try:
            rows.append(_run_case(case, ceilings, min_seconds))
        except Exception as exc:  # recorded: a rung that fails to build or run is a result
            rows.append({"op": case.op, "rung": case.rung, "tokens": case.tokens, "status": "failed",
                         "error": error_summary(exc)})
    add_speedups(rows)
    return rows


