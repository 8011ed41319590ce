# The experts' FFN and the combine in one op, with caller-owned workspaces:
#
#   h   = act(x[row_ids] @ w1[e])         (grouped GEMM, gathered, fused act)
#   y   = h @ w2[e]                       (grouped GEMM)
#   out = moe_combine(y, topk_weights, slot_to_row)
#
# It is moe_expert_matmul twice and moe_combine, but h and y live in the two
# mutable workspace buffers that the caller owns (pymoe's buffer pool) rather
# than in tensors the graph allocates on every call. The workspaces may have
# more rows than row_ids (the pool grows geometrically and is reused for
# smaller batches); only the first len(row_ids) rows are used.

import extensibility
from extensibility import InputTensor, OutputTensor
from extensibility import _MutableInputTensor as MutableInputTensor
from max.gpu.host import DeviceContext

from .moe_combine import combine_cpu, combine_gpu
from .moe_expert_matmul import check_activation, expert_matmul_cpu, expert_matmul_gpu


@extensibility.register("pymoe_moe_ffn")
struct MoEFFN:
    @staticmethod
    def execute[
        activation: StaticString,
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        h_workspace: MutableInputTensor[dtype=output.dtype, rank=2, ...],
        y_workspace: MutableInputTensor[dtype=output.dtype, rank=2, ...],
        x: InputTensor[dtype=output.dtype, rank=2, ...],
        row_ids: InputTensor[dtype=DType.int32, rank=1, ...],
        expert_offsets: InputTensor[dtype=DType.int32, rank=1, ...],
        topk_weights: InputTensor[dtype=DType.float32, rank=2, ...],
        slot_to_row: InputTensor[dtype=DType.int32, rank=1, ...],
        w1: InputTensor[dtype=output.dtype, rank=3, ...],
        w2: InputTensor[dtype=output.dtype, rank=3, ...],
        ctx: DeviceContext,
    ) raises:
        check_activation[activation]()
        comptime dtype = output.dtype
        var slots = row_ids.dim_size(0)
        if h_workspace.dim_size(0) < slots or y_workspace.dim_size(0) < slots:
            raise Error("pymoe_moe_ffn: workspace has fewer rows than token slots")
        var experts = w1.dim_size(0)
        var d_ff = h_workspace.dim_size(1)
        var d_model = output.dim_size(1)
        comptime if target == "gpu":
            expert_matmul_gpu[dtype, activation, True](
                ctx, h_workspace.unsafe_ptr(), d_ff, x.unsafe_ptr(), x.dim_size(1), row_ids.unsafe_ptr(),
                expert_offsets.unsafe_ptr(), experts, w1.unsafe_ptr(), w1.dim_size(2), slots,
            )
            expert_matmul_gpu[dtype, "none", False](
                ctx, y_workspace.unsafe_ptr(), d_model, h_workspace.unsafe_ptr(), d_ff, row_ids.unsafe_ptr(),
                expert_offsets.unsafe_ptr(), experts, w2.unsafe_ptr(), d_model, slots,
            )
            combine_gpu[dtype](
                ctx, output.unsafe_ptr(), output.dim_size(0), d_model, y_workspace.unsafe_ptr(),
                topk_weights.unsafe_ptr(), slot_to_row.unsafe_ptr(), topk_weights.dim_size(1),
            )
            return
        expert_matmul_cpu[dtype, activation, True](
            h_workspace.unsafe_ptr(), d_ff, x.unsafe_ptr(), x.dim_size(1), row_ids.unsafe_ptr(),
            expert_offsets.unsafe_ptr(), experts, w1.unsafe_ptr(), w1.dim_size(2),
        )
        expert_matmul_cpu[dtype, "none", False](
            y_workspace.unsafe_ptr(), d_model, h_workspace.unsafe_ptr(), d_ff, row_ids.unsafe_ptr(),
            expert_offsets.unsafe_ptr(), experts, w2.unsafe_ptr(), d_model,
        )
        combine_cpu[dtype](
            output.unsafe_ptr(), output.dim_size(0), d_model, y_workspace.unsafe_ptr(),
            topk_weights.unsafe_ptr(), slot_to_row.unsafe_ptr(), topk_weights.dim_size(1),
        )
