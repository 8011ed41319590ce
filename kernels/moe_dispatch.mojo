# MoE dispatch: group the T*k (token, choice) slots by expert.
#
# Input  topk_ids [T, k] int32 (from pymoe_moe_gate).
# Outputs, with S = T*k slots:
#   sorted_token_ids [S]   int32  token index of each row of the expert-grouped
#                                 layout; rows of expert e are
#                                 [expert_offsets[e], expert_offsets[e+1]),
#                                 in token order. Rows past expert_offsets[E]
#                                 (dropped slots) hold token 0 and are unused.
#   expert_offsets   [E+1] int32  exclusive prefix sum of the kept rows
#   slot_to_row      [S]   int32  row of slot t*k + j in that layout, or -1
#                                 when the slot was dropped by the capacity
#
# Capacity: with `capacity_factor_permille` = 1000 * capacity_factor > 0, each
# expert keeps at most ceil(capacity_factor * T * k / E) slots, the first ones
# in token order (Switch Transformer); the rest are dropped. 0 means no limit.
#
# A counting sort: one pass to count, a prefix sum, one pass to place. It is
# O(T*k) and stable, so the layout is deterministic. On the GPU each pass is
# a kernel: B blocks split the slots into ranges (about SLOTS_PER_BLOCK each);
# each block counts its range per expert in shared memory, E blocks (one per
# expert) turn the E x B counts into each block's first rank per expert and
# the experts' totals, one block turns the totals into the expert offsets,
# and each block places its range: a slot's rank within its expert
# is the expert's slots before its block, plus those before it in the block
# (counted per warp with shuffles, per round of GPU_BLOCK slots). Every slot
# is read twice in all, whatever E. The per-block numbers live in
# slot_to_row between the passes, so no scratch memory is needed.
# Up to ONE_BLOCK_DISPATCH_SLOTS slots (decode and small prefill) the same
# three passes run in ONE kernel of one block instead: there the three
# launches cost more than the work, and one block hands its results from
# pass to pass through a barrier. Out-of-range ids cannot raise on the GPU:
# those slots are dropped (slot_to_row = -1); the graph API rejects such ids
# where it can. The GPU takes at most MAX_EXPERTS experts (shared memory
# holds a count per expert; pymoe.ops checks it first).

import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu import WARP_SIZE, barrier, block_idx, thread_idx
from max.gpu.host import DeviceContext
from max.gpu.memory import AddressSpace
from max.gpu.primitives.block import prefix_sum as block_prefix_sum
from max.gpu.primitives.warp import shuffle_idx
from std.atomic import Atomic
from std.math import ceildiv
from std.memory import Pointer, stack_allocation
from .gpu_launch import pdl_attributes, pdl_begin

comptime GPU_BLOCK = 256
comptime WARPS = GPU_BLOCK // WARP_SIZE
comptime MAX_EXPERTS = 512  # as the gate's and the grouped GEMM's limits
# Slots per block of the many-slots path: enough blocks to fill the GPU at
# prefill sizes, few enough that the one-block scan over E x B counts stays
# short (it reads each block's count of each expert once).
comptime SLOTS_PER_BLOCK = 1024
comptime MAX_DISPATCH_BLOCKS = 512
# Up to this many slots one block runs all three passes in one kernel (see
# dispatch_gpu_one_block): below it the three kernels' launches cost more than
# one block's rounds over the slots. Measured on an H100 with
# scripts/dispatch_kernel_check.mojo (results/checks/20261207-s22-kernels-H100.log):
# at 1024 slots (128 tokens, k 8) one block 14.0 us against three kernels'
# 19.6, at 2048 slots 25.6 against 21.2.
comptime ONE_BLOCK_DISPATCH_SLOTS = 1024
# Up to this many slots (decode up to 8 tokens of top-8) one block runs the
# plain passes of dispatch_gpu_few_slots instead: each expert counts its slots
# by scanning them all, each slot its rank by scanning the slots before it.
# At 8 slots (one Qwen3 token) that took 2.3 us in session 20's layer profile
# (results/checks/20261207-s20-profile-qwen3-H100.log), the one-block path
# 5.1 us in session 22's (...-s22-profile-qwen3-H100.log). 64 is a guess:
# scripts/dispatch_kernel_check.mojo times the two up to 256 slots.
comptime FEW_DISPATCH_SLOTS = 64


def _scan_capped_counts(
    offsets: Pointer[Int32, MutAnyOrigin], experts: Int, capacity: Int, tid: Int
):
    """One block turns the counts in offsets[1..E] into the exclusive prefix sum
    of min(count, capacity) in offsets[0..E], GPU_BLOCK experts at a time.

    Args:
        offsets: Expert offsets [E + 1]; the counts are in [1..E] on entry.
        experts: E.
        capacity: The most slots an expert keeps.
        tid: This thread's index in the block.
    """
    var chunk_total = stack_allocation[1, Int32, address_space=AddressSpace.SHARED]()
    var running = Int32(0)
    for base in range(0, experts, GPU_BLOCK):
        var e = base + tid
        var c = Int32(0)
        if e < experts:
            c = min(offsets.unsafe_load(e + 1), Int32(capacity))
        var before = block_prefix_sum[block_size=GPU_BLOCK, exclusive=True](c)
        if tid == GPU_BLOCK - 1:
            chunk_total.unsafe_store(0, before + c)
        if e < experts:
            offsets.unsafe_store(e + 1, running + before + c)
        barrier()
        running += chunk_total.unsafe_load(0)
        barrier()
    if tid == 0:
        offsets.unsafe_store(0, Int32(0))


def _dispatch_blocks(slots: Int, experts: Int) -> Int:
    """Blocks of the many-slots path: about SLOTS_PER_BLOCK slots each, and at
    least E slots in every block's range (its counts are kept there)."""
    return max(1, min(ceildiv(slots, SLOTS_PER_BLOCK), slots // experts, MAX_DISPATCH_BLOCKS))


@always_inline
def _range_start(b: Int, slots: Int, blocks: Int) -> Int:
    """First slot of block b's range: the ranges split the slots as evenly as
    whole slots allow, so each holds at least slots // blocks."""
    return b * slots // blocks


def _count_range(
    hist: Pointer[Int32, MutUntrackedOrigin, address_space=AddressSpace.SHARED],
    ids: Pointer[Int32, MutAnyOrigin],
    lo: Int,
    hi: Int,
    experts: Int,
    tid: Int,
):
    """One block counts the slots [lo, hi) per expert into shared `hist`
    (zeroed here); out-of-range ids are not counted. Ends behind a barrier."""
    for e in range(tid, experts, GPU_BLOCK):
        hist.unsafe_store(e, Int32(0))
    barrier()
    for s in range(lo + tid, hi, GPU_BLOCK):
        var id = Int(ids.unsafe_load(s))
        if id >= 0 and id < experts:
            _ = Atomic.fetch_add(hist.unsafe_offset(id), Int32(1))
    barrier()


def _place_range(
    sorted_ptr: Pointer[Int32, MutAnyOrigin],
    offsets: Pointer[Int32, MutAnyOrigin],
    rows: Pointer[Int32, MutAnyOrigin],
    ids: Pointer[Int32, MutAnyOrigin],
    seen: Pointer[Int32, MutUntrackedOrigin, address_space=AddressSpace.SHARED],
    lo: Int,
    hi: Int,
    k: Int,
    experts: Int,
    tid: Int,
):
    """One block places the slots [lo, hi), GPU_BLOCK at a time. A slot's rank
    among its expert's slots (token order) is: the expert's slots before this
    range (in `seen` on entry, which this function advances), in this range's
    earlier rounds, in the earlier warps of this round, and in the earlier
    lanes of its warp. `offsets` must be final."""
    var lane = tid % WARP_SIZE
    var warp = tid // WARP_SIZE
    var in_warp = stack_allocation[WARPS * MAX_EXPERTS, Int32, address_space=AddressSpace.SHARED]()
    for i in range(tid, WARPS * MAX_EXPERTS, GPU_BLOCK):
        in_warp.unsafe_store(i, Int32(0))
    barrier()
    for base in range(lo, hi, GPU_BLOCK):
        var s = base + tid
        var id = -1
        if s < hi:
            id = Int(ids.unsafe_load(s))
        var valid = id >= 0 and id < experts
        # This lane's rank among the warp's lanes with the same id, and
        # their number (counted by the lowest of them).
        var rank = Int32(0)
        var same = Int32(0)
        comptime for j in range(WARP_SIZE):
            if Int(shuffle_idx(Int32(id), UInt32(j))) == id:
                same += 1
                if j < lane:
                    rank += 1
        var lowest = valid and rank == 0
        if lowest:
            in_warp.unsafe_store(warp * MAX_EXPERTS + id, same)
        barrier()
        if valid:
            var r = seen.unsafe_load(id) + rank
            for w in range(warp):
                r += in_warp.unsafe_load(w * MAX_EXPERTS + id)
            var start = offsets.unsafe_load(id)
            if r < offsets.unsafe_load(id + 1) - start:
                sorted_ptr.unsafe_store(Int(start + r), Int32(s // k))
                rows.unsafe_store(s, start + r)
            else:
                rows.unsafe_store(s, Int32(-1))
        elif s < hi:
            rows.unsafe_store(s, Int32(-1))
        barrier()
        if lowest:
            _ = Atomic.fetch_add(seen.unsafe_offset(id), same)
            in_warp.unsafe_store(warp * MAX_EXPERTS + id, Int32(0))
        barrier()


def dispatch_gpu(
    ctx: DeviceContext,
    sorted_ptr: Pointer[Int32, MutAnyOrigin],
    offsets: Pointer[Int32, MutAnyOrigin],
    rows: Pointer[Int32, MutAnyOrigin],
    ids: Pointer[Int32, MutAnyOrigin],
    slots: Int,
    k: Int,
    experts: Int,
    capacity: Int,
) raises:
    """The counting sort on the GPU: the few-slots scan up to
    FEW_DISPATCH_SLOTS slots, one kernel of one block up to
    ONE_BLOCK_DISPATCH_SLOTS, else three kernels over slot ranges (see the top
    of this file)."""
    if experts > MAX_EXPERTS:
        raise Error("pymoe_moe_dispatch: the GPU takes at most 512 experts")
    if slots <= FEW_DISPATCH_SLOTS:
        dispatch_gpu_few_slots(ctx, sorted_ptr, offsets, rows, ids, slots, k, experts, capacity)
    elif slots <= ONE_BLOCK_DISPATCH_SLOTS:
        dispatch_gpu_one_block(ctx, sorted_ptr, offsets, rows, ids, slots, k, experts, capacity)
    else:
        dispatch_gpu_ranges(ctx, sorted_ptr, offsets, rows, ids, slots, k, experts, capacity)


def dispatch_gpu_few_slots(
    ctx: DeviceContext,
    sorted_ptr: Pointer[Int32, MutAnyOrigin],
    offsets: Pointer[Int32, MutAnyOrigin],
    rows: Pointer[Int32, MutAnyOrigin],
    ids: Pointer[Int32, MutAnyOrigin],
    slots: Int,
    k: Int,
    experts: Int,
    capacity: Int,
) raises:
    """The three passes in one kernel of one block for a few slots, without
    shared-memory counters or warp ranks: a thread per expert counts that
    expert's slots, the capped prefix sum, then a thread per slot counts the
    slots of its expert before it (O(slots * (E + slots)) loads, all cached).
    Same arguments and results as dispatch_gpu (E <= MAX_EXPERTS)."""
    if experts == 0:
        return
    var n_slots = Int64(slots)
    var n_k = Int64(k)
    var n_e = Int64(experts)
    var cap = Int64(capacity)

    def few_slots_kernel() {var sorted_ptr, var offsets, var rows, var ids, var n_slots, var n_k, var n_e, var cap}:
        # A barrier makes the block's global writes visible to the whole
        # block, so the counts and offsets go from pass to pass in offsets.
        pdl_begin()
        var tid = Int(thread_idx.x)
        var slots = Int(n_slots)
        var e_count = Int(n_e)
        for e in range(tid, e_count, GPU_BLOCK):
            var c = Int32(0)
            for s in range(slots):
                if Int(ids.unsafe_load(s)) == e:
                    c += 1
            offsets.unsafe_store(e + 1, c)
        barrier()
        _scan_capped_counts(offsets, e_count, Int(cap), tid)
        barrier()
        # A slot's row: its expert's first row plus the slots of that expert
        # before it (token order, as the other paths and the CPU's).
        for s in range(tid, slots, GPU_BLOCK):
            var id = Int(ids.unsafe_load(s))
            var row = Int32(-1)
            if id >= 0 and id < e_count:
                var rank = 0
                for q in range(s):
                    if Int(ids.unsafe_load(q)) == id:
                        rank += 1
                var start = Int(offsets.unsafe_load(id))
                if rank < Int(offsets.unsafe_load(id + 1)) - start:
                    row = Int32(start + rank)
                    sorted_ptr.unsafe_store(start + rank, Int32(s // Int(n_k)))
            rows.unsafe_store(s, row)
        for tail in range(Int(offsets.unsafe_load(e_count)) + tid, slots, GPU_BLOCK):
            sorted_ptr.unsafe_store(tail, Int32(0))

    ctx.enqueue_function(few_slots_kernel, attributes=pdl_attributes(), grid_dim=1, block_dim=GPU_BLOCK)


def dispatch_gpu_one_block(
    ctx: DeviceContext,
    sorted_ptr: Pointer[Int32, MutAnyOrigin],
    offsets: Pointer[Int32, MutAnyOrigin],
    rows: Pointer[Int32, MutAnyOrigin],
    ids: Pointer[Int32, MutAnyOrigin],
    slots: Int,
    k: Int,
    experts: Int,
    capacity: Int,
) raises:
    """The three passes in one kernel of one block: count into shared memory,
    the capped prefix sum, place. A barrier makes the block's global writes
    visible to the whole block, so the offsets go from pass to pass in
    expert_offsets. Same arguments as dispatch_gpu (E <= MAX_EXPERTS)."""
    if experts == 0:
        return
    var n_slots = Int64(slots)
    var n_k = Int64(k)
    var n_e = Int64(experts)
    var cap = Int64(capacity)

    def one_block_kernel() {var sorted_ptr, var offsets, var rows, var ids, var n_slots, var n_k, var n_e, var cap}:
        pdl_begin()
        var tid = Int(thread_idx.x)
        var slots = Int(n_slots)
        var e_count = Int(n_e)
        var counts = stack_allocation[MAX_EXPERTS, Int32, address_space=AddressSpace.SHARED]()
        _count_range(counts, ids, 0, slots, e_count, tid)
        for e in range(tid, e_count, GPU_BLOCK):
            offsets.unsafe_store(e + 1, counts.unsafe_load(e))
            counts.unsafe_store(e, Int32(0))  # from here: the slots placed per expert
        barrier()
        _scan_capped_counts(offsets, e_count, Int(cap), tid)
        barrier()
        _place_range(sorted_ptr, offsets, rows, ids, counts, 0, slots, Int(n_k), e_count, tid)
        for tail in range(Int(offsets.unsafe_load(e_count)) + tid, slots, GPU_BLOCK):
            sorted_ptr.unsafe_store(tail, Int32(0))

    ctx.enqueue_function(one_block_kernel, attributes=pdl_attributes(), grid_dim=1, block_dim=GPU_BLOCK)


def dispatch_gpu_ranges(
    ctx: DeviceContext,
    sorted_ptr: Pointer[Int32, MutAnyOrigin],
    offsets: Pointer[Int32, MutAnyOrigin],
    rows: Pointer[Int32, MutAnyOrigin],
    ids: Pointer[Int32, MutAnyOrigin],
    slots: Int,
    k: Int,
    experts: Int,
    capacity: Int,
) raises:
    """The three passes as kernels over B blocks' slot ranges (count; prefix
    sums, one block per expert, then the capped offsets in one block; place). Needs slots >= E (every range holds its block's
    per-expert numbers, see below). Same arguments as dispatch_gpu."""
    if experts == 0:
        return
    if slots < experts:
        raise Error("dispatch_gpu_ranges: needs at least num_experts slots")
    var n_slots = Int64(slots)
    var n_k = Int64(k)
    var n_e = Int64(experts)
    var cap = Int64(capacity)
    # B blocks split the slots into ranges of at least E slots each, and
    # slot_to_row holds the blocks' per-expert numbers between the passes
    # (the first E entries of each block's own range, which only that block
    # overwrites, and only after reading them).
    var blocks = _dispatch_blocks(slots, experts)
    var n_b = Int64(blocks)

    def histogram_kernel() {var rows, var ids, var n_slots, var n_e, var n_b}:
        pdl_begin()
        # Block b counts its range's slots per expert into rows[lo + e].
        var b = Int(block_idx.x)
        var tid = Int(thread_idx.x)
        var e_count = Int(n_e)
        var lo = _range_start(b, Int(n_slots), Int(n_b))
        var hist = stack_allocation[MAX_EXPERTS, Int32, address_space=AddressSpace.SHARED]()
        _count_range(hist, ids, lo, _range_start(b + 1, Int(n_slots), Int(n_b)), e_count, tid)
        for e in range(tid, e_count, GPU_BLOCK):
            rows.unsafe_store(lo + e, hist.unsafe_load(e))

    def column_kernel() {var offsets, var rows, var n_slots, var n_e, var n_b}:
        pdl_begin()
        # Block e: expert e's count in each block's range becomes the expert's
        # slots in the blocks before (in place), its total goes to offsets[e + 1].
        # One block per expert: one block doing every expert (before session 25)
        # took 34.5 us at 16384 Qwen3-30B-A3B tokens (128 x 128 counts, each
        # loaded and stored from one SM; results/checks/20261207-s22-profile-qwen3-H100.log).
        # Kernel-only on an H100 the ranges dispatch took 25 us against 57 at 16384
        # top-8 tokens of 128 experts, 2 us more at 512-2048 tokens
        # (results/checks/20261207-s25-dispatch-gate-kernels-H100.log).
        var e = Int(block_idx.x)
        var tid = Int(thread_idx.x)
        var nb = Int(n_b)
        var chunk_total = stack_allocation[1, Int32, address_space=AddressSpace.SHARED]()
        var running = Int32(0)
        for base in range(0, nb, GPU_BLOCK):
            var b = base + tid
            var at = 0
            var c = Int32(0)
            if b < nb:
                at = _range_start(b, Int(n_slots), nb) + e
                c = rows.unsafe_load(at)
            var before = block_prefix_sum[block_size=GPU_BLOCK, exclusive=True](c)
            if tid == GPU_BLOCK - 1:
                chunk_total.unsafe_store(0, before + c)
            if b < nb:
                rows.unsafe_store(at, running + before)
            barrier()
            running += chunk_total.unsafe_load(0)
            barrier()
        if tid == 0:
            offsets.unsafe_store(e + 1, running)

    def capped_kernel() {var offsets, var n_e, var cap}:
        pdl_begin()
        # The totals in offsets[1..E] become the capped expert offsets.
        _scan_capped_counts(offsets, Int(n_e), Int(cap), Int(thread_idx.x))

    def place_kernel() {var sorted_ptr, var offsets, var rows, var ids, var n_slots, var n_k, var n_e, var n_b}:
        pdl_begin()
        var b = Int(block_idx.x)
        var tid = Int(thread_idx.x)
        var e_count = Int(n_e)
        var slots = Int(n_slots)
        var lo = _range_start(b, slots, Int(n_b))
        var seen = stack_allocation[MAX_EXPERTS, Int32, address_space=AddressSpace.SHARED]()
        for e in range(tid, e_count, GPU_BLOCK):
            seen.unsafe_store(e, rows.unsafe_load(lo + e))
        # (_place_range's first barrier orders these loads before any store to rows.)
        _place_range(sorted_ptr, offsets, rows, ids, seen, lo, _range_start(b + 1, slots, Int(n_b)), Int(n_k), e_count, tid)
        # Rows past the kept slots hold token 0; the blocks share that tail.
        var total = Int(offsets.unsafe_load(e_count))
        for row in range(total + b * GPU_BLOCK + tid, slots, Int(n_b) * GPU_BLOCK):
            sorted_ptr.unsafe_store(row, Int32(0))

    ctx.enqueue_function(histogram_kernel, attributes=pdl_attributes(), grid_dim=blocks, block_dim=GPU_BLOCK)
    ctx.enqueue_function(column_kernel, attributes=pdl_attributes(), grid_dim=experts, block_dim=GPU_BLOCK)
    ctx.enqueue_function(capped_kernel, attributes=pdl_attributes(), grid_dim=1, block_dim=GPU_BLOCK)
    ctx.enqueue_function(place_kernel, attributes=pdl_attributes(), grid_dim=blocks, block_dim=GPU_BLOCK)


@extensibility.register("pymoe_moe_dispatch")
struct MoEDispatch:
    @staticmethod
    def execute[
        capacity_factor_permille: Int,
        target: StaticString,
    ](
        sorted_token_ids: OutputTensor[dtype=DType.int32, rank=1, ...],
        expert_offsets: OutputTensor[dtype=DType.int32, rank=1, ...],
        slot_to_row: OutputTensor[dtype=DType.int32, rank=1, ...],
        topk_ids: InputTensor[dtype=DType.int32, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        var tokens = topk_ids.dim_size(0)
        var k = topk_ids.dim_size(1)
        var slots = tokens * k
        var experts = expert_offsets.dim_size(0) - 1
        var ids = topk_ids.unsafe_ptr()
        var sorted_ptr = sorted_token_ids.unsafe_ptr()
        var offsets = expert_offsets.unsafe_ptr()
        var rows = slot_to_row.unsafe_ptr()

        var capacity = slots
        comptime if capacity_factor_permille > 0:
            capacity = ceildiv(capacity_factor_permille * slots, 1000 * experts)
        comptime if target == "gpu":
            dispatch_gpu(ctx, sorted_ptr, offsets, rows, ids, slots, k, experts, capacity)
            return

        var fill = List[Int](length=experts, fill=0)
        for s in range(slots):
            var e = Int(ids.unsafe_load(s))
            if e < 0 or e >= experts:
                raise Error("pymoe_moe_dispatch: expert id out of range [0, num_experts)")
            fill[e] += 1

        var running = 0
        for e in range(experts):
            offsets.unsafe_store(e, Int32(running))
            running += min(fill[e], capacity)
            fill[e] = 0
        offsets.unsafe_store(experts, Int32(running))

        for s in range(slots):
            var e = Int(ids.unsafe_load(s))
            if fill[e] < capacity:
                var row = Int(offsets.unsafe_load(e)) + fill[e]
                sorted_ptr.unsafe_store(row, Int32(s // k))
                rows.unsafe_store(s, Int32(row))
                fill[e] += 1
            else:
                rows.unsafe_store(s, Int32(-1))
        for row in range(running, slots):
            sorted_ptr.unsafe_store(row, Int32(0))
