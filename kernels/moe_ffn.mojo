# The experts' FFN and the combine in one op, with caller-owned workspaces:
#
#   h   = act(x[row_ids] @ w1[e] + b1[e])  (grouped GEMM, gathered, fused act)
#   y   = h @ w2[e] + b2[e]                (grouped GEMM)
#   out = moe_combine(y, topk_weights, slot_to_row)
#
# The expert biases (GPT-OSS) are there only with has_b1 / has_b2 (compile
# time); without them b1 / b2 are placeholders that are not read. alpha and
# limit of "clamped_swiglu" are compile-time parameters too.
#
# It is moe_expert_matmul twice and moe_combine, but h and y live in the two
# mutable workspace buffers that the caller owns (pymoe's buffer pool) rather
# than in tensors the graph allocates on every call. The workspaces may have
# more rows than row_ids (the pool grows geometrically and is reused for
# smaller batches); only the first len(row_ids) rows are used. h has w1's
# column count (2*d_ff for SwiGLU) because on the GPU the first GEMM writes
# both SwiGLU halves before the activation folds them.
#
# GPU routed path: the tensor-core grouped GEMM (gpu_grouped_gemm.mojo, no
# host sync) for 16-bit inputs with widths that are multiples of 8, unless
# cublas_is_faster (never on Hopper); else cuBLAS per expert (gpu_gemm.mojo), which reads the
# offsets back to the host first.
#
# Every-expert path (GPU, every_expert_min_tokens <= T <= every_expert_max_tokens,
# chosen by Python: pymoe.ops.every_expert_token_range, which never picks it
# where the grouped GEMM runs): for a small batch, every expert's weights are
# read anyway (decode), the GEMMs are weight-bandwidth bound, and the cuBLAS
# routed path's costs are fixed ones: reading the offsets back to the host (a
# stream sync) and one GEMM launch per expert. So every expert
# runs on every token, as two strided-batched GEMMs (E at once, no gather, no
# host sync):
#
#   h[e*T + t] = act(x[t] @ w1[e] + b1[e]),   y[e*T + t] = h[e*T + t] @ w2[e] + b2[e]
#
# and the combine picks y[topk_ids[t, j]*T + t] for the kept slots. That is
# E/k times the routed FLOPs, which Python only allows while they stay under
# the weight-read time; the workspaces then need E*T rows.

import extensibility
from extensibility import InputTensor, OutputTensor
from extensibility import _MutableInputTensor as MutableInputTensor
from max.gpu.host import DeviceContext

from .cpu_gemm import expert_matmul_cpu
from .gpu_gemm import ExpertBias, activation_gpu, expert_matmul_gpu, expert_offsets_to_host, gemm_batched_gpu
from .gpu_grouped_gemm import cublas_is_faster, grouped_gemm_gpu, grouped_gemm_supported
from .moe_combine import combine_cpu, combine_gpu
from .moe_decode import FD_COUNTERS, fused_decode_gpu, fused_decode_plan, fused_decode_scratch_floats, fused_decode_supported
from .moe_expert_matmul import PACKED_ON_GPU, check_activation
from std.sys import size_of


@extensibility.register("pymoe_moe_ffn")
struct MoEFFN:
    @staticmethod
    def execute[
        activation: StaticString,
        packed: Bool,
        every_expert_min_tokens: Int,
        every_expert_max_tokens: Int,
        has_b1: Bool,
        has_b2: Bool,
        swiglu_alpha: Float32,
        swiglu_limit: Float32,
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        h_workspace: MutableInputTensor[dtype=output.dtype, rank=2, ...],
        y_workspace: MutableInputTensor[dtype=output.dtype, rank=2, ...],
        x: InputTensor[dtype=output.dtype, rank=2, ...],
        row_ids: InputTensor[dtype=DType.int32, rank=1, ...],
        expert_offsets: InputTensor[dtype=DType.int32, rank=1, ...],
        topk_weights: InputTensor[dtype=DType.float32, rank=2, ...],
        topk_ids: InputTensor[dtype=DType.int32, rank=2, ...],
        slot_to_row: InputTensor[dtype=DType.int32, rank=1, ...],
        w1: InputTensor[dtype=output.dtype, rank=3, ...],
        w2: InputTensor[dtype=output.dtype, rank=3, ...],
        b1: InputTensor[dtype=output.dtype, rank=2, ...],
        b2: InputTensor[dtype=output.dtype, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        check_activation[activation]()
        comptime dtype = output.dtype
        var slots = row_ids.dim_size(0)
        var experts = w1.dim_size(0)
        var n_w1 = w1.dim_size(2)
        var d_ff = w2.dim_size(1)
        var d_model = output.dim_size(1)
        var tokens = x.dim_size(0)
        if h_workspace.dim_size(1) != n_w1 or y_workspace.dim_size(1) != d_model:
            raise Error("pymoe_moe_ffn: workspaces must be [rows, w1 columns] and [rows, d_model]")
        comptime if has_b1:
            if b1.dim_size(0) != experts or b1.dim_size(1) != n_w1:
                raise Error("pymoe_moe_ffn: b1 must be [E, w1 columns]")
        comptime if has_b2:
            if b2.dim_size(0) != experts or b2.dim_size(1) != d_model:
                raise Error("pymoe_moe_ffn: b2 must be [E, d_model]")
        comptime if target == "gpu":
            comptime if packed:
                raise Error(PACKED_ON_GPU)
            if every_expert_min_tokens <= tokens and tokens <= every_expert_max_tokens:
                if h_workspace.dim_size(0) < experts * tokens or y_workspace.dim_size(0) < experts * tokens:
                    raise Error("pymoe_moe_ffn: the every-expert path needs workspaces of num_experts * tokens rows")
                every_expert_ffn_gpu[dtype, activation, has_b1, has_b2, swiglu_alpha, swiglu_limit](
                    ctx, output.unsafe_ptr(), h_workspace.unsafe_ptr(), y_workspace.unsafe_ptr(), x.unsafe_ptr(),
                    topk_weights.unsafe_ptr(), topk_ids.unsafe_ptr(), slot_to_row.unsafe_ptr(),
                    topk_weights.dim_size(1), w1.unsafe_ptr(), w2.unsafe_ptr(), tokens, experts, d_model, n_w1, d_ff,
                    b1.unsafe_ptr(), b2.unsafe_ptr(),
                )
                return
        if h_workspace.dim_size(0) < slots or y_workspace.dim_size(0) < slots:
            raise Error("pymoe_moe_ffn: workspace has fewer rows than token slots")
        comptime if target == "gpu":
            var h = h_workspace.unsafe_ptr()
            var y = y_workspace.unsafe_ptr()
            var off_dev = expert_offsets.unsafe_ptr()
            var x_ptr = x.unsafe_ptr()
            var w1_ptr = w1.unsafe_ptr()
            var w2_ptr = w2.unsafe_ptr()
            if (
                not cublas_is_faster(ctx, experts, slots)
                and grouped_gemm_supported[dtype](d_model, d_ff, d_model, d_ff, experts, x_ptr, h, y, w1_ptr, w2_ptr)
                and grouped_gemm_supported[dtype](d_ff, d_model, d_ff, d_model, experts)
            ):
                # The sync-free path: h = act(x[row_ids] @ w1 + b1) written
                # compactly ([slots, d_ff], row stride d_ff), y = h @ w2 + b2.
                grouped_gemm_gpu[dtype, activation, True, has_b1, swiglu_alpha, swiglu_limit](
                    ctx, h, d_ff, x_ptr, d_model, d_model, row_ids.unsafe_ptr(), off_dev, experts, slots,
                    w1_ptr, n_w1, b1.unsafe_ptr(),
                )
                grouped_gemm_gpu[dtype, "none", False, has_b2](
                    ctx, y, d_model, h, d_ff, d_ff, row_ids.unsafe_ptr(), off_dev, experts, slots,
                    w2_ptr, d_model, b2.unsafe_ptr(),
                )
                combine_gpu[dtype](
                    ctx, output.unsafe_ptr(), output.dim_size(0), d_model, y,
                    topk_weights.unsafe_ptr(), slot_to_row.unsafe_ptr(), topk_weights.dim_size(1),
                    topk_ids.unsafe_ptr(),
                )
                return
            # float32, shapes the tensor-core kernel does not take, and (off
            # Hopper) few large experts with many rows each (cublas_is_faster):
            # cuBLAS per expert, which needs the offsets on the host (a stream sync).
            var offsets = expert_offsets_to_host(ctx, off_dev, experts)
            # y doubles as the buffer of gathered x rows: the second GEMM
            # overwrites it only after the first one has read it (one stream).
            # The first GEMM writes all n_w1 columns of h; for SwiGLU the
            # activation folds them into the first d_ff columns in place.
            expert_matmul_gpu[dtype, activation, True, has_b1, swiglu_alpha, swiglu_limit](
                ctx, h, n_w1, x.unsafe_ptr(), d_model, d_model, row_ids.unsafe_ptr(), offsets,
                w1.unsafe_ptr(), n_w1, y, h, n_w1, ExpertBias[dtype](b1.unsafe_ptr(), n_w1, off_dev, experts, 0),
            )
            expert_matmul_gpu[dtype, "none", False, has_b2](
                ctx, y, d_model, h, n_w1, d_ff, row_ids.unsafe_ptr(), offsets,
                w2.unsafe_ptr(), d_model, y, y, d_model, ExpertBias[dtype](b2.unsafe_ptr(), d_model, off_dev, experts, 0),
            )
            combine_gpu[dtype](
                ctx, output.unsafe_ptr(), output.dim_size(0), d_model, y,
                topk_weights.unsafe_ptr(), slot_to_row.unsafe_ptr(), topk_weights.dim_size(1),
                topk_ids.unsafe_ptr(),
            )
            return
        # The CPU kernel fuses the activation and writes h compactly
        # ([slots, d_ff], row stride d_ff) into the front of the workspace.
        expert_matmul_cpu[dtype, activation, True, packed, has_b1, swiglu_alpha, swiglu_limit](
            h_workspace.unsafe_ptr(), d_ff, x.unsafe_ptr(), x.dim_size(1), row_ids.unsafe_ptr(),
            expert_offsets.unsafe_ptr(), experts, w1.unsafe_ptr(), w1.dim_size(2), b1.unsafe_ptr(),
        )
        expert_matmul_cpu[dtype, "none", False, packed, has_b2](
            y_workspace.unsafe_ptr(), d_model, h_workspace.unsafe_ptr(), d_ff, row_ids.unsafe_ptr(),
            expert_offsets.unsafe_ptr(), experts, w2.unsafe_ptr(), d_model, b2.unsafe_ptr(),
        )
        combine_cpu[dtype](
            output.unsafe_ptr(), output.dim_size(0), d_model, y_workspace.unsafe_ptr(),
            topk_weights.unsafe_ptr(), slot_to_row.unsafe_ptr(), topk_weights.dim_size(1),
        )


@extensibility.register("pymoe_moe_ffn_decode")
struct MoEFFNDecode:
    """pymoe_moe_ffn plus a float32 scratch buffer for the fused decode kernel
    (moe_decode.mojo): on the GPU, with 16-bit weights, a batch of at most
    fused_decode_max_tokens tokens (the layer passes 0, i.e. never, where a
    capacity limit could drop slots: the fused kernel keeps them all) runs as
    that one kernel from the gate's outputs; the dispatch's outputs and the
    workspaces are not read. Every other call is pymoe_moe_ffn's. The scratch
    holds FD_COUNTERS int32 counters first, which must be zero before the
    first call (the kernel leaves them zero), then the kernel's partials."""

    @staticmethod
    def execute[
        activation: StaticString,
        packed: Bool,
        every_expert_min_tokens: Int,
        every_expert_max_tokens: Int,
        has_b1: Bool,
        has_b2: Bool,
        swiglu_alpha: Float32,
        swiglu_limit: Float32,
        fused_decode_max_tokens: Int,
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        h_workspace: MutableInputTensor[dtype=output.dtype, rank=2, ...],
        y_workspace: MutableInputTensor[dtype=output.dtype, rank=2, ...],
        decode_scratch: MutableInputTensor[dtype=DType.float32, rank=1, ...],
        x: InputTensor[dtype=output.dtype, rank=2, ...],
        row_ids: InputTensor[dtype=DType.int32, rank=1, ...],
        expert_offsets: InputTensor[dtype=DType.int32, rank=1, ...],
        topk_weights: InputTensor[dtype=DType.float32, rank=2, ...],
        topk_ids: InputTensor[dtype=DType.int32, rank=2, ...],
        slot_to_row: InputTensor[dtype=DType.int32, rank=1, ...],
        w1: InputTensor[dtype=output.dtype, rank=3, ...],
        w2: InputTensor[dtype=output.dtype, rank=3, ...],
        b1: InputTensor[dtype=output.dtype, rank=2, ...],
        b2: InputTensor[dtype=output.dtype, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        comptime if target == "gpu" and size_of[Scalar[output.dtype]]() == 2 and not packed:
            var tokens = x.dim_size(0)
            var k = topk_ids.dim_size(1)
            var d_model = output.dim_size(1)
            var d_ff = w2.dim_size(1)
            if tokens <= fused_decode_max_tokens and fused_decode_supported(tokens, k, d_model, d_ff):
                check_activation[activation]()
                var plan = fused_decode_plan(tokens * k, d_model, d_ff, ctx.default_device_info.sm_count)
                var need = FD_COUNTERS + fused_decode_scratch_floats(tokens * k, d_model, d_ff, plan)
                if decode_scratch.dim_size(0) < need:
                    raise Error("pymoe_moe_ffn_decode: the decode scratch has ", decode_scratch.dim_size(0),
                                " floats, the call needs ", need)
                var scratch = decode_scratch.unsafe_ptr()
                fused_decode_gpu[output.dtype, activation, has_b1, has_b2, swiglu_alpha, swiglu_limit](
                    ctx, output.unsafe_ptr(), x.unsafe_ptr(), topk_ids.unsafe_ptr(), topk_weights.unsafe_ptr(),
                    tokens, k, w1.unsafe_ptr(), w2.unsafe_ptr(), b1.unsafe_ptr(), b2.unsafe_ptr(), w1.dim_size(0),
                    d_model, d_ff, scratch.unsafe_offset(FD_COUNTERS), scratch.bitcast[Int32](), plan,
                )
                return
        MoEFFN.execute[
            activation, packed, every_expert_min_tokens, every_expert_max_tokens, has_b1, has_b2, swiglu_alpha,
            swiglu_limit, target,
        ](
            output, h_workspace, y_workspace, x, row_ids, expert_offsets, topk_weights, topk_ids, slot_to_row, w1, w2,
            b1, b2, ctx,
        )


def every_expert_ffn_gpu[
    dtype: DType, activation: StaticString, has_b1: Bool, has_b2: Bool, alpha: Float32, limit: Float32
](
    ctx: DeviceContext,
    dst: Pointer[Scalar[dtype], MutAnyOrigin],
    h: Pointer[Scalar[dtype], MutAnyOrigin],
    y: Pointer[Scalar[dtype], MutAnyOrigin],
    x: Pointer[Scalar[dtype], MutAnyOrigin],
    topk_weights: Pointer[Float32, MutAnyOrigin],
    topk_ids: Pointer[Int32, MutAnyOrigin],
    slot_to_row: Pointer[Int32, MutAnyOrigin],
    k: Int,
    w1: Pointer[Scalar[dtype], MutAnyOrigin],
    w2: Pointer[Scalar[dtype], MutAnyOrigin],
    tokens: Int,
    experts: Int,
    d_model: Int,
    n_w1: Int,
    d_ff: Int,
    b1: Pointer[Scalar[dtype], MutAnyOrigin],
    b2: Pointer[Scalar[dtype], MutAnyOrigin],
) raises:
    """The every-expert path (see the file header): dst [T, d_model] = the
    layer's output; h [E*T, n_w1] and y [E*T, d_model] are the workspaces;
    b1 [E, n_w1] and b2 [E, d_model] the biases (read with has_b1 / has_b2)."""
    # Row e*T + t of h and y belongs to expert e: T rows per expert.
    var no_offsets = topk_ids  # not read: the experts' rows are found by division
    # x is the A of every batch entry (stride 0).
    gemm_batched_gpu[dtype](
        ctx, h, n_w1, tokens * n_w1, x, d_model, 0, w1, n_w1, d_model * n_w1, tokens, n_w1, d_model, experts,
    )
    activation_gpu[dtype, activation, has_b1, alpha, limit](
        ctx, h, n_w1, h, n_w1, experts * tokens, d_ff, ExpertBias[dtype](b1, n_w1, no_offsets, experts, tokens),
    )
    gemm_batched_gpu[dtype](
        ctx, y, d_model, tokens * d_model, h, n_w1, tokens * n_w1, w2, d_model, d_ff * d_model,
        tokens, d_model, d_ff, experts,
    )
    comptime if has_b2:
        activation_gpu[dtype, "none", True](
            ctx, y, d_model, y, d_model, experts * tokens, d_model,
            ExpertBias[dtype](b2, d_model, no_offsets, experts, tokens),
        )
    combine_gpu[dtype, True](ctx, dst, tokens, d_model, y, topk_weights, slot_to_row, k, topk_ids)
