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
# a kernel with one thread block per expert; the place pass numbers an
# expert's slots in token order with a block-wide prefix sum per chunk of
# slots (each thread counts a few consecutive slots first). The counts live
# in expert_offsets between the passes, so no scratch memory is needed.
# Decode batches (at most SMALL_DISPATCH_SLOTS slots) run the three passes in
# ONE kernel of one block instead: there the passes are a few microseconds of
# launches around almost no work, and one block can hand its results from
# pass to pass through a barrier. Out-of-range ids cannot raise on the GPU:
# those slots are dropped (slot_to_row = -1); the graph API rejects such ids
# where it can.

import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu import barrier, block_idx, thread_idx
from max.gpu.host import DeviceContext
from max.gpu.memory import AddressSpace
from max.gpu.primitives.block import prefix_sum as block_prefix_sum
from std.math import ceildiv
from std.memory import Pointer, stack_allocation

comptime GPU_BLOCK = 256
comptime SLOTS_PER_THREAD = 4
# Up to this many slots (decode: 32 tokens at top-8) one block runs all three
# passes; each thread then scans all slots once per expert it counts and once
# per slot it places, which stays below a kernel launch only while the slots
# are few.
comptime SMALL_DISPATCH_SLOTS = 256


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
    """The counting sort as three GPU kernels (count, prefix sum, place), or one
    kernel of one block for at most SMALL_DISPATCH_SLOTS slots."""
    var n_slots = Int64(slots)
    var n_k = Int64(k)
    var n_e = Int64(experts)
    var cap = Int64(capacity)

    def count_kernel() {var offsets, var ids, var n_slots}:
        # Block e counts the slots routed to expert e into offsets[e + 1].
        var e = Int(block_idx.x)
        var tid = Int(thread_idx.x)
        var partial = stack_allocation[GPU_BLOCK, Int32, address_space=AddressSpace.SHARED]()
        var c = Int32(0)
        for s in range(tid, Int(n_slots), GPU_BLOCK):
            if Int(ids.unsafe_load(s)) == e:
                c += 1
        partial.unsafe_store(tid, c)
        barrier()
        var stride = GPU_BLOCK // 2
        while stride > 0:
            if tid < stride:
                partial.unsafe_store(tid, partial.unsafe_load(tid) + partial.unsafe_load(tid + stride))
            barrier()
            stride //= 2
        if tid == 0:
            offsets.unsafe_store(e + 1, partial.unsafe_load(0))

    def prefix_kernel() {var offsets, var n_e, var cap}:
        _scan_capped_counts(offsets, Int(n_e), Int(cap), Int(thread_idx.x))

    def small_kernel() {var sorted_ptr, var offsets, var rows, var ids, var n_slots, var n_k, var n_e, var cap}:
        # The three passes in one block (slots <= SMALL_DISPATCH_SLOTS). A
        # barrier makes the block's global writes visible to the whole block,
        # so the counts and offsets go from pass to pass in expert_offsets.
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
        # before it (token order, as the CPU's and the place kernel's).
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

    def place_kernel() {var sorted_ptr, var offsets, var rows, var ids, var n_slots, var n_k, var n_e, var cap}:
        # Block e walks the slots in chunks of GPU_BLOCK * SLOTS_PER_THREAD;
        # thread i owns SLOTS_PER_THREAD consecutive slots of a chunk, so a
        # block-wide exclusive prefix sum of the threads' counts numbers the
        # expert's slots in slot (= token) order.
        var e = Int(block_idx.x)
        var tid = Int(thread_idx.x)
        var chunk_total = stack_allocation[1, Int32, address_space=AddressSpace.SHARED]()
        var start = Int(offsets.unsafe_load(e))
        var kept = Int(offsets.unsafe_load(e + 1)) - start
        var slots = Int(n_slots)
        var base = 0
        for chunk in range(0, slots, GPU_BLOCK * SLOTS_PER_THREAD):
            var first = chunk + tid * SLOTS_PER_THREAD
            var mine = Int32(0)
            comptime for i in range(SLOTS_PER_THREAD):
                if first + i < slots and Int(ids.unsafe_load(first + i)) == e:
                    mine += 1
            var before = block_prefix_sum[block_size=GPU_BLOCK, exclusive=True](mine)
            if tid == GPU_BLOCK - 1:
                chunk_total.unsafe_store(0, before + mine)
            var pos = base + Int(before)
            comptime for i in range(SLOTS_PER_THREAD):
                var s = first + i
                if s < slots:
                    var id = Int(ids.unsafe_load(s))
                    if id == e:
                        if pos < kept:
                            sorted_ptr.unsafe_store(start + pos, Int32(s // Int(n_k)))
                            rows.unsafe_store(s, Int32(start + pos))
                        else:
                            rows.unsafe_store(s, Int32(-1))
                        pos += 1
                    elif e == 0 and (id < 0 or id >= Int(n_e)):
                        rows.unsafe_store(s, Int32(-1))
            barrier()
            base += Int(chunk_total.unsafe_load(0))
            barrier()
        # Rows past the kept slots hold token 0; the blocks share that tail.
        var total = Int(offsets.unsafe_load(Int(n_e)))
        for row in range(total + e * GPU_BLOCK + tid, slots, Int(n_e) * GPU_BLOCK):
            sorted_ptr.unsafe_store(row, Int32(0))

    if experts == 0:
        return
    if slots <= SMALL_DISPATCH_SLOTS:
        ctx.enqueue_function(small_kernel, grid_dim=1, block_dim=GPU_BLOCK)
        return
    ctx.enqueue_function(count_kernel, grid_dim=experts, block_dim=GPU_BLOCK)
    ctx.enqueue_function(prefix_kernel, grid_dim=1, block_dim=GPU_BLOCK)
    ctx.enqueue_function(place_kernel, grid_dim=experts, block_dim=GPU_BLOCK)


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
