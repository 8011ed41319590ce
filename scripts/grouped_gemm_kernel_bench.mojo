# Kernel-only check and timing of the grouped GEMM tiles (kernels/gpu_grouped_gemm.mojo),
# without MAX's graph compiler or Python: the Hopper wgmma tile against the mma.sync tile
# on the same random inputs (relative difference, NaN count), and grouped_gemm_gpu (the
# ops' entry) against the mma.sync tile. Prints one line per case: median ms of 20 calls
# each (host clock around a synchronised call), TFLOP/s, and old/new.
#
# Build here (no GPU needed), run on the GPU machine with Mojo's runtime libraries
# (libKGENCompilerRTShared, libAsyncRTMojoBindings, libAsyncRTRuntimeGlobals,
# libMSupportGlobals, libMGPRT from the modular package's lib/) on LD_LIBRARY_PATH:
#   mojo build -I . --target-accelerator=sm_90a -o grouped_gemm_kernel_bench \
#       scripts/grouped_gemm_kernel_bench.mojo
from kernels.gpu_grouped_gemm import grouped_gemm_gpu, _grouped_gemm, _grouped_gemm_wgmma, DECODE_TILE, MID_TILE, PREFILL_TILE, DEFAULT_SWIGLU_ALPHA, DEFAULT_SWIGLU_LIMIT
from max.gpu.host import DeviceContext
from std.memory import Pointer
from std.time import perf_counter_ns
from std.math import sqrt

comptime BF = DType.bfloat16

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

def bench_case[act: StaticString, BM: Int, BN: Int, ST: Int, IF: Int = 1, GATHER: Bool = True, A_TMA: Bool = False, OLD_DECODE: Bool = False](ctx: DeviceContext, name: String, E: Int, K: Int, NW: Int, tokens: Int, topk: Int, old_prefill: Bool) raises:
    """GATHER False: A holds the grouped rows themselves (slots rows, as the down projection's
    input), read in place by both tiles; A_TMA: the wgmma tile loads them by TMA. The old
    (reference) tile: the 128 x 128 mma.sync tile with old_prefill, else the 16 x 128 decode
    tile with OLD_DECODE, else the 64 x 128 one."""
    var gated = act == "swiglu"
    var nout = NW // 2 if gated else NW
    var slots = tokens * topk
    var rng = Rng(1234 + UInt64(E * K + tokens))
    # routing: each token picks topk distinct experts (approximately: random with retries)
    var counts = List[Int](length=E, fill=0)
    var choice = List[Int](length=slots, fill=0)
    for t in range(tokens):
        for j in range(topk):
            var e = rng.int(E)
            var tries = 0
            while tries < 50:
                var dup = False
                for i in range(j):
                    if choice[t * topk + i] == e:
                        dup = True
                if not dup:
                    break
                e = rng.int(E)
                tries += 1
            choice[t * topk + j] = e
            counts[e] += 1
    var h_off = ctx.enqueue_create_host_buffer[DType.int32](E + 1)
    var h_ids = ctx.enqueue_create_host_buffer[DType.int32](slots)
    ctx.synchronize()
    var fill = List[Int](length=E, fill=0)
    h_off[0] = 0
    for e in range(E):
        h_off[e + 1] = h_off[e] + Int32(counts[e])
    for s in range(slots):
        var e = choice[s]
        h_ids[Int(h_off[e]) + fill[e]] = Int32(s // topk)
        fill[e] += 1
    var a_rows = tokens if GATHER else tokens * topk
    var h_a = ctx.enqueue_create_host_buffer[BF](a_rows * K)
    var h_w = ctx.enqueue_create_host_buffer[BF](E * K * NW)
    ctx.synchronize()
    for i in range(a_rows * K):
        h_a[i] = rng.next().cast[BF]()
    # W: a table of 4099 random values repeated (filling Mixtral's 940M weights one by one is slow)
    var sc = Float32(1.0) / sqrt(Float32(K))
    var table = List[Scalar[BF]](length=4099, fill=0)
    for i in range(4099):
        table[i] = (rng.next() * sc * 1.7).cast[BF]()
    for i in range(E * K * NW):
        h_w[i] = table[i % 4099]
    var d_a = ctx.enqueue_create_buffer[BF](a_rows * K)
    var d_w = ctx.enqueue_create_buffer[BF](E * K * NW)
    var d_off = ctx.enqueue_create_buffer[DType.int32](E + 1)
    var d_ids = ctx.enqueue_create_buffer[DType.int32](slots)
    var d_c0 = ctx.enqueue_create_buffer[BF](slots * nout)
    var d_c1 = ctx.enqueue_create_buffer[BF](slots * nout)
    ctx.enqueue_copy(d_a, h_a)
    ctx.enqueue_copy(d_w, h_w)
    ctx.enqueue_copy(d_off, h_off)
    ctx.enqueue_copy(d_ids, h_ids)
    ctx.synchronize()
    var pa = Pointer[Scalar[BF], MutAnyOrigin](unsafe_from_address=Int(d_a.unsafe_ptr()))
    var pw = Pointer[Scalar[BF], MutAnyOrigin](unsafe_from_address=Int(d_w.unsafe_ptr()))
    var pc0 = Pointer[Scalar[BF], MutAnyOrigin](unsafe_from_address=Int(d_c0.unsafe_ptr()))
    var pc1 = Pointer[Scalar[BF], MutAnyOrigin](unsafe_from_address=Int(d_c1.unsafe_ptr()))
    var poff = Pointer[Int32, MutAnyOrigin](unsafe_from_address=Int(d_off.unsafe_ptr()))
    var pids = Pointer[Int32, MutAnyOrigin](unsafe_from_address=Int(d_ids.unsafe_ptr()))
    var flops = 2.0 * Float64(slots) * Float64(K) * Float64(NW)
    var reps = 20

    def run_old() raises {var ctx, var pc0, var nout, var pa, var K, var pids, var poff, var E, var slots, var pw, var NW, var old_prefill}:
        if old_prefill:
            _grouped_gemm[BF, PREFILL_TILE, act, GATHER, False, DEFAULT_SWIGLU_ALPHA, DEFAULT_SWIGLU_LIMIT](ctx, pc0, nout, pa, K, K, pids, poff, E, slots, pw, NW, nout, pw)
        elif OLD_DECODE:
            _grouped_gemm[BF, DECODE_TILE, act, GATHER, False, DEFAULT_SWIGLU_ALPHA, DEFAULT_SWIGLU_LIMIT](ctx, pc0, nout, pa, K, K, pids, poff, E, slots, pw, NW, nout, pw)
        else:
            _grouped_gemm[BF, MID_TILE, act, GATHER, False, DEFAULT_SWIGLU_ALPHA, DEFAULT_SWIGLU_LIMIT](ctx, pc0, nout, pa, K, K, pids, poff, E, slots, pw, NW, nout, pw)
    def run_new() raises {var ctx, var pc1, var nout, var pa, var K, var pids, var poff, var E, var slots, var pw, var NW}:
        _grouped_gemm_wgmma[BF, BM, BN, ST, act, GATHER, False, DEFAULT_SWIGLU_ALPHA, DEFAULT_SWIGLU_LIMIT, IF, A_TMA](ctx, pc1, nout, pa, K, K, pids, poff, E, slots, pw, NW, nout, pw)

    run_old()
    run_new()
    ctx.synchronize()
    var h_c0 = ctx.enqueue_create_host_buffer[BF](slots * nout)
    var h_c1 = ctx.enqueue_create_host_buffer[BF](slots * nout)
    ctx.enqueue_copy(h_c0, d_c0)
    ctx.enqueue_copy(h_c1, d_c1)
    ctx.synchronize()
    var num = Float64(0)
    var den = Float64(0)
    var bad = 0
    for i in range(slots * nout):
        var x = Float64(h_c0[i].cast[DType.float32]())
        var y = Float64(h_c1[i].cast[DType.float32]())
        if y != y:
            bad += 1
        num += (x - y) * (x - y)
        den += x * x
    var rel = sqrt(num / max(den, 1e-30))
    var t_old = List[Float64]()
    var t_new = List[Float64]()
    for _ in range(3):
        run_old()
        run_new()
    ctx.synchronize()
    for _ in range(reps):
        var t0 = perf_counter_ns()
        run_old()
        ctx.synchronize()
        var t1 = perf_counter_ns()
        run_new()
        ctx.synchronize()
        var t2 = perf_counter_ns()
        t_old.append(Float64(t1 - t0) / 1e6)
        t_new.append(Float64(t2 - t1) / 1e6)
    sort(t_old)
    sort(t_new)
    var mo = t_old[reps // 2]
    var mn = t_new[reps // 2]
    print(name, "BM", BM, "BN", BN, "ST", ST, "in_flight", IF, "gather", GATHER, "a_tma", A_TMA, "old", "prefill" if old_prefill else ("decode" if OLD_DECODE else "mid"), "tokens", tokens, "rel", rel, "nan", bad,
          "old_ms", mo, "new_ms", mn, "old_TF", flops / mo / 1e9, "new_TF", flops / mn / 1e9, "x", mo / mn)
    # The kernels saw these only through addresses: keep them alive to the end.
    _ = d_a^
    _ = d_w^
    _ = d_off^
    _ = d_ids^
    _ = d_c0^
    _ = d_c1^

def dispatch_check(ctx: DeviceContext, tokens: Int) raises:
    """The op's entry (grouped_gemm_gpu) against the mma.sync tile, qwen3 gate/up."""
    var E = 128
    var K = 2048
    var NW = 1536
    var topk = 8
    var nout = NW // 2
    var slots = tokens * topk
    var rng = Rng(99)
    var h_off = ctx.enqueue_create_host_buffer[DType.int32](E + 1)
    var h_ids = ctx.enqueue_create_host_buffer[DType.int32](slots)
    var h_a = ctx.enqueue_create_host_buffer[BF](tokens * K)
    var h_w = ctx.enqueue_create_host_buffer[BF](E * K * NW)
    ctx.synchronize()
    for e in range(E + 1):
        h_off[e] = Int32(e * slots // E)
    for s in range(slots):
        h_ids[s] = Int32(rng.int(tokens))
    for i in range(tokens * K):
        h_a[i] = rng.next().cast[BF]()
    for i in range(E * K * NW):
        h_w[i] = (rng.next() * 0.03).cast[BF]()
    var d_a = ctx.enqueue_create_buffer[BF](tokens * K)
    var d_w = ctx.enqueue_create_buffer[BF](E * K * NW)
    var d_off = ctx.enqueue_create_buffer[DType.int32](E + 1)
    var d_ids = ctx.enqueue_create_buffer[DType.int32](slots)
    var d_c0 = ctx.enqueue_create_buffer[BF](slots * nout)
    var d_c1 = ctx.enqueue_create_buffer[BF](slots * nout)
    ctx.enqueue_copy(d_a, h_a)
    ctx.enqueue_copy(d_w, h_w)
    ctx.enqueue_copy(d_off, h_off)
    ctx.enqueue_copy(d_ids, h_ids)
    var pa = Pointer[Scalar[BF], MutAnyOrigin](unsafe_from_address=Int(d_a.unsafe_ptr()))
    var pw = Pointer[Scalar[BF], MutAnyOrigin](unsafe_from_address=Int(d_w.unsafe_ptr()))
    var pc0 = Pointer[Scalar[BF], MutAnyOrigin](unsafe_from_address=Int(d_c0.unsafe_ptr()))
    var pc1 = Pointer[Scalar[BF], MutAnyOrigin](unsafe_from_address=Int(d_c1.unsafe_ptr()))
    var poff = Pointer[Int32, MutAnyOrigin](unsafe_from_address=Int(d_off.unsafe_ptr()))
    var pids = Pointer[Int32, MutAnyOrigin](unsafe_from_address=Int(d_ids.unsafe_ptr()))
    _grouped_gemm[BF, MID_TILE, "swiglu", True, False, DEFAULT_SWIGLU_ALPHA, DEFAULT_SWIGLU_LIMIT](ctx, pc0, nout, pa, K, K, pids, poff, E, slots, pw, NW, nout, pw)
    grouped_gemm_gpu[BF, "swiglu", True](ctx, pc1, nout, pa, K, K, pids, poff, E, slots, pw, NW, pw)
    # Which tile the entry took shows in its time against the mma.sync tile's.
    ctx.synchronize()
    var t_mid = List[Float64]()
    var t_entry = List[Float64]()
    for _ in range(10):
        var t0 = perf_counter_ns()
        _grouped_gemm[BF, MID_TILE, "swiglu", True, False, DEFAULT_SWIGLU_ALPHA, DEFAULT_SWIGLU_LIMIT](ctx, pc0, nout, pa, K, K, pids, poff, E, slots, pw, NW, nout, pw)
        ctx.synchronize()
        var t1 = perf_counter_ns()
        grouped_gemm_gpu[BF, "swiglu", True](ctx, pc1, nout, pa, K, K, pids, poff, E, slots, pw, NW, pw)
        ctx.synchronize()
        var t2 = perf_counter_ns()
        t_mid.append(Float64(t1 - t0) / 1e6)
        t_entry.append(Float64(t2 - t1) / 1e6)
    sort(t_mid)
    sort(t_entry)
    print("dispatch tokens", tokens, "mma.sync 64x128 ms", t_mid[5], "grouped_gemm_gpu ms", t_entry[5])
    var h_c0 = ctx.enqueue_create_host_buffer[BF](slots * nout)
    var h_c1 = ctx.enqueue_create_host_buffer[BF](slots * nout)
    ctx.enqueue_copy(h_c0, d_c0)
    ctx.enqueue_copy(h_c1, d_c1)
    ctx.synchronize()
    var num = Float64(0)
    var den = Float64(0)
    for i in range(slots * nout):
        var x = Float64(h_c0[i].cast[DType.float32]())
        var y = Float64(h_c1[i].cast[DType.float32]())
        num += (x - y) * (x - y)
        den += x * x
    print("dispatch tokens", tokens, "rel", sqrt(num / max(den, 1e-30)))
    # The kernels saw these only through addresses: keep them alive to the end.
    _ = d_a^
    _ = d_w^
    _ = d_off^
    _ = d_ids^
    _ = d_c0^
    _ = d_c1^

def main() raises:
    var ctx = DeviceContext()
    dispatch_check(ctx, 4096)
    dispatch_check(ctx, 64)
    # old_prefill: the reference kernel is the 128x128 mma.sync tile (else the 64x128 one)
    bench_case["swiglu", 128, 256, 4](ctx, "qwen3-up", 128, 2048, 1536, 16384, 8, True)
    bench_case["none", 128, 256, 4](ctx, "qwen3-down", 128, 768, 2048, 16384, 8, True)
    bench_case["swiglu", 128, 256, 4](ctx, "gpt-oss-20b-up", 32, 2880, 5760, 16384, 4, True)
    bench_case["none", 128, 256, 4](ctx, "gpt-oss-20b-down", 32, 2880, 2880, 16384, 4, True)
    bench_case["swiglu", 128, 256, 4](ctx, "mixtral-up", 8, 4096, 28672, 16384, 2, True)
    bench_case["none", 128, 256, 4](ctx, "mixtral-down", 8, 14336, 4096, 16384, 2, True)
    # GPT-OSS-120B: 512 +- 23 rows per expert, so about half the experts end in a ragged row tile
    # of at most 64 rows, where the wgmma tile's second warpgroup issues no MMA
    bench_case["swiglu", 128, 256, 4](ctx, "gpt-oss-120b-up", 128, 2880, 5760, 16384, 4, True)
    bench_case["none", 128, 256, 4](ctx, "gpt-oss-120b-down", 128, 2880, 2880, 16384, 4, True)
    bench_case["swiglu", 128, 256, 4](ctx, "qwen3-up", 128, 2048, 1536, 1024, 8, False)
    # 32 and 64 rows per expert (Mixtral and Qwen3 at 128 / 256 and 512 / 1024 tokens), where the
    # entry takes the 64 x 128 mma.sync tile: the wgmma tile with TMA loads, 64 and 128 rows
    bench_case["swiglu", 64, 256, 4](ctx, "mixtral-up", 8, 4096, 28672, 128, 2, False)
    bench_case["swiglu", 128, 256, 4](ctx, "mixtral-up", 8, 4096, 28672, 128, 2, False)
    bench_case["none", 64, 256, 4](ctx, "mixtral-down", 8, 14336, 4096, 128, 2, False)
    bench_case["none", 128, 256, 4](ctx, "mixtral-down", 8, 14336, 4096, 128, 2, False)
    bench_case["swiglu", 64, 256, 4](ctx, "mixtral-up", 8, 4096, 28672, 256, 2, False)
    bench_case["none", 64, 256, 4](ctx, "mixtral-down", 8, 14336, 4096, 256, 2, False)
    bench_case["swiglu", 64, 256, 4](ctx, "qwen3-up", 128, 2048, 1536, 512, 8, False)
    bench_case["none", 64, 256, 4](ctx, "qwen3-down", 128, 768, 2048, 512, 8, False)
    bench_case["swiglu", 64, 256, 4](ctx, "qwen3-up", 128, 2048, 1536, 1024, 8, False)
    bench_case["swiglu", 64, 256, 4](ctx, "gpt-oss-20b-up", 32, 2880, 5760, 256, 4, False)
    bench_case["none", 64, 256, 4](ctx, "gpt-oss-20b-down", 32, 2880, 2880, 256, 4, False)
    # The down projection's A (the grouped rows, not gathered) by cp.async and by TMA, side by side
    bench_case["none", 128, 256, 4, 1, False, False](ctx, "qwen3-down-rows", 128, 768, 2048, 16384, 8, True)
    bench_case["none", 128, 256, 4, 1, False, True](ctx, "qwen3-down-rows", 128, 768, 2048, 16384, 8, True)
    bench_case["none", 128, 256, 4, 1, False, False](ctx, "mixtral-down-rows", 8, 14336, 4096, 16384, 2, True)
    bench_case["none", 128, 256, 4, 1, False, True](ctx, "mixtral-down-rows", 8, 14336, 4096, 16384, 2, True)
    bench_case["none", 128, 256, 4, 1, False, True](ctx, "qwen3-down-rows-odd", 128, 760, 2040, 9999, 8, True)
    # The layer's tile for 25-63 rows per expert: 64 rows, the down projection's A by TMA
    bench_case["none", 64, 256, 4, 1, False, False](ctx, "mixtral-down-rows", 8, 14336, 4096, 128, 2, False)
    bench_case["none", 64, 256, 4, 1, False, True](ctx, "mixtral-down-rows", 8, 14336, 4096, 128, 2, False)
    bench_case["none", 64, 256, 4, 1, False, True](ctx, "qwen3-down-rows-odd", 128, 760, 2040, 333, 8, False)
    # Mixtral's down projection at 512 and 1024 rows per expert (2048 / 4096 tokens), where
    # cuBLAS per expert was 1.2x / 1.1x faster (results/checks/20261207-s22-cublas-crossover-H100.log):
    # the layer's tile (128 x 256) against narrower and shorter ones, A by TMA as in the layer
    bench_case["none", 128, 256, 4, 1, False, True](ctx, "mixtral-down-rows", 8, 14336, 4096, 2048, 2, True)
    bench_case["none", 128, 128, 6, 1, False, True](ctx, "mixtral-down-rows", 8, 14336, 4096, 2048, 2, True)
    bench_case["none", 64, 256, 5, 1, False, True](ctx, "mixtral-down-rows", 8, 14336, 4096, 2048, 2, True)
    bench_case["none", 128, 256, 4, 1, False, True](ctx, "mixtral-down-rows", 8, 14336, 4096, 4096, 2, True)
    bench_case["none", 128, 128, 6, 1, False, True](ctx, "mixtral-down-rows", 8, 14336, 4096, 4096, 2, True)
    bench_case["none", 64, 256, 5, 1, False, True](ctx, "mixtral-down-rows", 8, 14336, 4096, 4096, 2, True)
    # 4-24 rows per expert, where the layer takes the 16 x 128 mma.sync decode tile: bandwidth-bound,
    # so the wgmma tile's TMA weight stream may win despite its 64-row padding (GPT-OSS-20B at 128
    # tokens is the one cell of goal 1 within reach: 70% of its floor, 1.3x needs 76%)
    bench_case["swiglu", 64, 256, 4, 1, True, False, True](ctx, "gpt-oss-20b-up", 32, 2880, 5760, 128, 4, False)
    bench_case["none", 64, 256, 4, 1, False, True, True](ctx, "gpt-oss-20b-down-rows", 32, 2880, 2880, 128, 4, False)
    bench_case["swiglu", 64, 256, 4, 1, True, False, True](ctx, "qwen3-up", 128, 2048, 1536, 128, 8, False)
    bench_case["none", 64, 256, 4, 1, False, True, True](ctx, "qwen3-down-rows", 128, 768, 2048, 128, 8, False)
    bench_case["swiglu", 64, 256, 4, 1, True, False, True](ctx, "mixtral-up", 8, 4096, 28672, 16, 2, False)
    bench_case["none", 64, 256, 4, 1, False, True, True](ctx, "mixtral-down-rows", 8, 14336, 4096, 16, 2, False)
    # K and n_out not multiples of the tile: the K tail and the gate box past n_out
    bench_case["swiglu", 128, 256, 4](ctx, "qwen3-up-odd", 128, 2040, 1520, 9999, 8, True)
    bench_case["none", 128, 256, 4](ctx, "qwen3-down-odd", 128, 760, 2040, 9999, 8, True)
