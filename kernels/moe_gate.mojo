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
# GPU: one warp per token (see gate_gpu); the statistics are accumulated
# with atomics into the output tensors themselves (no scratch memory), in
# float32 for P_i and the z-loss, so their last bits depend on the order of
# the adds.

import extensibility
from extensibility import InputTensor, OutputTensor
from max.algorithm import sync_parallelize
from max.gpu import WARP_SIZE, barrier, block_idx, grid_dim, thread_idx
from max.gpu.memory import AddressSpace
from max.gpu.primitives.warp import sum as warp_sum
from max.gpu.host import DeviceContext
from max.runtime.asyncrt import parallelism_level
from std.algorithm import vectorize
from std.atomic import Atomic
from std.math import ceildiv, exp, log
from std.memory import Pointer, stack_allocation
from std.sys import simd_width_of, size_of

from .gpu_gemm import aligned16

comptime TOKENS_PER_WORKER_MIN = 64
comptime GPU_BLOCK = 256
comptime WARPS_PER_BLOCK = GPU_BLOCK // WARP_SIZE
# Enough blocks to fill an H100 several times over; more would only add
# per-block atomics.
comptime MAX_GATE_BLOCKS = 1024
# Experts whose logits a warp computes together (registers per lane).
comptime EG = 8


@always_inline
def _gate_vec[dtype: DType]() -> Int:
    """Elements of x in one 16-byte load (the vector form of _group_logits)."""
    return 16 // size_of[Scalar[dtype]]()


@always_inline
def _group_logits[dtype: DType](
    xt: Pointer[Scalar[dtype], MutAnyOrigin],
    rw: Pointer[Scalar[dtype], MutAnyOrigin],
    d: Int,
    experts: Int,
    e0: Int,
    lane: Int,
    vector: Bool,
) -> SIMD[DType.float32, EG]:
    """Logits of experts e0 .. e0+EG-1 of one token, on every lane of the
    warp (lanes split d_model, then warp sums). Experts >= `experts` get 0.
    `vector` (see gate_gpu): each lane takes GATE_VEC consecutive elements
    of x per step with one 16-byte load and the EG router weights of each
    with one load, so GATE_VEC + 1 independent loads are in flight per step.
    The scalar form reads one element of x per step and waits a memory
    latency in each of its d / 32 steps (in decode, at 32-128 tokens, the
    gate's time grew with d_model: it was latency-bound)."""
    comptime GATE_VEC = _gate_vec[dtype]()
    var acc = SIMD[DType.float32, EG](0)
    if vector:
        for k0 in range(lane * GATE_VEC, d, WARP_SIZE * GATE_VEC):
            var xv = xt.unsafe_load[width=GATE_VEC, alignment=16](k0).cast[DType.float32]()
            comptime for i in range(GATE_VEC):
                var row = rw.unsafe_load[width=EG, alignment=16]((k0 + i) * experts + e0)
                acc += xv[i] * row.cast[DType.float32]()
    else:
        var n_valid = min(EG, experts - e0)
        for kk in range(lane, d, WARP_SIZE):
            var xv = xt.unsafe_load(kk).cast[DType.float32]()
            var row = rw.unsafe_offset(kk * experts + e0)
            comptime for j in range(EG):
                if j < n_valid:
                    acc[j] += xv * row.unsafe_load(j).cast[DType.float32]()
    comptime for j in range(EG):
        acc[j] = warp_sum(acc[j])
    return acc


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
    """The gate on the GPU: a zeroing kernel, the token kernel (one warp per
    token, see below), and a one-thread kernel that turns the sums into means
    and losses."""
    var n_tok = Int64(tokens)
    var n_d = Int64(d_model)
    var n_e = Int64(experts)
    # The vector loads of _group_logits: x rows and router rows start on 16
    # bytes, and every expert group is full.
    var vector = d_model % _gate_vec[dtype]() == 0 and experts % EG == 0 and aligned16[dtype](x, rw)

    def zero_stats() {var counts, var pmean, var losses, var n_e}:
        for e in range(Int(thread_idx.x), Int(n_e), GPU_BLOCK):
            counts.unsafe_store(e, Int32(0))
            pmean.unsafe_store(e, Float32(0))
        if Int(thread_idx.x) < 2:
            losses.unsafe_store(Int(thread_idx.x), Float32(0))

    # One warp per token (grid-stride over tokens). Experts go in groups of
    # EG: the lanes split d_model, each keeps EG partial dot products in
    # registers (the token's x is read once per group, coalesced; a group's
    # router weights are EG neighbours in memory), and EG warp sums give
    # every lane the group's logits. Softmax max and sum are accumulated
    # online over the groups; the top-k insertion is the CPU's (strict '>',
    # so the lower index wins ties), done redundantly by every lane. The
    # first group's statistics are summed in registers over the warp's
    # tokens (lane j holds expert j) and then over the block, so those
    # atomics are per block instead of per token; later groups add per token.
    def token_kernel() {var w_out, var id_out, var counts, var pmean, var losses, var x, var rw, var n_tok, var n_d, var n_e, var vector}:
        var tid = Int(thread_idx.x)
        var lane = tid % WARP_SIZE
        var warps = Int(grid_dim.x) * WARPS_PER_BLOCK
        var d = Int(n_d)
        var e_count = Int(n_e)
        var groups = ceildiv(e_count, EG)
        var neg_inf = Float32.MIN
        var p_acc: Float32 = 0
        var n_acc = Int32(0)
        var z_acc: Float32 = 0
        for t in range(Int(block_idx.x) * WARPS_PER_BLOCK + tid // WARP_SIZE, Int(n_tok), warps):
            var xt = x.unsafe_offset(t * d)
            var m = neg_inf
            var total: Float32 = 0
            var logits0 = SIMD[DType.float32, EG](0)
            var chosen = Array[Int, top_k](fill=-1)
            var chosen_logit = Array[Float32, top_k](fill=neg_inf)
            for g in range(groups):
                var l = _group_logits[dtype](xt, rw, d, e_count, g * EG, lane, vector)
                if g == 0:
                    logits0 = l
                var n_valid = min(EG, e_count - g * EG)
                var new_m = m
                for j in range(n_valid):
                    new_m = max(new_m, l[j])
                total *= exp(m - new_m)
                for j in range(n_valid):
                    total += exp(l[j] - new_m)
                    var cv = l[j]
                    var ci = g * EG + j
                    comptime for i in range(top_k):
                        if chosen[i] < 0 or cv > chosen_logit[i]:
                            var tv = chosen_logit[i]
                            var ti = chosen[i]
                            chosen_logit[i] = cv
                            chosen[i] = ci
                            cv = tv
                            ci = ti
                m = new_m
            var inv = 1.0 / total
            var chosen_sum: Float32 = 0
            comptime for j in range(top_k):
                chosen_sum += exp(chosen_logit[j] - m) * inv
            comptime for j in range(top_k):
                if lane == j % WARP_SIZE:
                    var p = exp(chosen_logit[j] - m) * inv
                    comptime if renormalize:
                        p = p / chosen_sum
                    w_out.unsafe_store(t * top_k + j, p)
                    id_out.unsafe_store(t * top_k + j, Int32(chosen[j]))
                if chosen[j] == lane:
                    n_acc += 1
                elif chosen[j] >= EG and lane == 0:
                    _ = Atomic.fetch_add(counts.unsafe_offset(chosen[j]), Int32(1))
            if lane < min(EG, e_count):
                p_acc += exp(logits0[lane] - m) * inv
            for g in range(1, groups):
                var l = _group_logits[dtype](xt, rw, d, e_count, g * EG, lane, vector)
                var e = g * EG + lane
                if lane < EG and e < e_count:
                    _ = Atomic.fetch_add(pmean.unsafe_offset(e), exp(l[lane] - m) * inv)
            if lane == 0:
                var lse = m + log(total)
                z_acc += lse * lse
        # Block reduction of the first group's statistics, then one atomic
        # per expert per block.
        var p_sh = stack_allocation[GPU_BLOCK, Float32, address_space=AddressSpace.SHARED]()
        var n_sh = stack_allocation[GPU_BLOCK, Int32, address_space=AddressSpace.SHARED]()
        var z_sh = stack_allocation[GPU_BLOCK, Float32, address_space=AddressSpace.SHARED]()
        p_sh.unsafe_store(tid, p_acc)
        n_sh.unsafe_store(tid, n_acc)
        z_sh.unsafe_store(tid, z_acc)
        barrier()
        if tid < WARP_SIZE:
            var p_sum: Float32 = 0
            var n_sum = Int32(0)
            var z_sum: Float32 = 0
            for w in range(WARPS_PER_BLOCK):
                p_sum += p_sh.unsafe_load(w * WARP_SIZE + tid)
                n_sum += n_sh.unsafe_load(w * WARP_SIZE + tid)
                z_sum += z_sh.unsafe_load(w * WARP_SIZE + tid)
            if tid < min(EG, e_count):
                _ = Atomic.fetch_add(pmean.unsafe_offset(tid), p_sum)
                _ = Atomic.fetch_add(counts.unsafe_offset(tid), n_sum)
            if tid == 0:
                _ = Atomic.fetch_add(losses.unsafe_offset(1), z_sum)

    def finish() {var counts, var pmean, var losses, var n_tok, var n_e}:
        var t = Float64(max(Int(n_tok), 1))
        var aux: Float64 = 0
        for e in range(Int(n_e)):
            var mean_p = Float64(pmean.unsafe_load(e)) / t
            pmean.unsafe_store(e, Float32(mean_p))
            aux += (Float64(counts.unsafe_load(e)) / t) * mean_p
        losses.unsafe_store(0, Float32(Float64(Int(n_e)) * aux))
        losses.unsafe_store(1, Float32(Float64(losses.unsafe_load(1)) / t))

    ctx.enqueue_function(zero_stats, grid_dim=1, block_dim=GPU_BLOCK)
    if tokens > 0:
        var blocks = min(ceildiv(tokens, WARPS_PER_BLOCK), MAX_GATE_BLOCKS)
        ctx.enqueue_function(token_kernel, grid_dim=blocks, block_dim=GPU_BLOCK)
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
