# Row-wise, numerically stable softmax over the last axis of a 2-D tensor.
#
# CPU: three vectorised passes per row (max, exp + sum, scale), rows split
# across the worker threads. GPU: one thread per row (the rows pymoe softmaxes
# are router logits, E entries). The max is subtracted before exp so that
# large logits cannot overflow; sums are accumulated in float32 whatever the
# storage dtype.

import extensibility
from extensibility import InputTensor, OutputTensor
from max.algorithm import sync_parallelize
from max.gpu import block_dim, block_idx, thread_idx
from max.gpu.host import DeviceContext
from max.runtime.asyncrt import parallelism_level
from std.algorithm import vectorize
from std.math import ceildiv, exp
from std.memory import Pointer
from std.sys import simd_width_of
from .gpu_launch import pdl_attributes, pdl_begin

comptime GPU_BLOCK = 256


def softmax_gpu[dtype: DType](
    ctx: DeviceContext,
    dst: Pointer[Scalar[dtype], MutAnyOrigin],
    src: Pointer[Scalar[dtype], MutAnyOrigin],
    rows: Int,
    cols: Int,
) raises:
    """Row softmax on the GPU, one thread per row."""
    var n_rows = Int64(rows)
    var n_cols = Int64(cols)

    def row_kernel() {var dst, var src, var n_rows, var n_cols}:
        pdl_begin()
        var r = block_idx.x * block_dim.x + thread_idx.x
        if r >= Int(n_rows):
            return
        var c = Int(n_cols)
        var xr = src.unsafe_offset(r * c)
        var yr = dst.unsafe_offset(r * c)
        var m = Float32.MIN
        for i in range(c):
            m = max(m, xr.unsafe_load(i).cast[DType.float32]())
        var total: Float32 = 0
        for i in range(c):
            total += exp(xr.unsafe_load(i).cast[DType.float32]() - m)
        var inv = 1.0 / total
        for i in range(c):
            yr.unsafe_store(i, (exp(xr.unsafe_load(i).cast[DType.float32]() - m) * inv).cast[dtype]())

    ctx.enqueue_function(row_kernel, attributes=pdl_attributes(), grid_dim=ceildiv(rows, GPU_BLOCK), block_dim=GPU_BLOCK)


@extensibility.register("pymoe_softmax")
struct Softmax:
    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        x: InputTensor[dtype=output.dtype, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        comptime dtype = output.dtype
        comptime W = simd_width_of[DType.float32]()
        var rows = x.dim_size(0)
        var cols = x.dim_size(1)
        if rows == 0 or cols == 0:
            return
        var src = x.unsafe_ptr()
        var dst = output.unsafe_ptr()
        comptime if target == "gpu":
            softmax_gpu[dtype](ctx, dst, src, rows, cols)
            return
        var workers = min(parallelism_level(None), rows)

        def rows_of_worker(w: Int) {var src, var dst, var rows, var cols, var workers}:
            for r in range(w * rows // workers, (w + 1) * rows // workers):
                var xr = src.unsafe_offset(r * cols)
                var yr = dst.unsafe_offset(r * cols)

                var vmax = SIMD[DType.float32, W](Float32.MIN)

                def max_step[width: Int](i: Int) {mut vmax, var xr}:
                    var v = xr.unsafe_load[width=width](i).cast[DType.float32]()
                    comptime if width == W:
                        vmax = max(vmax, rebind[SIMD[DType.float32, W]](v))
                    else:
                        vmax[0] = max(vmax[0], v.reduce_max())

                vectorize[W](cols, max_step)
                var row_max = vmax.reduce_max()

                var vsum = SIMD[DType.float32, W](0)

                def exp_step[width: Int](i: Int) {mut vsum, var xr, var yr, var row_max}:
                    var e = exp(xr.unsafe_load[width=width](i).cast[DType.float32]() - row_max)
                    yr.unsafe_store(i, e.cast[dtype]())
                    comptime if width == W:
                        vsum += rebind[SIMD[DType.float32, W]](e)
                    else:
                        vsum[0] += e.reduce_add()

                vectorize[W](cols, exp_step)
                var inv_sum = 1.0 / vsum.reduce_add()

                # Re-read exp values from the output: for bfloat16 this scales
                # the rounded values, an error well inside bf16 tolerance.
                def scale_step[width: Int](i: Int) {var yr, var inv_sum}:
                    var e = yr.unsafe_load[width=width](i).cast[DType.float32]()
                    yr.unsafe_store(i, (e * inv_sum).cast[dtype]())

                vectorize[W](cols, scale_step)

        sync_parallelize(rows_of_worker, workers)
