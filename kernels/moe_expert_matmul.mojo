# Grouped GEMM over the ragged expert groups, with an optional fused activation.
#
#   for each expert e, for each row r in [expert_offsets[e], expert_offsets[e+1]):
#       a_r        = x[row_ids[r]] if gather else x[r]
#       output[r]  = act(a_r @ w[e] + bias[e])     (+ bias[e] only with has_bias)
#
# Shapes: x [R, K], row_ids [M] int32, expert_offsets [E+1] int32,
# w [E, K, N] (row-major, so x @ w[e] reads w[e] along N), bias [E, N] (or a
# placeholder, e.g. [1, 1], that is not read when has_bias is False),
# output [M, N_out].
# Activations (compile-time): "none", "relu", "silu" with N_out = N, and the
# gated ones, where w[e] = [W_gate | W_up] along N, h = a_r @ w[e] (+ bias[e]) =
# [gate | up] and N_out = N / 2: "swiglu", output[r] = silu(gate) * up, and
# GPT-OSS's "clamped_swiglu", output[r] = (u + 1) * g * sigmoid(alpha * g) with
# g = min(gate, limit), u = clamp(up, -limit, limit) (swiglu_alpha and
# swiglu_limit are compile-time parameters).
# Rows from expert_offsets[E] to M (slots dropped by the capacity) are zeroed.
#
# The body, expert_matmul_cpu, is also called by moe_ffn.mojo, which writes
# into the layer's pooled workspaces; it leaves rows past expert_offsets[E]
# alone (nothing reads them there), so only the registered op zeroes them.
#
# Where the code lives:
#   cpu_gemm.mojo      the CPU grouped GEMM (expert_matmul_cpu): job
#                      schedule and micro-kernel;
#   cpu_pack.mojo      weight packing, and the pre-packed layout that
#                      pymoe_pack_expert_weights writes (pack_expert_weights_cpu);
#   cpu_decode.mojo    the decode pipeline (packing the next block while
#                      computing this one);
#   cpu_blocking.mojo  the register tile and cache-block sizes;
#   gpu_grouped_gemm.mojo  the GPU tensor-core grouped GEMM (no host sync);
#   gpu_gemm.mojo      the GPU cuBLAS path (expert_matmul_gpu; float32, odd
#                      widths, few large experts off Hopper: cublas_is_faster).

import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext
from std.memory import Pointer

from .activation import is_gated
from .cpu_gemm import expert_matmul_cpu
from .cpu_pack import pack_expert_weights_cpu
from .gpu_gemm import ExpertBias, expert_matmul_gpu, expert_offsets_to_host, zero_dropped_rows_gpu
from .gpu_grouped_gemm import cublas_is_faster, grouped_gemm_gpu, grouped_gemm_supported


def check_activation[activation: StaticString]():
    comptime assert (
        activation == "none" or activation == "relu" or activation == "silu" or is_gated[activation]()
    ), "activation must be none, relu, silu, swiglu or clamped_swiglu"


@extensibility.register("pymoe_moe_expert_matmul")
struct MoEExpertMatmul:
    @staticmethod
    def execute[
        activation: StaticString,
        gather: Bool,
        packed: Bool,
        has_bias: Bool,
        swiglu_alpha: Float32,
        swiglu_limit: Float32,
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        x: InputTensor[dtype=output.dtype, rank=2, ...],
        row_ids: InputTensor[dtype=DType.int32, rank=1, ...],
        expert_offsets: InputTensor[dtype=DType.int32, rank=1, ...],
        w: InputTensor[dtype=output.dtype, rank=3, ...],
        bias: InputTensor[dtype=output.dtype, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        check_activation[activation]()
        comptime dtype = output.dtype
        comptime gated = is_gated[activation]()
        comptime if has_bias:
            if bias.dim_size(0) != w.dim_size(0) or bias.dim_size(1) != w.dim_size(2):
                raise Error("pymoe_moe_expert_matmul: bias must be [E, N] as w is [E, K, N]")
        var m_rows = output.dim_size(0)
        var n_out = output.dim_size(1)
        var c_ptr = output.unsafe_ptr()
        comptime if target == "gpu":
            comptime if packed:
                raise Error(PACKED_ON_GPU)
            var experts = w.dim_size(0)
            var k_dim = x.dim_size(1)
            var n_w = w.dim_size(2)
            zero_dropped_rows_gpu[dtype](ctx, c_ptr, m_rows, n_out, expert_offsets.unsafe_ptr().unsafe_offset(experts))
            var x_ptr = x.unsafe_ptr()
            var w_ptr0 = w.unsafe_ptr()
            if not cublas_is_faster(ctx, experts, m_rows) and grouped_gemm_supported[dtype](
                k_dim, n_out, k_dim, n_out, experts, c_ptr, x_ptr, w_ptr0
            ):
                grouped_gemm_gpu[dtype, activation, gather, has_bias, swiglu_alpha, swiglu_limit](
                    ctx, c_ptr, n_out, x_ptr, k_dim, k_dim, row_ids.unsafe_ptr(), expert_offsets.unsafe_ptr(),
                    experts, m_rows, w_ptr0, n_w, bias.unsafe_ptr(),
                )
                return
            var offsets = expert_offsets_to_host(ctx, expert_offsets.unsafe_ptr(), experts)
            # Scratch for this standalone op (the layer's moe_ffn uses pooled
            # workspaces instead): gathered rows, and SwiGLU's two halves.
            var rows = max(offsets[experts], 1)
            var gathered = ctx.enqueue_create_buffer[dtype](rows * k_dim if gather else 1)
            var wide = ctx.enqueue_create_buffer[dtype](rows * n_w if gated else 1)
            var g_ptr = rebind[Pointer[Scalar[dtype], MutAnyOrigin]](gathered.unsafe_ptr())
            var w_ptr = rebind[Pointer[Scalar[dtype], MutAnyOrigin]](wide.unsafe_ptr())
            var row_bias = ExpertBias[dtype](bias.unsafe_ptr(), n_w, expert_offsets.unsafe_ptr(), experts, 0)
            expert_matmul_gpu[dtype, activation, gather, has_bias, swiglu_alpha, swiglu_limit](
                ctx, c_ptr, n_out, x.unsafe_ptr(), k_dim, k_dim, row_ids.unsafe_ptr(), offsets,
                w.unsafe_ptr(), n_w, g_ptr, w_ptr if gated else c_ptr,
                n_w if gated else n_out, row_bias,
            )
            # The scratch must outlive the kernels that use it.
            ctx.synchronize()
            _ = gathered^
            _ = wide^
            return
        var valid_rows = Int(expert_offsets.unsafe_ptr().unsafe_load(w.dim_size(0)))
        for r in range(valid_rows, m_rows):
            for c in range(n_out):
                c_ptr.unsafe_store(r * n_out + c, Scalar[dtype](0))
        if n_out == 0:
            return
        expert_matmul_cpu[dtype, activation, gather, packed, has_bias, swiglu_alpha, swiglu_limit](
            c_ptr, n_out, x.unsafe_ptr(), x.dim_size(1), row_ids.unsafe_ptr(),
            expert_offsets.unsafe_ptr(), w.dim_size(0), w.unsafe_ptr(), w.dim_size(2), bias.unsafe_ptr(),
        )


comptime PACKED_ON_GPU = "packed expert weights are a CPU layout; the GPU kernels read [E, K, N] as it is"


@extensibility.register("pymoe_pack_expert_weights")
struct PackExpertWeights:
    """Expert weights [E, K, N] in the CPU kernels' pre-packed layout (same
    shape and dtype; see cpu_pack.mojo). Run once when the weights load."""

    @staticmethod
    def execute[
        swiglu: Bool,
        target: StaticString,
    ](
        output: OutputTensor[rank=3, ...],
        w: InputTensor[dtype=output.dtype, rank=3, ...],
        ctx: DeviceContext,
    ) raises:
        comptime if target == "gpu":
            raise Error(PACKED_ON_GPU)
        else:
            pack_expert_weights_cpu[output.dtype, swiglu](
                output.unsafe_ptr(), w.unsafe_ptr(), w.dim_size(0), w.dim_size(1), w.dim_size(2),
            )
