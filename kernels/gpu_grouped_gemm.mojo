# The sync-free grouped expert GEMM on NVIDIA tensor cores (bfloat16/float16).
#
#   for each expert e, for each row r in [offsets[e], offsets[e+1]):
#       c[r, :] = act(a_r @ w[e] + bias[e]),   a_r = a[row_ids[r]] (gather) or a[r]
#
# One launch covers every expert, and the host never reads the offsets: the
# grid is sized by a bound the host knows (rows <= slots, so at most
# (slots + E*(BM-1)) / BM row tiles), and each thread block builds the tile
# schedule itself from the E+1 offsets on the device (a block-wide prefix sum
# of ceil(rows_e / BM); a few hundred integers, far cheaper than the block's
# K loop). Blocks whose row tile is past the real total return at once.
# Experts with no rows own no tiles, so their weights are never read: the
# decode path reads only the experts in use, each once per column tile.
#
# Inside a block: a BM x BN output tile, warps in a (BM/WM) x (BN/WN) grid,
# each warp a WM x WN tile of mma.sync m16n8k16 (float32 accumulators).
# Operand tiles stream through STAGES shared-memory buffers with cp.async
# (16 bytes per copy, L2 only) so loads of later K steps overlap the MMAs.
# Shared rows are XOR-swizzled in 16-byte chunks so that ldmatrix reads
# (8 rows of one chunk column) hit 8 different bank groups. A rows are
# gathered through row_ids inside the load (no separate gather pass); rows
# past the tile's end repeat its last row and are not stored.
#
# Gated activations (SwiGLU): w[e] = [W_gate | W_up] along N. A block's
# BN columns are BN/2 gate columns and the same BN/2 up columns, and each warp
# holds matching gate and up fragments (same registers layout), so the
# epilogue computes silu(gate) * up (or the clamped GPT-OSS form) in
# registers and writes only d_ff columns: the wide [rows, 2*d_ff] product
# never reaches memory.
#
# Requirements, checked by grouped_gemm_supported (else the caller uses the
# cuBLAS path): 16-bit dtype, K, the output width and the row strides
# multiples of 8 elements, 16-byte aligned pointers.
#
# Block order: a linear block id is mapped to (row tile, column tile) in
# groups of GROUP_M row tiles, so the blocks running together share a few
# experts' weight columns and a few row tiles (L2 reuse both ways).

from max.gpu import barrier, block_idx, lane_id, thread_idx, warp_id
from max.gpu.compute.mma import (
    WGMMADescriptor,
    ld_matrix,
    mma,
    wgmma_async,
    wgmma_commit_group_sync,
    wgmma_fence_aligned,
    wgmma_wait_group_sync,
)
from max.gpu.host import DeviceBuffer, DeviceContext, FuncAttribute
from max.gpu.host.info import H100
from max.gpu.host.nvidia.tma import TMADescriptor, TensorMapSwizzle, create_tma_descriptor, prefetch_tma_descriptor
from max.gpu.memory import (
    AddressSpace,
    async_copy,
    async_copy_commit_group,
    async_copy_wait_group,
    cp_async_bulk_tensor_shared_cluster_global,
    external_memory,
)
from max.gpu.sync import mbarrier_arrive_expect_tx_shared, mbarrier_init, mbarrier_try_wait_parity_shared
from max.gpu.primitives.block import prefix_sum as block_prefix_sum
from std.math import ceildiv, exp
from std.memory import Pointer, stack_allocation
from std.sys import inlined_assembly, size_of
from std.utils import IndexList

from .activation import DEFAULT_SWIGLU_ALPHA, DEFAULT_SWIGLU_LIMIT, clamped_swiglu_f32, is_gated
from .gpu_launch import pdl_attributes, pdl_begin

comptime GROUP_M = 8
comptime MAX_EXPERTS = 512  # the schedule lives in shared memory (pymoe's gate allows 512)


@fieldwise_init
struct TileConfig(ImplicitlyCopyable):
    """A block tile: BM x BN outputs (BN counts gate and up columns for the
    gated activations), K steps of BK, warps of WM x WN, STAGES buffers."""

    var bm: Int
    var bn: Int
    var bk: Int
    var wm: Int
    var wn: Int
    var stages: Int

    def threads(self) -> Int:
        return (self.bm // self.wm) * (self.bn // self.wn) * 32

    def smem_bytes(self, elem_bytes: Int) -> Int:
        return self.stages * (self.bm * self.bk + self.bk * self.bn) * elem_bytes


# Decode (a few rows per expert): weight-bandwidth bound, so 16-row tiles
# and many blocks in flight. Prefill: 4 warps of 64 x 64, in 64 x 128 tiles
# while experts have a few hundred rows (less padding in each expert's last
# tile) and 128 x 128 beyond. Chosen by timing the candidates on an H200 at
# the model presets' shapes (see docs/DESIGN.md, "The grouped GEMM").
comptime DECODE_TILE = TileConfig(16, 128, 64, 16, 32, 4)
# Few rows over many experts (2 * slots <= E: one token, or a handful): few
# blocks, each of which must keep more weight bytes in flight, so a K step of
# 128. Kernel-only on an H100 at 1 token (results/checks/
# 20261207-s20-decode-tiles-H100.log): Mixtral gate/up 0.186 -> 0.168 ms,
# down 0.095 -> 0.084, Qwen3-30B-A3B 3% / 1% faster, GPT-OSS-20B within 0.3%;
# at 16 Qwen3 tokens (2 * slots > E) it was 10% slower on the down projection.
comptime SPARSE_DECODE_TILE = TileConfig(16, 128, 128, 16, 32, 4)
# The router at decode (dense_gemm_gpu, <= 24 rows) is one or two column
# tiles over [d_model, E], so each block streams a large share of it: 64
# columns, K step 128, 8 stages. Same log, 1 and 16 rows: Qwen3-30B-A3B 15.4
# -> 12.5 us, GPT-OSS-20B 22.3 -> 16.9, Mixtral 30.3 -> 22.0, DeepSeek-V3
# 46.0 -> 34.5.
comptime ROUTER_DECODE_TILE = TileConfig(16, 64, 128, 16, 32, 8)
comptime MID_TILE = TileConfig(64, 128, 32, 32, 64, 4)
comptime PREFILL_TILE = TileConfig(128, 128, 32, 64, 64, 4)
# Average rows per expert in use up to which the decode / mid tile is used.
comptime DECODE_MAX_ROWS_PER_EXPERT = 24
comptime MID_MAX_ROWS_PER_EXPERT = 512


# Where cuBLAS per expert (gpu_gemm.mojo, after reading the offsets back: one
# stream sync) is faster than this kernel: few experts, each a large GEMM.
# Measured on an H200 at the model presets (bf16): Mixtral (E=8, 4096 x 14336)
# at 1024 and 4096 rows per expert, cuBLAS 4.9 and 18.6 ms, this kernel 9.3 and
# 33.5 ms; GPT-OSS-20B (E=32, 2880 x 2880) at 512 and 2048 rows per expert,
# 2.4 / 8.1 ms against 3.4 / 10.9 ms. Below 32 rows per expert this kernel won
# on both (Mixtral at 128 tokens: 1.01 against 1.02 ms), and at E=128 it won
# everywhere (Qwen3-30B-A3B: 1.6 / 5.1 ms against 5.8 / 10.2 ms at 4096 /
# 16384 tokens). No shape between 32 and 512 rows per expert was measured, so
# the threshold there is a guess. The files: docs/RESULTS.md, "The grouped GEMM".
# On Hopper the wgmma tile with TMA loads of W replaced this rule: measured on
# an H100 side by side (scripts/cublas_crossover_bench.mojo, cuBLAS with its
# gather and activation pass against grouped_gemm_gpu, the offsets given to
# cuBLAS on the host so its sync is not counted;
# results/checks/20261207-s22-cublas-crossover-H100.log), gate/up + down:
# GPT-OSS-20B at 128 / 512 / 2048 rows per expert 0.93 / 1.64 / 5.68 ms with
# cuBLAS against 0.71 / 1.64 / 5.49 ms; the E=8 presets small and medium
# (relu, 4096 and 16384 rows per expert) 1.19 / 14.9 against 0.89 / 13.1 ms;
# Mixtral at 4096 rows per expert 17.58 against 17.66 ms (a tie), but at 512
# and 1024 rows per expert cuBLAS is 7% and 5% faster (2.41 / 4.57 against
# 2.59 / 4.79 ms), the one place it still wins. There the layer keeps the
# grouped GEMM anyway: cuBLAS per expert reads the offsets back (a stream
# sync per layer call, and no device-graph capture). Other GPUs keep the rule
# measured against the mma.sync tiles (above).
# pymoe/ops.py mirrors these two constants and the Hopper exception
# (cublas_is_faster there decides which layers MoELayer.capture refuses, as
# this path syncs): change both together.
comptime CUBLAS_MAX_EXPERTS = 32
comptime CUBLAS_MIN_ROWS_PER_EXPERT = 512


def cublas_is_faster(ctx: DeviceContext, experts: Int, slots: Int) -> Bool:
    """Whether cuBLAS per expert runs the expert GEMMs instead of
    grouped_gemm_gpu for E experts and this many routed rows: never on Hopper,
    elsewhere from CUBLAS_MAX_EXPERTS and CUBLAS_MIN_ROWS_PER_EXPERT (see
    above)."""
    comptime if ctx.default_device_info == H100:
        return False
    return experts <= CUBLAS_MAX_EXPERTS and slots >= CUBLAS_MIN_ROWS_PER_EXPERT * experts


def _tensor_core_dtype[dtype: DType]() -> Bool:
    """The dtypes of the tensor-core tiles (16-bit inputs)."""
    return dtype == DType.bfloat16 or dtype == DType.float16


def grouped_gemm_supported[dtype: DType](
    k_dim: Int, n_out: Int, lda: Int, ldc: Int, experts: Int, *ptrs: Pointer[Scalar[dtype], MutAnyOrigin]
) -> Bool:
    """Whether grouped_gemm_gpu can run this product (see the file header)."""
    comptime if not _tensor_core_dtype[dtype]():
        return False
    if k_dim % 8 != 0 or n_out % 8 != 0 or lda % 8 != 0 or ldc % 8 != 0 or experts > MAX_EXPERTS:
        return False
    for p in ptrs:
        if Int(p) % 16 != 0:
            return False
    return True


def grouped_gemm_gpu[
    dtype: DType,
    activation: StaticString,
    gather: Bool,
    has_bias: Bool = False,
    alpha: Float32 = DEFAULT_SWIGLU_ALPHA,
    limit: Float32 = DEFAULT_SWIGLU_LIMIT,
](
    ctx: DeviceContext,
    c: Pointer[Scalar[dtype], MutAnyOrigin],
    ldc: Int,
    a: Pointer[Scalar[dtype], MutAnyOrigin],
    lda: Int,
    k_dim: Int,
    row_ids: Pointer[Int32, MutAnyOrigin],
    offsets: Pointer[Int32, MutAnyOrigin],
    experts: Int,
    slots: Int,
    w: Pointer[Scalar[dtype], MutAnyOrigin],
    n_w: Int,
    bias: Pointer[Scalar[dtype], MutAnyOrigin],
) raises:
    """C = act(A @ W[e] + bias[e]) over the expert groups (see the file header).

    Args:
        ctx: The device context (the op's stream).
        c: Output rows [offsets[E], n_out], row stride ldc; n_out = n_w / 2
            for the gated activations, n_w otherwise.
        ldc: Row stride of c.
        a: Input rows, row stride lda (k_dim columns used).
        lda: Row stride of a.
        k_dim: The reduction length.
        row_ids: [slots] source row of each grouped row (read with gather).
        offsets: [E + 1] expert offsets on the device.
        experts: E.
        slots: An upper bound of offsets[E] that the host knows.
        w: [E, k_dim, n_w] row-major.
        n_w: Columns of each w[e].
        bias: [E, n_w] (read with has_bias).
    """
    comptime if not _tensor_core_dtype[dtype]():
        # Never run: callers ask grouped_gemm_supported first, which says no to
        # other dtypes. This keeps the ops compiling for them (float32 takes
        # cuBLAS per expert).
        raise Error("grouped_gemm_gpu: 16-bit inputs only")
    else:
        if slots == 0:
            return
        var n_out = n_w // 2 if is_gated[activation]() else n_w
        # Rows per expert in use, on average: at most slots / min(E, slots).
        var rows_per_expert = slots // min(experts, slots)
        # Hopper only: measured there, and its 144 KB of shared memory is more
        # than many other GPUs give a block.
        comptime if ctx.default_device_info == H100:
            if 2 * slots <= experts:
                _grouped_gemm[dtype, SPARSE_DECODE_TILE, activation, gather, has_bias, alpha, limit](
                    ctx, c, ldc, a, lda, k_dim, row_ids, offsets, experts, slots, w, n_w, n_out, bias
                )
                return
        if rows_per_expert <= DECODE_MAX_ROWS_PER_EXPERT:
            _grouped_gemm[dtype, DECODE_TILE, activation, gather, has_bias, alpha, limit](
                ctx, c, ldc, a, lda, k_dim, row_ids, offsets, experts, slots, w, n_w, n_out, bias
            )
            return
        # Hopper (H100, H200: MAX's sm_90a target), known when MAX compiles the op
        # for the device. (_is_sm_9x() would ask about the host code's own target.)
        comptime if ctx.default_device_info == H100:
            if rows_per_expert >= WGMMA_MIN_ROWS_PER_EXPERT:
                _grouped_gemm_wgmma[dtype, 128, WG_BN, WG_STAGES, activation, gather, has_bias, alpha, limit, 1, not gather](
                    ctx, c, ldc, a, lda, k_dim, row_ids, offsets, experts, slots, w, n_w, n_out, bias
                )
            else:
                _grouped_gemm_wgmma[dtype, 64, WG_BN, WG_STAGES, activation, gather, has_bias, alpha, limit, 1, not gather](
                    ctx, c, ldc, a, lda, k_dim, row_ids, offsets, experts, slots, w, n_w, n_out, bias
                )
            return
        if rows_per_expert <= MID_MAX_ROWS_PER_EXPERT:
            _grouped_gemm[dtype, MID_TILE, activation, gather, has_bias, alpha, limit](
                ctx, c, ldc, a, lda, k_dim, row_ids, offsets, experts, slots, w, n_w, n_out, bias
            )
        else:
            _grouped_gemm[dtype, PREFILL_TILE, activation, gather, has_bias, alpha, limit](
                ctx, c, ldc, a, lda, k_dim, row_ids, offsets, experts, slots, w, n_w, n_out, bias
            )


def dense_gemm_gpu[dtype: DType, out_dtype: DType](
    ctx: DeviceContext,
    c: Pointer[Scalar[out_dtype], MutAnyOrigin],
    a: Pointer[Scalar[dtype], MutAnyOrigin],
    w: Pointer[Scalar[dtype], MutAnyOrigin],
    rows: Int,
    k_dim: Int,
    n: Int,
) raises:
    """C [rows, n] (out_dtype, float32 accumulation) = A [rows, k_dim] @ W
    [k_dim, n], all contiguous: the grouped GEMM with one group (the router's
    logits). Needs grouped_gemm_supported(k_dim, n, k_dim, n, 1, a, w)."""
    comptime if not _tensor_core_dtype[dtype]():
        # Never run: pymoe_router_logits asks grouped_gemm_supported first. This
        # keeps the op compiling for other dtypes.
        raise Error("dense_gemm_gpu: 16-bit inputs only")
    else:
        if rows == 0:
            return
        var no_ids = Pointer[Int32, MutAnyOrigin](unsafe_from_address=Int(a))  # not read: one dense group
        var no_bias = w
        if rows <= DECODE_MAX_ROWS_PER_EXPERT:
            # Hopper only, as SPARSE_DECODE_TILE (160 KB of shared memory).
            comptime if ctx.default_device_info == H100:
                _grouped_gemm[dtype, ROUTER_DECODE_TILE, "none", False, False, DEFAULT_SWIGLU_ALPHA, DEFAULT_SWIGLU_LIMIT, out_dtype, True](
                    ctx, c, n, a, k_dim, k_dim, no_ids, no_ids, 1, rows, w, n, n, no_bias
                )
            else:
                _grouped_gemm[dtype, DECODE_TILE, "none", False, False, DEFAULT_SWIGLU_ALPHA, DEFAULT_SWIGLU_LIMIT, out_dtype, True](
                    ctx, c, n, a, k_dim, k_dim, no_ids, no_ids, 1, rows, w, n, n, no_bias
                )
        else:
            _grouped_gemm[dtype, MID_TILE, "none", False, False, DEFAULT_SWIGLU_ALPHA, DEFAULT_SWIGLU_LIMIT, out_dtype, True](
                ctx, c, n, a, k_dim, k_dim, no_ids, no_ids, 1, rows, w, n, n, no_bias
            )


@always_inline
def _group_start[dense: Bool](offsets: Pointer[Int32, MutAnyOrigin], e: Int, rows: Int) -> Int:
    """Row where group e starts: offsets[e], or for one dense group of `rows`
    rows (offsets not read) 0 and rows."""
    comptime if dense:
        return 0 if e == 0 else rows
    else:
        return Int(offsets.unsafe_load(e))


@always_inline
def _swizzle_a[chunks_per_row: Int](row: Int, chunk: Int) -> Int:
    """The 16-byte chunk where (row, chunk) of an A tile lives, so that the
    8 rows of an ldmatrix read fall in 8 different 16-byte bank groups."""
    comptime if chunks_per_row >= 8:
        return row * chunks_per_row + (chunk ^ (row & 7))
    else:
        comptime assert chunks_per_row == 4, "BK must be 32 or a multiple of 64"
        return row * chunks_per_row + (chunk ^ ((row >> 1) & 3))


@always_inline
def _swizzle_b[chunks_per_row: Int](k: Int, chunk: Int) -> Int:
    """As _swizzle_a for the B tile [BK][BN] read by ldmatrix.trans."""
    return k * chunks_per_row + (chunk ^ (k & 7))


@always_inline
def _b_chunk[NI: Int, WN: Int, B_CPR: Int, GATED: Bool](wn: Int, f: Int) -> Int:
    """The B-tile chunk column of warp wn's n fragment f: gated warps hold
    their first NI/2 fragments in the gate half, the rest at the same
    columns of the up half."""
    comptime if GATED:
        comptime HALF = NI // 2
        if f < HALF:
            return (wn * (WN // 2) + f * 8) // 8
        return B_CPR // 2 + (wn * (WN // 2) + (f - HALF) * 8) // 8
    else:
        return (wn * WN + f * 8) // 8


@fieldwise_init
struct _BlockTile(ImplicitlyCopyable):
    """A block's output tile: its expert, first grouped row, rows used (<= BM)
    and column tile; valid is False for blocks past the real tile count."""

    var valid: Bool
    var expert: Int
    var row0: Int
    var rows: Int
    var n_tile: Int


@always_inline
def _block_tile[BM: Int, THREADS: Int, dense: Bool](
    offsets: Pointer[Int32, MutAnyOrigin], experts: Int, slots: Int, m_bound: Int, n_tiles: Int
) -> _BlockTile:
    """The tile schedule, built by every block from the E+1 offsets (see the
    file header): a block prefix sum of row tiles per expert in shared memory,
    this block's (row tile, column tile) GROUP_M row tiles at a time, and its
    expert by bisection. Every thread of the block must call it (barrier)."""
    var tid = Int(thread_idx.x)
    # sched[e] = row tiles of the experts before e.
    var sched = stack_allocation[MAX_EXPERTS + 1, Int32, address_space=AddressSpace.SHARED]()
    comptime PER_THREAD = ceildiv(MAX_EXPERTS, THREADS)
    var mine = Int32(0)
    comptime for i in range(PER_THREAD):
        var e = tid * PER_THREAD + i
        if e < experts:
            mine += Int32(ceildiv(_group_start[dense](offsets, e + 1, slots) - _group_start[dense](offsets, e, slots), BM))
    var before = block_prefix_sum[block_size=THREADS, exclusive=True](mine)
    comptime for i in range(PER_THREAD):
        var e = tid * PER_THREAD + i
        if e < experts:
            before += Int32(ceildiv(_group_start[dense](offsets, e + 1, slots) - _group_start[dense](offsets, e, slots), BM))
            sched.unsafe_store(e + 1, before)
    if tid == 0:
        sched.unsafe_store(0, Int32(0))
    barrier()

    var bid = Int(block_idx.x)
    var group_blocks = GROUP_M * n_tiles
    var first_m = (bid // group_blocks) * GROUP_M
    var group_m = min(GROUP_M, m_bound - first_m)
    var m_tile = first_m + (bid % group_blocks) % group_m
    var n_tile = (bid % group_blocks) // group_m
    if m_tile >= Int(sched.unsafe_load(experts)):
        return _BlockTile(False, 0, 0, 0, n_tile)
    # Its expert: the last e with sched[e] <= m_tile (empty experts share
    # their start with the next one).
    var lo = 0
    var hi = experts
    while hi - lo > 1:
        var mid = (lo + hi) // 2
        if Int(sched.unsafe_load(mid)) <= m_tile:
            lo = mid
        else:
            hi = mid
    var row0 = _group_start[dense](offsets, lo, slots) + (m_tile - Int(sched.unsafe_load(lo))) * BM
    var rows = min(BM, _group_start[dense](offsets, lo + 1, slots) - row0)
    return _BlockTile(True, lo, row0, rows, n_tile)


@always_inline
def _epilogue_pair[
    activation: StaticString, has_bias: Bool, alpha: Float32, limit: Float32, dtype: DType, out_dtype: DType
](
    v: SIMD[DType.float32, 2],
    up: SIMD[DType.float32, 2],
    bias: Pointer[Scalar[dtype], MutAnyOrigin],
    bias_at: Int,
    up_bias_at: Int,
) -> SIMD[out_dtype, 2]:
    """The fused epilogue of two adjacent outputs: bias (at bias_at, and at
    up_bias_at for the gated activations' up half), the activation in float32,
    the result in the output dtype."""
    var x = v
    var u = up
    comptime if has_bias:
        x += bias.unsafe_load[width=2](bias_at).cast[DType.float32]()
        comptime if is_gated[activation]():
            u += bias.unsafe_load[width=2](up_bias_at).cast[DType.float32]()
    comptime if activation == "relu":
        x = max(x, SIMD[DType.float32, 2](0))
    elif activation == "silu":
        x = x / (1.0 + exp(-x))
    elif activation == "swiglu":
        x = x / (1.0 + exp(-x)) * u
    elif activation == "clamped_swiglu":
        x = clamped_swiglu_f32[alpha, limit, 2](x, u)
    return x.cast[out_dtype]()


@always_inline
def _store_pair[
    activation: StaticString, has_bias: Bool, alpha: Float32, limit: Float32, dtype: DType, out_dtype: DType
](
    c: Pointer[Scalar[out_dtype], MutAnyOrigin],
    at: Int,
    v: SIMD[DType.float32, 2],
    up: SIMD[DType.float32, 2],
    bias: Pointer[Scalar[dtype], MutAnyOrigin],
    bias_at: Int,
    up_bias_at: Int,
):
    """_epilogue_pair, then one 2-wide store at c[at]."""
    var x = _epilogue_pair[activation, has_bias, alpha, limit, dtype, out_dtype](v, up, bias, bias_at, up_bias_at)
    c.unsafe_store[alignment = 2 * size_of[Scalar[out_dtype]]()](at, x)


def _grouped_gemm[
    dtype: DType,
    tile: TileConfig,
    activation: StaticString,
    gather: Bool,
    has_bias: Bool,
    alpha: Float32,
    limit: Float32,
    out_dtype: DType = dtype,
    dense: Bool = False,
](
    ctx: DeviceContext,
    c: Pointer[Scalar[out_dtype], MutAnyOrigin],
    ldc: Int,
    a: Pointer[Scalar[dtype], MutAnyOrigin],
    lda: Int,
    k_dim: Int,
    row_ids: Pointer[Int32, MutAnyOrigin],
    offsets: Pointer[Int32, MutAnyOrigin],
    experts: Int,
    slots: Int,
    w: Pointer[Scalar[dtype], MutAnyOrigin],
    n_w: Int,
    n_out: Int,
    bias: Pointer[Scalar[dtype], MutAnyOrigin],
) raises:
    comptime BM = tile.bm
    comptime BN = tile.bn
    comptime BK = tile.bk
    comptime WM = tile.wm
    comptime WN = tile.wn
    comptime STAGES = tile.stages
    comptime THREADS = tile.threads()
    comptime WARPS_N = BN // WN
    comptime MI = WM // 16  # m16 fragments per warp
    comptime NI = WN // 8  # n8 fragments per warp
    comptime GATED = is_gated[activation]()
    # Output columns per block: the gated blocks hold gate and up halves.
    comptime BN_OUT = BN // 2 if GATED else BN
    comptime A_CPR = BK // 8  # 16-byte chunks per row of the A tile
    comptime B_CPR = BN // 8
    comptime A_CHUNKS = BM * A_CPR // THREADS  # per thread
    comptime B_CHUNKS = BK * B_CPR // THREADS
    comptime A_STAGE = BM * BK
    comptime B_STAGE = BK * BN
    comptime assert BM % WM == 0 and BN % WN == 0 and WM % 16 == 0 and BK % 16 == 0, "tile shape"
    comptime assert BM * A_CPR % THREADS == 0 and BK * B_CPR % THREADS == 0, "loads split evenly"
    comptime assert B_CPR >= 8, "BN >= 64 (the B swizzle spans 8 chunks)"
    comptime assert NI % 4 == 0 if GATED else NI % 2 == 0, "n fragments come in ldmatrix.x4 pairs"
    comptime ELEM = size_of[Scalar[dtype]]()
    comptime assert ELEM == 2, "tensor-core path: 16-bit inputs"

    var m_bound = min(slots, (slots + experts * (BM - 1)) // BM)
    var n_tiles = ceildiv(n_out, BN_OUT)
    var grid = m_bound * n_tiles
    if grid == 0:
        return
    var smem_bytes = tile.smem_bytes(ELEM)
    var n_k = Int64(k_dim)
    var n_lda = Int64(lda)
    var n_ldc = Int64(ldc)
    var n_nw = Int64(n_w)
    var n_nout = Int64(n_out)
    var n_e = Int64(experts)
    var n_mb = Int64(m_bound)
    var n_nt = Int64(n_tiles)
    var n_slots = Int64(slots)

    def kernel() {
        var c, var a, var row_ids, var offsets, var w, var bias,
        var n_k, var n_lda, var n_ldc, var n_nw, var n_nout, var n_e, var n_mb, var n_nt, var n_slots,
    }:
        pdl_begin()
        var tid = Int(thread_idx.x)
        var lane = Int(lane_id())
        var warp = Int(warp_id())
        var wm = warp // WARPS_N
        var wn = warp % WARPS_N
        var E = Int(n_e)
        var K = Int(n_k)
        var S = Int(n_slots)

        var tile = _block_tile[BM, THREADS, dense](offsets, E, S, Int(n_mb), Int(n_nt))
        if not tile.valid:
            return
        var e = tile.expert
        var row0 = tile.row0
        var rows_here = tile.rows
        var col0 = tile.n_tile * BN_OUT  # first output column
        var N = Int(n_nw)
        var NOUT = Int(n_nout)
        var w_e = w.unsafe_offset(e * K * N)

        var smem = external_memory[
            Scalar[dtype], address_space=AddressSpace.SHARED, alignment=128, name="pymoe_grouped_gemm_smem"
        ]()
        var a_smem = smem
        var b_smem = smem.unsafe_offset(STAGES * A_STAGE)

        # Each thread's source rows (A) and columns (B), fixed over the K loop.
        var a_src = Array[Int, A_CHUNKS](fill=0)
        var a_dst = Array[Int, A_CHUNKS](fill=0)
        var a_col = Array[Int, A_CHUNKS](fill=0)
        comptime for i in range(A_CHUNKS):
            var q = tid + i * THREADS
            var r = q // A_CPR
            var ch = q % A_CPR
            var grouped_row = row0 + min(r, rows_here - 1)
            var src_row = grouped_row
            comptime if gather:
                src_row = Int(row_ids.unsafe_load(grouped_row))
            a_src[i] = src_row * Int(n_lda) + ch * 8
            a_col[i] = ch * 8
            a_dst[i] = _swizzle_a[A_CPR](r, ch) * 8
        var b_src = Array[Int, B_CHUNKS](fill=0)
        var b_dst = Array[Int, B_CHUNKS](fill=0)
        var b_k = Array[Int, B_CHUNKS](fill=0)
        var b_ok = Array[Bool, B_CHUNKS](fill=False)
        comptime for i in range(B_CHUNKS):
            var q = tid + i * THREADS
            var kr = q // B_CPR
            var ch = q % B_CPR
            var col: Int
            comptime if GATED:
                # Chunks [0, BN/16) are gate columns, the rest the same up columns.
                var half = ch // (B_CPR // 2)
                var out_col = col0 + (ch % (B_CPR // 2)) * 8
                b_ok[i] = out_col < NOUT
                col = half * NOUT + out_col
            else:
                col = col0 + ch * 8
                b_ok[i] = col < NOUT
            b_src[i] = kr * N + col
            b_k[i] = kr
            b_dst[i] = _swizzle_b[B_CPR](kr, ch) * 8

        var k_tiles = ceildiv(K, BK)
        var acc = Array[SIMD[DType.float32, 4], MI * NI](fill=SIMD[DType.float32, 4](0))
        # Step s loads K tile s and computes K tile s - (STAGES - 1): the
        # first STAGES - 1 steps only load.
        for step in range(k_tiles + STAGES - 1):
            var kt = step - (STAGES - 1)
            if kt >= 0:
                # Tile kt has landed, and every warp is done with tile kt - 1,
                # whose buffer this step refills.
                async_copy_wait_group(Int32(STAGES - 2))
                barrier()
            if step < k_tiles:
                var k0 = step * BK
                var a_stage = a_smem.unsafe_offset((step % STAGES) * A_STAGE)
                var b_stage = b_smem.unsafe_offset((step % STAGES) * B_STAGE)
                comptime for i in range(A_CHUNKS):
                    var dst = a_stage.unsafe_offset(a_dst[i])
                    if k0 + a_col[i] < K:
                        async_copy[16](
                            a.unsafe_offset(a_src[i] + k0).unsafe_address_space_cast[AddressSpace.GLOBAL](), dst
                        )
                    else:
                        dst.unsafe_store[alignment=16](SIMD[dtype, 8](0))
                comptime for i in range(B_CHUNKS):
                    var dst = b_stage.unsafe_offset(b_dst[i])
                    if b_ok[i] and k0 + b_k[i] < K:
                        async_copy[16](
                            w_e.unsafe_offset(b_src[i] + k0 * N).unsafe_address_space_cast[AddressSpace.GLOBAL](),
                            dst,
                        )
                    else:
                        dst.unsafe_store[alignment=16](SIMD[dtype, 8](0))
            async_copy_commit_group()
            if kt < 0:
                continue
            var a_stage = a_smem.unsafe_offset((kt % STAGES) * A_STAGE)
            var b_stage = b_smem.unsafe_offset((kt % STAGES) * B_STAGE)
            comptime for kk in range(BK // 16):
                var a_frag = Array[SIMD[dtype, 8], MI](fill=SIMD[dtype, 8](0))
                comptime for mi in range(MI):
                    var r = wm * WM + mi * 16 + (lane % 16)
                    var ch = kk * 2 + lane // 16
                    a_frag[mi] = ld_matrix[8](a_stage.unsafe_offset(_swizzle_a[A_CPR](r, ch) * 8))
                comptime for fp in range(NI // 2):
                    var kr = kk * 16 + (lane % 8) + ((lane // 8) % 2) * 8
                    var ch = _b_chunk[NI, WN, B_CPR, GATED](wn, fp * 2) + lane // 16
                    var b = ld_matrix[8, transpose=True](b_stage.unsafe_offset(_swizzle_b[B_CPR](kr, ch) * 8))
                    comptime for mi in range(MI):
                        mma(acc[mi * NI + fp * 2], a_frag[mi], b.slice[4, offset=0](), acc[mi * NI + fp * 2])
                        mma(acc[mi * NI + fp * 2 + 1], a_frag[mi], b.slice[4, offset=4](), acc[mi * NI + fp * 2 + 1])
        async_copy_wait_group(Int32(0))

        # Epilogue: bias, activation, 2 columns per store.
        comptime OUT_FRAGS = NI // 2 if GATED else NI
        comptime for mi in range(MI):
            comptime for f in range(OUT_FRAGS):
                var col = col0 + (wn * (WN // 2) if GATED else wn * WN) + f * 8 + (lane % 4) * 2
                if col < NOUT:
                    comptime for half in range(2):
                        var r = wm * WM + mi * 16 + lane // 4 + half * 8
                        if r < rows_here:
                            var up = SIMD[DType.float32, 2](0)
                            comptime if GATED:
                                up = acc[mi * NI + f + NI // 2].slice[2, offset=half * 2]()
                            _store_pair[activation, has_bias, alpha, limit](
                                c, (row0 + r) * Int(n_ldc) + col, acc[mi * NI + f].slice[2, offset=half * 2](), up,
                                bias, e * N + col, e * N + NOUT + col,
                            )

    ctx.enqueue_function(
        kernel,
        attributes=pdl_attributes(),
        grid_dim=grid,
        block_dim=THREADS,
        shared_mem_bytes=smem_bytes,
        func_attribute=FuncAttribute.MAX_DYNAMIC_SHARED_SIZE_BYTES(UInt32(smem_bytes)),
    )


# ---------------------------------------------------------------------------
# Hopper (sm_90a): the same schedule with a wgmma mainloop.
#
# Two warpgroups (256 threads) own a 128 x BN output tile, 64 rows each, and
# issue wgmma.m64nBNk16 with both operands in shared memory. The operand tiles
# are stored in the 128-byte-swizzled layouts that wgmma's descriptors name:
#   A [128 rows][64 k] K-major: row r at r * 128 bytes, its 16-byte chunk c at
#     chunk c ^ (r % 8) (an "atom" is 8 rows, 1024 bytes: SBO = 1024);
#   B [BK k][BN n] as it lies in memory (N contiguous, "MN-major"): BN/64
#     blocks of 64 columns, each [64 k][128 bytes], chunk c of k row kr at
#     c ^ (kr % 8) (SBO = 1024 between 8-row groups, LBO = one block).
# cp.async fills the A tile (the token rows are gathered, as above, so any
# row count works); TMA fills the W tile: one thread issues BN/64 boxes of
# [64 k][64 n] per stage, W seen as a 3D tensor (E, K, N) so that a box never
# reads into the next expert and K tails and the up half's N edge are
# zero-filled by the hardware (a gate box past n_out reads up columns, which
# feed only output columns >= n_out, never stored), and completes on the
# stage's mbarrier. Measured on an H100 against every thread loading W with
# cp.async (results/checks/20261207-s22-kernels-H100.log, scripts/wgmma_tma_bench.mojo of commit 794bb35,
# bit-identical outputs): Qwen3-30B-A3B gate/up at 16384 tokens 1.51 -> 1.30
# ms, down 0.92 -> 0.81 ms, Mixtral gate/up 14.1 -> 11.2 ms (686 TFLOP/s),
# down 6.67 -> 5.15 ms. Every warpgroup multiplies; one wgmma group stays in
# flight while the next tiles load: at step kt the buffers of tiles kt+1 ..
# kt+STAGES-2 are loading and tile kt-1 may still be in the tensor cores.


comptime WG_BK = 64
# 128 x 256 tiles, 4 buffers (192 KB: one block per SM). Measured on an H100
# against the mma.sync tiles (.gpucheck harness, same inputs, bit-identical
# outputs): Qwen3-30B-A3B gate/up at 256 / 1024 rows per expert 0.77 -> 0.54 /
# 2.72 -> 1.69 ms, down 0.44 -> 0.34 / 1.52 -> 1.10 ms; Mixtral gate/up at
# 1024 rows per expert 5.75 -> 3.51 ms (549 TFLOP/s). 128 x 128 tiles were
# slower, with 5 buffers (2.33 ms at Qwen3 1024 rows) and with 3 (96 KB, two
# blocks per SM: 2.19 against 1.63 ms, harness run 2).
comptime WG_BN = 256
comptime WG_STAGES = 4
# On Hopper every grouped GEMM past the decode tiles takes a wgmma tile: 128
# rows from this many rows per expert (on average) on, 64 rows below (most of
# 128 rows would be padding). Measured (same harness) on Qwen3 gate/up: at 64
# rows per expert the 128-row tile 0.33 -> 0.31 ms against the mma.sync mid
# tile, at 128 0.45 -> 0.37. The 64-row tile against the mma.sync mid tile
# (results/checks/20261207-s23-kernels-H100.log): at 32 rows per expert Mixtral
# gate/up 0.722 -> 0.658 ms, down 0.352 -> 0.320, GPT-OSS-20B 1.02x / 1.14x,
# Qwen3 gate/up 1.04x, down 0.99x; at 64 rows Mixtral 1.17x / 1.28x (where the
# 128-row tile is faster on Qwen3: 0.314 against 0.331 ms).
comptime WGMMA_MIN_ROWS_PER_EXPERT = 64


@always_inline
def _wgmma_desc[dtype: DType](smem_address: Int, lbo: Int, sbo: Int) -> WGMMADescriptor[dtype]:
    """A 128-byte-swizzle wgmma operand descriptor (the PTX ISA's matrix
    descriptor: shared address, LBO and SBO in 16-byte units, layout type 1)."""
    var d = ((Int64(smem_address) & 0x3FFFF) >> 4) | ((Int64(lbo) >> 4) << 16) | ((Int64(sbo) >> 4) << 32) | (Int64(1) << 62)
    return WGMMADescriptor[dtype](d)


@__llvm_arg_metadata(w_desc, `nvvm.grid_constant`)
@__llvm_arg_metadata(a_desc, `nvvm.grid_constant`)
def _grouped_gemm_wgmma_kernel[
    dtype: DType,
    BM: Int,
    BN: Int,
    STAGES: Int,
    activation: StaticString,
    gather: Bool,
    has_bias: Bool,
    alpha: Float32,
    limit: Float32,
    WGMMA_IN_FLIGHT: Int,
    A_BY_TMA: Bool,
](
    w_desc: TMADescriptor,
    a_desc: TMADescriptor,
    c: Pointer[Scalar[dtype], MutAnyOrigin],
    a: Pointer[Scalar[dtype], MutAnyOrigin],
    row_ids: Pointer[Int32, MutAnyOrigin],
    offsets: Pointer[Int32, MutAnyOrigin],
    bias: Pointer[Scalar[dtype], MutAnyOrigin],
    n_k: Int64,
    n_lda: Int64,
    n_ldc: Int64,
    n_nw: Int64,
    n_nout: Int64,
    n_e: Int64,
    n_mb: Int64,
    n_nt: Int64,
    n_slots: Int64,
):
    """The wgmma tile's kernel (see the section comment). A plain function,
    not a closure: the TMA descriptors must reach it as grid-constant kernel
    parameters (their addresses are what the copies name). With A_BY_TMA the
    A rows (not gathered: rows row0.. of a) come by TMA too, one [BM][64] box
    per stage on the same mbarrier, and no thread issues cp.async; a_desc is
    read only then."""
    comptime BK = WG_BK
    comptime THREADS = BM * 2  # a warpgroup (128 threads) per 64 rows
    comptime GATED = is_gated[activation]()
    comptime BN_OUT = BN // 2 if GATED else BN
    comptime NB = BN // 64  # 64-column blocks (TMA boxes) of the B tile
    comptime A_STAGE = BM * BK
    comptime B_STAGE = BK * BN
    comptime A_CHUNKS = BM * (BK // 8) // THREADS
    comptime ACC = BN // 2  # float32 accumulators per thread (m64 x BN / 128)
    comptime NF = BN // 8  # n8 fragments
    comptime assert WGMMA_IN_FLIGHT == 0 or WGMMA_IN_FLIGHT == 1, "0 or 1 wgmma groups in flight"
    comptime assert STAGES - 1 - WGMMA_IN_FLIGHT >= 1, "at least one K tile loads ahead"
    pdl_begin()
    var tid = Int(thread_idx.x)
    var lane = Int(lane_id())
    var warp = Int(warp_id())
    var wg = warp // 4
    var E = Int(n_e)
    var K = Int(n_k)
    var S = Int(n_slots)

    # One mbarrier per stage: the W boxes of a stage complete on it.
    var w_ready = stack_allocation[STAGES, Int64, address_space=AddressSpace.SHARED, alignment=8]()
    if tid == 0:
        prefetch_tma_descriptor(Pointer(to=w_desc).unsafe_bitcast[NoneType]())
        comptime if A_BY_TMA:
            prefetch_tma_descriptor(Pointer(to=a_desc).unsafe_bitcast[NoneType]())
        comptime for st in range(STAGES):
            mbarrier_init(w_ready.unsafe_offset(st), Int32(1))
    # (_block_tile's barriers make the initialised mbarriers visible to all.)
    var tile = _block_tile[BM, THREADS, False](offsets, E, S, Int(n_mb), Int(n_nt))
    if not tile.valid:
        return
    var e = tile.expert
    var row0 = tile.row0
    var rows_here = tile.rows
    var col0 = tile.n_tile * BN_OUT
    var N = Int(n_nw)
    var NOUT = Int(n_nout)

    var raw = external_memory[
        Scalar[dtype], address_space=AddressSpace.SHARED, alignment=1024, name="pymoe_grouped_gemm_smem"
    ]()
    # wgmma's swizzle works on address bits: tiles start on 1024 bytes.
    var smem = raw.unsafe_offset(((1024 - Int(raw) % 1024) % 1024) // 2)
    var a_smem = smem
    var b_smem = smem.unsafe_offset(STAGES * A_STAGE)

    var a_src = Array[Int, A_CHUNKS](fill=0)
    comptime if not A_BY_TMA:
        comptime for i in range(A_CHUNKS):
            var q = tid + i * THREADS
            var grouped_row = row0 + min(q // 8, rows_here - 1)
            var src_row = grouped_row
            comptime if gather:
                src_row = Int(row_ids.unsafe_load(grouped_row))
            a_src[i] = src_row * Int(n_lda) + (q % 8) * 8

    var k_tiles = ceildiv(K, BK)
    # WGMMA_IN_FLIGHT (0 or 1) wgmma groups stay in flight past a step, so
    # the buffer a step refills is that of tile kt - 1 - WGMMA_IN_FLIGHT:
    # one more tile loads ahead with 0, the tensor cores idle between
    # steps; 1 overlaps them. Measured on an H100 (harness run 2), 0 is
    # 1.2-1.3x slower (Qwen3 gate/up at 1024 rows 2.03 against 1.63 ms).
    comptime LOOKAHEAD = STAGES - 1 - WGMMA_IN_FLIGHT
    var acc = SIMD[DType.float32, ACC](0)
    # Step s loads K tile s and multiplies K tile kt = s - LOOKAHEAD.
    for step in range(k_tiles + LOOKAHEAD):
        var kt = step - LOOKAHEAD
        if kt >= 0:
            # Tile kt has landed for every thread (its A by each thread's
            # cp.async, its W on the mbarrier), and (each thread having waited
            # for all but WGMMA_IN_FLIGHT wgmma groups) the buffer this step
            # refills is free. cp.async writes through the generic proxy and
            # wgmma reads through the async one: the proxy fence orders them.
            async_copy_wait_group(Int32(LOOKAHEAD - 1))
            mbarrier_try_wait_parity_shared(w_ready.unsafe_offset(kt % STAGES), Int32((kt // STAGES) & 1), Int32(10000000))
            inlined_assembly["fence.proxy.async.shared::cta;", NoneType, constraints="~{memory}", has_side_effect=True]()
            barrier()
        if step < k_tiles:
            var k0 = step * BK
            var st = step % STAGES
            var a_stage = a_smem.unsafe_offset(st * A_STAGE)
            var b_stage = b_smem.unsafe_offset(st * B_STAGE)
            comptime if not A_BY_TMA:
                comptime for i in range(A_CHUNKS):
                    var q = tid + i * THREADS
                    var r = q // 8
                    var ch = q % 8
                    var dst = a_stage.unsafe_offset((r * 8 + (ch ^ (r & 7))) * 8)
                    if k0 + ch * 8 < K:
                        async_copy[16](a.unsafe_offset(a_src[i] + k0).unsafe_address_space_cast[AddressSpace.GLOBAL](), dst)
                    else:
                        dst.unsafe_store[alignment=16](SIMD[dtype, 8](0))
            if tid == 0:
                comptime TX_BYTES = (B_STAGE + (A_STAGE if A_BY_TMA else 0)) * size_of[Scalar[dtype]]()
                mbarrier_arrive_expect_tx_shared(w_ready.unsafe_offset(st), Int32(TX_BYTES))
                comptime if A_BY_TMA:
                    # Rows past the tensor (and the K tail) are zero-filled; rows of the
                    # next expert feed output rows >= rows_here, never stored.
                    cp_async_bulk_tensor_shared_cluster_global(
                        a_stage, Pointer(to=a_desc).unsafe_bitcast[NoneType](), w_ready.unsafe_offset(st),
                        IndexList[2](k0, row0),
                    )
                comptime for blk in range(NB):
                    var col: Int
                    comptime if GATED:
                        # Blocks [0, NB/2) hold gate columns, the rest the same up columns.
                        col = (blk // (NB // 2)) * NOUT + col0 + (blk % (NB // 2)) * 64
                    else:
                        col = col0 + blk * 64
                    cp_async_bulk_tensor_shared_cluster_global(
                        b_stage.unsafe_offset(blk * (BK * 64)),
                        Pointer(to=w_desc).unsafe_bitcast[NoneType](),
                        w_ready.unsafe_offset(st),
                        IndexList[3](col, k0, e),
                    )
        async_copy_commit_group()
        if kt < 0:
            continue
        # A warpgroup whose 64 rows all lie past the expert's (the second one in
        # an expert's ragged last row tile of at most 64 rows: about half of
        # GPT-OSS-120B's experts at 512 +- 23 rows have one) issues no wgmma:
        # its outputs are never stored, and the tensor cores it would share go
        # to the first. The branch is uniform per warpgroup, as wgmma needs;
        # the loads and barriers above stay the same for every thread.
        if wg * 64 >= rows_here:
            continue
        var a_addr = Int(a_smem.unsafe_offset((kt % STAGES) * A_STAGE + wg * 64 * BK))
        var b_addr = Int(b_smem.unsafe_offset((kt % STAGES) * B_STAGE))
        wgmma_fence_aligned()
        comptime for kk in range(BK // 16):
            # K step kk: 32 bytes into each A row; 16 k rows of 128 bytes into B.
            var da = _wgmma_desc[dtype](a_addr + kk * 32, 16, 1024)
            var db = _wgmma_desc[dtype](b_addr + kk * 16 * 128, BK * 128, 1024)
            acc = wgmma_async[64, BN, 16, DType.float32, ACC, a_type=dtype, b_type=dtype, layout_b="row"](da, db, acc)
        wgmma_commit_group_sync()
        wgmma_wait_group_sync[WGMMA_IN_FLIGHT]()
    wgmma_wait_group_sync[0]()
    async_copy_wait_group(Int32(0))

    # Epilogue. Fragment f (n8 block) of this thread: registers 4f..4f+3,
    # rows lane/4 and lane/4 + 8 of the warp's 16, columns f*8 + (lane%4)*2 + {0,1}.
    comptime OUT_FRAGS = NF // 2 if GATED else NF
    var warp_row = wg * 64 + (warp % 4) * 16 + lane // 4
    # The output tile goes through shared memory (the drained stage buffers),
    # so that global stores are whole 16-byte chunks of a row instead of
    # 4-byte pairs scattered over 8 rows: measured on an H100 (harness run
    # 2), Qwen3-30B-A3B down 1.12 -> 0.97 ms, gate/up and Mixtral gate/up
    # within 1.5%. Rows are padded by 8 elements, so the 8 rows of a
    # fragment store fall in different banks.
    comptime ROW = BN_OUT + 8
    comptime assert BM * ROW * 2 <= STAGES * (A_STAGE + B_STAGE) * 2, "the output tile fits the stage buffers"
    barrier()  # every warpgroup is past its last wgmma read of the buffers
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
                        _epilogue_pair[activation, has_bias, alpha, limit, dtype, dtype](
                            acc.slice[2, offset = f * 4 + half * 2](), up, bias, e * N + col0 + lc,
                            e * N + NOUT + col0 + lc,
                        ),
                    )
    barrier()
    comptime CPR = BN_OUT // 8
    for q in range(tid, BM * CPR, THREADS):
        var r = q // CPR
        var lc = (q % CPR) * 8
        if r < rows_here and col0 + lc < NOUT:
            c.unsafe_store[alignment=16](
                (row0 + r) * Int(n_ldc) + col0 + lc, smem.unsafe_load[width=8, alignment=16](r * ROW + lc)
            )


def _grouped_gemm_wgmma[
    dtype: DType,
    BM: Int,
    BN: Int,
    STAGES: Int,
    activation: StaticString,
    gather: Bool,
    has_bias: Bool,
    alpha: Float32,
    limit: Float32,
    WGMMA_IN_FLIGHT: Int = 1,
    A_BY_TMA: Bool = False,
](
    ctx: DeviceContext,
    c: Pointer[Scalar[dtype], MutAnyOrigin],
    ldc: Int,
    a: Pointer[Scalar[dtype], MutAnyOrigin],
    lda: Int,
    k_dim: Int,
    row_ids: Pointer[Int32, MutAnyOrigin],
    offsets: Pointer[Int32, MutAnyOrigin],
    experts: Int,
    slots: Int,
    w: Pointer[Scalar[dtype], MutAnyOrigin],
    n_w: Int,
    n_out: Int,
    bias: Pointer[Scalar[dtype], MutAnyOrigin],
) raises:
    """Launches the wgmma tile over the expert groups (grouped_gemm_gpu's
    arguments). W's TMA descriptor is built on the host for each call (a
    host-side encode; W must be 16-byte aligned with n_w a multiple of 8, as
    grouped_gemm_supported requires)."""
    comptime GATED = is_gated[activation]()
    comptime BN_OUT = BN // 2 if GATED else BN
    comptime assert BN % 128 == 0 and BN <= 256, "BN: 128 or 256 (gate and up halves of 64-column blocks)"
    comptime assert BM == 64 or BM == 128, "BM: one or two warpgroups of 64 rows"
    comptime assert size_of[Scalar[dtype]]() == 2, "tensor-core path: 16-bit inputs"
    comptime assert not (A_BY_TMA and gather), "gathered A rows come by cp.async (Hopper's TMA has no row gather)"
    comptime SMEM = STAGES * (BM * WG_BK + WG_BK * BN) * 2 + 1024  # + alignment slack

    var m_bound = min(slots, (slots + experts * (BM - 1)) // BM)
    var n_tiles = ceildiv(n_out, BN_OUT)
    var grid = m_bound * n_tiles
    if grid == 0:
        return
    # W as (E, K, N), box [1][WG_BK][64] (128 bytes of N: the swizzle span).
    var w_desc = create_tma_descriptor[dtype, 3, TensorMapSwizzle.SWIZZLE_128B](
        DeviceBuffer[dtype](ctx, w, 1, owning=False),
        IndexList[3](experts, k_dim, n_w),
        IndexList[3](k_dim * n_w, n_w, 1),
        IndexList[3](1, WG_BK, 64),
    )
    # A as (slots, K) with row stride lda, box [BM][64]; without A_BY_TMA the
    # kernel never reads it (W's descriptor stands in).
    var a_desc = w_desc
    comptime if A_BY_TMA:
        a_desc = create_tma_descriptor[dtype, 2, TensorMapSwizzle.SWIZZLE_128B](
            DeviceBuffer[dtype](ctx, a, 1, owning=False),
            IndexList[2](slots, k_dim),
            IndexList[2](lda, 1),
            IndexList[2](BM, WG_BK),
        )
    ctx.enqueue_function[
        _grouped_gemm_wgmma_kernel[
            dtype, BM, BN, STAGES, activation, gather, has_bias, alpha, limit, WGMMA_IN_FLIGHT, A_BY_TMA
        ]
    ](
        w_desc, a_desc, c, a, row_ids, offsets, bias,
        Int64(k_dim), Int64(lda), Int64(ldc), Int64(n_w), Int64(n_out), Int64(experts), Int64(m_bound),
        Int64(n_tiles), Int64(slots),
        attributes=pdl_attributes(),
        grid_dim=grid,
        block_dim=BM * 2,
        shared_mem_bytes=SMEM,
        func_attribute=FuncAttribute.MAX_DYNAMIC_SHARED_SIZE_BYTES(UInt32(SMEM)),
    )
