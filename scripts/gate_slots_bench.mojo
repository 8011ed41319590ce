# Kernel-only: the routed gate kernel (moe_gate.mojo,
# _enqueue_routed_tokens, given float32 logits as the bf16 layers give it) with its
# per-lane register slots sized for 512 experts (16, today) against 4 slots (128 experts), at
# Qwen3-30B-A3B's routing (E 128, top-8, renormalised softmax) for 1, 16 and 16384 tokens:
# median ms of 20 synchronised calls, and whether ids and weights are identical.
# Build: mojo build -I . --target-accelerator=sm_90a scripts/gate_slots_bench.mojo
from kernels.moe_gate import _enqueue_routed_tokens, MAX_GATE_BLOCKS, WARPS_PER_BLOCK
from max.gpu.host import DeviceContext
from std.math import ceildiv
from std.memory import Pointer
from std.time import perf_counter_ns

comptime E = 128
comptime K = 8


def P[dt: DType](addr: Int) -> Pointer[Scalar[dt], MutAnyOrigin]:
    return Pointer[Scalar[dt], MutAnyOrigin](unsafe_from_address=addr)


def run[SLOTS: Int](ctx: DeviceContext, tokens: Int, lg: Int, w: Int, ids: Int, stats: Int) raises:
    var blocks = min(ceildiv(tokens, WARPS_PER_BLOCK), MAX_GATE_BLOCKS)
    _enqueue_routed_tokens[DType.bfloat16, K, True, False, False, False, 1, 1, 1.0, True, SLOTS](
        ctx, blocks, P[DType.float32](w), P[DType.int32](ids), P[DType.int32](stats), P[DType.float32](stats + 4 * E),
        P[DType.float32](stats + 8 * E), P[DType.bfloat16](lg), P[DType.bfloat16](lg), P[DType.float32](lg),
        P[DType.float32](lg), P[DType.float32](lg), tokens, E, E, False, P[DType.float32](lg), 0,
    )


def gate_case(ctx: DeviceContext, tokens: Int) raises:
    var h_lg = ctx.enqueue_create_host_buffer[DType.float32](tokens * E)
    ctx.synchronize()
    var st: UInt64 = 7 + UInt64(tokens)
    for i in range(tokens * E):
        st = st * 6364136223846793005 + 1442695040888963407
        h_lg[i] = Float32(Int((st >> 33) % 2000001) - 1000000) / 250000.0
    var lg = ctx.enqueue_create_buffer[DType.float32](tokens * E)
    ctx.enqueue_copy(lg, h_lg)
    var w0 = ctx.enqueue_create_buffer[DType.float32](tokens * K)
    var w1 = ctx.enqueue_create_buffer[DType.float32](tokens * K)
    var i0 = ctx.enqueue_create_buffer[DType.int32](tokens * K)
    var i1 = ctx.enqueue_create_buffer[DType.int32](tokens * K)
    var stats = ctx.enqueue_create_buffer[DType.int32](4 * E)
    ctx.enqueue_memset(stats, 0)
    var a_lg = Int(lg.unsafe_ptr())
    var a_st = Int(stats.unsafe_ptr())
    var t16 = List[Float64]()
    var t4 = List[Float64]()
    for r in range(21):
        var t0 = perf_counter_ns()
        run[16](ctx, tokens, a_lg, Int(w0.unsafe_ptr()), Int(i0.unsafe_ptr()), a_st)
        ctx.synchronize()
        var t1 = perf_counter_ns()
        run[4](ctx, tokens, a_lg, Int(w1.unsafe_ptr()), Int(i1.unsafe_ptr()), a_st)
        ctx.synchronize()
        var t2 = perf_counter_ns()
        if r > 0:
            t16.append(Float64(t1 - t0) / 1e6)
            t4.append(Float64(t2 - t1) / 1e6)
    sort(t16)
    sort(t4)
    var hw0 = ctx.enqueue_create_host_buffer[DType.float32](tokens * K)
    var hw1 = ctx.enqueue_create_host_buffer[DType.float32](tokens * K)
    var hi0 = ctx.enqueue_create_host_buffer[DType.int32](tokens * K)
    var hi1 = ctx.enqueue_create_host_buffer[DType.int32](tokens * K)
    ctx.enqueue_copy(hw0, w0)
    ctx.enqueue_copy(hw1, w1)
    ctx.enqueue_copy(hi0, i0)
    ctx.enqueue_copy(hi1, i1)
    ctx.synchronize()
    var bad = 0
    for i in range(tokens * K):
        if hi0[i] != hi1[i] or hw0[i] != hw1[i]:
            bad += 1
    print("gate tokens", tokens, "E", E, "k", K, "slots16_ms", t16[10], "slots4_ms", t4[10], "x", t16[10] / t4[10],
          "mismatches", bad)
    # Mojo destroys a value after its last use: the buffers whose addresses the kernels were
    # given live to here.
    _ = lg^
    _ = stats^
    _ = w0^
    _ = w1^
    _ = i0^
    _ = i1^


def main() raises:
    var ctx = DeviceContext()
    for tokens in [1, 16, 16384]:
        gate_case(ctx, tokens)
