# Kernel-only experiment: the Hopper wgmma tile of the grouped GEMM with its W (B) tiles loaded
# by TMA (one thread issues BN/64 boxes per stage into an mbarrier) instead of cp.async by every
# thread; A (the gathered token rows) stays cp.async. Everything else is the production tile's
# (kernels/gpu_grouped_gemm.mojo, _grouped_gemm_wgmma: schedule, 128-byte-swizzled layouts, one
# wgmma group in flight, epilogue through shared memory), so the outputs must be bit-identical
# to it: it prints the mismatches, and both times (median of 20 synchronised calls) at the
# Qwen3-30B-A3B and Mixtral prefill shapes. First run scripts/tma_layout_check.mojo.
# W is seen as a 3D tensor (E, K, N): a box never reads into the next expert, K tails and the
# up half's N edge are zero-filled. A gate box past n_out reads up columns, which only feed
# output columns >= n_out, never stored.
# Build: mojo build -I . --target-accelerator=sm_90a -o wgmma_tma_bench scripts/wgmma_tma_bench.mojo
# and run with Mojo's runtime libraries on LD_LIBRARY_PATH (as scripts/grouped_gemm_kernel_bench.mojo).
from kernels.activation import DEFAULT_SWIGLU_ALPHA, DEFAULT_SWIGLU_LIMIT, is_gated
from kernels.gpu_grouped_gemm import WG_BK, _block_tile, _epilogue_pair, _grouped_gemm_wgmma, _wgmma_desc
from max.gpu import barrier, lane_id, thread_idx, warp_id
from max.gpu.compute.mma import wgmma_async, wgmma_commit_group_sync, wgmma_fence_aligned, wgmma_wait_group_sync
from max.gpu.host import DeviceBuffer, DeviceContext, FuncAttribute
from max.gpu.host.nvidia.tma import TMADescriptor, TensorMapSwizzle, create_tma_descriptor, prefetch_tma_descriptor
from max.gpu.memory import (
    AddressSpace, async_copy, async_copy_commit_group, async_copy_wait_group, cp_async_bulk_tensor_shared_cluster_global,
    external_memory,
)
from max.gpu.sync import mbarrier_arrive_expect_tx_shared, mbarrier_init, mbarrier_try_wait_parity_shared
from std.math import ceildiv, sqrt
from std.memory import Pointer, stack_allocation
from std.sys import inlined_assembly
from std.time import perf_counter_ns
from std.utils import IndexList

comptime BF = DType.bfloat16
comptime BM = 128
comptime BK = WG_BK
comptime THREADS = BM * 2


@__llvm_arg_metadata(wdesc, `nvvm.grid_constant`)
def wgmma_tma_kernel[activation: StaticString, BN: Int, STAGES: Int](
    wdesc: TMADescriptor,
    c: Pointer[Scalar[BF], MutAnyOrigin],
    a: Pointer[Scalar[BF], MutAnyOrigin],
    row_ids: Pointer[Int32, MutAnyOrigin],
    offsets: Pointer[Int32, MutAnyOrigin],
    n_k: Int64, n_lda: Int64, n_ldc: Int64, n_nw: Int64, n_nout: Int64, n_e: Int64, n_mb: Int64, n_nt: Int64,
    n_slots: Int64,
):
    comptime GATED = is_gated[activation]()
    comptime BN_OUT = BN // 2 if GATED else BN
    comptime NB = BN // 64
    comptime A_STAGE = BM * BK
    comptime B_STAGE = BK * BN
    comptime A_CHUNKS = BM * (BK // 8) // THREADS
    comptime ACC = BN // 2
    comptime NF = BN // 8
    var tid = Int(thread_idx.x)
    var lane = Int(lane_id())
    var warp = Int(warp_id())
    var wg = warp // 4
    var E = Int(n_e)
    var K = Int(n_k)
    var S = Int(n_slots)
    var bars = stack_allocation[STAGES, Int64, address_space=AddressSpace.SHARED, alignment=8]()
    if tid == 0:
        prefetch_tma_descriptor(Pointer(to=wdesc).unsafe_bitcast[NoneType]())
        for s in range(STAGES):
            mbarrier_init(bars.unsafe_offset(s), Int32(1))
    var tile = _block_tile[BM, THREADS, False](offsets, E, S, Int(n_mb), Int(n_nt))  # (barriers inside)
    if not tile.valid:
        return
    var e = tile.expert
    var row0 = tile.row0
    var rows_here = tile.rows
    var col0 = tile.n_tile * BN_OUT
    var NOUT = Int(n_nout)

    var raw = external_memory[Scalar[BF], address_space=AddressSpace.SHARED, alignment=1024, name="pymoe_tma_smem"]()
    var smem = raw.unsafe_offset(((1024 - Int(raw) % 1024) % 1024) // 2)
    var a_smem = smem
    var b_smem = smem.unsafe_offset(STAGES * A_STAGE)

    var a_src = Array[Int, A_CHUNKS](fill=0)
    comptime for i in range(A_CHUNKS):
        var q = tid + i * THREADS
        var grouped_row = row0 + min(q // 8, rows_here - 1)
        a_src[i] = Int(row_ids.unsafe_load(grouped_row)) * Int(n_lda) + (q % 8) * 8

    var k_tiles = ceildiv(K, BK)
    comptime LOOKAHEAD = STAGES - 2  # one wgmma group in flight, as the production tile
    var acc = SIMD[DType.float32, ACC](0)
    for step in range(k_tiles + LOOKAHEAD):
        var kt = step - LOOKAHEAD
        if kt >= 0:
            async_copy_wait_group(Int32(LOOKAHEAD - 1))
            mbarrier_try_wait_parity_shared(bars.unsafe_offset(kt % STAGES), Int32((kt // STAGES) & 1), Int32(10000000))
            inlined_assembly["fence.proxy.async.shared::cta;", NoneType, constraints="~{memory}", has_side_effect=True]()
            barrier()
        if step < k_tiles:
            var k0 = step * BK
            var st = step % STAGES
            var a_stage = a_smem.unsafe_offset(st * A_STAGE)
            var b_stage = b_smem.unsafe_offset(st * B_STAGE)
            comptime for i in range(A_CHUNKS):
                var q = tid + i * THREADS
                var r = q // 8
                var ch = q % 8
                var dst = a_stage.unsafe_offset((r * 8 + (ch ^ (r & 7))) * 8)
                if k0 + ch * 8 < K:
                    async_copy[16](a.unsafe_offset(a_src[i] + k0).unsafe_address_space_cast[AddressSpace.GLOBAL](), dst)
                else:
                    dst.unsafe_store[alignment=16](SIMD[BF, 8](0))
            if tid == 0:
                mbarrier_arrive_expect_tx_shared(bars.unsafe_offset(st), Int32(B_STAGE * 2))
                comptime for blk in range(NB):
                    var col: Int
                    comptime if GATED:
                        col = (blk // (NB // 2)) * NOUT + col0 + (blk % (NB // 2)) * 64
                    else:
                        col = col0 + blk * 64
                    cp_async_bulk_tensor_shared_cluster_global(
                        b_stage.unsafe_offset(blk * (BK * 64)), Pointer(to=wdesc).unsafe_bitcast[NoneType](),
                        bars.unsafe_offset(st), IndexList[3](col, k0, e),
                    )
        async_copy_commit_group()
        if kt < 0:
            continue
        var a_addr = Int(a_smem.unsafe_offset((kt % STAGES) * A_STAGE + wg * 64 * BK))
        var b_addr = Int(b_smem.unsafe_offset((kt % STAGES) * B_STAGE))
        wgmma_fence_aligned()
        comptime for kk in range(BK // 16):
            var da = _wgmma_desc[BF](a_addr + kk * 32, 16, 1024)
            var db = _wgmma_desc[BF](b_addr + kk * 16 * 128, BK * 128, 1024)
            acc = wgmma_async[64, BN, 16, DType.float32, ACC, a_type=BF, b_type=BF, layout_b="row"](da, db, acc)
        wgmma_commit_group_sync()
        wgmma_wait_group_sync[1]()
    wgmma_wait_group_sync[0]()
    async_copy_wait_group(Int32(0))

    comptime OUT_FRAGS = NF // 2 if GATED else NF
    var warp_row = wg * 64 + (warp % 4) * 16 + lane // 4
    comptime ROW = BN_OUT + 8
    barrier()
    comptime for f in range(OUT_FRAGS):
        var lc = f * 8 + (lane % 4) * 2
        if col0 + lc < NOUT:
            comptime for half in range(2):
                var r = warp_row + half * 8
                if r < rows_here:
                    var up = SIMD[DType.float32, 2](0)
                    comptime if GATED:
                        up = acc.slice[2, offset = (f + NF // 2) * 4 + half * 2]()
                    smem.unsafe_store[alignment=4](
                        r * ROW + lc,
                        _epilogue_pair[activation, False, DEFAULT_SWIGLU_ALPHA, DEFAULT_SWIGLU_LIMIT, BF, BF](
                            acc.slice[2, offset = f * 4 + half * 2](), up, c, 0, 0,
                        ),
                    )
    barrier()
    comptime CPR = BN_OUT // 8
    for q in range(tid, BM * CPR, THREADS):
        var r = q // CPR
        var lc = (q % CPR) * 8
        if r < rows_here and col0 + lc < NOUT:
            c.unsafe_store[alignment=16]((row0 + r) * Int(n_ldc) + col0 + lc, smem.unsafe_load[width=8, alignment=16](r * ROW + lc))


def launch_tma[act: StaticString, BN: Int, STAGES: Int](
    ctx: DeviceContext, c: Pointer[Scalar[BF], MutAnyOrigin], n_out: Int, a: Pointer[Scalar[BF], MutAnyOrigin], K: Int,
    row_ids: Pointer[Int32, MutAnyOrigin], offsets: Pointer[Int32, MutAnyOrigin], E: Int, slots: Int,
    w: Pointer[Scalar[BF], MutAnyOrigin], n_w: Int,
) raises:
    comptime BN_OUT = BN // 2 if is_gated[act]() else BN
    comptime SMEM = STAGES * (BM * BK + BK * BN) * 2 + 1024
    var m_bound = min(slots, (slots + E * (BM - 1)) // BM)
    var n_tiles = ceildiv(n_out, BN_OUT)
    var desc = create_tma_descriptor[BF, 3, TensorMapSwizzle.SWIZZLE_128B](
        DeviceBuffer[BF](ctx, w, 1, owning=False), IndexList[3](E, K, n_w), IndexList[3](K * n_w, n_w, 1),
        IndexList[3](1, BK, 64),
    )
    ctx.enqueue_function[wgmma_tma_kernel[act, BN, STAGES]](
        desc, c, a, row_ids, offsets, Int64(K), Int64(K), Int64(n_out), Int64(n_w), Int64(n_out), Int64(E),
        Int64(m_bound), Int64(n_tiles), Int64(slots),
        grid_dim=m_bound * n_tiles, block_dim=THREADS, shared_mem_bytes=SMEM,
        func_attribute=FuncAttribute.MAX_DYNAMIC_SHARED_SIZE_BYTES(UInt32(SMEM)),
    )


def run_case[act: StaticString](ctx: DeviceContext, name: String, E: Int, K: Int, NW: Int, tokens: Int, topk: Int) raises:
    comptime BN = 256
    comptime STAGES = 4
    var nout = NW // 2 if act == "swiglu" else NW
    var slots = tokens * topk
    var h_off = ctx.enqueue_create_host_buffer[DType.int32](E + 1)
    var h_ids = ctx.enqueue_create_host_buffer[DType.int32](slots)
    var h_a = ctx.enqueue_create_host_buffer[BF](tokens * K)
    var h_w = ctx.enqueue_create_host_buffer[BF](E * K * NW)
    ctx.synchronize()
    # routing: token t's j-th choice is expert (t * 7 + j * 13) % E (distinct for topk <= E), grouped by expert
    var counts = List[Int](length=E, fill=0)
    for t in range(tokens):
        for j in range(topk):
            counts[(t * 7 + j * 13) % E] += 1
    h_off[0] = 0
    for x in range(E):
        h_off[x + 1] = h_off[x] + Int32(counts[x])
    var fill = List[Int](length=E, fill=0)
    for t in range(tokens):
        for j in range(topk):
            var x = (t * 7 + j * 13) % E
            h_ids[Int(h_off[x]) + fill[x]] = Int32(t)
            fill[x] += 1
    for i in range(tokens * K):
        h_a[i] = (Float32((i * 7919) % 2001 - 1000) * 1e-3).cast[BF]()
    var sc = Float32(1.0) / sqrt(Float32(K))
    for i in range(E * K * NW):
        h_w[i] = (Float32((i * 104729) % 2001 - 1000) * 1e-3 * sc).cast[BF]()
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
    ctx.synchronize()
    var pa = Pointer[Scalar[BF], MutAnyOrigin](unsafe_from_address=Int(d_a.unsafe_ptr()))
    var pw = Pointer[Scalar[BF], MutAnyOrigin](unsafe_from_address=Int(d_w.unsafe_ptr()))
    var pc0 = Pointer[Scalar[BF], MutAnyOrigin](unsafe_from_address=Int(d_c0.unsafe_ptr()))
    var pc1 = Pointer[Scalar[BF], MutAnyOrigin](unsafe_from_address=Int(d_c1.unsafe_ptr()))
    var poff = Pointer[Int32, MutAnyOrigin](unsafe_from_address=Int(d_off.unsafe_ptr()))
    var pids = Pointer[Int32, MutAnyOrigin](unsafe_from_address=Int(d_ids.unsafe_ptr()))
    var times = List[Float64]()
    var times_tma = List[Float64]()
    for rep in range(23):
        var t0 = perf_counter_ns()
        _grouped_gemm_wgmma[BF, BM, BN, STAGES, act, True, False, DEFAULT_SWIGLU_ALPHA, DEFAULT_SWIGLU_LIMIT](
            ctx, pc0, nout, pa, K, K, pids, poff, E, slots, pw, NW, nout, pw
        )
        ctx.synchronize()
        var t1 = perf_counter_ns()
        launch_tma[act, BN, STAGES](ctx, pc1, nout, pa, K, pids, poff, E, slots, pw, NW)
        ctx.synchronize()
        var t2 = perf_counter_ns()
        if rep >= 3:
            times.append(Float64(t1 - t0) / 1e6)
            times_tma.append(Float64(t2 - t1) / 1e6)
    sort(times)
    sort(times_tma)
    var h_c0 = ctx.enqueue_create_host_buffer[BF](slots * nout)
    var h_c1 = ctx.enqueue_create_host_buffer[BF](slots * nout)
    ctx.enqueue_copy(h_c0, d_c0)
    ctx.enqueue_copy(h_c1, d_c1)
    ctx.synchronize()
    var bad = 0
    for i in range(slots * nout):
        if h_c0[i].to_bits() != h_c1[i].to_bits():
            bad += 1
    var flops = 2.0 * Float64(slots) * Float64(K) * Float64(NW)
    var ms = times[10]
    var ms_tma = times_tma[10]
    print(name, "tokens", tokens, "cp.async ms", ms, "(", times[0], "-", times[19], ") TFLOP/s", flops / ms / 1e9,
          "| tma ms", ms_tma, "(", times_tma[0], "-", times_tma[19], ") TFLOP/s", flops / ms_tma / 1e9,
          "| speedup", ms / ms_tma, "mismatches", bad)


def main() raises:
    var ctx = DeviceContext()
    run_case["swiglu"](ctx, "qwen3-up", 128, 2048, 1536, 4096, 8)
    run_case["swiglu"](ctx, "qwen3-up", 128, 2048, 1536, 16384, 8)
    run_case["none"](ctx, "qwen3-down", 128, 768, 2048, 16384, 8)
    run_case["swiglu"](ctx, "qwen3-up-odd", 128, 2040, 1520, 999, 8)
    run_case["swiglu"](ctx, "mixtral-up", 8, 4096, 28672, 16384, 2)
    run_case["none"](ctx, "mixtral-down", 8, 14336, 4096, 16384, 2)
