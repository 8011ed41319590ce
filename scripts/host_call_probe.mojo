# A Python extension module (built by scripts/host_call_overhead.py) that runs pymoe's CPU
# grouped GEMM (kernels/cpu_gemm.mojo, expert_matmul_cpu) on numpy arrays given by address,
# without a MAX graph: the measurement of what a MAX call adds to a small host expert call.
from std.memory import Pointer
from std.os import abort
from std.python import Python, PythonObject
from std.python.bindings import PythonModuleBuilder

from kernels.cpu_gemm import expert_matmul_cpu


@export
def PyInit_host_call_probe() abi("C") -> PythonObject:
    try:
        var b = PythonModuleBuilder("host_call_probe")
        b.def_function[expert_matmul](
            "expert_matmul", docstring="c[rows, n] = x[row_ids] @ w[e] over the expert offsets (float32, addresses)"
        )
        return b.finalize()
    except e:
        abort(String("host_call_probe: ", e))


def expert_matmul(
    c: PythonObject, x: PythonObject, row_ids: PythonObject, offsets: PythonObject, w: PythonObject,
    experts: PythonObject, k: PythonObject, n: PythonObject,
) raises -> PythonObject:
    var c_ptr = Pointer[Float32, MutAnyOrigin](unsafe_from_address=Int(py=c))
    var x_ptr = Pointer[Float32, MutAnyOrigin](unsafe_from_address=Int(py=x))
    var ids_ptr = Pointer[Int32, MutAnyOrigin](unsafe_from_address=Int(py=row_ids))
    var off_ptr = Pointer[Int32, MutAnyOrigin](unsafe_from_address=Int(py=offsets))
    var w_ptr = Pointer[Float32, MutAnyOrigin](unsafe_from_address=Int(py=w))
    var e = Int(py=experts)
    var k_dim = Int(py=k)
    var n_out = Int(py=n)
    # The kernel runs on the process's Mojo worker pool, which MAX's CPU calls share; a
    # worker may need the GIL (finishing a MAX call), so the GIL is released while the
    # kernel waits on the pool (holding it deadlocked once: the main thread waiting in the
    # pool, a worker waiting for the GIL). Nothing below touches a Python object.
    ref cpython = Python().cpython()
    var state = cpython.PyEval_SaveThread()
    expert_matmul_cpu[DType.float32, "none", True](c_ptr, n_out, x_ptr, k_dim, ids_ptr, off_ptr, e, w_ptr, n_out, w_ptr)
    cpython.PyEval_RestoreThread(state)
    return PythonObject(None)
