# A Python extension module (built by scripts/host_call_overhead.py) that runs pymoe's CPU
# grouped GEMM (kernels/cpu_gemm.mojo, expert_matmul_cpu) on numpy arrays given by address,
# without a MAX graph: the measurement of what a MAX call adds to a small host expert call.
from std.memory import Pointer
from std.os import abort
from std.python import PythonObject
from std.python.bindings import PythonModuleBuilder

from kernels.cpu_gemm import expert_matmul_cpu


@export
def PyInit_host_call_probe() -> PythonObject:
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
    expert_matmul_cpu[DType.float32, "none", True](
        Pointer[Float32, MutAnyOrigin](unsafe_from_address=Int(py=c)), Int(py=n),
        Pointer[Float32, MutAnyOrigin](unsafe_from_address=Int(py=x)), Int(py=k),
        Pointer[Int32, MutAnyOrigin](unsafe_from_address=Int(py=row_ids)),
        Pointer[Int32, MutAnyOrigin](unsafe_from_address=Int(py=offsets)), Int(py=experts),
        Pointer[Float32, MutAnyOrigin](unsafe_from_address=Int(py=w)), Int(py=n),
        Pointer[Float32, MutAnyOrigin](unsafe_from_address=Int(py=w)),
    )
    return PythonObject(None)
