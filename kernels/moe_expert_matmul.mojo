# Grouped GEMM over the ragged expert groups, with an optional fused activation.
#
#   for each expert e, for each row r in [expert_offsets[e], expert_offsets[e+1]):
#       a_r        = x[row_ids[r]] if gather else x[r]
#       output[r]  = act(a_r @ w[e])
#
# Shapes: x [R, K], row_ids [M] int32, expert_offsets [E+1] int32,
# w [E, K, N] (row-major, so x @ w[e] reads w[e] along N), output [M, N_out].
# Activations (compile-time): "none", "relu", "silu" with N_out = N, and
# "swiglu", where w[e] = [W_gate | W_up] along N and
# output[r] = silu(a_r @ W_gate) * (a_r @ W_up), N_out = N / 2.
# Rows from expert_offsets[E] to M (slots dropped by the capacity) are zeroed.
#
# CPU schedule: the work is cut into (expert, block of rows, block of columns)
# jobs spread over the worker threads, so both prefill (many rows per expert)
# and decode (a few rows, wide columns) keep every core busy. Inside a job a
# register-blocked micro-kernel holds MR rows x 2 SIMD vectors of float32
# accumulators; each k step broadcasts one element of each A row and does
# fused multiply-adds against two vectors of the weight row. The B strip
# (K x 2 vectors) is reused by all row blocks of the job while it sits in cache.
# Accumulation is float32 for every storage dtype.

import extensibility
from extensibility import InputTensor, OutputTensor
from max.algorithm import sync_parallelize
from max.gpu.host import DeviceContext
from max.runtime.asyncrt import parallelism_level
from std.math import ceildiv, exp, fma
from std.sys import simd_width_of

# Rows per micro-kernel: MR x 2 accumulator vectors + 2 weight vectors + 1
# broadcast fit the 16 vector registers of AVX2.
comptime MR = 6
# Rows and columns of one parallel job.
comptime ROWS_PER_JOB = 8 * MR
comptime VECTORS_PER_JOB = 16


@always_inline
def _activate[activation: StaticString, width: Int](v: SIMD[DType.float32, width]) -> SIMD[DType.float32, width]:
    comptime if activation == "relu":
        return max(v, SIMD[DType.float32, width](0))
    elif activation == "silu":
        return v / (1.0 + exp(-v))
    else:
        return v


@extensibility.register("pymoe_moe_expert_matmul")
struct MoEExpertMatmul:
    @staticmethod
    def execute[
        activation: StaticString,
        gather: Bool,
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        x: InputTensor[dtype=output.dtype, rank=2, ...],
        row_ids: InputTensor[dtype=DType.int32, rank=1, ...],
        expert_offsets: InputTensor[dtype=DType.int32, rank=1, ...],
        w: InputTensor[dtype=output.dtype, rank=3, ...],
        ctx: DeviceContext,
    ) raises:
        comptime assert (
            activation == "none" or activation == "relu" or activation == "silu" or activation == "swiglu"
        ), "activation must be none, relu, silu or swiglu"
        comptime dtype = output.dtype
        comptime W = simd_width_of[DType.float32]()
        comptime swiglu = activation == "swiglu"

        var m_rows = output.dim_size(0)
        var n_out = output.dim_size(1)
        var k_dim = x.dim_size(1)
        var experts = w.dim_size(0)
        var n_w = w.dim_size(2)
        var a_ptr = x.unsafe_ptr()
        var ids_ptr = row_ids.unsafe_ptr()
        var off_ptr = expert_offsets.unsafe_ptr()
        var b_ptr = w.unsafe_ptr()
        var c_ptr = output.unsafe_ptr()

        var valid_rows = Int(off_ptr.unsafe_load(experts))
        for r in range(valid_rows, m_rows):
            for c in range(n_out):
                c_ptr.unsafe_store(r * n_out + c, Scalar[dtype](0))
        if valid_rows == 0 or n_out == 0:
            return

        # Job table: expert e owns jobs [job_start[e], job_start[e+1]).
        var col_jobs = ceildiv(n_out, VECTORS_PER_JOB * W)
        var job_start = List[Int](length=experts + 1, fill=0)
        for e in range(experts):
            var rows_e = Int(off_ptr.unsafe_load(e + 1)) - Int(off_ptr.unsafe_load(e))
            job_start[e + 1] = job_start[e] + ceildiv(rows_e, ROWS_PER_JOB) * col_jobs
        var total_jobs = job_start[experts]
        var job_start_ptr = job_start.unsafe_ptr()
        var workers = max(1, min(parallelism_level(None), total_jobs))

        # Accumulate an MR x (NV * VW) tile over the whole K dimension and
        # store it. `second` is the column offset of the second weight vector:
        # VW for a plain tile, N/2 (the up projection) for SwiGLU.
        @always_inline
        def tile[VW: Int, NV: Int](
            row0: Int, nrows: Int, col: Int, e: Int, second: Int
        ) {var a_ptr, var ids_ptr, var b_ptr, var c_ptr, var k_dim, var n_w, var n_out}:
            var a_off = Array[Int, MR](fill=0)
            comptime for i in range(MR):
                var r = row0 + min(i, nrows - 1)
                comptime if gather:
                    a_off[i] = Int(ids_ptr.unsafe_load(r)) * k_dim
                else:
                    a_off[i] = r * k_dim
            var acc = Array[SIMD[DType.float32, VW], MR * NV](fill=SIMD[DType.float32, VW](0))
            var b_row = b_ptr.unsafe_offset(e * k_dim * n_w + col)
            for kk in range(k_dim):
                var b0 = b_row.unsafe_load[width=VW](0).cast[DType.float32]()
                var b1 = b0
                comptime if NV == 2:
                    b1 = b_row.unsafe_load[width=VW](second).cast[DType.float32]()
                comptime for i in range(MR):
                    var a = SIMD[DType.float32, VW](a_ptr.unsafe_load(a_off[i] + kk).cast[DType.float32]())
                    acc[i * NV] = fma(a, b0, acc[i * NV])
                    comptime if NV == 2:
                        acc[i * NV + 1] = fma(a, b1, acc[i * NV + 1])
                b_row = b_row.unsafe_offset(n_w)
            comptime for i in range(MR):
                if i < nrows:
                    var c_row = c_ptr.unsafe_offset((row0 + i) * n_out + col)
                    comptime if swiglu:
                        var g = acc[i * NV]
                        var u = acc[i * NV + 1]
                        c_row.unsafe_store(0, (g / (1.0 + exp(-g)) * u).cast[dtype]())
                    else:
                        comptime for v in range(NV):
                            c_row.unsafe_store(v * VW, _activate[activation](acc[i * NV + v]).cast[dtype]())

        def jobs_of_worker(wk: Int) {var tile, var off_ptr, var job_start_ptr, var experts, var total_jobs, var workers, var col_jobs, var n_out}:
            var e = 0
            for job in range(wk * total_jobs // workers, (wk + 1) * total_jobs // workers):
                while job >= job_start_ptr.unsafe_load(e + 1):
                    e += 1
                var local = job - job_start_ptr.unsafe_load(e)
                var row_lo = Int(off_ptr.unsafe_load(e)) + (local // col_jobs) * ROWS_PER_JOB
                var row_hi = min(row_lo + ROWS_PER_JOB, Int(off_ptr.unsafe_load(e + 1)))
                var col_lo = (local % col_jobs) * VECTORS_PER_JOB * W
                var col_hi = min(col_lo + VECTORS_PER_JOB * W, n_out)
                var col = col_lo
                comptime if swiglu:
                    while col + W <= col_hi:
                        for r in range(row_lo, row_hi, MR):
                            tile[W, 2](r, min(MR, row_hi - r), col, e, n_out)
                        col += W
                    while col < col_hi:
                        for r in range(row_lo, row_hi, MR):
                            tile[1, 2](r, min(MR, row_hi - r), col, e, n_out)
                        col += 1
                else:
                    while col + 2 * W <= col_hi:
                        for r in range(row_lo, row_hi, MR):
                            tile[W, 2](r, min(MR, row_hi - r), col, e, W)
                        col += 2 * W
                    while col < col_hi:
                        for r in range(row_lo, row_hi, MR):
                            tile[1, 1](r, min(MR, row_hi - r), col, e, 0)
                        col += 1

        sync_parallelize(jobs_of_worker, workers)
        _ = job_start^
