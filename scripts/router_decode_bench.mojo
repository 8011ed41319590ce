# Kernel-only: the router's logits at decode, the split-K GEMV (router_gemv_gpu) against the
# tensor-core GEMM (dense_gemm_gpu), at the model presets' router shapes and 1-128 tokens; sets
# ROUTER_GEMV_MAX_TOKENS (kernels/moe_gate.mojo). 64 router copies are called in turn so that
# back-to-back calls do not find the router in L2; a call's time is the median over 5 rounds of
# (64 back-to-back calls, then one synchronize) / 64, launches included. Both outputs are
# checked against a float64 product on the host (max |error| / max |logit|) after the output
# buffer was filled with NaN: an unwritten or non-finite logit counts in "bad" (and sets
# rel_err huge). The GEMV runs up to ROUTER_GEMV_MAX_TOKENS rows (its one pass).
#
# Build here (no GPU needed), run on the GPU machine with Mojo's runtime libraries on
# LD_LIBRARY_PATH (as for scripts/grouped_gemm_kernel_bench.mojo):
#   mojo build -I . --target-accelerator=sm_90a -o router_decode_bench scripts/router_decode_bench.mojo
from kernels.gpu_grouped_gemm import dense_gemm_gpu
from kernels.moe_gate import ROUTER_GEMV_MAX_TOKENS, router_gemv_gpu, router_gemv_scratch_floats
from std.math import isfinite, nan
from max.gpu.host import DeviceContext
from std.memory import Pointer
from std.time import perf_counter_ns

comptime BF = DType.bfloat16
comptime COPIES = 64
comptime ROUNDS = 5


def P[dt: DType](addr: Int) -> Pointer[Scalar[dt], MutAnyOrigin]:
    return Pointer[Scalar[dt], MutAnyOrigin](unsafe_from_address=addr)


def call(ctx: DeviceContext, gemv: Bool, pc: Int, pa: Int, pw: Int, rows: Int, K: Int, E: Int, ps: Int) raises:
    if gemv:
        router_gemv_gpu[BF](
            ctx, P[DType.float32](pc), P[BF](pa), P[BF](pw), rows, K, E, P[DType.float32](ps),
            router_gemv_scratch_floats[BF](K, E),
        )
    else:
        dense_gemm_gpu[BF, DType.float32](ctx, P[DType.float32](pc), P[BF](pa), P[BF](pw), rows, K, E)


def router(ctx: DeviceContext, name: String, rows: Int, K: Int, E: Int) raises:
    var h_a = ctx.enqueue_create_host_buffer[BF](rows * K)
    var h_w = ctx.enqueue_create_host_buffer[BF](COPIES * K * E)
    var h_c = ctx.enqueue_create_host_buffer[DType.float32](rows * E)
    ctx.synchronize()
    for i in range(rows * K):
        h_a[i] = (Float32((i * 7919) % 2001 - 1000) * 1e-3).cast[BF]()
    for i in range(COPIES * K * E):
        h_w[i] = (Float32((i * 104729) % 2001 - 1000) * 2e-5).cast[BF]()
    # float64 reference of copy 0
    var want = List[Float64](length=rows * E, fill=0.0)
    var ref_max: Float64 = 0
    for t in range(rows):
        for e in range(E):
            var acc: Float64 = 0
            for kk in range(K):
                acc += Float64(h_a[t * K + kk].cast[DType.float32]()) * Float64(h_w[kk * E + e].cast[DType.float32]())
            want[t * E + e] = acc
            ref_max = max(ref_max, abs(acc))
    var d_a = ctx.enqueue_create_buffer[BF](rows * K)
    var d_w = ctx.enqueue_create_buffer[BF](COPIES * K * E)
    var d_c = ctx.enqueue_create_buffer[DType.float32](rows * E)
    var d_s = ctx.enqueue_create_buffer[DType.float32](router_gemv_scratch_floats[BF](K, E))
    ctx.enqueue_copy(d_a, h_a)
    ctx.enqueue_copy(d_w, h_w)
    ctx.synchronize()
    var pa = Int(d_a.unsafe_ptr())
    var pw0 = Int(d_w.unsafe_ptr())
    var pc = Int(d_c.unsafe_ptr())
    var line = String("router ", name, " rows ", rows, " K ", K, " E ", E)
    for which in range(2 if rows <= ROUTER_GEMV_MAX_TOKENS else 1):
        var gemv = which == 1
        for i in range(rows * E):
            h_c[i] = nan[DType.float32]()
        ctx.enqueue_copy(d_c, h_c)
        call(ctx, gemv, pc, pa, pw0, rows, K, E, Int(d_s.unsafe_ptr()))
        ctx.enqueue_copy(h_c, d_c)
        ctx.synchronize()
        var err: Float64 = 0
        var bad = 0
        for i in range(rows * E):
            var diff = abs(Float64(h_c[i]) - want[i])
            if not isfinite(h_c[i]):
                bad += 1
                err = Float64.MAX
            elif diff > err:
                err = diff
        var times = List[Float64]()
        for round in range(ROUNDS + 1):
            var t0 = perf_counter_ns()
            for r in range(COPIES):
                call(ctx, gemv, pc, pa, pw0 + r * K * E * 2, rows, K, E, Int(d_s.unsafe_ptr()))
            ctx.synchronize()
            if round > 0:
                times.append(Float64(perf_counter_ns() - t0) / 1e3 / Float64(COPIES))
        sort(times)
        var us = times[ROUNDS // 2]
        line += String(" | ", "gemv" if gemv else "gemm", " us ", us, " (", times[0], "-", times[ROUNDS - 1], ") TB/s ",
                       Float64(K * E * 2) / us / 1e6, " rel_err ", err / max(ref_max, 1e-30), " bad ", bad)
    print(line)
    # The kernels see these buffers only through addresses taken above: keep them alive to
    # the end (Mojo frees a value after its last use). The harness of session 22's first runs
    # did not, so the GEMV's per-call scratch could be allocated inside the freed router
    # copies it was reading: the likely cause of its NaN at DeepSeek-V3's shape.
    _ = d_a^
    _ = d_w^
    _ = d_c^
    _ = d_s^


def main() raises:
    var ctx = DeviceContext()
    for rows in [1, 2, 3, 4, 8, 16, 32, 128]:
        router(ctx, "qwen3-30b-a3b", rows, 2048, 128)
        router(ctx, "gpt-oss-20b", rows, 2880, 32)
        router(ctx, "mixtral-8x7b", rows, 4096, 8)
        router(ctx, "deepseek-v3", rows, 7168, 256)
        router(ctx, "qwen3-235b-a22b", rows, 4096, 128)
