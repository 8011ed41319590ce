# Kernel-only check and timing of the fused decode kernel (kernels/moe_decode.mojo) against the
# grouped-GEMM path the layer runs today at decode (dispatch, gate/up grouped GEMM, down
# grouped GEMM, combine: kernels/moe_ffn.mojo's routed GPU path), bfloat16, on the same
# inputs. Correctness: both against a float64 reference on the host. Timing: 40 calls back to
# back on the stream (routing rotating over 8 sets, as a stack of layers would), then one
# synchronisation; per call = the total / 40; median of 15 such rounds, the two paths
# alternating. Beside each: the experts' bytes read over the time.
#
# Build here (no GPU needed), run on the GPU machine with Mojo's runtime libraries on
# LD_LIBRARY_PATH (see scripts/grouped_gemm_kernel_bench.mojo):
#   mojo build -I . --target-accelerator=sm_90a -o fused_decode_kernel_bench \
#       scripts/fused_decode_kernel_bench.mojo
from kernels.activation import DEFAULT_SWIGLU_ALPHA, DEFAULT_SWIGLU_LIMIT, is_gated
from kernels.gpu_grouped_gemm import grouped_gemm_gpu
from kernels.moe_combine import combine_gpu
from kernels.moe_dispatch import dispatch_gpu
from kernels.moe_decode import FD_COUNTERS, fused_decode_gpu, fused_decode_plan, fused_decode_scratch_floats, fused_decode_supported
from max.gpu.host import DeviceContext
from std.math import exp, sqrt
from std.memory import Pointer
from std.time import perf_counter_ns

comptime BF = DType.bfloat16
comptime SETS = 8


struct Rng:
    var s: UInt64

    def __init__(out self, seed: UInt64):
        self.s = seed

    def next(mut self) -> Float32:
        self.s = self.s * 6364136223846793005 + 1442695040888963407
        return Float32(Int((self.s >> 33) % 2000001) - 1000000) / 1000000.0

    def int(mut self, n: Int) -> Int:
        self.s = self.s * 6364136223846793005 + 1442695040888963407
        return Int((self.s >> 33) % UInt64(n))


def act64[activation: StaticString](g: Float64, u: Float64) -> Float64:
    comptime if activation == "relu":
        return max(g, 0.0)
    elif activation == "silu":
        return g / (1.0 + exp(-g))
    elif activation == "swiglu":
        return g / (1.0 + exp(-g)) * u
    else:
        var gg = min(g, Float64(DEFAULT_SWIGLU_LIMIT))
        var uu = min(max(u, -Float64(DEFAULT_SWIGLU_LIMIT)), Float64(DEFAULT_SWIGLU_LIMIT))
        return (uu + 1.0) * gg / (1.0 + exp(-Float64(DEFAULT_SWIGLU_ALPHA) * gg))


def bf_ptr(b: Int) -> Pointer[Scalar[BF], MutAnyOrigin]:
    return Pointer[Scalar[BF], MutAnyOrigin](unsafe_from_address=b)


def run_case[activation: StaticString, has_bias: Bool](
    ctx: DeviceContext, name: String, E: Int, D: Int, F: Int, K: Int, T: Int, blocks_per_sm: Int
) raises:
    comptime GATED = is_gated[activation]()
    var NW1 = 2 * F if GATED else F
    var S = T * K
    if not fused_decode_supported(T, K, D, F):
        print(name, "T", T, "not supported")
        return
    var rng = Rng(77 + UInt64(E * D + T))
    # Weights: a table of random values repeated (filling GBs one by one is slow); x random.
    var h_w1 = ctx.enqueue_create_host_buffer[BF](E * D * NW1)
    var h_w2 = ctx.enqueue_create_host_buffer[BF](E * F * D)
    var h_b1 = ctx.enqueue_create_host_buffer[BF](E * NW1)
    var h_b2 = ctx.enqueue_create_host_buffer[BF](E * D)
    var h_x = ctx.enqueue_create_host_buffer[BF](T * D)
    var h_ids = ctx.enqueue_create_host_buffer[DType.int32](SETS * S)
    var h_tw = ctx.enqueue_create_host_buffer[DType.float32](SETS * S)
    var h_sorted = ctx.enqueue_create_host_buffer[DType.int32](SETS * S)
    var h_off = ctx.enqueue_create_host_buffer[DType.int32](SETS * (E + 1))
    var h_rows = ctx.enqueue_create_host_buffer[DType.int32](SETS * S)
    ctx.synchronize()
    var t1 = List[Scalar[BF]](length=4099, fill=0)
    var t2 = List[Scalar[BF]](length=4093, fill=0)
    for i in range(4099):
        t1[i] = (rng.next() * 1.7 / sqrt(Float32(D))).cast[BF]()
    for i in range(4093):
        t2[i] = (rng.next() * 1.7 / sqrt(Float32(F))).cast[BF]()
    for i in range(E * D * NW1):
        h_w1[i] = t1[i % 4099]
    for i in range(E * F * D):
        h_w2[i] = t2[i % 4093]
    for i in range(E * NW1):
        h_b1[i] = (rng.next() * 0.5).cast[BF]()
    for i in range(E * D):
        h_b2[i] = (rng.next() * 0.5).cast[BF]()
    for i in range(T * D):
        h_x[i] = rng.next().cast[BF]()
    # Routing sets: each token k distinct experts, weights normalised; the dispatch of each
    # set for the grouped-GEMM path.
    for st in range(SETS):
        for t in range(T):
            var wsum: Float32 = 0
            for j in range(K):
                var e = rng.int(E)
                var dup = True
                while dup:
                    dup = False
                    for i in range(j):
                        if Int(h_ids[st * S + t * K + i]) == e:
                            dup = True
                    if dup:
                        e = rng.int(E)
                h_ids[st * S + t * K + j] = Int32(e)
                var w = 0.2 + abs(rng.next())
                h_tw[st * S + t * K + j] = w
                wsum += w
            for j in range(K):
                h_tw[st * S + t * K + j] = h_tw[st * S + t * K + j] / wsum
        var counts = List[Int](length=E, fill=0)
        for s in range(S):
            counts[Int(h_ids[st * S + s])] += 1
        h_off[st * (E + 1)] = 0
        for e in range(E):
            h_off[st * (E + 1) + e + 1] = h_off[st * (E + 1) + e] + Int32(counts[e])
        var fill = List[Int](length=E, fill=0)
        for s in range(S):
            var e = Int(h_ids[st * S + s])
            var row = Int(h_off[st * (E + 1) + e]) + fill[e]
            h_sorted[st * S + row] = Int32(s // K)
            h_rows[st * S + s] = Int32(row)
            fill[e] += 1
    var d_w1 = ctx.enqueue_create_buffer[BF](E * D * NW1)
    var d_w2 = ctx.enqueue_create_buffer[BF](E * F * D)
    var d_b1 = ctx.enqueue_create_buffer[BF](E * NW1)
    var d_b2 = ctx.enqueue_create_buffer[BF](E * D)
    var d_x = ctx.enqueue_create_buffer[BF](T * D)
    var d_ids = ctx.enqueue_create_buffer[DType.int32](SETS * S)
    var d_tw = ctx.enqueue_create_buffer[DType.float32](SETS * S)
    var d_sorted = ctx.enqueue_create_buffer[DType.int32](SETS * S)
    var d_off = ctx.enqueue_create_buffer[DType.int32](SETS * (E + 1))
    var d_rows = ctx.enqueue_create_buffer[DType.int32](SETS * S)
    var d_h = ctx.enqueue_create_buffer[BF](S * NW1)
    var d_y = ctx.enqueue_create_buffer[BF](S * D)
    var d_out_old = ctx.enqueue_create_buffer[BF](T * D)
    var d_out_new = ctx.enqueue_create_buffer[BF](T * D)
    var sm = ctx.default_device_info.sm_count
    var plan = fused_decode_plan(S, D, F, sm)
    plan.blocks = sm * blocks_per_sm
    var d_scratch = ctx.enqueue_create_buffer[DType.float32](fused_decode_scratch_floats(S, D, F, plan))
    var d_counters = ctx.enqueue_create_buffer[DType.int32](FD_COUNTERS)
    ctx.enqueue_copy(d_w1, h_w1)
    ctx.enqueue_copy(d_w2, h_w2)
    ctx.enqueue_copy(d_b1, h_b1)
    ctx.enqueue_copy(d_b2, h_b2)
    ctx.enqueue_copy(d_x, h_x)
    ctx.enqueue_copy(d_ids, h_ids)
    ctx.enqueue_copy(d_tw, h_tw)
    ctx.enqueue_copy(d_sorted, h_sorted)
    ctx.enqueue_copy(d_off, h_off)
    ctx.enqueue_copy(d_rows, h_rows)
    ctx.enqueue_memset(d_counters, 0)
    ctx.synchronize()
    var pw1 = bf_ptr(Int(d_w1.unsafe_ptr()))
    var pw2 = bf_ptr(Int(d_w2.unsafe_ptr()))
    var pb1 = bf_ptr(Int(d_b1.unsafe_ptr()))
    var pb2 = bf_ptr(Int(d_b2.unsafe_ptr()))
    var px = bf_ptr(Int(d_x.unsafe_ptr()))
    var ph = bf_ptr(Int(d_h.unsafe_ptr()))
    var py = bf_ptr(Int(d_y.unsafe_ptr()))
    var pold = bf_ptr(Int(d_out_old.unsafe_ptr()))
    var pnew = bf_ptr(Int(d_out_new.unsafe_ptr()))
    var pids = Pointer[Int32, MutAnyOrigin](unsafe_from_address=Int(d_ids.unsafe_ptr()))
    var ptw = Pointer[Float32, MutAnyOrigin](unsafe_from_address=Int(d_tw.unsafe_ptr()))
    var psorted = Pointer[Int32, MutAnyOrigin](unsafe_from_address=Int(d_sorted.unsafe_ptr()))
    var poff = Pointer[Int32, MutAnyOrigin](unsafe_from_address=Int(d_off.unsafe_ptr()))
    var prows = Pointer[Int32, MutAnyOrigin](unsafe_from_address=Int(d_rows.unsafe_ptr()))
    var pscr = Pointer[Float32, MutAnyOrigin](unsafe_from_address=Int(d_scratch.unsafe_ptr()))
    var pcnt = Pointer[Int32, MutAnyOrigin](unsafe_from_address=Int(d_counters.unsafe_ptr()))

    def run_old(st: Int) raises {var ctx, var pold, var px, var ph, var py, var pids, var ptw, var psorted, var poff, var prows, var pw1, var pw2, var pb1, var pb2, var S, var E, var D, var F, var NW1, var T, var K}:
        # As the layer: the dispatch (its outputs overwrite set st's, which equal them), the
        # two grouped GEMMs, the combine.
        var ids = pids.unsafe_offset(st * S)
        var sorted = psorted.unsafe_offset(st * S)
        var off = poff.unsafe_offset(st * (E + 1))
        var rows = prows.unsafe_offset(st * S)
        dispatch_gpu(ctx, sorted, off, rows, ids, S, K, E, 0)
        grouped_gemm_gpu[BF, activation, True, has_bias](ctx, ph, F, px, D, D, sorted, off, E, S, pw1, NW1, pb1)
        grouped_gemm_gpu[BF, "none", False, has_bias](ctx, py, D, ph, F, F, sorted, off, E, S, pw2, D, pb2)
        combine_gpu[BF](ctx, pold, T, D, py, ptw.unsafe_offset(st * S), rows, K, ids)

    def run_new(st: Int) raises {var ctx, var pnew, var px, var pids, var ptw, var pw1, var pw2, var pb1, var pb2, var S, var E, var D, var F, var T, var K, var pscr, var pcnt, var plan}:
        fused_decode_gpu[BF, activation, has_bias, has_bias, DEFAULT_SWIGLU_ALPHA, DEFAULT_SWIGLU_LIMIT](
            ctx, pnew, px, pids.unsafe_offset(st * S), ptw.unsafe_offset(st * S), T, K, pw1, pw2, pb1, pb2,
            E, D, F, pscr, pcnt, plan,
        )

    # Correctness, set 0 (the fused kernel run twice first: the counters must come back to 0).
    run_new(1)
    run_new(0)
    run_old(0)
    ctx.synchronize()
    var h_old = ctx.enqueue_create_host_buffer[BF](T * D)
    var h_new = ctx.enqueue_create_host_buffer[BF](T * D)
    var h_cnt = ctx.enqueue_create_host_buffer[DType.int32](FD_COUNTERS)
    ctx.enqueue_copy(h_old, d_out_old)
    ctx.enqueue_copy(h_new, d_out_new)
    ctx.enqueue_copy(h_cnt, d_counters)
    ctx.synchronize()
    var counters_left = 0
    for i in range(FD_COUNTERS):
        if h_cnt[i] != 0:
            counters_left += 1
    var refv = List[Float64](length=T * D, fill=0)
    var hrow = List[Float64](length=F, fill=0)
    for t in range(T):
        for j in range(K):
            var s = t * K + j
            var e = Int(h_ids[s])
            var wt = Float64(h_tw[s])
            var gs = List[Float64](length=F, fill=0)
            var us = List[Float64](length=F, fill=0)
            for i in range(D):
                var xv = Float64(h_x[t * D + i].cast[DType.float32]())
                var wrow = (e * D + i) * NW1
                for f in range(F):
                    gs[f] += xv * Float64(h_w1[wrow + f].cast[DType.float32]())
                    comptime if GATED:
                        us[f] += xv * Float64(h_w1[wrow + F + f].cast[DType.float32]())
            for f in range(F):
                var g = gs[f]
                var u = us[f]
                comptime if has_bias:
                    g += Float64(h_b1[e * NW1 + f].cast[DType.float32]())
                    comptime if GATED:
                        u += Float64(h_b1[e * NW1 + F + f].cast[DType.float32]())
                hrow[f] = act64[activation](g, u)
            var ys = List[Float64](length=D, fill=0)
            for f in range(F):
                var hf = hrow[f]
                var wrow2 = (e * F + f) * D
                for c in range(D):
                    ys[c] += hf * Float64(h_w2[wrow2 + c].cast[DType.float32]())
            for c in range(D):
                var y = ys[c]
                comptime if has_bias:
                    y += Float64(h_b2[e * D + c].cast[DType.float32]())
                refv[t * D + c] += wt * y
    var num_o: Float64 = 0
    var num_n: Float64 = 0
    var den: Float64 = 0
    var nan = 0
    for i in range(T * D):
        var o = Float64(h_old[i].cast[DType.float32]())
        var n = Float64(h_new[i].cast[DType.float32]())
        if n != n:
            nan += 1
        num_o += (o - refv[i]) * (o - refv[i])
        num_n += (n - refv[i]) * (n - refv[i])
        den += refv[i] * refv[i]
    var rel_old = sqrt(num_o / max(den, 1e-30))
    var rel_new = sqrt(num_n / max(den, 1e-30))

    # Timing: 40 calls back to back per round, rotating over the sets.
    comptime CALLS = 40
    comptime ROUNDS = 15
    var t_old = List[Float64]()
    var t_new = List[Float64]()
    for _ in range(2):
        for c in range(CALLS):
            run_old(c % SETS)
            run_new(c % SETS)
    ctx.synchronize()
    for r in range(ROUNDS):
        for which in range(2):
            var do_new = (which + r) % 2 == 1
            var t0 = perf_counter_ns()
            for c in range(CALLS):
                if do_new:
                    run_new(c % SETS)
                else:
                    run_old(c % SETS)
            ctx.synchronize()
            var dt = Float64(perf_counter_ns() - t0) / 1e3 / Float64(CALLS)
            if do_new:
                t_new.append(dt)
            else:
                t_old.append(dt)
    sort(t_old)
    sort(t_new)
    var mo = t_old[ROUNDS // 2]
    var mn = t_new[ROUNDS // 2]
    # Bytes of the experts in use (set 0's count of distinct experts; sets have about the same).
    var distinct = 0
    for s in range(S):
        var seen = False
        for s2 in range(s):
            if h_ids[s2] == h_ids[s]:
                seen = True
        if not seen:
            distinct += 1
    var bytes = Float64(distinct) * Float64(D * NW1 + F * D) * 2.0
    print(
        name, "T", T, "blocks/SM", blocks_per_sm, "plan c1", plan.c1, "c2", plan.c2, "ks2", plan.ks2,
        "| rel old", rel_old, "new", rel_new, "nan", nan, "counters_left", counters_left,
        "| us/call old", mo, "(", t_old[ROUNDS // 4], "-", t_old[3 * ROUNDS // 4], ") new", mn, "(", t_new[ROUNDS // 4], "-",
        t_new[3 * ROUNDS // 4], ") x", mo / mn, "| GB/s old", bytes / mo / 1e3, "new", bytes / mn / 1e3,
        flush=True,
    )
    _ = d_w1^
    _ = d_w2^
    _ = d_b1^
    _ = d_b2^
    _ = d_x^
    _ = d_ids^
    _ = d_tw^
    _ = d_sorted^
    _ = d_off^
    _ = d_rows^
    _ = d_h^
    _ = d_y^
    _ = d_out_old^
    _ = d_out_new^
    _ = d_scratch^
    _ = d_counters^


def main() raises:
    var ctx = DeviceContext()
    print("# fused decode kernel vs grouped-GEMM path;", ctx.name(), "SMs", ctx.default_device_info.sm_count, flush=True)
    run_case["relu", False](ctx, "relu-odd", 9, 520, 200, 3, 3, 1)
    for bps in range(1, 3):
        run_case["swiglu", False](ctx, "qwen3-30b-a3b", 128, 2048, 768, 8, 1, bps)
    run_case["swiglu", False](ctx, "qwen3-30b-a3b", 128, 2048, 768, 8, 2, 1)
    run_case["swiglu", False](ctx, "qwen3-30b-a3b", 128, 2048, 768, 8, 4, 1)
    for bps in range(1, 3):
        run_case["clamped_swiglu", True](ctx, "gpt-oss-120b", 128, 2880, 2880, 4, 1, bps)
    run_case["clamped_swiglu", True](ctx, "gpt-oss-120b", 128, 2880, 2880, 4, 4, 1)
    run_case["clamped_swiglu", True](ctx, "gpt-oss-20b", 32, 2880, 2880, 4, 1, 1)
    run_case["swiglu", False](ctx, "mixtral-8x7b", 8, 4096, 14336, 2, 1, 1)
    run_case["swiglu", False](ctx, "mixtral-8x7b", 8, 4096, 14336, 2, 4, 1)
    run_case["swiglu", False](ctx, "deepseek-v3-shape-E16", 16, 7168, 2048, 8, 1, 1)
