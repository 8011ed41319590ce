# MoE combine: the weighted gather-sum back to token order.
#
#   out[t, :] = sum_j topk_weights[t, j] * expert_out[slot_to_row[t*k + j], :]
#
# over the slots that were not dropped (slot_to_row >= 0); a token whose slots
# were all dropped gets zeros. Tokens are split across worker threads and the
# model dimension is vectorised; the sum is accumulated in float32.

import extensibility
from extensibility import InputTensor, OutputTensor
from max.algorithm import sync_parallelize
from max.gpu.host import DeviceContext
from max.runtime.asyncrt import parallelism_level
from std.algorithm import vectorize
from std.math import ceildiv
from std.memory import Pointer
from std.sys import simd_width_of

comptime TOKENS_PER_WORKER_MIN = 16


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
        combine_cpu[output.dtype](
            output.unsafe_ptr(), output.dim_size(0), output.dim_size(1), expert_out.unsafe_ptr(),
            topk_weights.unsafe_ptr(), slot_to_row.unsafe_ptr(), topk_weights.dim_size(1),
        )
