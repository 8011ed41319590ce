"""Graph-building API: functions that add pymoe's Mojo custom ops to a MAX graph.

Use them inside a `max.graph.Graph` next to `max.graph.ops`:

    from max.graph import Graph, TensorType, DeviceRef
    from max.dtype import DType
    import pymoe.ops as mops

    with Graph("mine", input_types=[...], custom_extensions=[mops.KERNELS_DIR]) as g:
        x, router, w1, w2 = g.inputs
        out = mops.moe_layer(x, mops.MoEGraphWeights(router, w1, w2), config).out
        g.output(out)

Every function checks shapes and dtypes in Python, so a mismatch raises a
ValueError/TypeError while the graph is being built, never inside a kernel.
Weight layouts are documented in `pymoe/weights.py` (on the CPU, MoELayer
keeps the expert weights pre-packed: see pack_expert_weights). Each op here has a Mojo
kernel of the same name in `kernels/` and a float64 reference of the same
name in `pymoe/reference.py`.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
from max.dtype import DType
from max.graph import BufferValue, Dim, Graph, StaticDim, TensorType, TensorValue, ops

from .config import ACTIVATIONS, GATED_ACTIVATIONS, MoEConfig
from .dtypes import dtype_name, itemsize


def find_kernels_dir(name: str = "kernels") -> Path:
    """The directory of pymoe's Mojo package `name` ("kernels": the production
    ops; "ablation_kernels": the benchmark-only rungs of `pymoe bench --ablation`).

    Installed, the Mojo sources ship inside the package as pymoe/<name>; in a
    source checkout they live at the repository root in <name>/.
    """
    here = Path(__file__).resolve().parent
    for candidate in (here / name, here.parent / name):
        if (candidate / "__init__.mojo").is_file():
            return candidate
    raise FileNotFoundError(
        f"pymoe's Mojo package {name} was not found in {here / name} or {here.parent / name}; "
        f"reinstall pymoe (pip install .) so that {name}/*.mojo are included"
    )


KERNELS_DIR: Path = find_kernels_dir()

FLOAT_DTYPES = (DType.float32, DType.bfloat16)


def check_kernels_dir(path: Path) -> Path:
    """Return `path` if it is a Mojo package of custom ops, else raise a clear error."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"kernels path {path} does not exist or is not a directory")
    if not (path / "__init__.mojo").is_file():
        raise FileNotFoundError(f"kernels path {path} is not a Mojo package (no __init__.mojo)")
    return path


# Whether a set of loaded kernel packages (their paths) holds pymoe's ops. MAX's
# `name in KernelLibrary` lists the symbols of every loaded package, over a second the first
# time each new graph asks on a 2-core CPU: asked for every graph, it was most of staging one
# (1.3-1.8 s against 6-75 ms for the presets' layer graphs and 8-layer stacks when asked once
# per set of packages: results/checks/20261208T031624Z-graph-staging-AMD-EPYC.json).
_HOLDS_PYMOE_OPS: dict[frozenset[str], bool] = {}


def _ensure_kernels_loaded() -> None:
    # Users may forget custom_extensions=[KERNELS_DIR]; load our package into
    # the graph being built so that the ops resolve either way.
    graph = Graph.current
    library = graph._kernel_library
    paths = frozenset(str(p) for p in library.library_paths())
    if paths not in _HOLDS_PYMOE_OPS:
        _HOLDS_PYMOE_OPS[paths] = "pymoe_moe_gate" in library
    if not _HOLDS_PYMOE_OPS[paths]:
        graph._import_kernels([KERNELS_DIR])


def custom_op(name: str, values: list, out_types: list, parameters: dict | None = None) -> list[TensorValue]:
    """Add the Mojo custom op `name` to the current graph, on the device of values[0];
    returns its outputs, one per entry of `out_types`.

    The typed functions below are the API; this is what they share, public for graphs
    that call kernels they do not wrap (the ablation rungs of pymoe/bench/ablation.py).
    pymoe's own kernel package is loaded into the graph if it was not already; another
    package must be in the Graph's custom_extensions. Nothing here checks shapes: the
    caller does, as the typed functions do.
    """
    _ensure_kernels_loaded()
    outs = ops.custom(name, device=values[0].device, values=values, out_types=out_types, parameters=parameters)
    return [o.tensor for o in outs]


def _float(name: str, v: TensorValue, rank: int | None = None) -> None:
    if v.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or bfloat16, got {v.dtype}")
    if rank is not None and v.rank != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {v.shape}")


def _same_dim(what: str, a: Dim, b: Dim) -> None:
    if a != b:
        raise ValueError(f"{what}: {a} != {b}")


# ----------------------------------------------------------------- activations


def softmax(x: TensorValue) -> TensorValue:
    """Row-wise numerically stable softmax over the last axis of a 2-D tensor."""
    _float("softmax input", x, rank=2)
    return custom_op("pymoe_softmax", [x], [TensorType(x.dtype, x.shape, x.device)])[0]


def relu(x: TensorValue) -> TensorValue:
    _float("relu input", x)
    return custom_op("pymoe_relu", [x], [TensorType(x.dtype, x.shape, x.device)])[0]


def silu(x: TensorValue) -> TensorValue:
    _float("silu input", x)
    return custom_op("pymoe_silu", [x], [TensorType(x.dtype, x.shape, x.device)])[0]


def swiglu(gate: TensorValue, up: TensorValue) -> TensorValue:
    """silu(gate) * up, element-wise."""
    _float("swiglu gate", gate)
    if up.dtype != gate.dtype or up.shape != gate.shape:
        raise ValueError(f"swiglu: up {up.dtype}{up.shape} must match gate {gate.dtype}{gate.shape}")
    return custom_op("pymoe_swiglu", [gate, up], [TensorType(gate.dtype, gate.shape, gate.device)])[0]


# ----------------------------------------------------------------------- gate


class GateOutput(NamedTuple):
    topk_weights: TensorValue  # [T, k] float32
    topk_ids: TensorValue  # [T, k] int32
    expert_counts: TensorValue  # [E] int32
    router_prob_mean: TensorValue  # [E] float32
    losses: TensorValue  # [2] float32: Switch aux loss, router z-loss


# The GPU kernel of every router but the default softmax one keeps a token's logits in
# registers: at most this many experts (GPU_ROUTED_MAX_EXPERTS in kernels/moe_gate.mojo).
GATE_GPU_ROUTED_MAX_EXPERTS = 512

# kernels/moe_gate.mojo's router GEMV (decode batches of the GPU router logits op): the same
# constants as there (a test compares them); router_gemv_scratch_floats mirrors its
# router_gemv_scratch_floats.
ROUTER_GEMV_MAX_TOKENS = 8
ROUTER_GEMV_BLOCK_BYTES = 16384
ROUTER_GEMV_MIN_SPLITS = 32
ROUTER_GEMV_MAX_SPLITS = 512


def router_logits(x: TensorValue, router_w: TensorValue) -> TensorValue:
    """x [T, d_model] @ router_w [d_model, E] in float32 on the GPU (16-bit inputs, static
    d_model and E multiples of 8): the router logits op, its second output the router GEMV's
    scratch (its partial rows at decode), an output so that MAX's graph plans its memory
    instead of the op allocating per call."""
    return _router_logits_op(x, router_w, partials_to_gate=False)[0]


def _router_logits_op(x: TensorValue, router_w: TensorValue, *, partials_to_gate: bool) -> list[TensorValue]:
    """The router logits op's two outputs, (logits, the GEMV's partial rows). With
    `partials_to_gate` a decode batch small enough for the gate to add the partial rows
    itself (kernels/moe_gate.mojo, router_partials_to_gate) leaves the logits unwritten:
    only moe_gate, which hands both outputs to the gate op, asks for that."""
    d_model, experts = int(x.shape[1]), int(router_w.shape[1])
    scratch = router_gemv_scratch_floats(d_model, experts, itemsize(dtype_name(x.dtype)))
    return custom_op("pymoe_router_logits", [x, router_w],
                     [TensorType(DType.float32, [x.shape[0], experts], x.device),
                      TensorType(DType.float32, [scratch], x.device)],
                     parameters={"partials_to_gate": partials_to_gate})


def router_gemv_scratch_floats(d_model: int, experts: int, itemsize: int) -> int:
    """The float32 scratch of the GPU router logits op for a router [d_model, experts] of
    `itemsize`-byte elements: a partial row per block of router rows and token, for up to
    ROUTER_GEMV_MAX_TOKENS tokens."""
    rows = min(ROUTER_GEMV_BLOCK_BYTES // 16, max(1, ROUTER_GEMV_BLOCK_BYTES // (experts * itemsize)))
    rows = min(rows, max(1, -(-d_model // ROUTER_GEMV_MIN_SPLITS)))
    if -(-d_model // rows) > ROUTER_GEMV_MAX_SPLITS:
        rows = -(-d_model // ROUTER_GEMV_MAX_SPLITS)
    return -(-d_model // rows) * ROUTER_GEMV_MAX_TOKENS * experts


def gate_routed_slots(experts: int) -> int:
    """Register slots per lane of that kernel for E experts: the fewest (a power of two)
    that hold E logits, 32 per slot. Fewer slots are less work in each of its top-k rounds."""
    slots = 1
    while slots * 32 < experts:
        slots *= 2
    return slots


def _gate_bias(name: str, bias: TensorValue | None, experts: int, x: TensorValue) -> TensorValue:
    """The bias input of the gate kernel: `bias` after its checks, or for None a float32
    [1] zero placeholder that the kernel, compiled without the bias, never reads."""
    if bias is None:
        return ops.constant(np.zeros(1, dtype=np.float32), DType.float32, device=x.device)
    if not isinstance(bias, TensorValue):
        raise TypeError(f"{name} must be None or a TensorValue, got {type(bias).__name__}")
    if bias.dtype != DType.float32:
        raise TypeError(f"{name} must be float32, got {bias.dtype}")
    if bias.rank != 1 or bias.shape[0] != Dim(experts):
        raise ValueError(f"{name} must have shape [num_experts={experts}], got {list(bias.shape)}")
    if bias.device != x.device:
        raise ValueError(f"{name} is on {bias.device}, x on {x.device}")
    return bias


def moe_gate(
    x: TensorValue,
    router_w: TensorValue,
    *,
    top_k: int,
    renormalize: bool = True,
    scoring: str = "softmax",
    router_bias: TensorValue | None = None,
    selection_bias: TensorValue | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    routed_scaling_factor: float = 1.0,
) -> GateOutput:
    """Router: x @ router_w (+ router_bias), fused, in float32 -> scores -> top-k.

    Every router of pymoe.routing.route (its five steps): `scoring` "softmax" over the
    experts or "sigmoid" per expert; `router_bias` (float32 [E], GPT-OSS) is added to the
    logits; `selection_bias` (float32 [E], DeepSeek-V3) is added to the scores for choosing
    only; with n_group > 1 the experts are chosen among the topk_group groups whose two
    best selection scores sum highest; the weights are the chosen scores, divided by their
    sum when `renormalize`, times `routed_scaling_factor`. Ties go to the lower expert
    (and group) index. router_prob_mean is the mean of the scores normalized over the
    experts; the z-loss takes the logits with the router bias. See
    kernels/moe_gate.mojo for the outputs. Every rule is a compile-time parameter of the
    kernel; the default router runs the code it ran before the others existed.
    """
    _float("x", x, rank=2)
    _float("router weights", router_w, rank=2)
    if router_w.dtype != x.dtype:
        raise TypeError(f"router weights dtype {router_w.dtype} must match x dtype {x.dtype}")
    _same_dim("router weights rows must equal x columns (d_model)", router_w.shape[0], x.shape[1])
    experts = router_w.shape[1]
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= int(experts):
        raise ValueError(f"top_k must be an int in [1, num_experts={int(experts)}], got {top_k!r}")
    experts = int(experts)
    # MoEConfig holds the rules of the router arguments (scoring, groups, scaling).
    MoEConfig(d_model=1, d_ff=1, num_experts=experts, top_k=top_k, renormalize=renormalize, scoring=scoring,
              n_group=n_group, topk_group=topk_group, routed_scaling_factor=routed_scaling_factor)
    routed = scoring != "softmax" or selection_bias is not None or n_group > 1
    if routed and not x.device.is_cpu() and experts > GATE_GPU_ROUTED_MAX_EXPERTS:
        raise ValueError(f"on the GPU, {scoring} routers with a selection bias or groups take at most "
                         f"{GATE_GPU_ROUTED_MAX_EXPERTS} experts, got {experts}")
    biases = [_gate_bias("router_bias", router_bias, experts, x),
              _gate_bias("selection_bias", selection_bias, experts, x)]
    t, dev = x.shape[0], x.device
    # On the GPU with 16-bit inputs the logits are a tensor-core GEMM of their own
    # (pymoe_router_logits) and the gate kernel only selects; elsewhere the gate
    # computes them itself and gets a placeholder.
    # A symbolic d_model (one graph for many widths, as the GPU tests build) cannot be
    # checked for the GEMM's multiples of 8 here, so the gate computes those logits itself.
    d_model = x.shape[1]
    logits_given = (not dev.is_cpu() and experts <= GATE_GPU_ROUTED_MAX_EXPERTS and isinstance(d_model, StaticDim)
                    and tensor_core_gemm_takes(dtype_name(x.dtype), int(d_model), experts))
    if logits_given:
        # A small decode batch skips the logits op's sum kernel: the gate adds its partial rows.
        logits, partials = _router_logits_op(x, router_w, partials_to_gate=True)
    else:
        logits = ops.constant(np.zeros((1, 1), dtype=np.float32), DType.float32, device=dev)
        partials = ops.constant(np.zeros(1, dtype=np.float32), DType.float32, device=dev)
    outs = custom_op(
        "pymoe_moe_gate",
        [x, router_w, *biases, logits, partials],
        [
            TensorType(DType.float32, [t, top_k], dev),
            TensorType(DType.int32, [t, top_k], dev),
            TensorType(DType.int32, [experts], dev),
            TensorType(DType.float32, [experts], dev),
            TensorType(DType.float32, [2], dev),
        ],
        parameters={
            "top_k": top_k, "renormalize": bool(renormalize), "scoring": scoring,
            "has_router_bias": router_bias is not None, "has_selection_bias": selection_bias is not None,
            "n_group": n_group, "topk_group": topk_group, "scaling": float(routed_scaling_factor),
            "logits_given": logits_given,
            # The CPU never reads it: one value there, so its compiled kernel is shared.
            "routed_slots": 1 if dev.is_cpu() else gate_routed_slots(experts),
        },
    )
    return GateOutput(*outs)


# ------------------------------------------------------------------- dispatch


# kernels/moe_dispatch.mojo's MAX_EXPERTS: its GPU passes keep a count per expert in
# shared memory. The same limit as the routed gate's and the grouped GEMM's.
DISPATCH_GPU_MAX_EXPERTS = 512


class DispatchOutput(NamedTuple):
    sorted_token_ids: TensorValue  # [T*k] int32
    expert_offsets: TensorValue  # [E+1] int32
    slot_to_row: TensorValue  # [T*k] int32, -1 where dropped


def moe_dispatch(
    topk_ids: TensorValue, *, num_experts: int, capacity_factor: float | None = None
) -> DispatchOutput:
    """Group the (token, choice) slots by expert; see kernels/moe_dispatch.mojo."""
    if topk_ids.dtype != DType.int32 or topk_ids.rank != 2:
        raise TypeError(f"topk_ids must be a rank-2 int32 tensor, got {topk_ids.dtype}{topk_ids.shape}")
    if not topk_ids.device.is_cpu() and num_experts > DISPATCH_GPU_MAX_EXPERTS:
        raise ValueError(f"on the GPU the dispatch takes at most {DISPATCH_GPU_MAX_EXPERTS} experts "
                         f"(a count per expert in shared memory), got {num_experts}")
    permille = MoEConfig(
        d_model=1, d_ff=1, num_experts=num_experts, top_k=1, capacity_factor=capacity_factor
    ).capacity_factor_permille
    slots = topk_ids.shape[0] * topk_ids.shape[1]
    dev = topk_ids.device
    outs = custom_op(
        "pymoe_moe_dispatch",
        [topk_ids],
        [
            TensorType(DType.int32, [slots], dev),
            TensorType(DType.int32, [num_experts + 1], dev),
            TensorType(DType.int32, [slots], dev),
        ],
        parameters={"capacity_factor_permille": permille},
    )
    return DispatchOutput(*outs)


# --------------------------------------------------------------- expert matmul

# What moe_expert_matmul may fuse after its GEMM: a model's ACTIVATIONS (pymoe/config.py)
# plus "none" (the w2 GEMM) and "silu" (a building block, tested on its own).
EXPERT_ACTIVATIONS = ("none", "relu", "silu", "swiglu", "clamped_swiglu")
# clamped_swiglu's constants when the caller gives none (GPT-OSS's; MoEConfig's defaults).
DEFAULT_SWIGLU_ALPHA = MoEConfig.swiglu_alpha
DEFAULT_SWIGLU_LIMIT = MoEConfig.swiglu_limit


def _epilogue_parameters(activation: str, swiglu_alpha: float, swiglu_limit: float) -> dict:
    """The clamped_swiglu constants as kernel parameters, after MoEConfig's checks (finite,
    > 0). Other activations do not read them: they get the defaults, so that a caller's
    values do not compile another copy of the same kernel."""
    MoEConfig(d_model=1, d_ff=1, swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit)
    if activation != "clamped_swiglu":
        swiglu_alpha, swiglu_limit = DEFAULT_SWIGLU_ALPHA, DEFAULT_SWIGLU_LIMIT
    return {"swiglu_alpha": float(swiglu_alpha), "swiglu_limit": float(swiglu_limit)}


def _expert_bias(name: str, bias: TensorValue | None, x: TensorValue, experts: Dim, cols: Dim) -> TensorValue:
    """`bias` checked to be [experts, cols] of x's dtype on x's device, or, for None, the
    placeholder the kernels take in its place: a [1, 1] zero they never read (their
    has_bias parameter is False then, so the default path does no extra work)."""
    if bias is None:
        return ops.constant([[0.0]], x.dtype, x.device)
    if not isinstance(bias, TensorValue):
        raise TypeError(f"{name} must be None or a TensorValue, got {type(bias).__name__}")
    if bias.dtype != x.dtype:
        raise TypeError(f"{name} dtype {bias.dtype} must match x dtype {x.dtype}")
    if bias.rank != 2 or bias.shape[0] != experts or bias.shape[1] != cols:
        raise ValueError(f"{name} must have shape [{experts}, {cols}] (experts, weight columns), "
                         f"got {list(bias.shape)}")
    if bias.device != x.device:
        raise ValueError(f"{name} is on {bias.device}, x on {x.device}: they must be on the same device")
    return bias


def pack_expert_weights(w: TensorValue, *, swiglu: bool = False) -> TensorValue:
    """Expert weights [E, K, N] in the CPU kernels' pre-packed layout.

    The result has w's shape and dtype; its contents are the column panels
    that the CPU expert matmul reads (layout in kernels/cpu_pack.mojo), so that
    each expert is one sequential stream and no call packs again. Pass it
    with packed=True to moe_expert_matmul / moe_ffn (MoEGraphWeights.packed).
    The layout depends on the CPU's SIMD width: pack on the machine that runs
    the layer. `swiglu` packs w1 = [W_gate | W_up] for the SwiGLU activation
    (gate and up columns side by side); every other weight packs with False.
    CPU only: the GPU kernels read [E, K, N] as it is.
    """
    _float("expert weights", w, rank=3)
    _cpu_only("pack_expert_weights", w)
    if swiglu and isinstance(w.shape[2], StaticDim) and int(w.shape[2]) % 2:
        raise ValueError(f"swiglu expert weights need an even number of columns, got {w.shape[2]}")
    return custom_op(
        "pymoe_pack_expert_weights", [w], [TensorType(w.dtype, w.shape, w.device)],
        parameters={"swiglu": bool(swiglu)},
    )[0]


def _cpu_only(what: str, v: TensorValue) -> None:
    if not v.device.is_cpu():
        raise ValueError(f"{what}: packed expert weights are a CPU layout; on the GPU pass the weights as they are")


def moe_expert_matmul(
    x: TensorValue,
    row_ids: TensorValue,
    expert_offsets: TensorValue,
    w: TensorValue,
    *,
    activation: str = "none",
    gather: bool = False,
    packed: bool = False,
    bias: TensorValue | None = None,
    swiglu_alpha: float = DEFAULT_SWIGLU_ALPHA,
    swiglu_limit: float = DEFAULT_SWIGLU_LIMIT,
) -> TensorValue:
    """Grouped GEMM over ragged expert groups: out[r] = act(a_r @ w[e(r)] + bias[e(r)]).

    a_r = x[row_ids[r]] when `gather` (x in token order), else x[r] (x already
    in the expert-grouped layout). The output has one row per entry of row_ids.
    `activation`: one of EXPERT_ACTIVATIONS; the gated ones ("swiglu",
    "clamped_swiglu") read w = [W_gate | W_up] and return half its columns;
    "clamped_swiglu" is GPT-OSS's (u + 1) * g * sigmoid(swiglu_alpha * g) with
    g = min(gate, swiglu_limit), u = clamp(up, -swiglu_limit, swiglu_limit).
    `bias`: None or [E, N] of x's dtype (N = w's columns), added before the
    activation. `packed`: w came from pack_expert_weights (CPU only; with
    swiglu=True for the gated activations).
    """
    if activation not in EXPERT_ACTIVATIONS:
        raise ValueError(f"activation must be one of {EXPERT_ACTIVATIONS}, got {activation!r}")
    parameters = _epilogue_parameters(activation, swiglu_alpha, swiglu_limit)
    if packed:
        _cpu_only("moe_expert_matmul", x)
    _float("x", x, rank=2)
    _float("expert weights", w, rank=3)
    if w.dtype != x.dtype:
        raise TypeError(f"expert weights dtype {w.dtype} must match x dtype {x.dtype}")
    for name, v in (("row_ids", row_ids), ("expert_offsets", expert_offsets)):
        if v.dtype != DType.int32 or v.rank != 1:
            raise TypeError(f"{name} must be a rank-1 int32 tensor, got {v.dtype}{v.shape}")
    _same_dim("expert weights K must equal x columns", w.shape[1], x.shape[1])
    _same_dim("expert_offsets must have num_experts + 1 entries", expert_offsets.shape[0], w.shape[0] + 1)
    n = w.shape[2]
    bias_value = _expert_bias("bias", bias, x, w.shape[0], n)
    if activation in GATED_ACTIVATIONS:
        if int(n) % 2:
            raise ValueError(f"{activation} expert weights need an even number of columns, got {n}")
        n = Dim(int(n) // 2)
    return custom_op(
        "pymoe_moe_expert_matmul",
        [x, row_ids, expert_offsets, w, bias_value],
        [TensorType(x.dtype, [row_ids.shape[0], n], x.device)],
        parameters={"activation": activation, "gather": bool(gather), "packed": bool(packed),
                    "has_bias": bias is not None, **parameters},
    )[0]


# ---------------------------------------------------------------------- combine


def moe_combine(expert_out: TensorValue, topk_weights: TensorValue, slot_to_row: TensorValue) -> TensorValue:
    """out[t] = sum_j topk_weights[t, j] * expert_out[slot_to_row[t*k+j]] (kept slots)."""
    _float("expert_out", expert_out, rank=2)
    if topk_weights.dtype != DType.float32 or topk_weights.rank != 2:
        raise TypeError(f"topk_weights must be rank-2 float32, got {topk_weights.dtype}{topk_weights.shape}")
    if slot_to_row.dtype != DType.int32 or slot_to_row.rank != 1:
        raise TypeError(f"slot_to_row must be rank-1 int32, got {slot_to_row.dtype}{slot_to_row.shape}")
    tokens = topk_weights.shape[0]
    return custom_op(
        "pymoe_moe_combine",
        [expert_out, topk_weights, slot_to_row],
        [TensorType(expert_out.dtype, [tokens, expert_out.shape[1]], expert_out.device)],
    )[0]


# ------------------------------------------------------------------ the layer


class MoEGraphWeights(NamedTuple):
    """Graph values of the layer's weights, in the layouts of pymoe/weights.py. The
    optional ones are present exactly when the MoEConfig asks for them
    (pymoe.weights.optional_weight_shapes)."""

    router: TensorValue  # [d_model, E]
    w1: TensorValue  # [E, d_model, d_ff] (relu) or [E, d_model, 2*d_ff] (gated: [W_gate | W_up])
    w2: TensorValue  # [E, d_ff, d_model]
    # True: w1 and w2 came from pack_expert_weights (CPU only; w1 packed with
    # swiglu=True for gated activations), the layout MoELayer uses on the CPU.
    packed: bool = False
    router_bias: TensorValue | None = None  # [E] float32
    selection_bias: TensorValue | None = None  # [E] float32
    b1: TensorValue | None = None  # [E, w1 columns]
    b2: TensorValue | None = None  # [E, d_model]
    shared_w1: TensorValue | None = None  # [d_model, 2*shared_d_ff]
    shared_w2: TensorValue | None = None  # [shared_d_ff, d_model]
    shared_gate: TensorValue | None = None  # [d_model, 1]


class LayerOutput(NamedTuple):
    out: TensorValue  # [T, d_model]
    expert_counts: TensorValue  # [E] int32
    losses: TensorValue  # [2] float32: aux loss, z-loss
    expert_offsets: TensorValue  # [E+1] int32; T*k - offsets[E] slots were dropped


# Weights kept in float32 whatever the layer's dtype: the router's biases, because the
# gate computes its logits and scores in float32.
FLOAT32_WEIGHTS = ("router_bias", "selection_bias")


def check_layer_weights(x: TensorValue, weights: MoEGraphWeights, config: MoEConfig) -> None:
    """Raise a ValueError/TypeError unless x and the weights fit `config`."""
    from .weights import OPTIONAL_WEIGHTS, optional_weight_shapes

    d, e, f = config.d_model, config.num_experts, config.d_ff
    _float("x", x, rank=2)
    _same_dim("x columns must equal d_model", x.shape[1], Dim(d))
    expected = {"router": [d, e], "w1": [e, d, config.expert_n], "w2": [e, f, d]}
    expected |= {name: list(shape) for name, shape in optional_weight_shapes(config).items()}
    for name in OPTIONAL_WEIGHTS:
        if name not in expected and getattr(weights, name) is not None:
            raise ValueError(f"weights.{name} is given but the config does not use it (see MoEConfig)")
    for name, shape in expected.items():
        v = getattr(weights, name)
        if v is None:
            raise ValueError(f"the config asks for weights.{name} {shape}, but it is None")
        dtype = DType.float32 if name in FLOAT32_WEIGHTS else x.dtype
        if v.dtype != dtype:
            raise TypeError(f"weights.{name} dtype {v.dtype} must be {dtype}")
        if [int(s) for s in v.shape] != shape:
            raise ValueError(f"weights.{name} has shape {list(v.shape)}, expected {shape}")


# The GPU's every-expert path of moe_ffn (see kernels/moe_ffn.mojo) runs all
# E experts on all T tokens, E/k times the routed FLOPs, to save the routed
# path's host sync and per-expert launches. It pays while those FLOPs stay
# under the time of reading the weights: up to about peak FLOP/s * itemsize /
# (2 * bandwidth) tokens in theory (about 250 in bf16 and 35 in fp32 on an
# H100). The limits below are measured: on the H100 the every-expert path was
# faster at 8-256 tokens in bf16 for all three preset shapes but one noisy point
# (small shape, 16 tokens), by only 6% at 256 tokens of the large shape, so we
# stop at 128; in fp32 (small shape) faster at 16-64 tokens, slower at 128
# (results/gpu/20261123T024908Z-every-expert-crossover-NVIDIA-H100-80GB-HBM3.json,
# from scripts/gpu_every_expert_crossover.py).
EVERY_EXPERT_MAX_TOKENS = {"bfloat16": 128, "float32": 64}
# ... and only while nearly every expert is used anyway: under uniform routing
# at least this fraction of the experts receives a token, so reading every
# expert's weights costs at most ~1/0.9 of the routed path's bytes.
EVERY_EXPERT_MIN_USED = 0.9
# The GPU's tensor-core grouped GEMM (kernels/gpu_grouped_gemm.mojo) takes 16-bit
# layers whose widths are multiples of 8; it reads only the experts in use, once,
# and never waits for the host, which leaves the every-expert path nothing to save.
GROUPED_GEMM_DTYPES = ("bfloat16", "float16")
GROUPED_GEMM_MAX_EXPERTS = 512


def tensor_core_gemm_takes(dtype: str, *widths: int) -> bool:
    """Whether kernels/gpu_grouped_gemm.mojo takes these inputs: 16-bit, every width
    a multiple of 8 (its 16-byte copies; grouped_gemm_supported there)."""
    return dtype in GROUPED_GEMM_DTYPES and all(w % 8 == 0 for w in widths)


def grouped_gemm_takes(config: MoEConfig, dtype: str) -> bool:
    """Whether the GPU layer's expert GEMMs run in the sync-free tensor-core kernel
    (else cuBLAS per expert after reading the expert offsets back: float32, odd widths)."""
    return (config.num_experts <= GROUPED_GEMM_MAX_EXPERTS
            and tensor_core_gemm_takes(dtype, config.d_model, config.d_ff))


# Where the GPU's routed path leaves the grouped GEMM for cuBLAS per expert although the
# grouped GEMM takes the layer: E <= CUBLAS_MAX_EXPERTS and >= CUBLAS_MIN_ROWS_PER_EXPERT
# routed rows per expert, except on Hopper (sm_90), where the wgmma tile runs everywhere. The
# same rule as kernels/gpu_grouped_gemm.mojo's (which says where it was measured); change
# both together.
CUBLAS_MAX_EXPERTS = 32
CUBLAS_MIN_ROWS_PER_EXPERT = 512


def is_hopper(architecture: str) -> bool:
    """Whether a MAX accelerator architecture name (gpu_architecture) is NVIDIA Hopper, where
    MAX compiles the ops' wgmma tiles."""
    return architecture.startswith("sm_90")


@functools.cache
def gpu_architecture() -> str:
    """The architecture name of the first accelerator MAX sees ("sm_90a" on H100 and H200), or
    "" on a machine without one (asked once per process: it opens the device)."""
    from max.driver import Accelerator, accelerator_count

    return Accelerator().architecture_name if accelerator_count() > 0 else ""


def cublas_is_faster(experts: int, slots: int, architecture: str) -> bool:
    """kernels/gpu_grouped_gemm.mojo's cublas_is_faster: whether the GPU expert GEMMs of E
    experts on `slots` routed rows (T*k) run cuBLAS per expert instead of the grouped GEMM
    on a GPU of this architecture."""
    if is_hopper(architecture):
        return False
    return experts <= CUBLAS_MAX_EXPERTS and slots >= CUBLAS_MIN_ROWS_PER_EXPERT * experts


def gpu_capture_refusal(config: MoEConfig, dtype: str, tokens: int,
                        every_expert_tokens: tuple[int, int] | None = None, pooled: bool = True,
                        architecture: str | None = None) -> str | None:
    """Why the GPU layer's graph on batches of `tokens` tokens cannot be captured as a device
    graph (MoELayer.capture), or None where it can: the one Python statement of which GPU
    paths of moe_ffn / moe_expert_matmul read back to the host (kernels/moe_ffn.mojo,
    kernels/moe_expert_matmul.mojo).

    - The routed path's cuBLAS per expert (float32, widths not multiples of 8, more than
      GROUPED_GEMM_MAX_EXPERTS experts, and the cublas_is_faster cells) copies the expert
      offsets to the host and synchronises the stream (gpu_gemm.mojo's
      expert_offsets_to_host): a host sync, which stream capture cannot record. The grouped
      GEMM (grouped_gemm_takes, not cublas_is_faster) never reads anything back.
    - The every-expert path (pooled layers at every_expert_tokens, default
      every_expert_token_range) reads nothing back, but runs cuBLAS strided-batched GEMMs
      through MAX's vendor-BLAS handle, which may be created, or given a workspace, on first
      use; whether that is capture-safe has not been checked on a GPU, so it is refused too.

    The grouped GEMM's own condition on pointer alignment (16 bytes) holds for every buffer
    MAX allocates, so it is not asked here. Without the pool (pooled=False) the layer runs
    moe_expert_matmul, which has the same routed rule and no every-expert path. `architecture`
    is the GPU's (default: gpu_architecture(), the first accelerator MAX sees)."""
    lo, hi = every_expert_token_range(config, "gpu", dtype) if every_expert_tokens is None else every_expert_tokens
    if pooled and lo <= tokens <= hi:
        return (f"at {tokens} tokens the layer runs every expert on every token (its every-expert range is "
                f"{lo}-{hi} tokens) as cuBLAS strided-batched GEMMs, not yet known to be capture-safe")
    if not grouped_gemm_takes(config, dtype):
        return (f"a {dtype} layer of d_model {config.d_model}, d_ff {config.d_ff} and {config.num_experts} experts "
                f"runs its expert GEMMs as cuBLAS per expert, which reads the expert offsets back to the host (a "
                f"stream sync); the sync-free grouped GEMM takes 16-bit layers with widths that are multiples of 8 "
                f"and at most {GROUPED_GEMM_MAX_EXPERTS} experts")
    slots = tokens * config.top_k
    if architecture is None:
        architecture = gpu_architecture()
    if cublas_is_faster(config.num_experts, slots, architecture):
        return (f"at {tokens} tokens ({slots} routed rows for {config.num_experts} experts, "
                f"{CUBLAS_MIN_ROWS_PER_EXPERT} or more per expert on average) the expert GEMMs run cuBLAS per "
                f"expert on this {architecture} GPU (faster there than the grouped GEMM; Hopper never takes it), which "
                f"reads the expert offsets back to the host (a stream sync)")
    return None


# The fused decode kernel (kernels/moe_decode.mojo: the experts' two GEMVs and the combine of a
# few tokens in one kernel, from the gate's outputs). Its limits, as there; change both together.
FUSED_DECODE_MAX_TOKENS = 4  # FD_MAX_TOKENS
FUSED_DECODE_MAX_SLOTS = 64  # FD_MAX_SLOTS
FUSED_DECODE_COUNTERS = 2 + 64 + 128  # FD_COUNTERS
FUSED_DECODE_BN2 = 128  # FD_BN2 (d_model columns per item; FD_MAX_CHUNKS2 of them at most)
FUSED_DECODE_MAX_CHUNKS2 = 128
FUSED_DECODE_MIN_ROWS2 = 256  # FD_MIN_ROWS2
FUSED_DECODE_MAX_ROWS2 = 1024  # FD_MAX_ROWS2


def fused_decode_tokens(config: MoEConfig, device: str, dtype: str) -> int:
    """The largest batch the GPU layer runs as the fused decode kernel, 0 where it never does:
    16-bit GPU layers whose widths it takes, without a capacity limit (the kernel keeps every
    slot; it does not drop), up to FUSED_DECODE_MAX_TOKENS tokens of top_k slots each."""
    if (device != "gpu" or dtype not in GROUPED_GEMM_DTYPES or config.capacity_factor is not None
            or config.d_model % 8 or config.d_ff % 8
            or -(-config.d_model // FUSED_DECODE_BN2) > FUSED_DECODE_MAX_CHUNKS2):
        return 0
    return min(FUSED_DECODE_MAX_TOKENS, FUSED_DECODE_MAX_SLOTS // config.top_k)


def fused_decode_scratch_floats(config: MoEConfig) -> int:
    """Float32s of the decode scratch buffer (pymoe_moe_ffn_decode's): the kernel's counters,
    then its partials for the largest fused batch (moe_decode.mojo's fused_decode_scratch_floats
    with the most row splits any GPU's plan makes)."""
    slots = FUSED_DECODE_MAX_TOKENS * config.top_k
    f = config.d_ff
    splits = max(1, f // FUSED_DECODE_MIN_ROWS2, -(-f // FUSED_DECODE_MAX_ROWS2))
    return FUSED_DECODE_COUNTERS + slots * f + splits * slots * config.d_model


def every_expert_token_range(config: MoEConfig, device: str, dtype: str) -> tuple[int, int]:
    """(lo, hi): moe_ffn takes the every-expert path for lo <= tokens <= hi
    (the GPU only; (1, 0), i.e. never, on the CPU)."""
    if device != "gpu" or grouped_gemm_takes(config, dtype):
        return (1, 0)
    e, k = config.num_experts, config.top_k
    lo = 1 if k == e else math.ceil(math.log(1 - EVERY_EXPERT_MIN_USED) / math.log(1 - k / e))
    return (lo, EVERY_EXPERT_MAX_TOKENS[dtype])


def moe_ffn_workspace_rows(tokens: int, config: MoEConfig, token_range: tuple[int, int]) -> int:
    """Rows each moe_ffn workspace needs for `tokens` tokens: T*k for the routed
    path, E*T when `token_range` (see every_expert_token_range) selects the every-expert path."""
    lo, hi = token_range
    every = config.num_experts * tokens if lo <= tokens <= hi else 0
    return max(tokens * config.top_k, every)


def moe_ffn(
    x: TensorValue,
    gate: GateOutput,
    dispatch: DispatchOutput,
    w1: TensorValue,
    w2: TensorValue,
    workspaces: tuple[BufferValue, ...],
    *,
    activation: str,
    every_expert_tokens: tuple[int, int] = (1, 0),
    fused_decode_max_tokens: int = 0,
    packed: bool = False,
    b1: TensorValue | None = None,
    b2: TensorValue | None = None,
    swiglu_alpha: float = DEFAULT_SWIGLU_ALPHA,
    swiglu_limit: float = DEFAULT_SWIGLU_LIMIT,
) -> TensorValue:
    """The experts' FFN and the combine in one op, with caller-owned workspaces.

    Same result as moe_expert_matmul (gathered, fused activation), then
    moe_expert_matmul on w2, then moe_combine; the intermediates h and y are
    written into `workspaces` = (h buffer [rows, w1 columns], y buffer [rows,
    d_model]) instead of new tensors. rows >= moe_ffn_workspace_rows(T, ...)
    (the kernel raises at run time otherwise). h is as wide as w1 (2*d_ff for
    SwiGLU) because the GPU path writes both SwiGLU halves before folding them.
    `activation` is one of pymoe.config.ACTIVATIONS: "relu", or "swiglu" /
    "clamped_swiglu" (w1 = [Wg | Wu]; swiglu_alpha and swiglu_limit as in
    moe_expert_matmul). `b1` [E, w1 columns] and `b2` [E, d_model] (x's dtype)
    or None: the expert biases, b1 added before the activation, b2 to each
    expert's output before the routing weight scales it. `every_expert_tokens`
    = (lo, hi): on the GPU, batches of lo..hi tokens run every expert on every
    token (see every_expert_token_range; the default (1, 0) never does).
    `packed`: w1 and w2 came from pack_expert_weights (CPU only).
    A third workspace, a float32 [fused_decode_scratch_floats(config)] buffer whose first
    FUSED_DECODE_COUNTERS values are zero (the kernel leaves them so), runs batches of up to
    `fused_decode_max_tokens` tokens as the fused decode kernel (fused_decode_tokens; 0 never).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    parameters = _epilogue_parameters(activation, swiglu_alpha, swiglu_limit)
    if packed:
        _cpu_only("moe_ffn", x)
    lo, hi = every_expert_tokens
    if not (isinstance(lo, int) and isinstance(hi, int) and lo >= 1):
        raise ValueError(f"every_expert_tokens must be two ints (lo >= 1, hi), got {every_expert_tokens!r}")
    if len(workspaces) not in (2, 3):
        raise ValueError(f"workspaces must be (h, y) or (h, y, decode scratch), got {len(workspaces)} buffers")
    h_ws, y_ws, *decode = workspaces
    if decode and (not isinstance(decode[0], BufferValue) or decode[0].dtype != DType.float32
                   or decode[0].rank != 1):
        raise ValueError("the decode scratch must be a float32 rank-1 BufferValue")
    if fused_decode_max_tokens and not decode:
        raise ValueError("fused_decode_max_tokens needs the decode scratch (a third workspace)")
    w1_cols, d_model = w1.shape[2], w2.shape[2]
    for name, ws, width in (("h workspace", h_ws, w1_cols), ("y workspace", y_ws, d_model)):
        if not isinstance(ws, BufferValue):
            raise TypeError(f"{name} must be a BufferValue (a mutable graph buffer), got {type(ws).__name__}")
        if ws.dtype != x.dtype or ws.rank != 2 or ws.shape[1] != width:
            raise ValueError(f"{name} must be {x.dtype}[rows, {width}], got {ws.dtype}{list(ws.shape)}")
    b1_value = _expert_bias("b1", b1, x, w1.shape[0], w1_cols)
    b2_value = _expert_bias("b2", b2, x, w2.shape[0], d_model)
    _ensure_kernels_loaded()
    if decode:
        parameters["fused_decode_max_tokens"] = int(fused_decode_max_tokens)
    out = ops.inplace_custom(
        "pymoe_moe_ffn_decode" if decode else "pymoe_moe_ffn",
        device=x.device,
        values=[
            h_ws, y_ws, *decode, x, dispatch.sorted_token_ids, dispatch.expert_offsets,
            gate.topk_weights, gate.topk_ids, dispatch.slot_to_row, w1, w2, b1_value, b2_value,
        ],
        out_types=[TensorType(x.dtype, [x.shape[0], d_model], x.device)],
        parameters={
            "activation": activation, "packed": bool(packed),
            "every_expert_min_tokens": lo, "every_expert_max_tokens": hi,
            "has_b1": b1 is not None, "has_b2": b2 is not None, **parameters,
        },
    )
    return out[0].tensor


def moe_layer(
    x: TensorValue,
    weights: MoEGraphWeights,
    config: MoEConfig,
    workspaces: tuple[BufferValue, ...] | None = None,
    every_expert_tokens: tuple[int, int] | None = None,
    fused_decode_tokens: int = 0,
) -> LayerOutput:
    """The MoE layer: gate -> dispatch -> expert FFN (gathered, fused bias and activation)
    -> combine, plus the shared expert.

    With `workspaces` (see moe_ffn) the expert intermediates go to those
    buffers; without, the graph allocates them on every call. With a third workspace (the decode
    scratch, see moe_ffn), batches of up to `fused_decode_tokens` tokens (at most
    fused_decode_tokens(config, device, dtype)) run as the fused decode kernel.
    `every_expert_tokens` (moe_ffn's, pooled only) defaults to
    every_expert_token_range(config, device of x, dtype of x).
    The layer's extras follow MoEConfig: weight_on_input (Llama-4, top_k 1) scales each
    token's expert input by its routing weight and combines with weight 1; the shared
    expert (MAX's matmul, see shared_expert) is added to the routed output.
    """
    check_layer_weights(x, weights, config)
    gate = moe_gate(
        x, weights.router, top_k=config.top_k, renormalize=config.renormalize, scoring=config.scoring,
        router_bias=weights.router_bias, selection_bias=weights.selection_bias, n_group=config.n_group,
        topk_group=config.topk_group, routed_scaling_factor=float(config.routed_scaling_factor),
    )
    disp = moe_dispatch(
        gate.topk_ids, num_experts=config.num_experts, capacity_factor=config.capacity_factor
    )
    expert_in, combine_gate = x, gate
    if config.weight_on_input:
        # top_k is 1, so a token's one routing weight scales its whole row.
        expert_in = x * ops.cast(gate.topk_weights, x.dtype)
        combine_gate = gate._replace(topk_weights=ops.broadcast_to(
            ops.constant(1.0, DType.float32, x.device), gate.topk_weights.shape))
    epilogue = {"swiglu_alpha": float(config.swiglu_alpha), "swiglu_limit": float(config.swiglu_limit)}
    if workspaces is not None:
        if every_expert_tokens is None:
            device = "cpu" if x.device.is_cpu() else "gpu"
            every_expert_tokens = every_expert_token_range(config, device, dtype_name(x.dtype))
        out = moe_ffn(expert_in, combine_gate, disp, weights.w1, weights.w2, workspaces,
                      activation=config.activation, every_expert_tokens=every_expert_tokens,
                      fused_decode_max_tokens=fused_decode_tokens,
                      packed=weights.packed, b1=weights.b1, b2=weights.b2, **epilogue)
    else:
        h = moe_expert_matmul(
            expert_in, disp.sorted_token_ids, disp.expert_offsets, weights.w1, activation=config.activation,
            gather=True, packed=weights.packed, bias=weights.b1, **epilogue,
        )
        y = moe_expert_matmul(
            h, disp.sorted_token_ids, disp.expert_offsets, weights.w2, activation="none", packed=weights.packed,
            bias=weights.b2,
        )
        out = moe_combine(y, combine_gate.topk_weights, disp.slot_to_row)
    if config.shared_d_ff:
        out = out + shared_expert(x, weights.shared_w1, weights.shared_w2, weights.shared_gate)
    return LayerOutput(out, gate.expert_counts, gate.losses, disp.expert_offsets)


def shared_expert(x: TensorValue, w1: TensorValue, w2: TensorValue, gate: TensorValue | None = None) -> TensorValue:
    """The shared SwiGLU expert in MAX's own ops: dense_ffn(x, w1, w2, "swiglu"), times
    sigmoid(x @ gate) when a gate [d_model, 1] is given (Qwen2-MoE)."""
    out = dense_ffn(x, w1, w2, "swiglu")
    if gate is not None:
        out = out * ops.sigmoid(ops.matmul(x, gate))
    return out


def dense_ffn(x: TensorValue, w1: TensorValue, w2: TensorValue, activation: str = "relu",
              swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0) -> TensorValue:
    """The dense FFN baseline in MAX's own ops (ops.matmul): act(x @ w1) @ w2; a gated
    activation takes w1 = [W_gate | W_up]."""
    _float("x", x, rank=2)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    h = ops.matmul(x, w1)
    if activation == "relu":
        h = ops.relu(h)
    else:
        f = int(w1.shape[1]) // 2
        gate, up = h[:, :f], h[:, f:]
        if activation == "swiglu":
            h = ops.silu(gate) * up
        else:  # clamped_swiglu, as pymoe.reference.clamped_swiglu
            gate = ops.min(gate, swiglu_limit)
            up = ops.max(ops.min(up, swiglu_limit), -swiglu_limit)
            h = (up + 1.0) * gate * ops.sigmoid(gate * swiglu_alpha)
    return ops.matmul(h, w2)
