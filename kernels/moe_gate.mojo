# MoE gating: router logits x @ router_w -> float32 softmax over experts -> top-k.
#
# The router matmul is fused here (it is d_model x E per token, E small) and
# accumulated in float32 whatever the storage dtype.
#
# Outputs, for T tokens and E experts:
#   topk_weights     [T, k] float32  softmax probabilities of the chosen experts,
#                                    divided by their sum when `renormalize`
#   topk_ids         [T, k] int32    chosen experts, highest probability first;
#                                    on equal probabilities the lower index wins
#   expert_counts    [E]    int32    tokens routed to each expert (before any
#                                    capacity limit)
#   router_prob_mean [E]    float32  P_i, the mean router probability of expert i
#   losses           [2]    float32  [Switch auxiliary loss E * sum_i f_i * P_i
#                                    with f_i = counts_i / T, router z-loss
#                                    mean_t logsumexp(logits_t)^2]
#
# `top_k` and `renormalize` are compile-time parameters, so the selection loop
# is unrolled and the branch on renormalisation disappears. CPU: tokens are
# split across worker threads; each worker keeps float64 partial sums that
# are added in a fixed order afterwards, so the statistics are deterministic.
# GPU: one thread per token; the statistics are accumulated with atomics
# into the output tensors themselves (no scratch memory), in float32 for
# P_i and the z-loss, so their last bits depend on the order of the adds.

import extensibility
from extensibility import InputTensor, OutputTensor
from max.algorithm import sync_parallelize
from max.gpu import block_dim, block_idx, thread_idx
from max.gpu.host import DeviceContext
from max.runtime.asyncrt import parallelism_level
from std.algorithm import vectorize
from std.atomic import Atomic
from std.math import ceildiv, exp, log
from std.memory import Pointer
from std.sys import simd_width_of

comptime TOKENS_PER_WORKER_MIN = 64
comptime GPU_BLOCK = 128


def gate_gpu[dtype: DType, top_k: Int, renormalize: Bool](
    ctx: DeviceContext,
    w_out: Pointer[Float32, MutAnyOrigin],
    id_out: Pointer[Int32, MutAnyOrigin],
    counts: Pointer[Int32, MutAnyOrigin],
    pmean: Pointer[Float32, MutAnyOrigin],
    losses: Pointer[Float32, MutAnyOrigin],
    x: Pointer[Scalar[dtype], MutAnyOrigin],
    rw: Pointer[Scalar[dtype], MutAnyOrigin],
    tokens: Int,
    d_model: Int,
    experts: Int,
) raises:
    """The gate on the GPU: a zeroing kernel, one thread per token, and a
    one-thread kernel that turns the sums into means and losses."""
    var n_tok = Int64(tokens)
    var n_d = Int64(d_model)
    var n_e = Int64(experts)

    def zero_stats() {var counts, var pmean, var losses, var n_e}:
        var e = Int(thread_idx.x)
        if e < Int(n_e):
            counts.unsafe_store(e, Int32(0))
            pmean.unsafe_store(e, Float32(0))
        if e < 2:
            losses.unsafe_store(e, Float32(0))

    def token_kernel() {var w_out, var id_out, var counts, var pmean, var losses, var x, var rw, var n_tok, var n_d, var n_e}:
        var t = block_idx.x * block_dim.x + thread_idx.x
        if t >= Int(n_tok):
            return
        var d = Int(n_d)
        var e_count = Int(n_e)
        var xt = x.unsafe_offset(t * d)
        # Pass 1: max logit. Pass 2: sum of exp. Selection recomputes the
        # logits instead of storing E of them per thread.
        var m = Float32.MIN
        for e in range(e_count):
            var acc: Float32 = 0
            for kk in range(d):
                acc += xt.unsafe_load(kk).cast[DType.float32]() * rw.unsafe_load(kk * e_count + e).cast[DType.float32]()
            m = max(m, acc)
        var total: Float32 = 0
        var chosen = Array[Int, top_k](fill=-1)
        var chosen_logit = Array[Float32, top_k](fill=Float32.MIN)
        for e in range(e_count):
            var acc: Float32 = 0
            for kk in range(d):
                acc += xt.unsafe_load(kk).cast[DType.float32]() * rw.unsafe_load(kk * e_count + e).cast[DType.float32]()
            var p = exp(acc - m)
            total += p
            # Insert into the sorted top-k list; strict '>' keeps the lower
            # index first on ties, as on the CPU.
            var v = acc
            var id = e
            comptime for j in range(top_k):
                if chosen[j] < 0 or v > chosen_logit[j]:
                    var tv = chosen_logit[j]
                    var ti = chosen[j]
                    chosen_logit[j] = v
                    chosen[j] = id
                    v = tv
                    id = ti
        var inv = 1.0 / total
        var chosen_sum: Float32 = 0
        comptime for j in range(top_k):
            chosen_sum += exp(chosen_logit[j] - m) * inv
        comptime for j in range(top_k):
            var p = exp(chosen_logit[j] - m) * inv
            comptime if renormalize:
                p = p / chosen_sum
            w_out.unsafe_store(t * top_k + j, p)
            id_out.unsafe_store(t * top_k + j, Int32(chosen[j]))
            _ = Atomic.fetch_add(counts.unsafe_offset(chosen[j]), Int32(1))
        for e in range(e_count):
            var acc: Float32 = 0
            for kk in range(d):
                acc += xt.unsafe_load(kk).cast[DType.float32]() * rw.unsafe_load(kk * e_count + e).cast[DType.float32]()
            _ = Atomic.fetch_add(pmean.unsafe_offset(e), exp(acc - m) * inv)
        var lse = m + log(total)
        _ = Atomic.fetch_add(losses.unsafe_offset(1), lse * lse)

    def finish() {var counts, var pmean, var losses, var n_tok, var n_e}:
        var t = Float64(max(Int(n_tok), 1))
        var aux: Float64 = 0
        for e in range(Int(n_e)):
            var mean_p = Float64(pmean.unsafe_load(e)) / t
            pmean.unsafe_store(e, Float32(mean_p))
            aux += (Float64(counts.unsafe_load(e)) / t) * mean_p
        losses.unsafe_store(0, Float32(Float64(Int(n_e)) * aux))
        losses.unsafe_store(1, Float32(Float64(losses.unsafe_load(1)) / t))

    ctx.enqueue_function(zero_stats, grid_dim=1, block_dim=max(experts, 2))
    if tokens > 0:
        ctx.enqueue_function(token_kernel, grid_dim=ceildiv(tokens, GPU_BLOCK), block_dim=GPU_BLOCK)
    ctx.enqueue_function(finish, grid_dim=1, block_dim=1)


@extensibility.register("pymoe_moe_gate")
struct MoEGate:
    @staticmethod
    def execute[
        top_k: Int,
        renormalize: Bool,
        target: StaticString,
    ](
        topk_weights: OutputTensor[dtype=DType.float32, rank=2, ...],
        topk_ids: OutputTensor[dtype=DType.int32, rank=2, ...],
        expert_counts: OutputTensor[dtype=DType.int32, rank=1, ...],
        router_prob_mean: OutputTensor[dtype=DType.float32, rank=1, ...],
        losses: OutputTensor[dtype=DType.float32, rank=1, ...],
        x: InputTensor[rank=2, ...],
        router_w: InputTensor[dtype=x.dtype, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        comptime W = simd_width_of[DType.float32]()
        var tokens = x.dim_size(0)
        var d_model = x.dim_size(1)
        var experts = router_w.dim_size(1)
        if top_k < 1 or top_k > experts:
            raise Error("pymoe_moe_gate: top_k must be in [1, num_experts]")

        var src = x.unsafe_ptr()
        var rw = router_w.unsafe_ptr()
        var w_out = topk_weights.unsafe_ptr()
        var id_out = topk_ids.unsafe_ptr()
        comptime if target == "gpu":
            gate_gpu[x.dtype, top_k, renormalize](
                ctx, w_out, id_out, expert_counts.unsafe_ptr(), router_prob_mean.unsafe_ptr(),
                losses.unsafe_ptr(), src, rw, tokens, d_model, experts,
            )
            return
        var workers = max(1, min(parallelism_level(None), ceildiv(tokens, TOKENS_PER_WORKER_MIN)))

        # Per worker: E counts, E probability sums, 1 z-loss sum (all float64).
        var stride = 2 * experts + 1
        var partial = List[Float64](length=workers * stride, fill=0.0)
        var partial_ptr = partial.unsafe_ptr()

        def tokens_of_worker(w: Int) {var src, var rw, var d_model, var w_out, var id_out, var tokens, var experts, var workers, var partial_ptr, var stride}:
            var probs = List[Float32](length=experts, fill=0.0)
            var p = probs.unsafe_ptr()
            var logits = List[Float32](length=experts, fill=0.0)
            var row = logits.unsafe_ptr()
            var acc = partial_ptr.unsafe_offset(w * stride)
            for t in range(w * tokens // workers, (w + 1) * tokens // workers):
                var xt = src.unsafe_offset(t * d_model)

                def logit_step[width: Int](e: Int) {var xt, var rw, var row, var d_model, var experts}:
                    var acc = SIMD[DType.float32, width](0)
                    for kk in range(d_model):
                        var a = xt.unsafe_load(kk).cast[DType.float32]()
                        acc += a * rw.unsafe_load[width=width](kk * experts + e).cast[DType.float32]()
                    row.unsafe_store(e, acc)

                vectorize[W](experts, logit_step)

                var vmax = SIMD[DType.float32, W](Float32.MIN)

                def max_step[width: Int](i: Int) {mut vmax, var row}:
                    var v = row.unsafe_load[width=width](i)
                    comptime if width == W:
                        vmax = max(vmax, rebind[SIMD[DType.float32, W]](v))
                    else:
                        vmax[0] = max(vmax[0], v.reduce_max())

                vectorize[W](experts, max_step)
                var row_max = vmax.reduce_max()

                var vsum = SIMD[DType.float32, W](0)

                def exp_step[width: Int](i: Int) {mut vsum, var row, var p, var row_max}:
                    var e = exp(row.unsafe_load[width=width](i) - row_max)
                    p.unsafe_store(i, e)
                    comptime if width == W:
                        vsum += rebind[SIMD[DType.float32, W]](e)
                    else:
                        vsum[0] += e.reduce_add()

                vectorize[W](experts, exp_step)
                var total = vsum.reduce_add()
                var inv_total = 1.0 / total

                def normalize_step[width: Int](i: Int) {var p, var inv_total}:
                    p.unsafe_store(i, p.unsafe_load[width=width](i) * inv_total)

                vectorize[W](experts, normalize_step)

                for e in range(experts):
                    acc.unsafe_store(experts + e, acc.unsafe_load(experts + e) + Float64(p.unsafe_load(e)))
                var lse = Float64(row_max) + log(Float64(total))
                acc.unsafe_store(2 * experts, acc.unsafe_load(2 * experts) + lse * lse)

                # Top-k by k selection passes: strict '>' keeps the lower index on
                # ties. A chosen expert is marked by a negative probability.
                var chosen_w = Array[Float32, top_k](fill=0)
                var chosen_sum: Float32 = 0
                for j in range(top_k):
                    var best = -1
                    var best_p: Float32 = -1.0
                    for e in range(experts):
                        var pe = p.unsafe_load(e)
                        if pe >= 0 and (best < 0 or pe > best_p):
                            best = e
                            best_p = pe
                    if best < 0:  # only NaN probabilities are left
                        for e in range(experts):
                            if p.unsafe_load(e) >= 0 or p.unsafe_load(e) != p.unsafe_load(e):
                                best = e
                                best_p = p.unsafe_load(e)
                                break
                    p.unsafe_store(best, -2.0)
                    chosen_w[j] = best_p
                    chosen_sum += best_p
                    id_out.unsafe_store(t * top_k + j, Int32(best))
                    acc.unsafe_store(best, acc.unsafe_load(best) + 1.0)
                comptime for j in range(top_k):
                    comptime if renormalize:
                        w_out.unsafe_store(t * top_k + j, chosen_w[j] / chosen_sum)
                    else:
                        w_out.unsafe_store(t * top_k + j, chosen_w[j])

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
        var loss_ptr = losses.unsafe_ptr()
        loss_ptr.unsafe_store(0, Float32(Float64(experts) * aux))
        loss_ptr.unsafe_store(1, Float32(z / Float64(max(tokens, 1))))
        _ = partial^
