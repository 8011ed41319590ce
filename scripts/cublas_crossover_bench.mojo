# Kernel-only: where cuBLAS per expert (kernels/gpu_gemm.mojo, expert_matmul_gpu: gather, one
# cuBLAS GEMM per expert, activation pass) beats the sync-free grouped GEMM (grouped_gemm_gpu,
# the wgmma tile with TMA loads of W on Hopper), at the shapes that take cuBLAS today
# (cublas_is_faster: E <= 32 and >= 512 routed rows per expert) and just below. Both compute the
# same product from the same inputs (random routing, the expert offsets given to cuBLAS on the
# host, so its read-back sync is not timed); the relative L2 difference of their outputs is
# printed. A call's time is the median of 15 synchronised calls (host clock), TFLOP/s counts
# 2 * rows * K * n_w. Sets CUBLAS_MAX_EXPERTS / CUBLAS_MIN_ROWS_PER_EXPERT.
#
# Build here, run on the GPU machine with Mojo's runtime libraries and a libcublas on
# LD_LIBRARY_PATH (as scripts/grouped_gemm_kernel_bench.mojo; PyTorch's wheel ships libcublas):
#   mojo build -I . --target-accelerator=sm_90a -o cublas_crossover_bench scripts/cublas_crossover_bench.mojo
from kernels.activation import DEFAULT_SWIGLU_ALPHA, DEFAULT_SWIGLU_LIMIT
from kernels.gpu_gemm import ExpertBias, expert_matmul_gpu
from kernels.gpu_grouped_gemm import grouped_gemm_gpu
from max.gpu.host import DeviceContext
from std.math import sqrt
from std.memory import Pointer
from std.time import perf_counter_ns

comptime BF = DType.bfloat16
comptime REPS = 15


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


def P[dt: DType](addr: Int) -> Pointer[Scalar[dt], MutAnyOrigin]:
    return Pointer[Scalar[dt], MutAnyOrigin](unsafe_from_address=addr)


def median_ms(mut t: List[Float64]) -> Float64:
    sort(t)
    return t[len(t) // 2]


def run_cublas[act: StaticString](
    ctx: DeviceContext, pc0: Pointer[Scalar[BF], MutAnyOrigin], nout: Int, pa: Pointer[Scalar[BF], MutAnyOrigin], K: Int,
    pids: Pointer[Int32, MutAnyOrigin], offsets: List[Int], pw: Pointer[Scalar[BF], MutAnyOrigin], NW: Int,
    pg: Pointer[Scalar[BF], MutAnyOrigin], pwide: Pointer[Scalar[BF], MutAnyOrigin], no_bias: ExpertBias[BF],
) raises:
    var wide = pc0 if act == "none" else pwide  # "none" writes the products in place
    expert_matmul_gpu[BF, act, True](ctx, pc0, nout, pa, K, K, pids, offsets.copy(), pw, NW, pg, wide, NW, no_bias)


def one_case[act: StaticString](ctx: DeviceContext, name: String, E: Int, K: Int, NW: Int, tokens: Int, topk: Int) raises:
    var nout = NW // 2 if act == "swiglu" else NW
    var slots = tokens * topk
    var rng = Rng(7 + UInt64(E * K + tokens))
    # random top-k routing (distinct experts per token), rows grouped by expert
    var counts = List[Int](length=E, fill=0)
    var choice = List[Int](length=slots, fill=0)
    for t in range(tokens):
        for j in range(topk):
            var x = rng.int(E)
            var again = True
            while again:
                again = False
                for i in range(j):
                    if choice[t * topk + i] == x:
                        x = (x + 1) % E
                        again = True
            choice[t * topk + j] = x
            counts[x] += 1
    var offsets = List[Int](length=E + 1, fill=0)
    for e in range(E):
        offsets[e + 1] = offsets[e] + counts[e]
    var h_off = ctx.enqueue_create_host_buffer[DType.int32](E + 1)
    var h_ids = ctx.enqueue_create_host_buffer[DType.int32](slots)
    var h_a = ctx.enqueue_create_host_buffer[BF](tokens * K)
    var h_w = ctx.enqueue_create_host_buffer[BF](E * K * NW)
    ctx.synchronize()
    var fill = List[Int](length=E, fill=0)
    for e in range(E + 1):
        h_off[e] = Int32(offsets[e])
    for s in range(slots):
        var e = choice[s]
        h_ids[offsets[e] + fill[e]] = Int32(s // topk)
        fill[e] += 1
    for i in range(tokens * K):
        h_a[i] = rng.next().cast[BF]()
    # W: a table of 4099 random values repeated (filling Mixtral's 940M weights one by one is slow)
    var sc = Float32(1.0) / sqrt(Float32(K))
    var table = List[Scalar[BF]](length=4099, fill=0)
    for i in range(4099):
        table[i] = (rng.next() * sc).cast[BF]()
    for i in range(E * K * NW):
        h_w[i] = table[i % 4099]
    var d_a = ctx.enqueue_create_buffer[BF](tokens * K)
    var d_w = ctx.enqueue_create_buffer[BF](E * K * NW)
    var d_off = ctx.enqueue_create_buffer[DType.int32](E + 1)
    var d_ids = ctx.enqueue_create_buffer[DType.int32](slots)
    var d_c0 = ctx.enqueue_create_buffer[BF](slots * nout)
    var d_c1 = ctx.enqueue_create_buffer[BF](slots * nout)
    var d_gathered = ctx.enqueue_create_buffer[BF](slots * K)
    var d_wide = ctx.enqueue_create_buffer[BF](slots * NW)
    ctx.enqueue_copy(d_a, h_a)
    ctx.enqueue_copy(d_w, h_w)
    ctx.enqueue_copy(d_off, h_off)
    ctx.enqueue_copy(d_ids, h_ids)
    ctx.synchronize()
    var pa = P[BF](Int(d_a.unsafe_ptr()))
    var pw = P[BF](Int(d_w.unsafe_ptr()))
    var pc0 = P[BF](Int(d_c0.unsafe_ptr()))
    var pc1 = P[BF](Int(d_c1.unsafe_ptr()))
    var pg = P[BF](Int(d_gathered.unsafe_ptr()))
    var pwide = P[BF](Int(d_wide.unsafe_ptr()))
    var poff = Pointer[Int32, MutAnyOrigin](unsafe_from_address=Int(d_off.unsafe_ptr()))
    var pids = Pointer[Int32, MutAnyOrigin](unsafe_from_address=Int(d_ids.unsafe_ptr()))
    var no_bias = ExpertBias[BF](pw, NW, poff, E, 0)  # not read: no bias

    for _ in range(3):
        run_cublas[act](ctx, pc0, nout, pa, K, pids, offsets, pw, NW, pg, pwide, no_bias)
        grouped_gemm_gpu[BF, act, True](ctx, pc1, nout, pa, K, K, pids, poff, E, slots, pw, NW, pw)
    ctx.synchronize()
    var t_cublas = List[Float64]()
    var t_grouped = List[Float64]()
    for _ in range(REPS):
        var t0 = perf_counter_ns()
        run_cublas[act](ctx, pc0, nout, pa, K, pids, offsets, pw, NW, pg, pwide, no_bias)
        ctx.synchronize()
        var t1 = perf_counter_ns()
        grouped_gemm_gpu[BF, act, True](ctx, pc1, nout, pa, K, K, pids, poff, E, slots, pw, NW, pw)
        ctx.synchronize()
        var t2 = perf_counter_ns()
        t_cublas.append(Float64(t1 - t0) / 1e6)
        t_grouped.append(Float64(t2 - t1) / 1e6)
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
        if y != y or x != x:
            bad += 1
        else:
            num += (x - y) * (x - y)
            den += x * x
    var flops = 2.0 * Float64(slots) * Float64(K) * Float64(NW)
    var mc = median_ms(t_cublas)
    var mg = median_ms(t_grouped)
    print(name, "E", E, "K", K, "n_w", NW, "tokens", tokens, "rows/expert", slots // E,
          "| cublas ms", mc, "(", t_cublas[0], "-", t_cublas[REPS - 1], ") TFLOP/s", flops / mc / 1e9,
          "| grouped ms", mg, "(", t_grouped[0], "-", t_grouped[REPS - 1], ") TFLOP/s", flops / mg / 1e9,
          "| grouped/cublas speed", mc / mg, "rel_diff", sqrt(num / max(den, 1e-30)), "nonfinite", bad)
    # The kernels saw these only through addresses: keep them alive to the end.
    _ = d_a^
    _ = d_w^
    _ = d_off^
    _ = d_ids^
    _ = d_c0^
    _ = d_c1^
    _ = d_gathered^
    _ = d_wide^

def main() raises:
    var ctx = DeviceContext()
    for tokens in [512, 2048, 4096, 16384]:  # 128, 512, 1024, 4096 rows per expert
        one_case["swiglu"](ctx, "mixtral-8x7b-up", 8, 4096, 28672, tokens, 2)
        one_case["none"](ctx, "mixtral-8x7b-down", 8, 14336, 4096, tokens, 2)
    for tokens in [1024, 4096, 16384]:  # 128, 512, 2048 rows per expert
        one_case["swiglu"](ctx, "gpt-oss-20b-up", 32, 2880, 5760, tokens, 4)
        one_case["none"](ctx, "gpt-oss-20b-down", 32, 2880, 2880, tokens, 4)
    # the E=8 prefill presets (relu): small 16384 tokens d 1024, medium 65536 d 2048
    one_case["relu"](ctx, "small-up", 8, 1024, 4096, 16384, 2)
    one_case["none"](ctx, "small-down", 8, 4096, 1024, 16384, 2)
    one_case["relu"](ctx, "medium-up", 8, 2048, 8192, 65536, 2)
    one_case["none"](ctx, "medium-down", 8, 8192, 2048, 65536, 2)
