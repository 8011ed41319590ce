# The lower rungs of the optimisation ablation (`pymoe bench --ablation`).
#
# The production ops in kernels/ are the top rung. The rungs below
# them differ in one step at a time so that each step's effect is measured:
#
#   scalar       one element at a time; the op's parameters (top-k,
#                renormalise, activation, gather) are read at run time from a
#                small int32 `params` tensor, so nothing is specialised;
#   simd         the same algorithm on explicit SIMD vectors of the target's
#                width; parameters still read at run time;
#   specialized  SIMD with the op's parameters (and for the expert matmul its
#                register tile and cache blocks) as compile-time parameters:
#                the production kernels, plus `pymoe_ablation_softmax_fixed`
#                (row length known at compile time) because the production
#                softmax has no parameter to specialise.
#
# Every rung uses the same worker threads as production so that threading is
# not part of any step. These kernels are benchmark subjects, not API: the
# layer never uses them, so they are a Mojo package of their own that only the
# graphs of pymoe/bench/ablation.py load (user graphs never see these ops).
# Each is tested against the float64 reference.
#
# Runtime activation codes: 0 none, 1 relu, 2 silu, 3 swiglu.

import extensibility
from extensibility import InputTensor, OutputTensor
from max.algorithm import sync_parallelize
from max.gpu.host import DeviceContext
from max.runtime.asyncrt import parallelism_level
from std.algorithm import vectorize
from std.math import ceildiv, exp, log
from std.memory import Pointer
from std.sys import simd_width_of

comptime W = simd_width_of[DType.float32]()
comptime ACT_NONE = 0
comptime ACT_RELU = 1
comptime ACT_SILU = 2
comptime ACT_SWIGLU = 3
comptime ELEMENTS_PER_WORKER_MIN = 1 << 14


@always_inline
def _act_runtime[width: Int](v: SIMD[DType.float32, width], code: Int) -> SIMD[DType.float32, width]:
    if code == ACT_RELU:
        return max(v, SIMD[DType.float32, width](0))
    if code == ACT_SILU:
        return v / (1.0 + exp(-v))
    return v


def _workers(items: Int, per_worker_min: Int) -> Int:
    return max(1, min(parallelism_level(None), ceildiv(items, per_worker_min)))


# ------------------------------------------------------------------ softmax


@extensibility.register("pymoe_ablation_softmax_scalar")
struct SoftmaxScalar:
    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        x: InputTensor[dtype=output.dtype, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        comptime dtype = output.dtype
        var rows = x.dim_size(0)
        var cols = x.dim_size(1)
        if rows == 0 or cols == 0:
            return
        var src = x.unsafe_ptr()
        var dst = output.unsafe_ptr()
        var workers = _workers(rows * cols, ELEMENTS_PER_WORKER_MIN)

        def rows_of_worker(w: Int) {var src, var dst, var rows, var cols, var workers}:
            for r in range(w * rows // workers, (w + 1) * rows // workers):
                var m = Float32.MIN
                for c in range(cols):
                    m = max(m, src.unsafe_load(r * cols + c).cast[DType.float32]())
                var s: Float32 = 0
                for c in range(cols):
                    s += exp(src.unsafe_load(r * cols + c).cast[DType.float32]() - m)
                for c in range(cols):
                    var e = exp(src.unsafe_load(r * cols + c).cast[DType.float32]() - m)
                    dst.unsafe_store(r * cols + c, (e / s).cast[dtype]())

        sync_parallelize(rows_of_worker, workers)


@extensibility.register("pymoe_ablation_softmax_fixed")
struct SoftmaxFixed:
    """Softmax over rows of exactly `cols` entries (a power of two): each row
    is one SIMD value, so the three passes are register operations."""

    @staticmethod
    def execute[
        cols: Int,
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        x: InputTensor[dtype=output.dtype, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        comptime dtype = output.dtype
        comptime assert cols > 0 and (cols & (cols - 1)) == 0, "cols must be a power of two"
        if x.dim_size(1) != cols:
            raise Error("pymoe_ablation_softmax_fixed: rows must have exactly `cols` entries")
        var rows = x.dim_size(0)
        if rows == 0:
            return
        var src = x.unsafe_ptr()
        var dst = output.unsafe_ptr()
        var workers = _workers(rows * cols, ELEMENTS_PER_WORKER_MIN)

        def rows_of_worker(w: Int) {var src, var dst, var rows, var workers}:
            for r in range(w * rows // workers, (w + 1) * rows // workers):
                var v = src.unsafe_load[width=cols](r * cols).cast[DType.float32]()
                var e = exp(v - v.reduce_max())
                dst.unsafe_store(r * cols, (e * (1.0 / e.reduce_add())).cast[dtype]())

        sync_parallelize(rows_of_worker, workers)


# --------------------------------------------------------------- activation


@extensibility.register("pymoe_ablation_activation")
struct ActivationRuntime:
    """Relu or silu chosen at run time by params[0]; `simd` picks the rung."""

    @staticmethod
    def execute[
        simd: Bool,
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        x: InputTensor[dtype=output.dtype, rank=2, ...],
        params: InputTensor[dtype=DType.int32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        comptime dtype = output.dtype
        var n = x.dim_size(0) * x.dim_size(1)
        if n == 0:
            return
        var code = Int(params.unsafe_ptr().unsafe_load(0))
        var src = x.unsafe_ptr()
        var dst = output.unsafe_ptr()
        var workers = _workers(n, ELEMENTS_PER_WORKER_MIN)

        def chunk_of_worker(w: Int) {var src, var dst, var n, var code, var workers}:
            var lo = w * n // workers
            var hi = (w + 1) * n // workers
            comptime if simd:

                def step[width: Int](i: Int) {var src, var dst, var code, var lo}:
                    var v = src.unsafe_load[width=width](lo + i).cast[DType.float32]()
                    dst.unsafe_store(lo + i, _act_runtime(v, code).cast[dtype]())

                vectorize[W](hi - lo, step)
            else:
                for i in range(lo, hi):
                    var v = src.unsafe_load(i).cast[DType.float32]()
                    dst.unsafe_store(i, _act_runtime[1](v, code).cast[dtype]())

        sync_parallelize(chunk_of_worker, workers)


# --------------------------------------------------------------------- gate


@extensibility.register("pymoe_ablation_moe_gate")
struct GateRuntime:
    """The contract of pymoe_moe_gate (same five outputs) with top-k taken from the
    output shape and renormalise from params[0] at run time."""

    @staticmethod
    def execute[
        simd: Bool,
        target: StaticString,
    ](
        topk_weights: OutputTensor[dtype=DType.float32, rank=2, ...],
        topk_ids: OutputTensor[dtype=DType.int32, rank=2, ...],
        expert_counts: OutputTensor[dtype=DType.int32, rank=1, ...],
        router_prob_mean: OutputTensor[dtype=DType.float32, rank=1, ...],
        losses: OutputTensor[dtype=DType.float32, rank=1, ...],
        x: InputTensor[rank=2, ...],
        router_w: InputTensor[dtype=x.dtype, rank=2, ...],
        params: InputTensor[dtype=DType.int32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        var tokens = x.dim_size(0)
        var d_model = x.dim_size(1)
        var experts = router_w.dim_size(1)
        var top_k = topk_ids.dim_size(1)
        var renormalize = params.unsafe_ptr().unsafe_load(0) != 0
        if top_k < 1 or top_k > experts:
            raise Error("pymoe_ablation_moe_gate: top_k must be in [1, num_experts]")
        var src = x.unsafe_ptr()
        var rw = router_w.unsafe_ptr()
        var w_out = topk_weights.unsafe_ptr()
        var id_out = topk_ids.unsafe_ptr()
        var workers = _workers(tokens, 64)
        var stride = 2 * experts + 1
        var partial = List[Float64](length=workers * stride, fill=0.0)
        var partial_ptr = partial.unsafe_ptr()

        def tokens_of_worker(w: Int) {
            var src, var rw, var d_model, var w_out, var id_out, var tokens, var experts,
            var workers, var partial_ptr, var stride, var top_k, var renormalize,
        }:
            var probs = List[Float32](length=experts, fill=0.0)
            var p = probs.unsafe_ptr()
            var chosen = List[Float32](length=top_k, fill=0.0)
            var acc = partial_ptr.unsafe_offset(w * stride)
            for t in range(w * tokens // workers, (w + 1) * tokens // workers):
                var xt = src.unsafe_offset(t * d_model)
                comptime if simd:

                    def logit_step[width: Int](e: Int) {var xt, var rw, var p, var d_model, var experts}:
                        var s = SIMD[DType.float32, width](0)
                        for kk in range(d_model):
                            var a = xt.unsafe_load(kk).cast[DType.float32]()
                            s += a * rw.unsafe_load[width=width](kk * experts + e).cast[DType.float32]()
                        p.unsafe_store(e, s)

                    vectorize[W](experts, logit_step)
                else:
                    for e in range(experts):
                        var s: Float32 = 0
                        for kk in range(d_model):
                            s += xt.unsafe_load(kk).cast[DType.float32]() * rw.unsafe_load(kk * experts + e).cast[DType.float32]()
                        p.unsafe_store(e, s)
                var m = Float32.MIN
                for e in range(experts):
                    m = max(m, p.unsafe_load(e))
                var total: Float32 = 0
                for e in range(experts):
                    var ex = exp(p.unsafe_load(e) - m)
                    p.unsafe_store(e, ex)
                    total += ex
                for e in range(experts):
                    p.unsafe_store(e, p.unsafe_load(e) / total)
                    acc.unsafe_store(experts + e, acc.unsafe_load(experts + e) + Float64(p.unsafe_load(e)))
                var lse = Float64(m) + log(Float64(total))
                acc.unsafe_store(2 * experts, acc.unsafe_load(2 * experts) + lse * lse)
                # Same selection and tie rule as pymoe_moe_gate, with k a loop bound.
                var chosen_sum: Float32 = 0
                for j in range(top_k):
                    var best = -1
                    var best_p: Float32 = -1.0
                    for e in range(experts):
                        var pe = p.unsafe_load(e)
                        if pe >= 0 and (best < 0 or pe > best_p):
                            best = e
                            best_p = pe
                    if best < 0:
                        best = 0
                        best_p = p.unsafe_load(0)
                    p.unsafe_store(best, -2.0)
                    chosen[j] = best_p
                    chosen_sum += best_p
                    id_out.unsafe_store(t * top_k + j, Int32(best))
                    acc.unsafe_store(best, acc.unsafe_load(best) + 1.0)
                for j in range(top_k):
                    if renormalize:
                        w_out.unsafe_store(t * top_k + j, chosen[j] / chosen_sum)
                    else:
                        w_out.unsafe_store(t * top_k + j, chosen[j])

        sync_parallelize(tokens_of_worker, workers)

        var counts = expert_counts.unsafe_ptr()
        var pmean = router_prob_mean.unsafe_ptr()
        var aux: Float64 = 0
        var z: Float64 = 0
        for e in range(experts):
            var c: Float64 = 0
            var ps: Float64 = 0
            for w in range(workers):
                c += partial_ptr.unsafe_load(w * stride + e)
                ps += partial_ptr.unsafe_load(w * stride + experts + e)
            counts.unsafe_store(e, Int32(Int(c)))
            var mean_p = ps / Float64(max(tokens, 1))
            pmean.unsafe_store(e, Float32(mean_p))
            aux += (c / Float64(max(tokens, 1))) * mean_p
        for w in range(workers):
            z += partial_ptr.unsafe_load(w * stride + 2 * experts)
        losses.unsafe_ptr().unsafe_store(0, Float32(Float64(experts) * aux))
        losses.unsafe_ptr().unsafe_store(1, Float32(z / Float64(max(tokens, 1))))
        _ = partial^


# ------------------------------------------------------------ expert matmul


@extensibility.register("pymoe_ablation_moe_expert_matmul")
struct ExpertMatmulRuntime:
    """The contract of pymoe_moe_expert_matmul with the activation (params[0]) and
    gather (params[1]) read at run time, one output row at a time.

    scalar: the textbook dot-product loop, out[r, n] = sum_k a[k] * w[k, n].
    simd:   a row of float32 accumulators updated as acc += a[k] * w[k, :]
            along SIMD vectors; no register tile, no cache blocking, so each
            row streams its expert's whole weight matrix.
    """

    @staticmethod
    def execute[
        simd: Bool,
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        x: InputTensor[dtype=output.dtype, rank=2, ...],
        row_ids: InputTensor[dtype=DType.int32, rank=1, ...],
        expert_offsets: InputTensor[dtype=DType.int32, rank=1, ...],
        w: InputTensor[dtype=output.dtype, rank=3, ...],
        params: InputTensor[dtype=DType.int32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        comptime dtype = output.dtype
        var code = Int(params.unsafe_ptr().unsafe_load(0))
        var gather = params.unsafe_ptr().unsafe_load(1) != 0
        var m_rows = output.dim_size(0)
        var n_out = output.dim_size(1)
        var k_dim = x.dim_size(1)
        var experts = w.dim_size(0)
        var n_w = w.dim_size(2)
        var half = n_w // 2
        var c_ptr = output.unsafe_ptr()
        var a_ptr = x.unsafe_ptr()
        var b_ptr = w.unsafe_ptr()
        var ids = row_ids.unsafe_ptr()
        var off = expert_offsets.unsafe_ptr()
        var valid_rows = Int(off.unsafe_load(experts))
        for r in range(valid_rows * n_out, m_rows * n_out):
            c_ptr.unsafe_store(r, Scalar[dtype](0))
        if valid_rows == 0 or n_out == 0:
            return
        var workers = _workers(valid_rows, 1)

        def rows_of_worker(wk: Int) {
            var c_ptr, var a_ptr, var b_ptr, var ids, var off, var code, var gather, var n_out,
            var k_dim, var n_w, var half, var valid_rows, var workers,
        }:
            var acc_list = List[Float32](length=n_w, fill=0.0)
            var acc = acc_list.unsafe_ptr()
            var e = 0
            for r in range(wk * valid_rows // workers, (wk + 1) * valid_rows // workers):
                while r >= Int(off.unsafe_load(e + 1)):
                    e += 1
                var a = a_ptr.unsafe_offset((Int(ids.unsafe_load(r)) if gather else r) * k_dim)
                var b = b_ptr.unsafe_offset(e * k_dim * n_w)
                var c = c_ptr.unsafe_offset(r * n_out)
                comptime if simd:

                    def zero[width: Int](n: Int) {var acc}:
                        acc.unsafe_store(n, SIMD[DType.float32, width](0))

                    vectorize[W](n_w, zero)
                    for kk in range(k_dim):
                        var av = a.unsafe_load(kk).cast[DType.float32]()
                        var bk = b.unsafe_offset(kk * n_w)

                        def axpy[width: Int](n: Int) {var acc, var bk, var av}:
                            acc.unsafe_store(n, acc.unsafe_load[width=width](n) + av * bk.unsafe_load[width=width](n).cast[DType.float32]())

                        vectorize[W](n_w, axpy)

                    def epilogue[width: Int](n: Int) {var acc, var c, var code, var half}:
                        var y = acc.unsafe_load[width=width](n)
                        if code == ACT_SWIGLU:
                            var u = acc.unsafe_load[width=width](half + n)
                            y = y / (1.0 + exp(-y)) * u
                        else:
                            y = _act_runtime(y, code)
                        c.unsafe_store(n, y.cast[dtype]())

                    vectorize[W](n_out, epilogue)
                else:
                    for n in range(n_out):
                        var s: Float32 = 0
                        for kk in range(k_dim):
                            s += a.unsafe_load(kk).cast[DType.float32]() * b.unsafe_load(kk * n_w + n).cast[DType.float32]()
                        if code == ACT_SWIGLU:
                            var u: Float32 = 0
                            for kk in range(k_dim):
                                u += a.unsafe_load(kk).cast[DType.float32]() * b.unsafe_load(kk * n_w + half + n).cast[DType.float32]()
                            s = s / (1.0 + exp(-s)) * u
                        else:
                            s = _act_runtime[1](s, code)[0]
                        c.unsafe_store(n, s.cast[dtype]())

        sync_parallelize(rows_of_worker, workers)
