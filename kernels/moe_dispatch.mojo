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
# O(T*k) and stable, so the layout is deterministic.

import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext
from std.math import ceildiv


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
