# The experts' FFN and the combine of a decode step in ONE GPU kernel.
#
# At a few tokens a layer's expert work is two GEMVs over the experts in use,
# read once each at the memory bandwidth. The grouped-GEMM path runs them as
# four kernels (dispatch, gate/up, down, combine); at one token each of those
# costs a launch and a drain of the GPU that together are as long as the
# reads themselves. Here one kernel does it all, from the gate's topk_ids and
# topk_weights (no dispatch):
#
#   phase 1  h[s, :]          = w_s * act(x[t_s] @ w1[e_s] + b1[e_s])       (float32)
#   phase 2  y_part[q, s, :]  = h[s, rows q] @ w2[e_s][rows q, :]           (float32 partials)
#   phase 3  out[t, :]        = sum_j (sum_q y_part[q, t*k+j, :] + w_tj * b2[e_tj])
#
# Work items. Phase 1: (expert in use u, chunk of FD_BN1 gate columns and the
# same up columns), all d_model rows, so its epilogue applies the activation;
# phase 2: (u, chunk of FD_BN2 d_model columns, row split q of d_ff); phase
# 3: one per d_model chunk. An expert chosen by several tokens is read once
# for all of them (up to FD_MAX_TOKENS). Every block of a persistent grid
# takes the next item from an atomic ticket counter, phase 1's items first,
# so an item's inputs come from items taken before it, by blocks that are
# running: a block that waits for them (on a per-expert or per-chunk
# completion counter) never waits for a block that is not resident, whatever
# else runs on the GPU; no grid barrier, no cooperative launch. A block takes
# its next ticket while it works on the current one (a block holding a
# phase-1 ticket is itself in phase 1, which never waits, so this adds no
# cycle). Phase 2 of the first experts overlaps phase 1 of the last ones.
#
# Phase 2's row splits make enough items to fill the GPU at one token; their
# partials are summed in a fixed order, so the result does not depend on the
# schedule (no float atomics). Scratch: float32 h and partials
# (fused_decode_scratch_floats) and FD_COUNTERS int32 counters that must be
# zero before the first call; the block that leaves last sets them back to 0.

from max.gpu import WARP_SIZE, barrier, thread_idx
from max.gpu.host import DeviceContext
from max.gpu.intrinsics import threadfence
from max.gpu.memory import AddressSpace
from max.gpu.primitives.warp import shuffle_xor
from std.atomic import Atomic, Ordering
from std.collections import Array
from std.math import ceildiv, exp
from std.memory import Pointer, stack_allocation

from .activation import clamped_swiglu_f32, is_gated
from .gpu_launch import pdl_attributes, pdl_begin

comptime FD_THREADS = 256
comptime FD_WARPS = FD_THREADS // WARP_SIZE
comptime FD_VEC = 8  # 16-bit values per 16-byte load
comptime FD_MAX_SLOTS = 64  # T * k
comptime FD_MAX_TOKENS = 4  # tokens of one expert held in registers
comptime FD_BN1 = 32  # gate columns per phase-1 item (plus as many up columns)
comptime FD_BN2 = 128  # d_model columns per phase-2 / phase-3 item
comptime FD_MAX_CHUNKS2 = 128  # d_model up to 16384
comptime FD_MAX_ROWS2 = 1024  # d_ff rows per phase-2 item (h staged in shared memory)
comptime FD_UNROLL = 4  # 16-byte weight loads in flight per thread
comptime FD_ITEM_TARGET = 2  # phase-2 items per SM, about (load balance)
comptime FD_MIN_ROWS2 = 256  # d_ff rows per phase-2 item at least (per-item costs)
comptime FD_BLOCKS_PER_SM = 2
comptime FD_COUNTERS = 2 + FD_MAX_SLOTS + FD_MAX_CHUNKS2
comptime _TICKET = 0
comptime _EXITED = 1
comptime _DONE1 = 2
comptime _DONE2 = 2 + FD_MAX_SLOTS


@fieldwise_init
struct FusedDecodePlan(ImplicitlyCopyable):
    """How one call splits its work (fused_decode_plan)."""

    var c1: Int  # phase-1 column chunks (of d_ff)
    var c2: Int  # phase-2 / phase-3 column chunks (of d_model)
    var ks2: Int  # phase-2 row splits (of d_ff)
    var rows2: Int  # d_ff rows per split
    var blocks: Int  # the grid


def fused_decode_plan(slots: Int, d_model: Int, d_ff: Int, sm_count: Int) -> FusedDecodePlan:
    """Phase 2's row splits: about FD_ITEM_TARGET items per SM when every slot
    has its own expert (one token), at least FD_MIN_ROWS2 rows each."""
    var c1 = ceildiv(d_ff, FD_BN1)
    var c2 = ceildiv(d_model, FD_BN2)
    var ks2 = max(1, min(ceildiv(FD_ITEM_TARGET * sm_count, slots * c2), d_ff // FD_MIN_ROWS2))
    var rows2 = min(ceildiv(ceildiv(d_ff, ks2), 32) * 32, FD_MAX_ROWS2)
    ks2 = ceildiv(d_ff, rows2)
    return FusedDecodePlan(c1, c2, ks2, rows2, FD_BLOCKS_PER_SM * sm_count)


def fused_decode_scratch_floats(slots: Int, d_model: Int, d_ff: Int, plan: FusedDecodePlan) -> Int:
    """Float32 scratch one call needs: h and phase 2's partials."""
    return slots * d_ff + plan.ks2 * slots * d_model


def fused_decode_supported(tokens: Int, k: Int, d_model: Int, d_ff: Int) -> Bool:
    """Shapes the fused kernel takes (else the grouped-GEMM path runs)."""
    return (
        tokens >= 1
        and tokens <= FD_MAX_TOKENS
        and tokens * k <= FD_MAX_SLOTS
        and d_model % FD_VEC == 0
        and d_ff % FD_VEC == 0
        and ceildiv(d_model, FD_BN2) <= FD_MAX_CHUNKS2
    )


@always_inline
def _act[activation: StaticString, alpha: Float32, limit: Float32](g: Float32, u: Float32) -> Float32:
    comptime if activation == "relu":
        return max(g, 0.0)
    elif activation == "silu":
        return g / (1.0 + exp(-g))
    elif activation == "swiglu":
        return g / (1.0 + exp(-g)) * u
    else:
        return clamped_swiglu_f32[alpha, limit, 1](g, u)[0]


@always_inline
def _load_from_other_block(p: Pointer[Float32, MutAnyOrigin], i: Int) -> Float32:
    """A float32 written by another block of this kernel, read past the L1
    (volatile): after thread 0's acquire of its producer's counter and a block
    barrier it is visible (a plain load could hit a stale L1 line); no
    ordering of its own, so these loads overlap."""
    return p.unsafe_load[volatile=True](i)


def fused_decode_gpu[
    dtype: DType, activation: StaticString, has_b1: Bool, has_b2: Bool, alpha: Float32, limit: Float32
](
    ctx: DeviceContext,
    dst: Pointer[Scalar[dtype], MutAnyOrigin],
    x: Pointer[Scalar[dtype], MutAnyOrigin],
    topk_ids: Pointer[Int32, MutAnyOrigin],
    topk_weights: Pointer[Float32, MutAnyOrigin],
    tokens: Int,
    k: Int,
    w1: Pointer[Scalar[dtype], MutAnyOrigin],
    w2: Pointer[Scalar[dtype], MutAnyOrigin],
    b1: Pointer[Scalar[dtype], MutAnyOrigin],
    b2: Pointer[Scalar[dtype], MutAnyOrigin],
    experts: Int,
    d_model: Int,
    d_ff: Int,
    scratch: Pointer[Float32, MutAnyOrigin],
    counters: Pointer[Int32, MutAnyOrigin],
    plan: FusedDecodePlan,
) raises:
    """dst [T, d_model] = the layer's routed experts' output (see the file
    header). w1 [E, d_model, n_w1] (n_w1 = 2 d_ff for the gated activations,
    gate columns first), w2 [E, d_ff, d_model]; b1 [E, n_w1], b2 [E, d_model]
    read with has_b1 / has_b2. Ids outside [0, E) are skipped (their slot
    adds nothing). Needs fused_decode_supported, fused_decode_scratch_floats
    floats of scratch and the FD_COUNTERS counters (zero before the first call).
    """
    comptime GATED = is_gated[activation]()
    comptime HALVES = 2 if GATED else 1
    comptime VPR1 = HALVES * FD_BN1 // FD_VEC  # threads across one phase-1 row
    comptime RPS1 = FD_THREADS // VPR1  # rows per step
    comptime COLS1 = VPR1 * FD_VEC
    comptime VPR2 = FD_BN2 // FD_VEC
    comptime RPS2 = FD_THREADS // VPR2
    comptime assert VPR1 <= WARP_SIZE and VPR2 <= WARP_SIZE, "a row's vectors fit in a warp"
    comptime assert COLS1 <= FD_BN2, "the reduction buffer holds a phase-1 item's columns"
    var slots = tokens * k
    var h_all = scratch
    var y_part = scratch.unsafe_offset(slots * d_ff)
    var n_t = Int64(tokens)
    var n_k = Int64(k)
    var n_e = Int64(experts)
    var n_d = Int64(d_model)
    var n_f = Int64(d_ff)
    var p_c1 = Int64(plan.c1)
    var p_c2 = Int64(plan.c2)
    var p_ks2 = Int64(plan.ks2)
    var p_rows2 = Int64(plan.rows2)
    var n_blocks = Int64(plan.blocks)

    def kernel() {
        var dst, var x, var topk_ids, var topk_weights, var w1, var w2, var b1, var b2, var h_all, var y_part,
        var counters, var n_t, var n_k, var n_e, var n_d, var n_f, var p_c1, var p_c2, var p_ks2, var p_rows2,
        var n_blocks
    }:
        var tid = Int(thread_idx.x)
        var lane = tid % WARP_SIZE
        var warp = tid // WARP_SIZE
        var T = Int(n_t)
        var K = Int(n_k)
        var S = T * K
        var D = Int(n_d)
        var F = Int(n_f)
        var NW1 = HALVES * F
        # The experts in use, in order of first appearance: u_expert[u], the
        # slots of u (token order) u_slot[u * FD_MAX_TOKENS + m], their count
        # u_count[u]; n_used[0] of them.
        var ids = stack_allocation[FD_MAX_SLOTS, Int32, address_space=AddressSpace.SHARED]()
        var first = stack_allocation[FD_MAX_SLOTS, Int32, address_space=AddressSpace.SHARED]()
        var u_expert = stack_allocation[FD_MAX_SLOTS, Int32, address_space=AddressSpace.SHARED]()
        var u_count = stack_allocation[FD_MAX_SLOTS, Int32, address_space=AddressSpace.SHARED]()
        var u_slot = stack_allocation[FD_MAX_SLOTS * FD_MAX_TOKENS, Int32, address_space=AddressSpace.SHARED]()
        var n_used = stack_allocation[1, Int32, address_space=AddressSpace.SHARED]()
        var item_sh = stack_allocation[1, Int32, address_space=AddressSpace.SHARED]()
        var red = stack_allocation[FD_WARPS * FD_MAX_TOKENS * FD_BN2, Float32, address_space=AddressSpace.SHARED]()
        var h_sh = stack_allocation[FD_MAX_ROWS2 * FD_MAX_TOKENS, Float32, address_space=AddressSpace.SHARED]()
        pdl_begin()
        if tid == 0:
            item_sh.unsafe_store(0, Atomic.fetch_add(counters.unsafe_offset(_TICKET), Int32(1)))
        if tid < S:
            var e = topk_ids.unsafe_load(tid)
            ids.unsafe_store(tid, e if (e >= 0 and Int(e) < Int(n_e)) else -1)
        barrier()
        if tid < S:
            # A slot is its expert's first if no earlier token chose the same
            # expert (a token's own k choices are distinct) and it is valid.
            var e = ids.unsafe_load(tid)
            var is_first = e >= 0
            for s2 in range((tid // K) * K):
                if ids.unsafe_load(s2) == e:
                    is_first = False
            first.unsafe_store(tid, Int32(1) if is_first else Int32(0))
        barrier()
        if tid < S and first.unsafe_load(tid) != 0:
            var u = 0
            for s2 in range(tid):
                u += Int(first.unsafe_load(s2))
            var e = ids.unsafe_load(tid)
            u_expert.unsafe_store(u, e)
            var m = 0
            for s2 in range(tid, S):
                # One slot per token (the gate's k choices are distinct) and T <=
                # FD_MAX_TOKENS (the host's check); the cap only keeps a malformed
                # topk_ids from writing past this expert's slots.
                if ids.unsafe_load(s2) == e and m < FD_MAX_TOKENS:
                    u_slot.unsafe_store(u * FD_MAX_TOKENS + m, Int32(s2))
                    m += 1
            u_count.unsafe_store(u, Int32(m))
        if tid == 0:
            var n = 0
            for s2 in range(S):
                n += Int(first.unsafe_load(s2))
            n_used.unsafe_store(0, Int32(n))
        barrier()
        var U = Int(n_used.unsafe_load(0))
        var C1 = Int(p_c1)
        var C2 = Int(p_c2)
        var KS2 = Int(p_ks2)
        var R2 = Int(p_rows2)
        var items1 = U * C1
        var items2 = U * C2 * KS2
        var total = items1 + items2 + C2
        var item = Int(item_sh.unsafe_load(0))

        while item < total:
            # The next ticket, taken now: its atomic's round trip overlaps
            # this item (thread 0 uses the value only at the end).
            var next_item = Int32(0)
            if tid == 0:
                next_item = Atomic.fetch_add(counters.unsafe_offset(_TICKET), Int32(1))
            if item < items1:
                # ---- phase 1: columns chunk c of the gate half (and the up
                # half) of expert u, every d_model row.
                var u = item // C1
                var c = item % C1
                var e = Int(u_expert.unsafe_load(u))
                var ntok = Int(u_count.unsafe_load(u))
                var v = tid % VPR1
                var rg = tid // VPR1
                var half = v // (FD_BN1 // FD_VEC)
                var col = c * FD_BN1 + (v % (FD_BN1 // FD_VEC)) * FD_VEC  # within the half
                var wcol = half * F + (col if col < F else 0)
                var wbase = w1.unsafe_offset(e * D * NW1 + wcol)
                var xrow = Array[Int, FD_MAX_TOKENS](fill=0)
                comptime for m in range(FD_MAX_TOKENS):
                    if m < ntok:
                        xrow[m] = (Int(u_slot.unsafe_load(u * FD_MAX_TOKENS + m)) // K) * D
                var acc = Array[SIMD[DType.float32, FD_VEC], FD_MAX_TOKENS](fill=0)
                for rb in range(rg, D, RPS1 * FD_UNROLL):
                    var wv = Array[SIMD[DType.float32, FD_VEC], FD_UNROLL](fill=0)
                    comptime for i in range(FD_UNROLL):
                        var r = min(rb + i * RPS1, D - 1)
                        wv[i] = wbase.unsafe_load[width=FD_VEC, alignment=16](r * NW1).cast[DType.float32]()
                    comptime for i in range(FD_UNROLL):
                        var r = rb + i * RPS1
                        if r < D:
                            comptime for m in range(FD_MAX_TOKENS):
                                if m < ntok:
                                    acc[m] += x.unsafe_load(xrow[m] + r).cast[DType.float32]() * wv[i]
                # Sum the row groups: lanes VPR1 apart in a warp, then the warps.
                comptime for m in range(FD_MAX_TOKENS):
                    comptime for sh in range(5):
                        comptime if (1 << sh) >= VPR1:
                            comptime for j in range(FD_VEC):
                                acc[m][j] += shuffle_xor(acc[m][j], UInt32(1 << sh))
                if lane < VPR1:
                    comptime for m in range(FD_MAX_TOKENS):
                        if m < ntok:
                            comptime for j in range(FD_VEC):
                                red.unsafe_store((warp * FD_MAX_TOKENS + m) * COLS1 + lane * FD_VEC + j, acc[m][j])
                barrier()
                # The epilogue: bias, activation, the slot's routing weight.
                for o in range(tid, ntok * FD_BN1, FD_THREADS):
                    var m = o // FD_BN1
                    var cc = o % FD_BN1
                    var f = c * FD_BN1 + cc
                    if f < F:
                        var g: Float32 = 0
                        var up: Float32 = 0
                        comptime for w in range(FD_WARPS):
                            g += red.unsafe_load((w * FD_MAX_TOKENS + m) * COLS1 + cc)
                            comptime if GATED:
                                up += red.unsafe_load((w * FD_MAX_TOKENS + m) * COLS1 + FD_BN1 + cc)
                        comptime if has_b1:
                            g += b1.unsafe_load(e * NW1 + f).cast[DType.float32]()
                            comptime if GATED:
                                up += b1.unsafe_load(e * NW1 + F + f).cast[DType.float32]()
                        var s = Int(u_slot.unsafe_load(u * FD_MAX_TOKENS + m))
                        h_all.unsafe_store(s * F + f, _act[activation, alpha, limit](g, up) * topk_weights.unsafe_load(s))
                threadfence()
                barrier()
                if tid == 0:
                    _ = Atomic.fetch_add(counters.unsafe_offset(_DONE1 + u), Int32(1))
            elif item < items1 + items2:
                # ---- phase 2: rows [r0, r1) of d_ff, d_model columns chunk c.
                var it = item - items1
                var u = it // (C2 * KS2)
                var c = (it // KS2) % C2
                var q = it % KS2
                var e = Int(u_expert.unsafe_load(u))
                var ntok = Int(u_count.unsafe_load(u))
                var r0 = q * R2
                var r1 = min(r0 + R2, F)
                if tid == 0:
                    while Atomic.load[ordering=Ordering.ACQUIRE](counters.unsafe_offset(_DONE1 + u)) < Int32(C1):
                        pass
                barrier()
                for o in range(tid, ntok * (r1 - r0), FD_THREADS):
                    var m = o // (r1 - r0)
                    var i = r0 + o % (r1 - r0)
                    var s = Int(u_slot.unsafe_load(u * FD_MAX_TOKENS + m))
                    h_sh.unsafe_store(m * FD_MAX_ROWS2 + (i - r0), _load_from_other_block(h_all, s * F + i))
                barrier()
                var v = tid % VPR2
                var rg = tid // VPR2
                var col = c * FD_BN2 + v * FD_VEC
                var wbase = w2.unsafe_offset(e * F * D + (col if col < D else 0))
                var acc = Array[SIMD[DType.float32, FD_VEC], FD_MAX_TOKENS](fill=0)
                for rb in range(r0 + rg, r1, RPS2 * FD_UNROLL):
                    var wv = Array[SIMD[DType.float32, FD_VEC], FD_UNROLL](fill=0)
                    comptime for i in range(FD_UNROLL):
                        var r = min(rb + i * RPS2, r1 - 1)
                        wv[i] = wbase.unsafe_load[width=FD_VEC, alignment=16](r * D).cast[DType.float32]()
                    comptime for i in range(FD_UNROLL):
                        var r = rb + i * RPS2
                        if r < r1:
                            comptime for m in range(FD_MAX_TOKENS):
                                if m < ntok:
                                    acc[m] += h_sh.unsafe_load(m * FD_MAX_ROWS2 + (r - r0)) * wv[i]
                comptime for m in range(FD_MAX_TOKENS):
                    comptime for sh in range(5):
                        comptime if (1 << sh) >= VPR2:
                            comptime for j in range(FD_VEC):
                                acc[m][j] += shuffle_xor(acc[m][j], UInt32(1 << sh))
                if lane < VPR2:
                    comptime for m in range(FD_MAX_TOKENS):
                        if m < ntok:
                            comptime for j in range(FD_VEC):
                                red.unsafe_store((warp * FD_MAX_TOKENS + m) * FD_BN2 + lane * FD_VEC + j, acc[m][j])
                barrier()
                for o in range(tid, ntok * FD_BN2, FD_THREADS):
                    var m = o // FD_BN2
                    var cc = o % FD_BN2
                    if c * FD_BN2 + cc < D:
                        var sum: Float32 = 0
                        comptime for w in range(FD_WARPS):
                            sum += red.unsafe_load((w * FD_MAX_TOKENS + m) * FD_BN2 + cc)
                        var s = Int(u_slot.unsafe_load(u * FD_MAX_TOKENS + m))
                        y_part.unsafe_store((q * S + s) * D + c * FD_BN2 + cc, sum)
                threadfence()
                barrier()
                if tid == 0:
                    _ = Atomic.fetch_add(counters.unsafe_offset(_DONE2 + c), Int32(1))
            else:
                # ---- phase 3: the combine of d_model columns chunk c, every
                # token, its slots in order (deterministic).
                var c = item - items1 - items2
                if tid == 0:
                    while Atomic.load[ordering=Ordering.ACQUIRE](counters.unsafe_offset(_DONE2 + c)) < Int32(U * KS2):
                        pass
                barrier()
                for o in range(tid, T * FD_BN2, FD_THREADS):
                    var t = o // FD_BN2
                    var col = c * FD_BN2 + o % FD_BN2
                    if col < D:
                        var sum: Float32 = 0
                        for j in range(K):
                            var s = t * K + j
                            var e = Int(ids.unsafe_load(s))
                            if e >= 0:
                                for q2 in range(KS2):
                                    sum += _load_from_other_block(y_part, (q2 * S + s) * D + col)
                                comptime if has_b2:
                                    sum += topk_weights.unsafe_load(s) * b2.unsafe_load(e * D + col).cast[DType.float32]()
                        dst.unsafe_store(t * D + col, sum.cast[dtype]())
            # Hand the next ticket to the block (every thread is past its
            # reads of the shared buffers of this item).
            barrier()
            if tid == 0:
                item_sh.unsafe_store(0, next_item)
            barrier()
            item = Int(item_sh.unsafe_load(0))
        # The last block to leave resets the counters for the next call: every
        # item is done by then and no block reads them again.
        if tid == 0:
            var left = Atomic.fetch_add(counters.unsafe_offset(_EXITED), Int32(1))
            if Int(left) == Int(n_blocks) - 1:
                counters.unsafe_store(_TICKET, 0)
                for u in range(U):
                    counters.unsafe_store(_DONE1 + u, 0)
                for c in range(C2):
                    counters.unsafe_store(_DONE2 + c, 0)
                counters.unsafe_store(_EXITED, 0)

    ctx.enqueue_function(kernel, attributes=pdl_attributes(), grid_dim=plan.blocks, block_dim=FD_THREADS)
