# MoE combine: the weighted gather-sum back to token order.
#
#   out[t, :] = sum_j topk_weights[t, j] * expert_out[slot_to_row[t*k + j], :]
#
# over the slots that were not dropped (slot_to_row >= 0); a token whose slots
# were all dropped gets zeros. CPU: tokens are split across worker threads and
# the model dimension is vectorised. GPU: one thread per 16 bytes of output,
# a block row per token, so the reads of each expert row are coalesced. The sum
# is accumulated in float32.
#
# combine_gpu also serves moe_ffn's every-expert path, where expert_out holds
# every expert's output for every token ([E * T, d], expert-major): there the
# row of slot (t, j) is topk_ids[t, j] * T + t, and slot_to_row only says
# whether the slot was dropped.

import extensibility
from extensibility import InputTensor, OutputTensor
from max.algorithm import sync_parallelize
from max.gpu import block_dim, block_idx, thread_idx
from max.gpu.host import DeviceContext
from max.runtime.asyncrt import parallelism_level
from std.algorithm import vectorize
from std.math import ceildiv
from std.memory import Pointer
from std.sys import simd_width_of, size_of

from .gpu_gemm import aligned16
from .gpu_launch import pdl_attributes, pdl_begin

comptime TOKENS_PER_WORKER_MIN = 16
comptime GPU_BLOCK = 256


def combine_gpu[dtype: DType, every_expert: Bool = False](
    ctx: DeviceContext,
    dst: Pointer[Scalar[dtype], MutAnyOrigin],
    tokens: Int,
    d: Int,
    src: Pointer[Scalar[dtype], MutAnyOrigin],
    weights: Pointer[Float32, MutAnyOrigin],
    rows: Pointer[Int32, MutAnyOrigin],
    k: Int,
    topk_ids: Pointer[Int32, MutAnyOrigin],
) raises:
    """The weighted gather-sum on the GPU: one block per (token, column
    block), 16 bytes per thread when d allows (a flat grid: the y dimension
    of a grid is limited to 65535). With `every_expert`, src is [E * T, d]
    expert-major and topk_ids picks the rows (see the file header);
    otherwise topk_ids is not read."""
    comptime VW = 16 // size_of[Scalar[dtype]]()
    if tokens == 0 or d == 0:
        return
    if d % VW == 0 and aligned16[dtype](dst, src):
        _combine_gpu[dtype, VW, every_expert](ctx, dst, tokens, d, src, weights, rows, k, topk_ids)
    else:
        _combine_gpu[dtype, 1, every_expert](ctx, dst, tokens, d, src, weights, rows, k, topk_ids)


def _combine_gpu[dtype: DType, vw: Int, every_expert: Bool](
    ctx: DeviceContext,
    dst: Pointer[Scalar[dtype], MutAnyOrigin],
    tokens: Int,
    d: Int,
    src: Pointer[Scalar[dtype], MutAnyOrigin],
    weights: Pointer[Float32, MutAnyOrigin],
    rows: Pointer[Int32, MutAnyOrigin],
    k: Int,
    topk_ids: Pointer[Int32, MutAnyOrigin],
) raises:
    comptime ALIGN = vw * size_of[Scalar[dtype]]()  # see gpu_gemm.gather_rows_gpu
    var n_d = Int64(d)
    var n_k = Int64(k)
    var n_t = Int64(tokens)
    var col_blocks = ceildiv(d // vw, GPU_BLOCK)
    var n_cb = Int64(col_blocks)

    def kernel() {var dst, var src, var weights, var rows, var topk_ids, var n_d, var n_k, var n_t, var n_cb}:
        pdl_begin()
        var t = Int(block_idx.x) // Int(n_cb)
        var c = ((Int(block_idx.x) % Int(n_cb)) * GPU_BLOCK + Int(thread_idx.x)) * vw
        var width = Int(n_d)
        if c >= width:
            return
        var acc = SIMD[DType.float32, vw](0)
        for j in range(Int(n_k)):
            var slot = t * Int(n_k) + j
            var row = Int(rows.unsafe_load(slot))
            comptime if every_expert:
                if row >= 0:
                    row = Int(topk_ids.unsafe_load(slot)) * Int(n_t) + t
            if row >= 0:
                acc += weights.unsafe_load(slot) * src.unsafe_load[width=vw, alignment=ALIGN](row * width + c).cast[DType.float32]()
        dst.unsafe_store[alignment=ALIGN](t * width + c, acc.cast[dtype]())

    ctx.enqueue_function(kernel, attributes=pdl_attributes(), grid_dim=tokens * col_blocks, block_dim=GPU_BLOCK)


def combine_cpu[dtype: DType](
    dst: Pointer[Scalar[dtype], MutAnyOrigin],
    tokens: Int,
    d: Int,
    src: Pointer[Scalar[dtype], MutAnyOrigin],
    weights: Pointer[Float32, MutAnyOrigin],
    rows: Pointer[Int32, MutAnyOrigin],
    k: Int,
):
    """Weighted gather-sum: out[t] = sum_j weights[t*k+j] * src[rows[t*k+j]] over kept slots."""
    comptime W = simd_width_of[DType.float32]()
    if tokens == 0:
        return
    var workers = max(1, min(parallelism_level(None), ceildiv(tokens, TOKENS_PER_WORKER_MIN)))

    def tokens_of_worker(w: Int) {var dst, var src, var weights, var rows, var tokens, var d, var k, var workers}:
        for t in range(w * tokens // workers, (w + 1) * tokens // workers):
            var out_row = dst.unsafe_offset(t * d)

            def column_step[width: Int](c: Int) {var out_row, var src, var weights, var rows, var t, var d, var k}:
                var acc = SIMD[DType.float32, width](0)
                for j in range(k):
                    var row = Int(rows.unsafe_load(t * k + j))
                    if row >= 0:
                        var y = src.unsafe_load[width=width](row * d + c).cast[DType.float32]()
                        acc += weights.unsafe_load(t * k + j) * y
                out_row.unsafe_store(c, acc.cast[dtype]())

            vectorize[W](d, column_step)

    sync_parallelize(tokens_of_worker, workers)


@extensibility.register("pymoe_moe_combine")
struct MoECombine:
    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        expert_out: InputTensor[dtype=output.dtype, rank=2, ...],
        topk_weights: InputTensor[dtype=DType.float32, rank=2, ...],
        slot_to_row: InputTensor[dtype=DType.int32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        comptime if target == "gpu":
            combine_gpu[output.dtype](
                ctx, output.unsafe_ptr(), output.dim_size(0), output.dim_size(1), expert_out.unsafe_ptr(),
                topk_weights.unsafe_ptr(), slot_to_row.unsafe_ptr(), topk_weights.dim_size(1),
                slot_to_row.unsafe_ptr(),
            )
        else:
            combine_cpu[output.dtype](
                output.unsafe_ptr(), output.dim_size(0), output.dim_size(1), expert_out.unsafe_ptr(),
                topk_weights.unsafe_ptr(), slot_to_row.unsafe_ptr(), topk_weights.dim_size(1),
            )
