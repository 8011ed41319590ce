# Kernel-only: the routed gate kernel (moe_gate.mojo, _enqueue_routed_tokens, given float32
# logits as the bf16 layers give it) at Qwen3-30B-A3B's routing (E 128, top-8, renormalised
# softmax) with its grid capped at different block counts. In the layer it takes
# min(T / 8, MAX_GATE_BLOCKS = 1024) blocks; at 16384 tokens the gate took 54 us of the layer's
# 2.69 ms in session 22's profile (results/checks/20261207-s22-profile-qwen3-H100.log), where
# its work (16384 x 128 logits, 8 MB) would take a few. Every block adds its statistics with one
# atomic per expert, so fewer blocks mean fewer atomics on the same 256 addresses, and longer
# loops per warp. Prints, per token count and block cap: us per call (50 calls queued back to
# back, then one sync; the median of 5 such rounds) and whether the ids, weights and expert
# counts equal those of the 1024-block grid.
# Build: mojo build -I . --target-accelerator=sm_90a scripts/gate_blocks_bench.mojo
from kernels.moe_gate import _enqueue_routed_tokens, WARPS_PER_BLOCK
from max.gpu.host import DeviceContext
from std.math import ceildiv
from std.memory import Pointer
from std.time import perf_counter_ns

comptime E = 128
comptime K = 8
comptime SLOTS = 4  # E <= 32 * SLOTS, as pymoe.ops passes for 128 experts
comptime CALLS = 50


def P[dt: DType](addr: Int) -> Pointer[Scalar[dt], MutAnyOrigin]:
    return Pointer[Scalar[dt], MutAnyOrigin](unsafe_from_address=addr)


def run(ctx: DeviceContext, blocks: Int, tokens: Int, lg: Int, w: Int, ids: Int, stats: Int) raises:
    _enqueue_routed_tokens[DType.bfloat16, K, True, False, False, False, 1, 1, 1.0, True, SLOTS](
        ctx, blocks, P[DType.float32](w), P[DType.int32](ids), P[DType.int32](stats), P[DType.float32](stats + 4 * E),
        P[DType.float32](stats + 8 * E), P[DType.bfloat16](lg), P[DType.bfloat16](lg), P[DType.float32](lg),
        P[DType.float32](lg), P[DType.float32](lg), tokens, E, E, False, P[DType.float32](lg), 0,
    )


def gate_case(ctx: DeviceContext, tokens: Int) raises:
    var h_lg = ctx.enqueue_create_host_buffer[DType.float32](tokens * E)
    ctx.synchronize()
    var st: UInt64 = 11 + UInt64(tokens)
    for i in range(tokens * E):
        st = st * 6364136223846793005 + 1442695040888963407
        h_lg[i] = Float32(Int((st >> 33) % 2000001) - 1000000) / 250000.0
    var lg = ctx.enqueue_create_buffer[DType.float32](tokens * E)
    ctx.enqueue_copy(lg, h_lg)
    var a_lg = Int(lg.unsafe_ptr())
    # The reference: the layer's grid (1024 blocks at these sizes), counts from zero.
    var w_ref = ctx.enqueue_create_buffer[DType.float32](tokens * K)
    var i_ref = ctx.enqueue_create_buffer[DType.int32](tokens * K)
    var s_ref = ctx.enqueue_create_buffer[DType.int32](12 * E)
    ctx.enqueue_memset(s_ref, 0)
    run(ctx, min(ceildiv(tokens, WARPS_PER_BLOCK), 1024), tokens, a_lg, Int(w_ref.unsafe_ptr()),
        Int(i_ref.unsafe_ptr()), Int(s_ref.unsafe_ptr()))
    var hw_ref = ctx.enqueue_create_host_buffer[DType.float32](tokens * K)
    var hi_ref = ctx.enqueue_create_host_buffer[DType.int32](tokens * K)
    var hs_ref = ctx.enqueue_create_host_buffer[DType.int32](12 * E)
    ctx.enqueue_copy(hw_ref, w_ref)
    ctx.enqueue_copy(hi_ref, i_ref)
    ctx.enqueue_copy(hs_ref, s_ref)
    ctx.synchronize()
    for blocks in [66, 132, 264, 528, 1024, 2048]:
        if blocks > ceildiv(tokens, WARPS_PER_BLOCK):
            continue
        var w = ctx.enqueue_create_buffer[DType.float32](tokens * K)
        var ids = ctx.enqueue_create_buffer[DType.int32](tokens * K)
        var stats = ctx.enqueue_create_buffer[DType.int32](12 * E)
        ctx.enqueue_memset(stats, 0)
        run(ctx, blocks, tokens, a_lg, Int(w.unsafe_ptr()), Int(ids.unsafe_ptr()), Int(stats.unsafe_ptr()))
        var hw = ctx.enqueue_create_host_buffer[DType.float32](tokens * K)
        var hi = ctx.enqueue_create_host_buffer[DType.int32](tokens * K)
        var hs = ctx.enqueue_create_host_buffer[DType.int32](12 * E)
        ctx.enqueue_copy(hw, w)
        ctx.enqueue_copy(hi, ids)
        ctx.enqueue_copy(hs, stats)
        ctx.synchronize()
        var bad = 0
        for i in range(tokens * K):
            if hi[i] != hi_ref[i] or hw[i] != hw_ref[i]:
                bad += 1
        var bad_counts = 0
        for e in range(E):
            if hs[e] != hs_ref[e]:
                bad_counts += 1
        var rounds = List[Float64]()
        for _ in range(5):
            var t0 = perf_counter_ns()
            for _ in range(CALLS):
                run(ctx, blocks, tokens, a_lg, Int(w.unsafe_ptr()), Int(ids.unsafe_ptr()), Int(stats.unsafe_ptr()))
            ctx.synchronize()
            rounds.append(Float64(perf_counter_ns() - t0) / 1e3 / CALLS)
        sort(rounds)
        print("gate tokens", tokens, "E", E, "k", K, "blocks", blocks, "us_per_call", rounds[2], "(", rounds[0], "-",
              rounds[4], ") mismatches", bad, "count_mismatches", bad_counts)
        _ = w^
        _ = ids^
        _ = stats^
    # Mojo destroys a value after its last use: the buffers whose addresses the kernels were
    # given live to here.
    _ = lg^
    _ = w_ref^
    _ = i_ref^
    _ = s_ref^


def main() raises:
    var ctx = DeviceContext()
    for tokens in [4096, 16384]:
        gate_case(ctx, tokens)
