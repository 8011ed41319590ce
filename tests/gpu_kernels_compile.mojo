# Compiled (not run) by tests/test_gpu_kernels_compile.py for NVIDIA Hopper and Ampere: the
# grouped GEMM entries that the ops instantiate for every layer dtype. MAX compiles an op's
# GPU path only on a GPU machine, where a float32 graph once failed to load because
# grouped_gemm_gpu[float32] reached the tensor-core tiles' 16-bit assert. The router's logits
# the gate, the dispatch and the fused decode kernel are here too, so that their GPU code is
# compiled by every CI run.
from kernels.gpu_grouped_gemm import dense_gemm_gpu, grouped_gemm_gpu
from kernels.moe_decode import fused_decode_gpu, fused_decode_plan
from kernels.moe_dispatch import dispatch_gpu
from kernels.moe_gate import gate_gpu, router_logits_gpu
from max.gpu.host import DeviceContext
from std.memory import Pointer


def entries[dtype: DType](ctx: DeviceContext) raises:
    var buf = ctx.enqueue_create_buffer[dtype](64)
    var ids = ctx.enqueue_create_buffer[DType.int32](64)
    var p = Pointer[Scalar[dtype], MutAnyOrigin](unsafe_from_address=Int(buf.unsafe_ptr()))
    var q = Pointer[Int32, MutAnyOrigin](unsafe_from_address=Int(ids.unsafe_ptr()))
    grouped_gemm_gpu[dtype, "swiglu", True, True](ctx, p, 8, p, 8, 8, q, q, 4, 16, p, 16, p)
    grouped_gemm_gpu[dtype, "none", False](ctx, p, 8, p, 8, 8, q, q, 4, 16, p, 8, p)
    var logits = ctx.enqueue_create_buffer[DType.float32](64)
    var pl = Pointer[Float32, MutAnyOrigin](unsafe_from_address=Int(logits.unsafe_ptr()))
    dense_gemm_gpu[dtype, DType.float32](ctx, pl, p, p, 1, 8, 8)
    var qi = Pointer[Int32, MutAnyOrigin](unsafe_from_address=Int(ids.unsafe_ptr()))
    comptime if dtype != DType.float32:  # the router's logits op takes 16-bit inputs only
        var scratch = ctx.enqueue_create_buffer[DType.float32](256)
        var ps = Pointer[Float32, MutAnyOrigin](unsafe_from_address=Int(scratch.unsafe_ptr()))
        router_logits_gpu[dtype](ctx, pl, p, p, 1, 8, 8, ps, 256)
        router_logits_gpu[dtype](ctx, pl, p, p, 1, 8, 8, ps, 256, partials_to_gate=True)  # the gate sums
        # the gate given those logits, with 4 register slots (E <= 128), and a DeepSeek-style router
        gate_gpu[dtype, 8, True, False, False, False, 1, 1, 1.0, True, 4](ctx, pl, qi, qi, pl, pl, p, p, pl, pl, pl, 1, 8, 8, pl, 0)
        gate_gpu[dtype, 8, True, False, False, False, 1, 1, 1.0, True, 4](ctx, pl, qi, qi, pl, pl, p, p, pl, pl, pl, 1, 8, 8, ps, 1)
        _ = scratch^
        gate_gpu[dtype, 8, True, True, False, True, 8, 4, 2.5, True, 8](ctx, pl, qi, qi, pl, pl, p, p, pl, pl, pl, 1, 8, 8, pl, 0)
    else:  # the default softmax router computing its own logits
        gate_gpu[dtype, 2, True, False, False, False, 1, 1, 1.0, False, 1](ctx, pl, qi, qi, pl, pl, p, p, pl, pl, pl, 1, 8, 8, pl, 0)


def fused_decode[dtype: DType](ctx: DeviceContext) raises:
    """Every activation, with and without the expert biases (the 16-bit layers take it)."""
    var buf = ctx.enqueue_create_buffer[dtype](64)
    var ids = ctx.enqueue_create_buffer[DType.int32](64)
    var f = ctx.enqueue_create_buffer[DType.float32](64)
    var p = Pointer[Scalar[dtype], MutAnyOrigin](unsafe_from_address=Int(buf.unsafe_ptr()))
    var q = Pointer[Int32, MutAnyOrigin](unsafe_from_address=Int(ids.unsafe_ptr()))
    var pf = Pointer[Float32, MutAnyOrigin](unsafe_from_address=Int(f.unsafe_ptr()))
    var plan = fused_decode_plan(8, 64, 64, 132)
    fused_decode_gpu[dtype, "swiglu", False, False, 1.702, 7.0](ctx, p, p, q, pf, 1, 8, p, p, p, p, 128, 64, 64, pf, q, plan)
    fused_decode_gpu[dtype, "clamped_swiglu", True, True, 1.702, 7.0](ctx, p, p, q, pf, 1, 8, p, p, p, p, 128, 64, 64, pf, q, plan)
    fused_decode_gpu[dtype, "relu", False, True, 1.702, 7.0](ctx, p, p, q, pf, 1, 8, p, p, p, p, 128, 64, 64, pf, q, plan)


def dispatch(ctx: DeviceContext) raises:
    var buf = ctx.enqueue_create_buffer[DType.int32](64)
    var q = Pointer[Int32, MutAnyOrigin](unsafe_from_address=Int(buf.unsafe_ptr()))
    dispatch_gpu(ctx, q, q, q, q, 8, 8, 4, 8)


def main() raises:
    var ctx = DeviceContext()
    entries[DType.float32](ctx)
    entries[DType.bfloat16](ctx)
    fused_decode[DType.bfloat16](ctx)
    dispatch(ctx)
