# MoE gating: router logits x @ router_w (+ router bias) -> float32 scores ->
# (group-limited) top-k, for every router of pymoe.routing.route.
#
# The router matmul is fused here (it is d_model x E per token, E small) and
# accumulated in float32 whatever the storage dtype.
#
# The routing rule (pymoe/routing.py has it in five steps): logits = x @ W,
# plus the router bias (GPT-OSS); scores = softmax over the experts or a
# sigmoid per expert; selection scores = scores + selection bias (DeepSeek-V3);
# with n_group > 1 only the topk_group groups with the best sum of their two
# best selection scores stay candidates; the top_k candidates by selection
# score are chosen, highest first, the lower index winning ties; their weights
# are their scores (never the selection scores), divided by their sum when
# `renormalize`, times `scaling` (routed_scaling_factor).
#
# Outputs, for T tokens and E experts:
#   topk_weights     [T, k] float32  weights of the chosen experts (above)
#   topk_ids         [T, k] int32    chosen experts, best selection score first
#   expert_counts    [E]    int32    tokens routed to each expert (before any
#                                    capacity limit)
#   router_prob_mean [E]    float32  P_i, the mean over tokens of expert i's
#                                    score normalized to sum 1 over the experts
#                                    (the softmax itself; sigmoid / its sum)
#   losses           [2]    float32  [Switch auxiliary loss E * sum_i f_i * P_i
#                                    with f_i = counts_i / T, router z-loss
#                                    mean_t logsumexp(logits_t)^2, the logits
#                                    with the router bias]
#
# Every router variant is a compile-time parameter, so the default router
# (softmax, no biases, no groups, scaling 1) runs the same code as before the
# variants existed. The two bias inputs are always there (a custom op has a
# fixed list of inputs); without their flag the kernel never reads them and
# pymoe.ops passes a one-element placeholder.
#
# `top_k` and `renormalize` are compile-time parameters too, so the selection
# loop is unrolled and the branch on renormalisation disappears. CPU: tokens
# are split across worker threads; each worker keeps float64 partial sums
# that are added in a fixed order afterwards, so the statistics are
# deterministic. GPU: one warp per token (see gate_gpu and
# _enqueue_routed_tokens); the statistics are accumulated with atomics into
# the output tensors themselves (no scratch memory), in float32 for P_i and
# the z-loss, so their last bits depend on the order of the adds.

import extensibility
from extensibility import InputTensor, OutputTensor
from max.algorithm import sync_parallelize
from max.gpu import WARP_SIZE, barrier, block_idx, grid_dim, thread_idx
from max.gpu.memory import AddressSpace
from max.gpu.primitives.block import sum as block_sum
from max.gpu.primitives.warp import max as warp_max
from max.gpu.primitives.warp import shuffle_xor
from max.gpu.primitives.warp import sum as warp_sum
from max.gpu.host import DeviceContext
from max.runtime.asyncrt import parallelism_level
from std.algorithm import vectorize
from std.atomic import Atomic
from std.math import ceildiv, exp, log
from std.memory import Pointer, stack_allocation
from std.sys import simd_width_of, size_of

from .gpu_gemm import aligned16
from .gpu_grouped_gemm import dense_gemm_gpu, grouped_gemm_supported
from .gpu_launch import pdl_attributes, pdl_begin

comptime TOKENS_PER_WORKER_MIN = 64
comptime GPU_BLOCK = 256
comptime WARPS_PER_BLOCK = GPU_BLOCK // WARP_SIZE
# Enough blocks to fill an H100 several times over; more would only add
# per-block atomics.
comptime MAX_GATE_BLOCKS = 1024
# Experts whose logits a warp computes together (registers per lane).
comptime EG = 8
# The GPU path of the routers other than the default (and of every router
# given its logits) keeps each token's E logits in registers, `routed_slots`
# per lane (expert i * WARP_SIZE + lane in slot i), at most ROUTED_SLOTS: E may
# be at most GPU_ROUTED_MAX_EXPERTS (DeepSeek-V3 has 256). pymoe.ops checks it
# and passes the fewest slots that hold E.
comptime GPU_ROUTED_MAX_EXPERTS = 512
comptime ROUTED_SLOTS = GPU_ROUTED_MAX_EXPERTS // WARP_SIZE


@always_inline
def _sigmoid(v: Float32) -> Float32:
    """The logistic function without overflow for large negative v."""
    var e = exp(-abs(v))
    if v >= 0:
        return 1.0 / (1.0 + e)
    return e / (1.0 + e)


@always_inline
def _with_router_bias(
    l: SIMD[DType.float32, EG], rb: Pointer[Float32, MutAnyOrigin], e0: Int, experts: Int
) -> SIMD[DType.float32, EG]:
    """The logits of experts e0 .. e0+EG-1 plus their router bias (experts
    past the last keep their value)."""
    var out = l
    comptime for j in range(EG):
        if e0 + j < experts:
            out[j] += rb.unsafe_load(e0 + j)
    return out


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


def _zero_gate_stats(
    counts: Pointer[Int32, MutAnyOrigin],
    pmean: Pointer[Float32, MutAnyOrigin],
    losses: Pointer[Float32, MutAnyOrigin],
    experts: Int,
    tid: Int,
):
    """One block zeroes the sums the token kernels add into with atomics.

    A launch of one block of tokens (a decode batch) calls it first and
    _finish_gate_stats last, each behind a barrier (which makes the block's
    global writes visible to the block), instead of two one-block kernels
    around it: the statistics need every token's sums, and one block holds
    them all.
    """
    for e in range(tid, experts, GPU_BLOCK):
        counts.unsafe_store(e, Int32(0))
        pmean.unsafe_store(e, Float32(0))
    if tid < 2:
        losses.unsafe_store(tid, Float32(0))


def _finish_gate_stats(
    counts: Pointer[Int32, MutAnyOrigin],
    pmean: Pointer[Float32, MutAnyOrigin],
    losses: Pointer[Float32, MutAnyOrigin],
    tokens: Int,
    experts: Int,
    tid: Int,
):
    """One block turns the sums into means and the losses: each thread its
    experts' means and its share of the aux loss, then a block sum."""
    var t = Float32(max(tokens, 1))
    var aux: Float32 = 0
    for e in range(tid, experts, GPU_BLOCK):
        var mean_p = pmean.unsafe_load(e) / t
        pmean.unsafe_store(e, mean_p)
        aux += (Float32(counts.unsafe_load(e)) / t) * mean_p
    var total = block_sum[block_size=GPU_BLOCK](aux)
    if tid == 0:
        losses.unsafe_store(0, Float32(experts) * total)
        losses.unsafe_store(1, losses.unsafe_load(1) / t)


def gate_gpu[
    dtype: DType,
    top_k: Int,
    renormalize: Bool,
    sigmoid: Bool,
    has_router_bias: Bool,
    has_selection_bias: Bool,
    n_group: Int,
    topk_group: Int,
    scaling: Float32,
    logits_given: Bool,
    routed_slots: Int,
](
    ctx: DeviceContext,
    w_out: Pointer[Float32, MutAnyOrigin],
    id_out: Pointer[Int32, MutAnyOrigin],
    counts: Pointer[Int32, MutAnyOrigin],
    pmean: Pointer[Float32, MutAnyOrigin],
    losses: Pointer[Float32, MutAnyOrigin],
    x: Pointer[Scalar[dtype], MutAnyOrigin],
    rw: Pointer[Scalar[dtype], MutAnyOrigin],
    rb: Pointer[Float32, MutAnyOrigin],
    sb: Pointer[Float32, MutAnyOrigin],
    lg: Pointer[Float32, MutAnyOrigin],
    tokens: Int,
    d_model: Int,
    experts: Int,
    lg_partials: Pointer[Float32, MutAnyOrigin],
    lg_splits: Int,
) raises:
    """The gate on the GPU: a zeroing kernel, the token kernel (one warp per
    token), and a one-block kernel that turns the sums into means and losses;
    a batch that one block of the token kernel holds (decode) runs the three
    in that block (_zero_gate_stats).

    With logits_given, lg holds the logits [T, E] in float32 (computed by
    pymoe_router_logits, a tensor-core GEMM), and every router runs
    _enqueue_routed_tokens reading them; the warps then only select. That is
    the fast path for 16-bit inputs: a warp computing a token's E dot
    products itself reads the whole router per token.

    Softmax routers without selection bias or groups (Mixtral, Qwen, GPT-OSS)
    run the online-softmax token kernel below; every other router runs
    _enqueue_routed_tokens's (logits of all E experts in registers, then
    warp-wide selection).

    Parameters:
        dtype: The dtype of x and the router weights.
        top_k: Experts per token.
        renormalize: Divide the k weights by their sum.
        sigmoid: Sigmoid scores (else softmax).
        has_router_bias: Add rb to the logits.
        has_selection_bias: Add sb to the scores for the selection.
        n_group: Expert groups of the group-limited top-k (1: plain top-k).
        topk_group: Groups kept.
        scaling: The factor of the weights (routed_scaling_factor).
        logits_given: lg holds the logits (see above).
        routed_slots: Register slots per lane of the routed token kernel
            (E <= 32 * routed_slots; pymoe.ops passes the fewest that hold E).

    Args:
        ctx: The device context.
        w_out: Weights [T, k].
        id_out: Ids [T, k].
        counts: Expert counts [E].
        pmean: Mean normalized scores [E].
        losses: [aux loss, z-loss].
        x: Tokens [T, d_model].
        rw: Router weights [d_model, E].
        rb: Router bias [E] (read only with has_router_bias).
        sb: Selection bias [E] (read only with has_selection_bias).
        lg: Logits [T, E] (read only with logits_given and no lg_splits).
        tokens: T.
        d_model: d_model.
        experts: E.
        lg_partials: With logits_given and lg_splits > 0, the router GEMV's
            partial rows [lg_splits, T, E] instead of lg, which the gate's
            one block adds up (router_partials_to_gate: T * E <= GPU_BLOCK).
        lg_splits: Their count (0: read lg).
    """
    if lg_splits > 0 and (not logits_given or tokens * experts > GPU_BLOCK):
        raise Error("gate_gpu: partial logit rows need logits_given and T * E <= " + String(GPU_BLOCK))
    var n_tok = Int64(tokens)
    var n_d = Int64(d_model)
    var n_e = Int64(experts)
    # The vector loads of _group_logits: x rows and router rows start on 16
    # bytes, and every expert group is full.
    var vector = d_model % _gate_vec[dtype]() == 0 and experts % EG == 0 and aligned16[dtype](x, rw)

    def zero_stats() {var counts, var pmean, var losses, var n_e}:
        pdl_begin()
        _zero_gate_stats(counts, pmean, losses, Int(n_e), Int(thread_idx.x))

    # One warp per token (grid-stride over tokens). Experts go in groups of
    # EG: the lanes split d_model, each keeps EG partial dot products in
    # registers (the token's x is read once per group, coalesced; a group's
    # router weights are EG neighbours in memory), and EG warp sums give
    # every lane the group's logits (plus the router bias, if any). Softmax
    # max and sum are accumulated online over the groups; the top-k insertion is the CPU's (strict '>',
    # so the lower index wins ties), done redundantly by every lane. The
    # first group's statistics are summed in registers over the warp's
    # tokens (lane j holds expert j) and then over the block, so those
    # atomics are per block instead of per token; later groups add per token.
    def token_kernel() {var w_out, var id_out, var counts, var pmean, var losses, var x, var rw, var rb, var n_tok, var n_d, var n_e, var vector}:
        pdl_begin()
        var tid = Int(thread_idx.x)
        var one_block = Int(grid_dim.x) == 1
        if one_block:
            _zero_gate_stats(counts, pmean, losses, Int(n_e), tid)
            barrier()
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
                comptime if has_router_bias:
                    l = _with_router_bias(l, rb, g * EG, e_count)
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
                    comptime if scaling != 1.0:
                        p *= scaling
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
                comptime if has_router_bias:
                    l = _with_router_bias(l, rb, g * EG, e_count)
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
        if one_block:
            barrier()
            _finish_gate_stats(counts, pmean, losses, Int(n_tok), Int(n_e), tid)

    def finish() {var counts, var pmean, var losses, var n_tok, var n_e}:
        pdl_begin()
        _finish_gate_stats(counts, pmean, losses, Int(n_tok), Int(n_e), Int(thread_idx.x))

    var blocks = min(ceildiv(tokens, WARPS_PER_BLOCK), MAX_GATE_BLOCKS)
    # A decode batch (one block of tokens) zeroes and finishes the statistics
    # inside its token kernel: two launches fewer (see _zero_gate_stats).
    var separate_stats = blocks != 1
    if separate_stats:
        ctx.enqueue_function(zero_stats, attributes=pdl_attributes(), grid_dim=1, block_dim=GPU_BLOCK)
    if tokens > 0:
        comptime if logits_given or sigmoid or has_selection_bias or n_group > 1:
            _enqueue_routed_tokens[
                dtype, top_k, renormalize, sigmoid, has_router_bias, has_selection_bias, n_group, topk_group,
                scaling, logits_given, routed_slots,
            ](
                ctx, blocks, w_out, id_out, counts, pmean, losses, x, rw, rb, sb, lg, tokens, d_model, experts, vector,
                lg_partials, lg_splits,
            )
        else:
            ctx.enqueue_function(token_kernel, attributes=pdl_attributes(), grid_dim=blocks, block_dim=GPU_BLOCK)
    if separate_stats:
        ctx.enqueue_function(finish, attributes=pdl_attributes(), grid_dim=1, block_dim=GPU_BLOCK)


def _enqueue_routed_tokens[
    dtype: DType,
    top_k: Int,
    renormalize: Bool,
    sigmoid: Bool,
    has_router_bias: Bool,
    has_selection_bias: Bool,
    n_group: Int,
    topk_group: Int,
    scaling: Float32,
    logits_given: Bool,
    SLOTS: Int,
](
    ctx: DeviceContext,
    blocks: Int,
    w_out: Pointer[Float32, MutAnyOrigin],
    id_out: Pointer[Int32, MutAnyOrigin],
    counts: Pointer[Int32, MutAnyOrigin],
    pmean: Pointer[Float32, MutAnyOrigin],
    losses: Pointer[Float32, MutAnyOrigin],
    x: Pointer[Scalar[dtype], MutAnyOrigin],
    rw: Pointer[Scalar[dtype], MutAnyOrigin],
    rb: Pointer[Float32, MutAnyOrigin],
    sb: Pointer[Float32, MutAnyOrigin],
    lg: Pointer[Float32, MutAnyOrigin],
    tokens: Int,
    d_model: Int,
    experts: Int,
    vector: Bool,
    lg_partials: Pointer[Float32, MutAnyOrigin],
    lg_splits: Int,
) raises:
    """The token kernel of every router but the default softmax one (sigmoid
    scores, a selection bias, group-limited top-k): one warp per token.

    The warp reads the token's E logits from lg (logits_given: one coalesced
    row per token, as the default softmax router uses them too) or computes
    them in groups of EG as the softmax kernel does (_group_logits), and keeps them: lane l holds expert i * WARP_SIZE + l in
    slot i of its registers. Max, softmax sum, group scores (the two best of
    each group, merged pairwise across the lanes) and each of the k choices
    (the lane's best candidate, then a warp-wide arg-max whose ties go to the
    lower index) are warp reductions, so no lane scans all E experts. The
    statistics are summed per lane in registers over the warp's tokens, then
    over the block in shared memory, then one atomic per expert per block.
    Same parameters and pointers as gate_gpu; `vector` is its choice of loads.
    With lg_splits > 0 (one block, T * E <= GPU_BLOCK) the block first adds
    the router GEMV's partial rows into shared memory, thread i logit i,
    splits in order (the GEMV's sum kernel's adds), and the warps read that.
    """
    if experts > SLOTS * WARP_SIZE:
        raise Error("pymoe_moe_gate: this router kernel holds at most " + String(SLOTS * WARP_SIZE) + " experts")
    var n_tok = Int64(tokens)
    var n_d = Int64(d_model)
    var n_e = Int64(experts)
    comptime LANE_GROUPS = WARP_SIZE // EG  # EG-groups per slot
    var n_split = Int64(lg_splits)

    def routed_kernel() {var w_out, var id_out, var counts, var pmean, var losses, var x, var rw, var rb, var sb, var lg, var n_tok, var n_d, var n_e, var vector, var lg_partials, var n_split}:
        pdl_begin()
        var tid = Int(thread_idx.x)
        var splits = Int(n_split)
        var summed = stack_allocation[GPU_BLOCK, Float32, address_space=AddressSpace.SHARED]()
        comptime if logits_given:
            if splits > 0:
                var n = Int(n_tok) * Int(n_e)
                if tid < n:
                    var sum: Float32 = 0
                    for s in range(splits):
                        sum += lg_partials.unsafe_load(s * n + tid)
                    summed.unsafe_store(tid, sum)
                barrier()
        # One block (a decode batch) writes the finished statistics itself
        # below: no zeroing, atomics or re-reading of the sums.
        var one_block = Int(grid_dim.x) == 1
        var lane = tid % WARP_SIZE
        var warp = tid // WARP_SIZE
        var warps = Int(grid_dim.x) * WARPS_PER_BLOCK
        var d = Int(n_d)
        var e_count = Int(n_e)
        var groups = ceildiv(e_count, EG)
        var neg_inf = Float32.MIN
        var p_acc = SIMD[DType.float32, SLOTS](0)
        var n_acc = SIMD[DType.int32, SLOTS](0)
        var z_acc: Float32 = 0
        for t in range(Int(block_idx.x) * WARPS_PER_BLOCK + warp, Int(n_tok), warps):
            var xt = x.unsafe_offset(t * d)
            # Logits; slots past the last expert stay -inf (score 0).
            var logit = SIMD[DType.float32, SLOTS](neg_inf)
            comptime if logits_given:
                comptime for i in range(SLOTS):
                    var e = i * WARP_SIZE + lane
                    if e < e_count:
                        if splits > 0:
                            logit[i] = summed.unsafe_load(t * e_count + e)
                        else:
                            logit[i] = lg.unsafe_load(t * e_count + e)
            else:
                for g in range(groups):
                    var l = _group_logits[dtype](xt, rw, d, e_count, g * EG, lane, vector)
                    if lane // EG == g % LANE_GROUPS:
                        comptime for i in range(SLOTS):
                            if g // LANE_GROUPS == i:
                                logit[i] = l[lane % EG]
            var local_max = neg_inf
            comptime for i in range(SLOTS):
                var e = i * WARP_SIZE + lane
                if e < e_count:
                    comptime if has_router_bias:
                        logit[i] += rb.unsafe_load(e)
                    local_max = max(local_max, logit[i])
            var m = warp_max(local_max)
            var local_sum: Float32 = 0
            comptime for i in range(SLOTS):
                if i * WARP_SIZE + lane < e_count:
                    local_sum += exp(logit[i] - m)
            var total = warp_sum(local_sum)
            if lane == 0:
                var lse = m + log(total)
                z_acc += lse * lse

            # Scores (weights and statistics) and selection scores.
            var score = SIMD[DType.float32, SLOTS](0)
            var sel = SIMD[DType.float32, SLOTS](neg_inf)
            var score_sum: Float32 = 0
            comptime for i in range(SLOTS):
                var e = i * WARP_SIZE + lane
                if e < e_count:
                    comptime if sigmoid:
                        score[i] = _sigmoid(logit[i])
                    else:
                        score[i] = exp(logit[i] - m) / total
                    score_sum += score[i]
                    sel[i] = score[i]
                    comptime if has_selection_bias:
                        sel[i] += sb.unsafe_load(e)
            comptime if sigmoid:
                p_acc += score / warp_sum(score_sum)
            else:
                p_acc += score

            # Group-limited top-k: drop the candidates outside the topk_group
            # groups of best two-best sums (every lane decides the same).
            comptime if n_group > 1:
                var group_size = e_count // n_group
                var group_score = Array[Float32, n_group](fill=0)
                for g in range(n_group):
                    var b1 = neg_inf
                    var b2 = neg_inf
                    comptime for i in range(SLOTS):
                        var e = i * WARP_SIZE + lane
                        if e < e_count and e // group_size == g:
                            if sel[i] > b1:
                                b2 = b1
                                b1 = sel[i]
                            elif sel[i] > b2:
                                b2 = sel[i]
                    var off = WARP_SIZE // 2
                    while off > 0:
                        var o1 = shuffle_xor(b1, UInt32(off))
                        var o2 = shuffle_xor(b2, UInt32(off))
                        # The two best of two sorted pairs.
                        var top = max(b1, o1)
                        b2 = max(min(b1, o1), max(b2, o2))
                        b1 = top
                        off //= 2
                    group_score[g] = b1 + b2
                var kept = Array[Bool, n_group](fill=False)
                for _ in range(topk_group):
                    var best = -1
                    var best_v = neg_inf
                    for g in range(n_group):
                        if not kept[g] and (best < 0 or group_score[g] > best_v):
                            best = g
                            best_v = group_score[g]
                    kept[best] = True
                comptime for i in range(SLOTS):
                    var e = i * WARP_SIZE + lane
                    if e < e_count and not kept[e // group_size]:
                        sel[i] = neg_inf

            # k arg-max rounds; `taken` marks this lane's chosen slots.
            var taken = UInt32(0)
            var chosen_sum: Float32 = 0
            for j in range(top_k):
                var best_v = neg_inf
                var best = -1
                var best_score: Float32 = 0
                comptime for i in range(SLOTS):
                    var e = i * WARP_SIZE + lane
                    if e < e_count and (taken >> UInt32(i)) & 1 == 0 and (best < 0 or sel[i] > best_v):
                        best_v = sel[i]
                        best = e
                        best_score = score[i]
                var off = WARP_SIZE // 2
                while off > 0:
                    var other_v = shuffle_xor(best_v, UInt32(off))
                    var other = Int(shuffle_xor(Int32(best), UInt32(off)))
                    var other_score = shuffle_xor(best_score, UInt32(off))
                    if other >= 0 and (
                        best < 0 or other_v > best_v or (other_v == best_v and other < best)
                    ):
                        best_v = other_v
                        best = other
                        best_score = other_score
                    off //= 2
                if best >= 0 and best % WARP_SIZE == lane:
                    taken |= UInt32(1) << UInt32(best // WARP_SIZE)
                    comptime for i in range(SLOTS):
                        if best == i * WARP_SIZE + lane:
                            n_acc[i] += 1
                chosen_sum += best_score
                if lane == j % WARP_SIZE:
                    var w = best_score
                    comptime if not renormalize and scaling != 1.0:
                        w *= scaling
                    w_out.unsafe_store(t * top_k + j, w)
                    id_out.unsafe_store(t * top_k + j, Int32(best))
            comptime if renormalize:
                # Each lane rescales the weights it wrote.
                var f = scaling / chosen_sum
                for j in range(lane, top_k, WARP_SIZE):
                    w_out.unsafe_store(t * top_k + j, w_out.unsafe_load(t * top_k + j) * f)

        # Block reduction of the statistics, then one atomic per expert per block.
        var p_sh = stack_allocation[WARPS_PER_BLOCK * SLOTS * WARP_SIZE, Float32, address_space=AddressSpace.SHARED]()
        var n_sh = stack_allocation[WARPS_PER_BLOCK * SLOTS * WARP_SIZE, Int32, address_space=AddressSpace.SHARED]()
        var z_sh = stack_allocation[WARPS_PER_BLOCK, Float32, address_space=AddressSpace.SHARED]()
        comptime for i in range(SLOTS):
            p_sh.unsafe_store(warp * SLOTS * WARP_SIZE + i * WARP_SIZE + lane, p_acc[i])
            n_sh.unsafe_store(warp * SLOTS * WARP_SIZE + i * WARP_SIZE + lane, n_acc[i])
        if lane == 0:
            z_sh.unsafe_store(warp, z_acc)
        barrier()
        # The same sums and means, in the same order, as the atomics into
        # zeroed statistics and _finish_gate_stats would give (one block: one
        # add per expert), so the results are the same, except that a
        # subnormal sum stays subnormal here where atom.add.f32 flushed it to
        # zero (an expert's summed probability below about 1e-38).
        var t_count = Float32(max(Int(n_tok), 1))
        var aux: Float32 = 0
        for e in range(tid, e_count, GPU_BLOCK):
            var p_sum: Float32 = 0
            var n_sum = Int32(0)
            for w in range(WARPS_PER_BLOCK):
                p_sum += p_sh.unsafe_load(w * SLOTS * WARP_SIZE + e)
                n_sum += n_sh.unsafe_load(w * SLOTS * WARP_SIZE + e)
            if one_block:
                var mean_p = p_sum / t_count
                pmean.unsafe_store(e, mean_p)
                counts.unsafe_store(e, n_sum)
                aux += (Float32(n_sum) / t_count) * mean_p
            else:
                _ = Atomic.fetch_add(pmean.unsafe_offset(e), p_sum)
                if n_sum != 0:
                    _ = Atomic.fetch_add(counts.unsafe_offset(e), n_sum)
        var z_sum: Float32 = 0
        if tid == 0:
            for w in range(WARPS_PER_BLOCK):
                z_sum += z_sh.unsafe_load(w)
        if one_block:
            var total = block_sum[block_size=GPU_BLOCK](aux)
            if tid == 0:
                losses.unsafe_store(0, Float32(e_count) * total)
                losses.unsafe_store(1, z_sum / t_count)
        elif tid == 0:
            _ = Atomic.fetch_add(losses.unsafe_offset(1), z_sum)

    ctx.enqueue_function(routed_kernel, attributes=pdl_attributes(), grid_dim=blocks, block_dim=GPU_BLOCK)


@extensibility.register("pymoe_moe_gate")
struct MoEGate:
    @staticmethod
    def execute[
        top_k: Int,
        renormalize: Bool,
        scoring: StaticString,
        has_router_bias: Bool,
        has_selection_bias: Bool,
        n_group: Int,
        topk_group: Int,
        scaling: Float32,
        logits_given: Bool,
        routed_slots: Int,
        target: StaticString,
    ](
        topk_weights: OutputTensor[dtype=DType.float32, rank=2, ...],
        topk_ids: OutputTensor[dtype=DType.int32, rank=2, ...],
        expert_counts: OutputTensor[dtype=DType.int32, rank=1, ...],
        router_prob_mean: OutputTensor[dtype=DType.float32, rank=1, ...],
        losses: OutputTensor[dtype=DType.float32, rank=1, ...],
        x: InputTensor[rank=2, ...],
        router_w: InputTensor[dtype=x.dtype, rank=2, ...],
        router_bias: InputTensor[dtype=DType.float32, rank=1, ...],
        selection_bias: InputTensor[dtype=DType.float32, rank=1, ...],
        logits: InputTensor[dtype=DType.float32, rank=2, ...],
        logit_partials: InputTensor[dtype=DType.float32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        """Route T tokens to top_k of E experts (see the top of this file).

        Parameters:
            top_k: Experts per token.
            renormalize: Divide the k weights by their sum.
            scoring: "softmax" or "sigmoid".
            has_router_bias: Add router_bias [E] to the logits; without it
                router_bias is a placeholder that is never read.
            has_selection_bias: Add selection_bias [E] to the scores for the
                selection only; without it, a placeholder.
            n_group: Expert groups of the group-limited top-k (1: plain top-k).
            topk_group: Groups kept (1 when n_group is 1).
            scaling: The factor of the weights (routed_scaling_factor).
            logits_given: (GPU) `logits` holds x @ router_w in float32, from
                pymoe_router_logits, and `logit_partials` that op's scratch (run
                with partials_to_gate): in a batch of router_partials_to_gate
                the gate adds the partial rows and `logits` is neither written
                nor read. Else both are placeholders, never read.
            routed_slots: (GPU) Each lane's register slots for the logits in
                the routed token kernel: a power of two, E <= 32 *
                routed_slots. Fewer slots are less work per selection round
                and fewer registers (pymoe.ops passes the fewest that hold E).
            target: "cpu" or "gpu".

        Args:
            topk_weights: Weights of the chosen experts [T, k].
            topk_ids: Chosen experts [T, k].
            expert_counts: Tokens per expert [E].
            router_prob_mean: Mean normalized score per expert [E].
            losses: [aux loss, z-loss].
            x: Tokens [T, d_model].
            router_w: Router weights [d_model, E].
            router_bias: Router bias [E] or a placeholder.
            selection_bias: Selection bias [E] or a placeholder.
            logits: Logits [T, E] or a placeholder.
            logit_partials: The router GEMV's partial rows or a placeholder.
            ctx: The device context.
        """
        comptime assert scoring == "softmax" or scoring == "sigmoid", "scoring must be softmax or sigmoid"
        comptime SIGMOID = scoring == "sigmoid"
        # The default router keeps its original selection (probabilities are
        # >= 0, so a chosen one is marked negative); the others need a
        # selection buffer and the group step.
        comptime ROUTED = SIGMOID or has_selection_bias or n_group > 1
        comptime W = simd_width_of[DType.float32]()
        var tokens = x.dim_size(0)
        var d_model = x.dim_size(1)
        var experts = router_w.dim_size(1)
        if top_k < 1 or top_k > experts:
            raise Error("pymoe_moe_gate: top_k must be in [1, num_experts]")
        if n_group < 1 or experts % n_group != 0 or topk_group < 1 or topk_group > n_group:
            raise Error("pymoe_moe_gate: n_group must divide num_experts and 1 <= topk_group <= n_group")
        if n_group > 1 and (experts // n_group < 2 or top_k > topk_group * (experts // n_group)):
            raise Error("pymoe_moe_gate: groups of >= 2 experts, and top_k within the kept groups")
        if has_router_bias and router_bias.dim_size(0) != experts:
            raise Error("pymoe_moe_gate: router_bias must have num_experts entries")
        if has_selection_bias and selection_bias.dim_size(0) != experts:
            raise Error("pymoe_moe_gate: selection_bias must have num_experts entries")

        var src = x.unsafe_ptr()
        var rw = router_w.unsafe_ptr()
        var rb = router_bias.unsafe_ptr()
        var sb = selection_bias.unsafe_ptr()
        var w_out = topk_weights.unsafe_ptr()
        var id_out = topk_ids.unsafe_ptr()
        comptime if target == "gpu":
            # (ROUTED_SLOTS depends on the target's warp size: checked for the GPU only.)
            comptime assert routed_slots >= 1 and routed_slots <= ROUTED_SLOTS and (routed_slots & (routed_slots - 1)) == 0, "routed_slots: a power of two, at most 16 (512 experts)"
            comptime if logits_given:
                if logits.dim_size(0) != tokens or logits.dim_size(1) != experts:
                    raise Error("pymoe_moe_gate: logits must be [T, num_experts]")
                if experts > GPU_ROUTED_MAX_EXPERTS:
                    raise Error("pymoe_moe_gate: given logits take at most 512 experts on the GPU")
            var lg_splits = 0
            comptime if logits_given:
                lg_splits = router_partials_to_gate[x.dtype](tokens, d_model, experts)
                if logit_partials.dim_size(0) < lg_splits * tokens * experts:
                    raise Error("pymoe_moe_gate: logit_partials holds fewer floats than the router's partial rows")
            gate_gpu[
                x.dtype, top_k, renormalize, SIGMOID, has_router_bias, has_selection_bias, n_group, topk_group,
                scaling, logits_given, routed_slots,
            ](
                ctx, w_out, id_out, expert_counts.unsafe_ptr(), router_prob_mean.unsafe_ptr(),
                losses.unsafe_ptr(), src, rw, rb, sb, logits.unsafe_ptr(), tokens, d_model, experts,
                logit_partials.unsafe_ptr(), lg_splits,
            )
            return
        var workers = max(1, min(parallelism_level(None), ceildiv(tokens, TOKENS_PER_WORKER_MIN)))

        # Per worker: E counts, E probability sums, 1 z-loss sum (all float64).
        var stride = 2 * experts + 1
        var partial = List[Float64](length=workers * stride, fill=0.0)
        var partial_ptr = partial.unsafe_ptr()

        def tokens_of_worker(w: Int) {var src, var rw, var rb, var sb, var d_model, var w_out, var id_out, var tokens, var experts, var workers, var partial_ptr, var stride}:
            var probs = List[Float32](length=experts, fill=0.0)
            var p = probs.unsafe_ptr()
            var logits = List[Float32](length=experts, fill=0.0)
            var row = logits.unsafe_ptr()
            # The routed routers' selection scores and chosen marks.
            var selection = List[Float32](length=experts if ROUTED else 0, fill=0.0)
            var sel = selection.unsafe_ptr()
            var taken_list = List[UInt8](length=experts if ROUTED else 0, fill=0)
            var taken = taken_list.unsafe_ptr()
            var acc = partial_ptr.unsafe_offset(w * stride)
            for t in range(w * tokens // workers, (w + 1) * tokens // workers):
                var xt = src.unsafe_offset(t * d_model)

                def logit_step[width: Int](e: Int) {var xt, var rw, var rb, var row, var d_model, var experts}:
                    var acc = SIMD[DType.float32, width](0)
                    for kk in range(d_model):
                        var a = xt.unsafe_load(kk).cast[DType.float32]()
                        acc += a * rw.unsafe_load[width=width](kk * experts + e).cast[DType.float32]()
                    comptime if has_router_bias:
                        acc += rb.unsafe_load[width=width](e)
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
                var lse = Float64(row_max) + log(Float64(total))
                acc.unsafe_store(2 * experts, acc.unsafe_load(2 * experts) + lse * lse)

                comptime if SIGMOID:
                    # p held exp(logit - max) for the z-loss; now the scores.
                    var score_sum: Float64 = 0
                    for e in range(experts):
                        var s = _sigmoid(row.unsafe_load(e))
                        p.unsafe_store(e, s)
                        score_sum += Float64(s)
                    var inv_sum = 1.0 / score_sum
                    for e in range(experts):
                        acc.unsafe_store(experts + e, acc.unsafe_load(experts + e) + Float64(p.unsafe_load(e)) * inv_sum)
                else:
                    var inv_total = 1.0 / total

                    def normalize_step[width: Int](i: Int) {var p, var inv_total}:
                        p.unsafe_store(i, p.unsafe_load[width=width](i) * inv_total)

                    vectorize[W](experts, normalize_step)

                    for e in range(experts):
                        acc.unsafe_store(experts + e, acc.unsafe_load(experts + e) + Float64(p.unsafe_load(e)))

                var chosen_w = Array[Float32, top_k](fill=0)
                var chosen_sum: Float32 = 0
                comptime if ROUTED:
                    for e in range(experts):
                        var v = p.unsafe_load(e)
                        comptime if has_selection_bias:
                            v += sb.unsafe_load(e)
                        sel.unsafe_store(e, v)
                    comptime if n_group > 1:
                        # Keep the topk_group groups of best two-best sums
                        # (ties to the lower group); the rest become -inf.
                        var group_size = experts // n_group
                        var group_score = Array[Float32, n_group](fill=0)
                        for g in range(n_group):
                            var b1 = Float32.MIN
                            var b2 = Float32.MIN
                            for e in range(g * group_size, (g + 1) * group_size):
                                var v = sel.unsafe_load(e)
                                if v > b1:
                                    b2 = b1
                                    b1 = v
                                elif v > b2:
                                    b2 = v
                            group_score[g] = b1 + b2
                        var kept = Array[Bool, n_group](fill=False)
                        for _ in range(topk_group):
                            var best = -1
                            var best_v = Float32.MIN
                            for g in range(n_group):
                                if not kept[g] and (best < 0 or group_score[g] > best_v):
                                    best = g
                                    best_v = group_score[g]
                            kept[best] = True
                        for g in range(n_group):
                            if not kept[g]:
                                for e in range(g * group_size, (g + 1) * group_size):
                                    sel.unsafe_store(e, Float32.MIN)
                    # k selection passes over the selection scores; strict '>'
                    # keeps the lower index on ties.
                    for j in range(top_k):
                        var best = -1
                        var best_v = Float32.MIN
                        for e in range(experts):
                            if taken.unsafe_load(e) == 0 and (best < 0 or sel.unsafe_load(e) > best_v):
                                best = e
                                best_v = sel.unsafe_load(e)
                        taken.unsafe_store(best, UInt8(1))
                        chosen_w[j] = p.unsafe_load(best)
                        chosen_sum += chosen_w[j]
                        id_out.unsafe_store(t * top_k + j, Int32(best))
                        acc.unsafe_store(best, acc.unsafe_load(best) + 1.0)
                    for j in range(top_k):
                        taken.unsafe_store(Int(id_out.unsafe_load(t * top_k + j)), UInt8(0))
                else:
                    # Top-k by k selection passes: strict '>' keeps the lower index on
                    # ties. A chosen expert is marked by a negative probability.
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
                    var weight = chosen_w[j]
                    comptime if renormalize:
                        weight = weight / chosen_sum
                    comptime if scaling != 1.0:
                        weight *= scaling
                    w_out.unsafe_store(t * top_k + j, weight)
            _ = selection^
            _ = taken_list^

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


# The router's logits for a decode batch (at most ROUTER_GEMV_MAX_TOKENS
# tokens) as a split-K GEMV instead of the tensor-core GEMM: the GEMM's column
# tiles give a router of E <= 128 columns one or two blocks, and one SM alone
# reads the [d_model, E] router slowly (the decode profile's router kernel).
# Here each of many blocks reads about ROUTER_GEMV_BLOCK_BYTES of the router's
# rows, so the read spreads over the GPU. Measured on an H100
# (results/checks/20261207-s22-kernels-H100.log, router_decode_bench): faster
# than the GEMM up to 8 tokens (Qwen3-30B-A3B at 1 token 10.7 against 12.6 us,
# GPT-OSS-20B 10.0 against 17.0, Qwen3-235B 10.7 against 21.4), slower at 16
# on three of five routers (Qwen3-30B-A3B 16.1 against 12.5 us), so one pass
# of 8 tokens is all it does.
comptime ROUTER_GEMV_MAX_TOKENS = 8
comptime ROUTER_GEMV_BLOCK_BYTES = 16384
# At least this many blocks (a small router, Mixtral's [4096, 8], would
# otherwise get 4 blocks of 16 KB).
comptime ROUTER_GEMV_MIN_SPLITS = 32
comptime ROUTER_GEMV_MAX_SPLITS = 512
# Rows of router a block stages at most (a row is >= 16 bytes), so the widest
# d_model the GEMV takes; wider routers take the GEMM.
comptime ROUTER_GEMV_MAX_ROWS = ROUTER_GEMV_BLOCK_BYTES // 16
comptime ROUTER_GEMV_MAX_D_MODEL = ROUTER_GEMV_MAX_SPLITS * ROUTER_GEMV_MAX_ROWS
# Router rows read per thread before the multiply-adds (loads in flight).
comptime ROUTER_GEMV_UNROLL = 4


def router_gemv_rows_per_block[dtype: DType](d_model: Int, experts: Int) -> Int:
    """Router rows per block of router_gemv_gpu: about ROUTER_GEMV_BLOCK_BYTES,
    at least ROUTER_GEMV_MIN_SPLITS blocks, at most ROUTER_GEMV_MAX_SPLITS.
    pymoe.ops.router_gemv_scratch_floats mirrors this (a test compares them)."""
    var rows = min(ROUTER_GEMV_MAX_ROWS, max(1, ROUTER_GEMV_BLOCK_BYTES // (experts * size_of[Scalar[dtype]]())))
    rows = min(rows, max(1, ceildiv(d_model, ROUTER_GEMV_MIN_SPLITS)))
    if ceildiv(d_model, rows) > ROUTER_GEMV_MAX_SPLITS:
        rows = ceildiv(d_model, ROUTER_GEMV_MAX_SPLITS)  # <= MAX_ROWS: d_model <= ROUTER_GEMV_MAX_D_MODEL
    return rows


def router_gemv_scratch_floats[dtype: DType](d_model: Int, experts: Int) -> Int:
    """The float32 scratch router_gemv_gpu needs: a partial row per block and
    token, for up to ROUTER_GEMV_MAX_TOKENS tokens."""
    return ceildiv(d_model, router_gemv_rows_per_block[dtype](d_model, experts)) * ROUTER_GEMV_MAX_TOKENS * experts


def router_partials_to_gate[dtype: DType](tokens: Int, d_model: Int, experts: Int) -> Int:
    """How many partial rows per token the gate adds up itself (0: it reads the
    logits). A decode batch whose T*E logits one gate block holds with one
    logit per thread (T*E <= GPU_BLOCK): there the GEMV's second kernel (the
    sum) would be a launch of its own for the same adds, so the router op
    leaves it out and the gate's block adds the partial rows into shared
    memory in the sum kernel's order (the same logits, bit for bit). The
    router op (with partials_to_gate) and the gate op (given logits) both
    ask this, so they agree."""
    if tokens < 1 or tokens > ROUTER_GEMV_MAX_TOKENS or d_model > ROUTER_GEMV_MAX_D_MODEL:
        return 0
    if tokens * experts > GPU_BLOCK:
        return 0
    return ceildiv(d_model, router_gemv_rows_per_block[dtype](d_model, experts))


def router_gemv_gpu[dtype: DType](
    ctx: DeviceContext,
    logits: Pointer[Float32, MutAnyOrigin],
    x: Pointer[Scalar[dtype], MutAnyOrigin],
    rw: Pointer[Scalar[dtype], MutAnyOrigin],
    tokens: Int,
    d_model: Int,
    experts: Int,
    scratch: Pointer[Float32, MutAnyOrigin],
    scratch_floats: Int,
    sum_partials: Bool = True,
) raises:
    """logits [T, E] (float32) = x [T, d_model] @ rw [d_model, E] for at most
    ROUTER_GEMV_MAX_TOKENS tokens, in two kernels (one without sum_partials:
    then the partial rows in `scratch` are the result, logits is not written,
    and the gate adds them up: router_partials_to_gate). The first splits d_model
    into ranges of rows, one block each: the block stages its range of x in
    shared memory as float32; each thread reads 16-byte vectors of one column
    group (VEC experts) of some router rows and keeps the partial sums of
    every token in registers; the threads of a column group add their sums by
    warp shuffles, then through shared memory, into one partial row per token
    and range. The second adds the ranges' partials in range order, so the
    logits do not depend on scheduling (no atomics).

    Parameters:
        dtype: A 16-bit dtype of x and the router.

    Args:
        ctx: The device context.
        logits: Logits [T, E].
        x: Tokens [T, d_model].
        rw: Router weights [d_model, E], 16-byte aligned.
        tokens: T, at most ROUTER_GEMV_MAX_TOKENS.
        d_model: d_model.
        experts: E, a multiple of 16 // size_of[dtype] (one vector), at most
            GPU_ROUTED_MAX_EXPERTS.
        scratch: The blocks' partial rows, caller-owned (the op's second output,
            planned by MAX's graph, so no buffer is allocated per call).
        scratch_floats: Its size, at least router_gemv_scratch_floats.
        sum_partials: Run the sum kernel (see above).
    """
    comptime VEC = 16 // size_of[Scalar[dtype]]()
    comptime TPP = ROUTER_GEMV_MAX_TOKENS
    comptime WARPS = GPU_BLOCK // WARP_SIZE
    comptime MAX_ROWS = ROUTER_GEMV_MAX_ROWS
    comptime assert GPU_BLOCK % (GPU_ROUTED_MAX_EXPERTS // VEC) == 0, "a block holds a row of the widest router"
    if experts % VEC != 0 or experts > GPU_ROUTED_MAX_EXPERTS or Int(rw) % 16 != 0:
        raise Error("router_gemv_gpu: num_experts a multiple of one 16-byte vector, at most 512, an aligned router")
    if tokens > TPP or d_model > ROUTER_GEMV_MAX_D_MODEL:
        raise Error("router_gemv_gpu: at most ROUTER_GEMV_MAX_TOKENS tokens and ROUTER_GEMV_MAX_D_MODEL rows")
    if tokens == 0:
        return
    var rows_per_block = router_gemv_rows_per_block[dtype](d_model, experts)
    var splits = ceildiv(d_model, rows_per_block)
    if scratch_floats < splits * tokens * experts:
        raise Error("router_gemv_gpu: the scratch holds fewer floats than router_gemv_scratch_floats")
    # Column groups padded to a power of two, so that the threads of one group
    # in a warp are lanes apart by multiples of it (shuffle partners).
    var groups_p = 1
    while groups_p < experts // VEC:
        groups_p *= 2
    var pp = scratch
    var n_tok = Int64(tokens)
    var n_d = Int64(d_model)
    var n_e = Int64(experts)
    var n_r = Int64(rows_per_block)
    var n_gp = Int64(groups_p)

    def split_kernel() {var pp, var x, var rw, var n_tok, var n_d, var n_e, var n_r, var n_gp}:
        pdl_begin()
        var tid = Int(thread_idx.x)
        var lane = tid % WARP_SIZE
        var warp = tid // WARP_SIZE
        var s = Int(block_idx.x)
        var t_count = Int(n_tok)
        var d = Int(n_d)
        var e_count = Int(n_e)
        var groups = e_count // VEC
        var gp = Int(n_gp)
        var sweep = GPU_BLOCK // gp  # rows the block reads side by side
        var g = tid % gp
        var r0 = tid // gp
        var lo = s * Int(n_r)
        var hi = min(d, lo + Int(n_r))
        var xs = stack_allocation[TPP * MAX_ROWS, Float32, address_space=AddressSpace.SHARED]()
        # One partial vector per (warp, or row of threads when gp >= a warp;
        # column group): at most GPU_BLOCK of them.
        var red = stack_allocation[GPU_BLOCK * VEC, Float32, address_space=AddressSpace.SHARED]()
        for i in range(tid, t_count * (hi - lo), GPU_BLOCK):
            var t = i // (hi - lo)
            var r = i % (hi - lo)
            xs.unsafe_store(t * MAX_ROWS + r, x.unsafe_load(t * d + lo + r).cast[DType.float32]())
        barrier()
        var acc = Array[SIMD[DType.float32, VEC], TPP](fill=SIMD[DType.float32, VEC](0))
        if g < groups:
            for r in range(lo + r0, hi, sweep * ROUTER_GEMV_UNROLL):
                var w = Array[SIMD[DType.float32, VEC], ROUTER_GEMV_UNROLL](fill=SIMD[DType.float32, VEC](0))
                var xv = Array[SIMD[DType.float32, TPP], ROUTER_GEMV_UNROLL](fill=SIMD[DType.float32, TPP](0))
                comptime for u in range(ROUTER_GEMV_UNROLL):
                    var row = r + u * sweep
                    if row < hi:
                        w[u] = rw.unsafe_load[width=VEC, alignment=16](row * e_count + g * VEC).cast[DType.float32]()
                        comptime for t in range(TPP):
                            if t < t_count:
                                xv[u][t] = xs.unsafe_load(t * MAX_ROWS + row - lo)
                comptime for u in range(ROUTER_GEMV_UNROLL):
                    comptime for t in range(TPP):
                        acc[t] += xv[u][t] * w[u]
        # Threads of one column group within a warp: lanes g, g + gp, ...
        # (when gp < WARP_SIZE); their sum ends in the lanes below gp.
        var off = gp
        while off < WARP_SIZE:
            comptime for t in range(TPP):
                comptime for j in range(VEC):
                    acc[t][j] += shuffle_xor(acc[t][j], UInt32(off))
            off *= 2
        var slots = min(WARPS, sweep)  # partials per column group
        var slot = warp if gp < WARP_SIZE else r0
        var writer = lane < gp if gp < WARP_SIZE else True
        comptime for t in range(TPP):
            if writer:
                red.unsafe_store[width=VEC]((slot * gp + g) * VEC, acc[t])
            barrier()
            if t < t_count:
                for e in range(tid, e_count, GPU_BLOCK):
                    var sum: Float32 = 0
                    for q in range(slots):
                        sum += red.unsafe_load((q * gp + e // VEC) * VEC + e % VEC)
                    pp.unsafe_store((s * t_count + t) * e_count + e, sum)
            barrier()

    var n_s = Int64(splits)

    def sum_kernel() {var logits, var pp, var n_tok, var n_e, var n_s}:
        pdl_begin()
        var i = Int(block_idx.x) * GPU_BLOCK + Int(thread_idx.x)
        var n = Int(n_tok) * Int(n_e)
        if i < n:
            var sum: Float32 = 0
            for s in range(Int(n_s)):
                sum += pp.unsafe_load(s * n + i)
            logits.unsafe_store(i, sum)

    ctx.enqueue_function(split_kernel, attributes=pdl_attributes(), grid_dim=splits, block_dim=GPU_BLOCK)
    if sum_partials:
        ctx.enqueue_function(
            sum_kernel, attributes=pdl_attributes(), grid_dim=ceildiv(tokens * experts, GPU_BLOCK), block_dim=GPU_BLOCK
        )


def router_logits_gpu[dtype: DType](
    ctx: DeviceContext,
    logits: Pointer[Float32, MutAnyOrigin],
    x: Pointer[Scalar[dtype], MutAnyOrigin],
    rw: Pointer[Scalar[dtype], MutAnyOrigin],
    tokens: Int,
    d_model: Int,
    experts: Int,
    scratch: Pointer[Float32, MutAnyOrigin],
    scratch_floats: Int,
    partials_to_gate: Bool = False,
) raises:
    """logits = x @ rw in float32: the split-K GEMV for a decode batch (its
    partials in `scratch`), else the tensor-core GEMM (dense_gemm_gpu). Needs
    grouped_gemm_supported(d_model, E, d_model, E, 1, x, rw) (16-bit,
    multiples of 8, aligned). With partials_to_gate, a batch that
    router_partials_to_gate gives to the gate leaves the logits unwritten
    (the gate adds the partial rows itself)."""
    if tokens <= ROUTER_GEMV_MAX_TOKENS and d_model <= ROUTER_GEMV_MAX_D_MODEL:
        var gate_sums = partials_to_gate and router_partials_to_gate[dtype](tokens, d_model, experts) > 0
        router_gemv_gpu[dtype](ctx, logits, x, rw, tokens, d_model, experts, scratch, scratch_floats, not gate_sums)
    else:
        dense_gemm_gpu[dtype, DType.float32](ctx, logits, x, rw, tokens, d_model, experts)


@extensibility.register("pymoe_router_logits")
struct RouterLogits:
    """x @ router_w in float32 on the GPU (16-bit inputs; the split-K GEMV up
    to ROUTER_GEMV_MAX_TOKENS tokens, else a grouped GEMM with one group), for
    pymoe_moe_gate's logits input. `scratch` (float32, at least
    router_gemv_scratch_floats: pymoe.ops.router_gemv_scratch_floats) holds
    the GEMV's partial rows; as an output of the op, MAX's graph plans it, so
    the op allocates nothing per call. The CPU gate computes its logits
    itself, so this op is GPU-only. `partials_to_gate` (pymoe_moe_gate, given
    the logits, also reads `scratch`): in a batch of router_partials_to_gate the
    logits output is not written, one launch fewer per decode step."""

    @staticmethod
    def execute[
        partials_to_gate: Bool,
        target: StaticString,
    ](
        logits: OutputTensor[dtype=DType.float32, rank=2, ...],
        scratch: OutputTensor[dtype=DType.float32, rank=1, ...],
        x: InputTensor[rank=2, ...],
        router_w: InputTensor[dtype=x.dtype, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        comptime if target == "gpu":
            var tokens = x.dim_size(0)
            var d_model = x.dim_size(1)
            var experts = router_w.dim_size(1)
            var xp = x.unsafe_ptr()
            var rw = router_w.unsafe_ptr()
            if not grouped_gemm_supported[x.dtype](d_model, experts, d_model, experts, 1, xp, rw):
                raise Error("pymoe_router_logits: 16-bit x, d_model and num_experts multiples of 8")
            router_logits_gpu[x.dtype](
                ctx, logits.unsafe_ptr(), xp, rw, tokens, d_model, experts, scratch.unsafe_ptr(), scratch.dim_size(0),
                partials_to_gate,
            )
        else:
            raise Error("pymoe_router_logits runs on the GPU only")
