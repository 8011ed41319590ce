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
from std.memory import Pointer
from std.os import abort
from std.ffi import external_call
from std.time import perf_counter_ns
from std.python import Python, PythonObject
from std.python.bindings import PythonModuleBuilder

from kernels.activation import DEFAULT_SWIGLU_ALPHA, DEFAULT_SWIGLU_LIMIT
from kernels.cpu_gemm import expert_matmul_cpu
from kernels.moe_combine import combine_cpu

# The codes ffn's `dtype` and `activation` arguments take (pymoe.offload.host_native mirrors them).
comptime FLOAT32 = 0
comptime BFLOAT16 = 1
comptime RELU = 0
comptime SWIGLU = 1
comptime CLAMPED_SWIGLU = 2


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


def _unpack(args: PythonObject) raises -> List[Int]:
    """ffn's args, a tuple of ints (addresses and sizes)
    (out, x, row_ids, offsets, weights, slot_to_row, w1, w2, h, y, rows, k, experts,
    d_model, d_ff, n_w1, dtype, activation): out [rows, d_model] = sum over the k slots
    of each row of weights[row, j] * expert(x[row]), the slots grouped by expert in
    row_ids over offsets [experts + 1] and placed by slot_to_row [rows * k] (-1: none);
    w1 [experts, d_model, n_w1] and w2 [experts, d_ff, d_model] packed as the CPU layer
    packs them; h [slots, d_ff] and y [slots, d_model] the workspaces; checked here."""
    var a = List[Int]()
    for i in range(18):
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
    # No biases: w1/w2 stand in for the bias pointers, which has_bias=False never reads.
    # clamped_swiglu with MoEConfig's default alpha and limit, which the host group's config
    # keeps (pymoe.offload.host.group_config).
    expert_matmul_cpu[dtype, activation, True, True, False, DEFAULT_SWIGLU_ALPHA, DEFAULT_SWIGLU_LIMIT](
        h, d_ff, x, d_model, row_ids, offsets, experts, w1, n_w1, w1
    )
    expert_matmul_cpu[dtype, "none", False, True, False](y, d_model, h, d_ff, row_ids, offsets, experts, w2, d_model, w2)
    combine_cpu[dtype](out, rows, d_model, y, weights, slot_to_row, k)
