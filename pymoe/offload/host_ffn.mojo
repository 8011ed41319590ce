# The host experts' FFN as a Python extension module (pymoe_host_ffn), called without a MAX
# graph: pymoe.offload.host_native builds it with `mojo build --emit shared-lib` and
# HostExpertGroup(backend="native") calls it. The same kernels and order as the CPU graph's
# pymoe_moe_ffn op (kernels/moe_ffn.mojo): the first grouped GEMM with the activation fused,
# the second, then the weighted combine, on pre-packed weights.
#
# Why: a MAX graph call has a fixed cost that a host expert call at decode (a row or a few per
# expert) does not amortise; on the 2-vCPU VM a one-expert call took 1.42 ms as a graph against
# 0.76 ms called directly, back to back (scripts/host_call_overhead.py,
# results/offload/20261207T051027Z-host-call-overhead-AMD-EPYC.json).
from max.algorithm import sync_parallelize
from max.runtime.asyncrt import parallelism_level
from std.math import ceildiv
from std.memory import Pointer
from std.os import abort
from std.ffi import external_call
from std.time import perf_counter_ns
from std.python import Python, PythonObject
from std.python.bindings import PythonModuleBuilder
from std.sys.intrinsics import PrefetchOptions, prefetch

from kernels.activation import DEFAULT_SWIGLU_ALPHA, DEFAULT_SWIGLU_LIMIT, clamped_swiglu_f32, is_gated, silu_f32
from kernels.cpu_blocking import NR, W
from kernels.cpu_gemm import expert_matmul_cpu
from kernels.moe_combine import combine_cpu

# The codes ffn's `dtype` and `activation` arguments take (pymoe.offload.host_native mirrors them).
comptime FLOAT32 = 0
comptime BFLOAT16 = 1
comptime RELU = 0
comptime SWIGLU = 1
comptime CLAMPED_SWIGLU = 2

# A call whose experts have one row each (a batch-1 decode layer's host call) runs in ONE
# parallel region instead of the two grouped GEMMs' two: each region wakes the pool's threads,
# and a pool idle for a decode layer's GPU time wakes slowly. On the 2-vCPU VM, after 2 ms idle,
# one region of a no-op took 0.04 ms and two back to back 0.46 ms (scripts/pool_wake_probe.mojo,
# results/checks/20261207-s27-pool-wake-cpuvm.log). Worker w computes its share of the first GEMM's
# output panels (d_ff columns) for every expert in use, then the second GEMM over the same d_ff
# rows into a float32 partial of every output row: no worker waits for another. The calling
# thread adds the partials and combines. A call that reads few weights takes fewer workers (at
# least MIN_BYTES_PER_WORKER each): one runs on the calling thread and wakes nobody. With two
# rows per expert a first version was slower than the grouped GEMMs in bfloat16 on the VM, so
# it takes one-row calls only (both in docs/RESULTS.md; scripts/host_one_row_probe.py times it).
comptime MIN_BYTES_PER_WORKER = 1 << 20
# Panel rows prefetched ahead (a panel is one contiguous stream that crosses pages, where the
# hardware prefetchers stop): 2 KiB of float32, as kernels/cpu_pack.mojo's PACKED_PREFETCH_ROWS.
comptime PANEL_PREFETCH_ROWS = 32


@export
def PyInit_pymoe_host_ffn() abi("C") -> PythonObject:
    try:
        var b = PythonModuleBuilder("pymoe_host_ffn")
        b.def_function[ffn](
            "ffn",
            docstring="ffn(args): the host experts' FFN and combine on buffers given by address (see host_ffn.mojo)",
        )
        b.def_function[ffn_when](
            "ffn_when",
            docstring="ffn_when(flag, value, timeout_us, args): ffn(args) once the int32 at address flag is >= value, "
            + "the worker pool spinning until then (see host_ffn.mojo)",
        )
        b.def_function[pool_workers](
            "pool_workers",
            docstring="pool_workers(): the worker pool's size (a one-row call's partials: that many [slots, d_model])",
        )
        return b.finalize()
    except e:
        abort(String("pymoe_host_ffn: ", e))


def ffn(args: PythonObject) raises -> PythonObject:
    """One call of the host experts: see _unpack for args."""
    var a = _unpack(args)
    # The kernels run on the process's Mojo worker pool, which MAX's CPU calls share; a worker
    # may need the GIL (finishing a MAX call), so the GIL is released while the kernels wait on
    # the pool (holding it deadlocked once in scripts/host_call_probe.mojo: the main thread
    # waiting in the pool, a worker waiting for the GIL). Nothing below touches a Python object.
    ref cpython = Python().cpython()
    var state = cpython.PyEval_SaveThread()
    _ffn_of(a)
    cpython.PyEval_RestoreThread(state)
    return PythonObject(None)


def ffn_when(flag: PythonObject, value: PythonObject, timeout_us: PythonObject, args: PythonObject) raises -> PythonObject:
    """Runs ffn(args) once the int32 at address `flag` is >= `value`, every worker of the pool
    spinning on the flag until then, so that none has to be woken when it turns: a pool left
    idle for a decode layer's GPU time (about a millisecond) starts a call later than one used
    microseconds before (scripts/host_wait_probe.py). A host worker could call it before its
    layer's rows are in host memory, the GPU writing the flag behind the rows' copy
    (cuStreamWriteValue32); the offloading engine tried that and dropped it (spinning made its
    hybrid runs slower on an H100: docs/RESULTS.md, session 25). Raises after `timeout_us`
    without the value."""
    var a = _unpack(args)
    var flag_ptr = Pointer[Int32, MutAnyOrigin](unsafe_from_address=Int(py=flag))
    var target = Int32(Int(py=value))
    var deadline = Int(perf_counter_ns()) + Int(py=timeout_us) * 1000
    ref cpython = Python().cpython()
    var state = cpython.PyEval_SaveThread()

    def spin(worker: Int) {var flag_ptr, var target, var deadline}:
        while flag_ptr.unsafe_load[volatile=True]() < target and Int(perf_counter_ns()) < deadline:
            # Yield the core: the threads that issue the GPU work (and the GPU's copy that
            # sets the flag) must not wait behind a spinning worker.
            _ = external_call["sched_yield", Int32]()

    sync_parallelize(spin, parallelism_level(None))
    var ready = flag_ptr.unsafe_load[volatile=True]() >= target
    if ready:
        _ffn_of(a)
    cpython.PyEval_RestoreThread(state)
    if not ready:
        raise Error("pymoe_host_ffn.ffn_when: the flag did not reach ", target, " in ", Int(py=timeout_us), " us")
    return PythonObject(None)


def pool_workers() raises -> PythonObject:
    """The worker pool's size: a one-row call takes at most this many partial buffers."""
    return PythonObject(parallelism_level(None))


def _one_row_workers(a: List[Int]) -> Int:
    """The workers of a call whose experts have at most one row each (see MIN_BYTES_PER_WORKER),
    or 0 if an expert has more rows (or none has any)."""
    var offsets = Pointer[Int32, MutAnyOrigin](unsafe_from_address=a[3])
    var experts = a[12]
    var d_model = a[13]
    var d_ff = a[14]
    var n_w1 = a[15]
    var elem = 4 if a[16] == FLOAT32 else 2
    var used = 0
    for e in range(experts):
        var n = Int(offsets.unsafe_load(e + 1) - offsets.unsafe_load(e))
        if n > 1:
            return 0
        if n > 0:
            used += 1
    if used == 0:
        return 0
    var per_panel = W if a[17] != RELU else NR
    var panels = ceildiv(d_ff, per_panel)
    var bytes = used * (d_model * n_w1 + d_ff * d_model) * elem
    return max(1, min(min(parallelism_level(None), panels), bytes // MIN_BYTES_PER_WORKER))


def _unpack(args: PythonObject) raises -> List[Int]:
    """ffn's args, a tuple of ints (addresses and sizes)
    (out, x, row_ids, offsets, weights, slot_to_row, w1, w2, h, y, rows, k, experts,
    d_model, d_ff, n_w1, dtype, activation, partials): out [rows, d_model] = sum over the k slots
    of each row of weights[row, j] * expert(x[row]), the slots grouped by expert in
    row_ids over offsets [experts + 1] and placed by slot_to_row [rows * k] (-1: none);
    w1 [experts, d_model, n_w1] and w2 [experts, d_ff, d_model] packed as the CPU layer
    packs them; h [slots, d_ff] and y [slots, d_model] the workspaces; partials: float32
    [pool_workers(), slots, d_model] for a call whose experts have one row each (see
    _ffn_one_row), or 0 to run the two grouped GEMMs in any case; the codes checked here."""
    var a = List[Int]()
    for i in range(19):
        a.append(Int(py=args[i]))
    var dtype = a[16]
    var activation = a[17]
    if dtype != FLOAT32 and dtype != BFLOAT16:
        raise Error("pymoe_host_ffn.ffn: dtype code must be 0 (float32) or 1 (bfloat16), got ", dtype)
    if activation != RELU and activation != SWIGLU and activation != CLAMPED_SWIGLU:
        raise Error("pymoe_host_ffn.ffn: activation code must be 0 (relu), 1 (swiglu) or 2 (clamped_swiglu), got ",
                    activation)
    return a^


def _ffn_of(a: List[Int]):
    if a[16] == FLOAT32:
        _ffn_act[DType.float32](a, a[17])
    else:
        _ffn_act[DType.bfloat16](a, a[17])


def _ffn_act[dtype: DType](a: List[Int], activation: Int):
    if activation == RELU:
        _ffn[dtype, "relu"](a)
    elif activation == SWIGLU:
        _ffn[dtype, "swiglu"](a)
    else:
        _ffn[dtype, "clamped_swiglu"](a)


def _ffn[dtype: DType, activation: StaticString](a: List[Int]):
    comptime P = Pointer[Scalar[dtype], MutAnyOrigin]
    var out = P(unsafe_from_address=a[0])
    var x = P(unsafe_from_address=a[1])
    var row_ids = Pointer[Int32, MutAnyOrigin](unsafe_from_address=a[2])
    var offsets = Pointer[Int32, MutAnyOrigin](unsafe_from_address=a[3])
    var weights = Pointer[Float32, MutAnyOrigin](unsafe_from_address=a[4])
    var slot_to_row = Pointer[Int32, MutAnyOrigin](unsafe_from_address=a[5])
    var w1 = P(unsafe_from_address=a[6])
    var w2 = P(unsafe_from_address=a[7])
    var h = P(unsafe_from_address=a[8])
    var y = P(unsafe_from_address=a[9])
    var rows = a[10]
    var k = a[11]
    var experts = a[12]
    var d_model = a[13]
    var d_ff = a[14]
    var n_w1 = a[15]
    var workers = _one_row_workers(a) if a[18] != 0 else 0
    if workers > 0:
        _ffn_one_row[dtype, activation](a, workers)
        return
    # No biases: w1/w2 stand in for the bias pointers, which has_bias=False never reads.
    # clamped_swiglu with MoEConfig's default alpha and limit, which the host group's config
    # keeps (pymoe.offload.host.group_config).
    expert_matmul_cpu[dtype, activation, True, True, False, DEFAULT_SWIGLU_ALPHA, DEFAULT_SWIGLU_LIMIT](
        h, d_ff, x, d_model, row_ids, offsets, experts, w1, n_w1, w1
    )
    expert_matmul_cpu[dtype, "none", False, True, False](y, d_model, h, d_ff, row_ids, offsets, experts, w2, d_model, w2)
    combine_cpu[dtype](out, rows, d_model, y, weights, slot_to_row, k)


@always_inline
def _first_gemm_panel[dtype: DType, activation: StaticString](
    h: Pointer[Scalar[dtype], MutAnyOrigin],
    x_row: Pointer[Scalar[dtype], MutAnyOrigin],
    panel: Pointer[Scalar[dtype], MutAnyOrigin],
    stride: Int,
    lanes: Int,
    d_model: Int,
):
    """h[0 : lanes] = the activated product of one row x_row [d_model] and one first-GEMM panel:
    d_model rows of `stride` values (NR in a full panel, whose output columns are W gated ones,
    gate in lanes [0, W) and up in [W, 2W), or NR plain ones; the ragged last panel stores
    `lanes` values, gated: `lanes` gate then `lanes` up)."""
    comptime GATED = is_gated[activation]()
    var acc = SIMD[DType.float32, NR](0)
    for kk in range(d_model):
        var wv = SIMD[DType.float32, NR](0)
        if stride == NR:
            prefetch[PrefetchOptions().for_read().high_locality().to_data_cache()](
                panel.unsafe_offset((kk + PANEL_PREFETCH_ROWS) * NR))
            wv = panel.unsafe_load[width=NR](kk * NR).cast[DType.float32]()
        else:
            for j in range(lanes):
                wv[j] = panel.unsafe_load(kk * stride + j).cast[DType.float32]()
                comptime if GATED:
                    wv[W + j] = panel.unsafe_load(kk * stride + lanes + j).cast[DType.float32]()
        acc += x_row.unsafe_load(kk).cast[DType.float32]() * wv
    comptime if GATED:
        var g = acc.slice[W, offset=0]()
        var u = acc.slice[W, offset=W]()
        var v: SIMD[DType.float32, W]
        comptime if activation == "swiglu":
            v = silu_f32(g) * u
        else:
            v = clamped_swiglu_f32[DEFAULT_SWIGLU_ALPHA, DEFAULT_SWIGLU_LIMIT](g, u)
        for j in range(lanes):
            h.unsafe_store(j, v[j].cast[dtype]())
    else:
        var v = max(acc, SIMD[DType.float32, NR](0))
        for j in range(lanes):
            h.unsafe_store(j, v[j].cast[dtype]())


@always_inline
def _second_gemm_panel[dtype: DType](
    part: Pointer[Float32, MutAnyOrigin],
    h_row: Pointer[Scalar[dtype], MutAnyOrigin],
    panel: Pointer[Scalar[dtype], MutAnyOrigin],
    stride: Int,
    c0: Int,
    c1: Int,
):
    """part[0 : stride] = the sum over d_ff rows c in [c0, c1) of h_row[c] times row c of one
    second-GEMM panel (`stride` values: NR, or the ragged last panel's width)."""
    var acc = SIMD[DType.float32, NR](0)
    for c in range(c0, c1):
        var wv = SIMD[DType.float32, NR](0)
        if stride == NR:
            prefetch[PrefetchOptions().for_read().high_locality().to_data_cache()](
                panel.unsafe_offset((c + PANEL_PREFETCH_ROWS) * NR))
            wv = panel.unsafe_load[width=NR](c * NR).cast[DType.float32]()
        else:
            for j in range(stride):
                wv[j] = panel.unsafe_load(c * stride + j).cast[DType.float32]()
        acc += h_row.unsafe_load(c).cast[DType.float32]() * wv
    if stride == NR:
        part.unsafe_store(0, acc)
    else:
        for j in range(stride):
            part.unsafe_store(j, acc[j])


def _ffn_one_row[dtype: DType, activation: StaticString](a: List[Int], workers: Int):
    """A call whose experts have one row each, in one parallel region (see the header):
    worker w takes panels [w*P/workers, (w+1)*P/workers) of the first GEMM's P output panels
    of every expert in use, then the second GEMM over those d_ff rows into its float32 partial
    [slots, d_model]; the calling thread adds the partials into y and combines. The weights
    are pre-packed (kernels/cpu_pack.mojo: NR-wide panels of all K rows, then the ragged one)."""
    comptime P = Pointer[Scalar[dtype], MutAnyOrigin]
    comptime GATED = is_gated[activation]()
    comptime PER_PANEL = W if GATED else NR  # first-GEMM output columns per panel
    var out = P(unsafe_from_address=a[0])
    var x = P(unsafe_from_address=a[1])
    var row_ids = Pointer[Int32, MutAnyOrigin](unsafe_from_address=a[2])
    var offsets = Pointer[Int32, MutAnyOrigin](unsafe_from_address=a[3])
    var weights = Pointer[Float32, MutAnyOrigin](unsafe_from_address=a[4])
    var slot_to_row = Pointer[Int32, MutAnyOrigin](unsafe_from_address=a[5])
    var w1 = P(unsafe_from_address=a[6])
    var w2 = P(unsafe_from_address=a[7])
    var h = P(unsafe_from_address=a[8])
    var y = P(unsafe_from_address=a[9])
    var rows = a[10]
    var k = a[11]
    var experts = a[12]
    var d_model = a[13]
    var d_ff = a[14]
    var n_w1 = a[15]
    var partials = Pointer[Float32, MutAnyOrigin](unsafe_from_address=a[18])
    var slots = Int(offsets.unsafe_load(experts))
    var full1 = d_ff // PER_PANEL
    var rem1 = d_ff - full1 * PER_PANEL
    var panels1 = full1 + (1 if rem1 > 0 else 0)
    var full2 = d_model // NR
    var rem2 = d_model - full2 * NR
    var panels2 = full2 + (1 if rem2 > 0 else 0)

    def work(w: Int) {
        var x, var row_ids, var offsets, var w1, var w2, var h, var partials, var experts, var d_model, var d_ff,
        var n_w1, var slots, var full1, var rem1, var panels1, var full2, var rem2, var panels2, var workers,
    }:
        var q0 = w * panels1 // workers
        var q1 = (w + 1) * panels1 // workers
        var c0 = q0 * PER_PANEL
        var c1 = min(q1 * PER_PANEL, d_ff)
        for e in range(experts):
            var r = Int(offsets.unsafe_load(e))
            if r == Int(offsets.unsafe_load(e + 1)):
                continue
            var x_row = x.unsafe_offset(Int(row_ids.unsafe_load(r)) * d_model)
            var h_row = h.unsafe_offset(r * d_ff)
            var w1_e = w1.unsafe_offset(e * d_model * n_w1)
            for q in range(q0, q1):
                var full = q < full1
                _first_gemm_panel[dtype, activation](
                    h_row.unsafe_offset(q * PER_PANEL), x_row, w1_e.unsafe_offset(q * d_model * NR),
                    NR if full else (2 * rem1 if GATED else rem1), PER_PANEL if full else rem1, d_model,
                )
            var w2_e = w2.unsafe_offset(e * d_ff * d_model)
            var part = partials.unsafe_offset((w * slots + r) * d_model)
            for p in range(panels2):
                _second_gemm_panel[dtype](
                    part.unsafe_offset(p * NR), h_row, w2_e.unsafe_offset(p * d_ff * NR),
                    NR if p < full2 else rem2, c0, c1,
                )

    sync_parallelize(work, workers)
    # y = the sum of the partials (in float32, then y's dtype, as the grouped GEMM rounds it).
    var n = slots * d_model
    for i in range(0, n - W + 1, W):
        var acc = partials.unsafe_load[width=W](i)
        for w in range(1, workers):
            acc += partials.unsafe_load[width=W](w * n + i)
        y.unsafe_store(i, acc.cast[dtype]())
    for i in range(n // W * W, n):
        var acc = Float32(0)
        for w in range(workers):
            acc += partials.unsafe_load(w * n + i)
        y.unsafe_store(i, acc.cast[dtype]())
    combine_cpu[dtype](out, rows, d_model, y, weights, slot_to_row, k)
