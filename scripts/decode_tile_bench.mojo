# Kernel-only timing of candidate decode tiles of the grouped GEMM (kernels/gpu_grouped_gemm.mojo,
# _grouped_gemm) at the model presets' expert shapes with 1 and 16 tokens, where a layer's
# time is the read of the experts in use. For each shape, R routings use different experts
# (disjoint where E allows), so back-to-back calls do not find their weights in L2; a call's
# time is the median over 5 rounds of (R back-to-back launches, then one synchronize) / R.
# TB/s = bytes of the used experts' weights / time. Every candidate's output on routing 0 is
# compared with the current DECODE_TILE's (bit-identical expected: the same k16 order).
# First, the router GEMM (dense_gemm_gpu's call) at 1 and 16 rows with candidate tiles, from 64
# router copies.
#
# Build here (no GPU needed), run on the GPU machine with Mojo's runtime libraries on
# LD_LIBRARY_PATH (as for scripts/grouped_gemm_kernel_bench.mojo):
#   mojo build -I . --target-accelerator=sm_90a -o decode_tile_bench scripts/decode_tile_bench.mojo
from kernels.gpu_grouped_gemm import _grouped_gemm, TileConfig, DECODE_TILE, DEFAULT_SWIGLU_ALPHA, DEFAULT_SWIGLU_LIMIT
from max.gpu.host import DeviceBuffer, DeviceContext
from std.memory import Pointer
from std.time import perf_counter_ns

comptime BF = DType.bfloat16
comptime R = 16  # routings per shape
comptime ROUNDS = 5


def P[dt: DType](addr: Int) -> Pointer[Scalar[dt], MutAnyOrigin]:
    return Pointer[Scalar[dt], MutAnyOrigin](unsafe_from_address=addr)


struct Case(Movable):
    var ctx: DeviceContext
    var E: Int
    var K: Int
    var NW: Int
    var nout: Int
    var tokens: Int
    var topk: Int
    var slots: Int
    var a: Int
    var w: Int
    var off: Int  # R x (E + 1)
    var ids: Int  # R x slots
    var c: Int
    var c_ref: Int
    var bytes: Float64  # weight bytes read per call, averaged over the routings
    var bufs: List[DeviceBuffer[BF]]
    var ibufs: List[DeviceBuffer[DType.int32]]

    def __init__(out self, ctx: DeviceContext, E: Int, K: Int, NW: Int, gated: Bool, tokens: Int, topk: Int) raises:
        self.ctx = ctx
        self.E = E
        self.K = K
        self.NW = NW
        self.nout = NW // 2 if gated else NW
        self.tokens = tokens
        self.topk = topk
        self.slots = tokens * topk
        self.bufs = List[DeviceBuffer[BF]]()
        self.ibufs = List[DeviceBuffer[DType.int32]]()
        var h_off = ctx.enqueue_create_host_buffer[DType.int32](R * (E + 1))
        var h_ids = ctx.enqueue_create_host_buffer[DType.int32](R * self.slots)
        var h_a = ctx.enqueue_create_host_buffer[BF](tokens * K)
        var h_w = ctx.enqueue_create_host_buffer[BF](E * K * NW)
        ctx.synchronize()
        var st: UInt64 = 77 + UInt64(E * K + tokens)
        var used = 0
        for r in range(R):
            var counts = List[Int](length=E, fill=0)
            var choice = List[Int](length=self.slots, fill=0)
            for t in range(tokens):
                for j in range(topk):
                    var e = (r * topk + j) % E  # 1 token: routing r's experts are disjoint where E allows
                    if tokens > 1:
                        var dup = True
                        while dup:
                            st = st * 6364136223846793005 + 1442695040888963407
                            e = Int((st >> 33) % UInt64(E))
                            dup = False
                            for i in range(j):
                                if choice[t * topk + i] == e:
                                    dup = True
                    choice[t * topk + j] = e
                    counts[e] += 1
            var base = r * (E + 1)
            h_off[base] = 0
            for e in range(E):
                h_off[base + e + 1] = h_off[base + e] + Int32(counts[e])
                if counts[e] > 0:
                    used += 1
            var fill = List[Int](length=E, fill=0)
            for s in range(self.slots):
                var e = choice[s]
                h_ids[r * self.slots + Int(h_off[base + e]) + fill[e]] = Int32(s // topk)
                fill[e] += 1
        self.bytes = Float64(used) / Float64(R) * Float64(K * NW * 2)
        for i in range(tokens * K):
            h_a[i] = (Float32((i * 7919) % 2001 - 1000) * 1e-3).cast[BF]()
        for i in range(E * K * NW):
            h_w[i] = (Float32((i * 104729) % 2001 - 1000) * 2e-5).cast[BF]()
        var d_a = ctx.enqueue_create_buffer[BF](tokens * K)
        var d_w = ctx.enqueue_create_buffer[BF](E * K * NW)
        var d_c = ctx.enqueue_create_buffer[BF](self.slots * self.nout)
        var d_cr = ctx.enqueue_create_buffer[BF](self.slots * self.nout)
        var d_off = ctx.enqueue_create_buffer[DType.int32](R * (E + 1))
        var d_ids = ctx.enqueue_create_buffer[DType.int32](R * self.slots)
        ctx.enqueue_copy(d_a, h_a)
        ctx.enqueue_copy(d_w, h_w)
        ctx.enqueue_copy(d_off, h_off)
        ctx.enqueue_copy(d_ids, h_ids)
        ctx.synchronize()
        self.a = Int(d_a.unsafe_ptr())
        self.w = Int(d_w.unsafe_ptr())
        self.c = Int(d_c.unsafe_ptr())
        self.c_ref = Int(d_cr.unsafe_ptr())
        self.off = Int(d_off.unsafe_ptr())
        self.ids = Int(d_ids.unsafe_ptr())
        self.bufs.append(d_a^)
        self.bufs.append(d_w^)
        self.bufs.append(d_c^)
        self.bufs.append(d_cr^)
        self.ibufs.append(d_off^)
        self.ibufs.append(d_ids^)

    def call[tile: TileConfig, act: StaticString](self, r: Int, out_addr: Int) raises:
        _grouped_gemm[BF, tile, act, True, False, DEFAULT_SWIGLU_ALPHA, DEFAULT_SWIGLU_LIMIT](
            self.ctx, P[BF](out_addr), self.nout, P[BF](self.a), self.K, self.K,
            P[DType.int32](self.ids + r * self.slots * 4), P[DType.int32](self.off + r * (self.E + 1) * 4),
            self.E, self.slots, P[BF](self.w), self.NW, self.nout, P[BF](self.w),
        )

    def run[tile: TileConfig, act: StaticString](self, name: String) raises:
        for r in range(R):
            self.call[tile, act](r, self.c)
        self.ctx.synchronize()
        var times = List[Float64]()
        for _ in range(ROUNDS):
            var t0 = perf_counter_ns()
            for r in range(R):
                self.call[tile, act](r, self.c)
            self.ctx.synchronize()
            times.append(Float64(perf_counter_ns() - t0) / 1e6 / Float64(R))
        sort(times)
        var ms = times[ROUNDS // 2]
        # Bit-identity with the current decode tile on routing 0.
        self.call[DECODE_TILE, act](0, self.c_ref)
        self.call[tile, act](0, self.c)
        var n = self.slots * self.nout
        var h0 = self.ctx.enqueue_create_host_buffer[BF](n)
        var h1 = self.ctx.enqueue_create_host_buffer[BF](n)
        self.ctx.enqueue_copy(h0, self.bufs[3])
        self.ctx.enqueue_copy(h1, self.bufs[2])
        self.ctx.synchronize()
        var bad = 0
        for i in range(n):
            if h0[i].to_bits() != h1[i].to_bits():
                bad += 1
        print("decode", name, "tokens", self.tokens, "tile", tile.bm, tile.bn, tile.bk, tile.wm, tile.wn, tile.stages,
              "ms", ms, "min_ms", times[0], "max_ms", times[ROUNDS - 1], "TB/s", self.bytes / ms / 1e9, "mismatches", bad)


comptime T_BN64 = TileConfig(16, 64, 64, 16, 32, 4)
comptime T_BN64_S8 = TileConfig(16, 64, 64, 16, 32, 8)
comptime T_S8 = TileConfig(16, 128, 64, 16, 32, 8)
comptime T_BK128 = TileConfig(16, 128, 128, 16, 32, 4)
comptime T_BN64_BK128 = TileConfig(16, 64, 128, 16, 32, 4)
comptime T_BN64_BK128_S6 = TileConfig(16, 64, 128, 16, 32, 6)
# Router candidates: more bytes in flight for the one or two blocks of a decode router.
comptime T_BK128_S6 = TileConfig(16, 128, 128, 16, 32, 6)
comptime T_BN64_BK128_S8 = TileConfig(16, 64, 128, 16, 32, 8)


def shape[act: StaticString](ctx: DeviceContext, name: String, E: Int, K: Int, NW: Int, tokens: Int, topk: Int) raises:
    var cs = Case(ctx, E, K, NW, act == "swiglu", tokens, topk)
    cs.run[DECODE_TILE, act](name)
    cs.run[T_BN64, act](name)
    cs.run[T_BN64_S8, act](name)
    cs.run[T_S8, act](name)
    cs.run[T_BK128, act](name)
    cs.run[T_BN64_BK128, act](name)
    cs.run[T_BN64_BK128_S6, act](name)


def router[tile: TileConfig](ctx: DeviceContext, name: String, rows: Int, K: Int, E: Int) raises:
    """The router GEMM (dense_gemm_gpu, float32 logits) at decode: one column tile of E <= 128
    columns is one block per 16 rows, which reads the whole [K, E] router alone."""
    var reps = 64  # router copies, so that back-to-back calls miss L2 (K x E x 2 bytes each)
    var h_a = ctx.enqueue_create_host_buffer[BF](rows * K)
    var h_w = ctx.enqueue_create_host_buffer[BF](reps * K * E)
    ctx.synchronize()
    for i in range(rows * K):
        h_a[i] = (Float32((i * 7919) % 2001 - 1000) * 1e-3).cast[BF]()
    for i in range(reps * K * E):
        h_w[i] = (Float32((i * 104729) % 2001 - 1000) * 2e-5).cast[BF]()
    var d_a = ctx.enqueue_create_buffer[BF](rows * K)
    var d_w = ctx.enqueue_create_buffer[BF](reps * K * E)
    var d_c = ctx.enqueue_create_buffer[DType.float32](rows * E)
    ctx.enqueue_copy(d_a, h_a)
    ctx.enqueue_copy(d_w, h_w)
    ctx.synchronize()
    var pa = P[BF](Int(d_a.unsafe_ptr()))
    var pc = P[DType.float32](Int(d_c.unsafe_ptr()))
    var times = List[Float64]()
    for round in range(ROUNDS + 1):
        var t0 = perf_counter_ns()
        for r in range(reps):
            # dense_gemm_gpu's call, with the candidate tile
            var pw = P[BF](Int(d_w.unsafe_ptr()) + r * K * E * 2)
            var no_ids = P[DType.int32](Int(pa))
            _grouped_gemm[BF, tile, "none", False, False, DEFAULT_SWIGLU_ALPHA, DEFAULT_SWIGLU_LIMIT, DType.float32, True](
                ctx, pc, E, pa, K, K, no_ids, no_ids, 1, rows, pw, E, E, pw
            )
        ctx.synchronize()
        if round > 0:
            times.append(Float64(perf_counter_ns() - t0) / 1e6 / Float64(reps))
    sort(times)
    var ms = times[ROUNDS // 2]
    print("router", name, "tile", tile.bm, tile.bn, tile.bk, tile.wm, tile.wn, tile.stages, "rows", rows, "K", K, "E", E, "ms", ms, "min_ms", times[0], "max_ms", times[ROUNDS - 1],
          "TB/s", Float64(K * E * 2) / ms / 1e9)
    # Mojo destroys a value after its last use: the buffers whose addresses the kernels were
    # given live to here.
    _ = d_a^
    _ = d_w^
    _ = d_c^


def main() raises:
    var ctx = DeviceContext()
    for rows in [1, 16]:
        router[DECODE_TILE](ctx, "qwen3", rows, 2048, 128)
        router[T_BK128_S6](ctx, "qwen3", rows, 2048, 128)
        router[T_BN64_BK128_S8](ctx, "qwen3", rows, 2048, 128)
        router[DECODE_TILE](ctx, "gpt-oss-20b", rows, 2880, 32)
        router[T_BN64_BK128_S8](ctx, "gpt-oss-20b", rows, 2880, 32)
        router[DECODE_TILE](ctx, "mixtral", rows, 4096, 8)
        router[T_BN64_BK128_S8](ctx, "mixtral", rows, 4096, 8)
        router[DECODE_TILE](ctx, "deepseek-v3", rows, 7168, 256)
        router[T_BK128_S6](ctx, "deepseek-v3", rows, 7168, 256)
        router[T_BN64_BK128_S8](ctx, "deepseek-v3", rows, 7168, 256)
    for tokens in [1, 16]:
        shape["swiglu"](ctx, "qwen3-up", 128, 2048, 1536, tokens, 8)
        shape["none"](ctx, "qwen3-down", 128, 768, 2048, tokens, 8)
        shape["swiglu"](ctx, "gptoss-up", 32, 2880, 5760, tokens, 4)
        shape["none"](ctx, "gptoss-down", 32, 2880, 2880, tokens, 4)
        shape["swiglu"](ctx, "mixtral-up", 8, 4096, 28672, tokens, 2)
        shape["none"](ctx, "mixtral-down", 8, 14336, 4096, tokens, 2)
