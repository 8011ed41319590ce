# Grouped GEMM over the ragged expert groups, with an optional fused activation.
#
#   for each expert e, for each row r in [expert_offsets[e], expert_offsets[e+1]):
#       a_r        = x[row_ids[r]] if gather else x[r]
#       output[r]  = act(a_r @ w[e])
#
# Shapes: x [R, K], row_ids [M] int32, expert_offsets [E+1] int32,
# w [E, K, N] (row-major, so x @ w[e] reads w[e] along N), output [M, N_out].
# Activations (compile-time): "none", "relu", "silu" with N_out = N, and
# "swiglu", where w[e] = [W_gate | W_up] along N and
# output[r] = silu(a_r @ W_gate) * (a_r @ W_up), N_out = N / 2.
# Rows from expert_offsets[E] to M (slots dropped by the capacity) are zeroed.
#
# The body, expert_matmul_cpu, is also called by moe_ffn.mojo, which writes
# into the layer's pooled workspaces; it leaves rows past expert_offsets[E]
# alone (nothing reads them there), so only the registered op zeroes them.
#
# CPU schedule (the BLIS layering, so both weights and activations stream
# through the caches once per block instead of once per output tile):
# - jobs are (expert, block of MC rows, block of NC columns), spread over the
#   worker threads, so prefill (many rows per expert) and decode (a few rows,
#   wide columns) both keep every core busy;
# - inside a job, K is cut into KC-deep slices. For each slice the job packs
#   the weight block (KC x NC) into NR-wide float32 column panels in the
#   order the micro-kernel reads them. Packing turns the weight reads into
#   one contiguous stream per row (the unpacked access jumps a whole weight
#   row, i.e. a page, per step), pads ragged edges with zeros so the
#   micro-kernel never needs a scalar tail, and converts bf16 once instead of
#   in the inner loop. Activation rows are not packed: the micro-kernel reads
#   them in place (through row_ids when gathering), each row a contiguous
#   stream along K;
# - the micro-kernel keeps MR x 2 SIMD vectors of float32 accumulators in
#   registers (12 of the 16 AVX2 registers); each k step loads two weight
#   vectors and broadcasts MR activations. A weight panel (KC x NR) stays in
#   cache while the micro-kernel walks the MC rows;
# - partial sums over K slices wait in a per-job float32 scratch tile; the
#   activation is applied when the last slice finishes;
# - a block's rows go in tiles of MR, then one of 4 or 2 rows, so a few rows
#   (decode) do not pay for a whole MR tile of padding.
# Decode schedule, when no expert has more than DECODE_ROWS rows: each weight
# is used by a few rows only, so the time goes into reading the weights, and
# packing a block and then computing on it would leave the memory idle
# during the FMAs and the FMAs idle during the packing. Instead the blocks are
# small (DECODE_BLOCK panel-rows, so two sit in L2), and while a block is
# computed the first tile of each panel also packs its share of the next
# block (this job's next slice, or the worker's next job's first), one
# panel-row per k step, with a prefetch PIPELINE_PREFETCH_ROWS rows ahead:
# the reads that go to memory are spread among the FMAs. With at most
# DECODE_WIDE_ROWS rows a block spans 64 panels, so each weight row is read
# in 4 KiB runs (the hardware prefetchers stop at page ends). SwiGLU blocks,
# and jobs whose width is not a whole number of panels, are packed before
# use as in prefill.
# For SwiGLU a panel holds W gate columns and the W matching up columns, so
# the epilogue forms silu(gate) * up from two accumulators without a pass
# over an intermediate tensor.
#
# Pre-packed weights (prepacked=True; pymoe_pack_expert_weights writes them
# once, when MoELayer loads its weights on the CPU): each expert's [K, N] is
# stored as its NR-wide panels one after another, panel q = K rows of NR
# values (the order above, in the weights' dtype), and the ragged last panel
# (rem < NR output columns) as K rows of rem values (SwiGLU: rem gate, then
# rem up): K * N values, so the tensor keeps its shape [E, K, N]. The
# micro-kernel then reads the panels in place: nothing is packed per call,
# only the ragged panel is copied (zero-padded) per K slice. Decode walks
# each panel's K slices in order, so a job reads one contiguous stream and
# prefetches PACKED_PREFETCH_ROWS panel rows ahead (crossing into the next
# panel at the end); prefill keeps the K-slice-outer order so a slice of A
# stays in L2 across the panels. (Before and after on the 2-core EPYC: README,
# "Results on CPU", and the result files it names.)
# Jobs are dealt to the workers round-robin, so each worker gets a share of
# every expert (experts with more rows cost more).
#
# GPU schedule (expert_matmul_gpu): the expert offsets are read back to the
# host (one stream sync), the gathered rows are copied into a contiguous
# block, and each expert's rows are one cuBLAS GEMM (tensor cores in bf16,
# see gpu_gemm.mojo) writing the raw products; a memory-bound pass then
# applies the activation (SwiGLU folds its two halves). Unlike the CPU path
# the activation is not fused into the GEMM: cuBLAS has no SiLU epilogue.

import extensibility
from extensibility import InputTensor, OutputTensor
from max.algorithm import sync_parallelize
from max.gpu import block_idx, thread_idx
from max.gpu.host import DeviceContext
from max.runtime.asyncrt import parallelism_level
from std.math import ceildiv, exp, fma
from std.memory import Pointer
from std.memory.alloc import unsafe_alloc
from std.sys import simd_width_of, size_of
from std.sys.intrinsics import PrefetchOptions, prefetch

from .gpu_gemm import activation_gpu, expert_offsets_to_host, gather_rows_gpu, gemm_gpu

comptime W = simd_width_of[DType.float32]()
# Micro-kernel tile: MR rows x NR = 2 vectors of columns.
comptime MR = 6
comptime NR = 2 * W
# Cache blocking: KC-deep slices; MC rows (a multiple of MR) per job; NC_PANELS
# packed panels (NC_PANELS * NR packed columns) per job.
comptime KC = 512
comptime MC = 32 * MR
comptime NC_PANELS = 16
# Weight rows prefetched ahead while packing: the rows of a block are a page
# apart, which the hardware prefetchers do not follow.
comptime PREFETCH_ROWS = 8
# Decode schedule (see the file header), taken when no expert has more than
# DECODE_ROWS rows. A packed block is DECODE_BLOCK panel-rows (128 KiB of
# float32, well inside L2 beside the block packed ahead), cut into
# DECODE_PANELS_WIDE panels (each weight row read in 4 KiB runs, a page) of
# DECODE_BLOCK / DECODE_PANELS_WIDE rows when the block has at most
# DECODE_WIDE_ROWS rows (reading the weights is the cost), else into
# NC_PANELS panels of deeper slices (fewer accumulator round trips through
# the scratch, for the FMAs).
comptime DECODE_ROWS = 4 * MR
comptime DECODE_WIDE_ROWS = 2 * MR
comptime DECODE_BLOCK = 2048
comptime DECODE_PANELS_WIDE = 64
# The decode pipeline prefetches this many rows below the row it packs.
comptime PIPELINE_PREFETCH_ROWS = 2

# Pre-packed panels: rows prefetched ahead of the micro-kernel (2 KiB of
# float32; the panel streams cross pages, where hardware prefetchers stop).
comptime PACKED_PREFETCH_ROWS = 32

comptime F32Ptr = Pointer[Float32, MutUntrackedOrigin]


@always_inline
def _activate[activation: StaticString, width: Int](v: SIMD[DType.float32, width]) -> SIMD[DType.float32, width]:
    comptime if activation == "relu":
        return max(v, SIMD[DType.float32, width](0))
    elif activation == "silu":
        return v / (1.0 + exp(-v))
    else:
        return v


@always_inline
def _pack_b[dtype: DType, swiglu: Bool, pdtype: DType = DType.float32](
    dst: Pointer[Scalar[pdtype], MutUntrackedOrigin],
    b: Pointer[Scalar[dtype], MutAnyOrigin],
    k0: Int,
    kc: Int,
    n_w: Int,
    col0: Int,
    col_end: Int,
    half: Int,
):
    """Pack rows [k0, k0+kc) of one expert's weights for output columns
    [col0, col_end) as NR-wide panels of pdtype: dst[(q * kc + kk) * NR + j].
    Plain: panel q holds columns col0 + q*NR + j. SwiGLU: panel q covers
    output columns c = col0 + q*W .. +W, gate column c in lanes [0, W) and
    up column half + c in lanes [W, 2W). Columns past col_end are zero."""
    comptime cols_per_panel = W if swiglu else NR
    comptime LINE = 64 // size_of[Scalar[dtype]]()
    var panels = ceildiv(col_end - col0, cols_per_panel)
    for kk in range(kc):
        var src = b.unsafe_offset((k0 + kk) * n_w)
        if kk + PREFETCH_ROWS < kc:
            var ahead = src.unsafe_offset(PREFETCH_ROWS * n_w)
            for c in range(col0, col_end, LINE):
                prefetch[PrefetchOptions().for_read().high_locality().to_data_cache()](ahead.unsafe_offset(c))
                comptime if swiglu:
                    prefetch[PrefetchOptions().for_read().high_locality().to_data_cache()](ahead.unsafe_offset(half + c))
        for q in range(panels):
            var d = dst.unsafe_offset((q * kc + kk) * NR)
            var c = col0 + q * cols_per_panel
            if c + cols_per_panel <= col_end:
                comptime if swiglu:
                    d.unsafe_store(0, src.unsafe_load[width=W](c).cast[pdtype]())
                    d.unsafe_store(W, src.unsafe_load[width=W](half + c).cast[pdtype]())
                else:
                    d.unsafe_store(0, src.unsafe_load[width=NR](c).cast[pdtype]())
            else:
                for j in range(NR):
                    var v = Scalar[pdtype](0)
                    comptime if swiglu:
                        var cj = c + (j % W)
                        if cj < col_end:
                            v = src.unsafe_load(cj + (half if j >= W else 0)).cast[pdtype]()
                    else:
                        if c + j < col_end:
                            v = src.unsafe_load(c + j).cast[pdtype]()
                    d.unsafe_store(j, v)


struct _NextBlock[dtype: DType](ImplicitlyCopyable):
    """The weight block the decode schedule packs while it computes the
    current one: rows [k0, k0 + kc) of one expert, `panels` NR-wide column
    panels from col0 (full panels only), packed as _pack_b packs them.
    Packing goes in units of one panel-row (NR weights), row by row, so the
    reads walk each weight row forwards."""

    var src: Pointer[Scalar[Self.dtype], MutUntrackedOrigin]  # row k0, column col0
    var n_w: Int
    var kc: Int
    var panels: Int

    def __init__(out self, b_e: Pointer[Scalar[Self.dtype], MutAnyOrigin], k0: Int, kc: Int, n_w: Int, col0: Int, panels: Int):
        self.src = rebind[Pointer[Scalar[Self.dtype], MutUntrackedOrigin]](b_e.unsafe_offset(k0 * n_w + col0))
        self.n_w = n_w
        self.kc = kc
        self.panels = panels

    def units(self) -> Int:
        return self.kc * self.panels


@always_inline
def _pack_units[dtype: DType](nb: _NextBlock[dtype], dst: F32Ptr, u0: Int, n: Int):
    """Pack units [u0, u0 + n) of `nb` into dst (outside a micro-kernel)."""
    for u in range(u0, u0 + n):
        var r = u // nb.panels
        var j = u % nb.panels
        var v = nb.src.unsafe_load[width=NR](r * nb.n_w + j * NR)
        dst.unsafe_store((j * nb.kc + r) * NR, v.cast[DType.float32]())


@always_inline
def _micro_tile[dtype: DType, pdtype: DType, activation: StaticString, mr: Int, pipelined: Bool, prefetch_b: Bool](
    a: Pointer[Scalar[dtype], MutAnyOrigin],
    a_off: Array[Int, mr],
    pb: Pointer[Scalar[pdtype], MutUntrackedOrigin],
    kc: Int,
    first: Bool,
    last: Bool,
    scratch: F32Ptr,
    scratch_stride: Int,
    c: Pointer[Scalar[dtype], MutAnyOrigin],
    n_out: Int,
    nrows: Int,
    col: Int,
    col_end: Int,
    nb: _NextBlock[dtype],
    nb_dst: F32Ptr,
    nb_u0: Int,
    nb_units: Int,
):
    """One mr x NR tile over a K slice. Partial sums go to `scratch` (row
    stride scratch_stride) between slices; the last slice applies the
    activation and stores rows < nrows and columns < col_end of C.
    When `pipelined`, its first `nb_units` (<= kc) steps also each pack one unit of the next
    block (from unit nb_u0, into nb_dst) and prefetch the weights
    PIPELINE_PREFETCH_ROWS rows below it: the loads that go to memory are then spread
    among the FMAs instead of stalling a separate packing pass."""
    comptime swiglu = activation == "swiglu"
    var acc = Array[SIMD[DType.float32, W], 2 * mr](fill=SIMD[DType.float32, W](0))
    if not first:
        comptime for i in range(mr):
            comptime for v in range(2):
                acc[2 * i + v] = scratch.unsafe_load[width=W](i * scratch_stride + v * W)
    var r = nb_u0 // max(nb.panels, 1)
    var j = nb_u0 - r * nb.panels
    var src = nb.src.unsafe_offset(r * nb.n_w + j * NR)
    var dst = nb_dst.unsafe_offset((j * nb.kc + r) * NR)
    var ahead = PIPELINE_PREFETCH_ROWS * nb.n_w
    for kk in range(kc):
        comptime if prefetch_b:
            prefetch[PrefetchOptions().for_read().high_locality().to_data_cache()](pb.unsafe_offset((kk + PACKED_PREFETCH_ROWS) * NR))
        comptime if pipelined:
            if kk < nb_units:
                prefetch[PrefetchOptions().for_read().high_locality().to_data_cache()](src.unsafe_offset(ahead))
                dst.unsafe_store(0, src.unsafe_load[width=NR](0).cast[DType.float32]())
                j += 1
                src = src.unsafe_offset(NR)
                dst = dst.unsafe_offset(nb.kc * NR)
                if j == nb.panels:
                    j = 0
                    r += 1
                    src = nb.src.unsafe_offset(r * nb.n_w)
                    dst = nb_dst.unsafe_offset(r * NR)
        var b0 = pb.unsafe_load[width=W](kk * NR).cast[DType.float32]()
        var b1 = pb.unsafe_load[width=W](kk * NR + W).cast[DType.float32]()
        comptime for i in range(mr):
            var a = SIMD[DType.float32, W](a.unsafe_load(a_off[i] + kk).cast[DType.float32]())
            acc[2 * i] = fma(a, b0, acc[2 * i])
            acc[2 * i + 1] = fma(a, b1, acc[2 * i + 1])
    if not last:
        comptime for i in range(mr):
            comptime for v in range(2):
                scratch.unsafe_store(i * scratch_stride + v * W, acc[2 * i + v])
        return
    comptime for i in range(mr):
        if i < nrows:
            var c_row = c.unsafe_offset(i * n_out)
            comptime if swiglu:
                var g = acc[2 * i]
                var y = g / (1.0 + exp(-g)) * acc[2 * i + 1]
                if col + W <= col_end:
                    c_row.unsafe_store(col, y.cast[dtype]())
                else:
                    for jj in range(col_end - col):
                        c_row.unsafe_store(col + jj, y[jj].cast[dtype]())
            else:
                comptime for v in range(2):
                    var y = _activate[activation](acc[2 * i + v])
                    var cv = col + v * W
                    if cv + W <= col_end:
                        c_row.unsafe_store(cv, y.cast[dtype]())
                    else:
                        for jj in range(max(0, col_end - cv)):
                            c_row.unsafe_store(cv + jj, y[jj].cast[dtype]())


@always_inline
def _row_tile[
    dtype: DType, pdtype: DType, activation: StaticString, gather: Bool, mr: Int, pipelined: Bool = False, prefetch_b: Bool = False
](
    a_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    ids_ptr: Pointer[Int32, MutAnyOrigin],
    k_dim: Int,
    k0: Int,
    r0: Int,
    row_end: Int,
    pb: Pointer[Scalar[pdtype], MutUntrackedOrigin],
    kc: Int,
    scratch: F32Ptr,
    scratch_stride: Int,
    c_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    n_out: Int,
    col: Int,
    col_end: Int,
    nb: _NextBlock[dtype],
    nb_dst: F32Ptr,
    nb_u0: Int,
    nb_units: Int,
):
    """_micro_tile on rows [r0, min(r0 + mr, row_end)) of the expert's
    block: rows past the block repeat its last row; their results are
    computed but never stored."""
    var a_off = Array[Int, mr](fill=0)
    comptime for i in range(mr):
        var r = min(r0 + i, row_end - 1)
        comptime if gather:
            a_off[i] = Int(ids_ptr.unsafe_load(r)) * k_dim + k0
        else:
            a_off[i] = r * k_dim + k0
    _micro_tile[dtype, pdtype, activation, mr, pipelined, prefetch_b](
        a_ptr, a_off, pb, kc, k0 == 0, k0 + kc >= k_dim, scratch, scratch_stride,
        c_ptr.unsafe_offset(r0 * n_out), n_out, min(mr, row_end - r0), col, col_end, nb, nb_dst, nb_u0, nb_units,
    )


@always_inline
def _panel_rows[dtype: DType, pdtype: DType, activation: StaticString, gather: Bool, prefetch_b: Bool](
    a_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    ids_ptr: Pointer[Int32, MutAnyOrigin],
    k_dim: Int,
    k0: Int,
    r_from: Int,
    row0: Int,
    row_end: Int,
    pb: Pointer[Scalar[pdtype], MutUntrackedOrigin],
    kc: Int,
    scratch: F32Ptr,
    scratch_stride: Int,
    c_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    n_out: Int,
    col: Int,
    col_end: Int,
):
    """Rows [r_from, row_end) of a block starting at row0, on one panel and K
    slice: full MR-row tiles, then the rest in one 4- or 2-row tile, so a
    decode block of 8 rows computes 8, not 12. `scratch` is row0's."""
    # These tiles pack nothing ahead: an empty next block.
    var none = _NextBlock[dtype](a_ptr, 0, 0, 0, 0, 0)
    var r0 = r_from
    while r0 < row_end:
        var left = row_end - r0
        var s_r = scratch.unsafe_offset((r0 - row0) * scratch_stride)
        if left > 4:
            _row_tile[dtype, pdtype, activation, gather, MR, False, prefetch_b](
                a_ptr, ids_ptr, k_dim, k0, r0, row_end, pb, kc, s_r, scratch_stride, c_ptr, n_out, col, col_end,
                none, scratch, 0, 0,
            )
            r0 += MR
        elif left > 2:
            _row_tile[dtype, pdtype, activation, gather, 4, False, prefetch_b](
                a_ptr, ids_ptr, k_dim, k0, r0, row_end, pb, kc, s_r, scratch_stride, c_ptr, n_out, col, col_end,
                none, scratch, 0, 0,
            )
            r0 += 4
        else:
            _row_tile[dtype, pdtype, activation, gather, 2, False, prefetch_b](
                a_ptr, ids_ptr, k_dim, k0, r0, row_end, pb, kc, s_r, scratch_stride, c_ptr, n_out, col, col_end,
                none, scratch, 0, 0,
            )
            r0 += 2


@always_inline
def _tail_panel[dtype: DType, swiglu: Bool](
    dst: Pointer[Scalar[dtype], MutUntrackedOrigin],
    tail: Pointer[Scalar[dtype], MutAnyOrigin],
    k0: Int,
    kc: Int,
    rem: Int,
):
    """Rows [k0, k0 + kc) of a pre-packed expert's ragged last panel (`rem`
    output columns, stored rem wide, or 2 * rem for SwiGLU: gate then up) as
    one NR-wide panel with zeros past rem, so the micro-kernel needs no tail."""
    comptime cols_per_panel = W if swiglu else NR
    comptime width = 2 if swiglu else 1
    for kk in range(kc):
        var src = tail.unsafe_offset((k0 + kk) * rem * width)
        for j in range(NR):
            var c = j % cols_per_panel
            var v = Scalar[dtype](0)
            if c < rem:
                v = src.unsafe_load(c + (rem if j >= cols_per_panel else 0))
            dst.unsafe_store(kk * NR + j, v)


def pack_expert_weights_cpu[dtype: DType, swiglu: Bool](
    dst_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    src_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    experts: Int,
    k_dim: Int,
    n_w: Int,
):
    """Pack each expert's weights [K, N] into the layout that
    expert_matmul_cpu[prepacked=True] reads (see the file header), N * K
    values per expert like the input."""
    comptime cols_per_panel = W if swiglu else NR
    comptime width = 2 if swiglu else 1  # tail values per row and column
    var n_out = n_w // 2 if swiglu else n_w
    var full = n_out // cols_per_panel
    var rem = n_out - full * cols_per_panel

    def pack_expert(e: Int) {var dst_ptr, var src_ptr, var k_dim, var n_w, var n_out, var full, var rem}:
        var src = src_ptr.unsafe_offset(e * k_dim * n_w)
        var dst = rebind[Pointer[Scalar[dtype], MutUntrackedOrigin]](dst_ptr.unsafe_offset(e * k_dim * n_w))
        _pack_b[dtype, swiglu, dtype](dst, src, 0, k_dim, n_w, 0, full * cols_per_panel, n_out)
        var tail = dst.unsafe_offset(full * k_dim * NR)
        var c0 = full * cols_per_panel
        for kk in range(k_dim):
            for j in range(rem):
                tail.unsafe_store(kk * rem * width + j, src.unsafe_load(kk * n_w + c0 + j))
                comptime if swiglu:
                    tail.unsafe_store(kk * rem * width + rem + j, src.unsafe_load(kk * n_w + n_out + c0 + j))

    sync_parallelize(pack_expert, experts)


def expert_matmul_cpu[dtype: DType, activation: StaticString, gather: Bool, prepacked: Bool = False](
    c_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    n_out: Int,
    a_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    k_dim: Int,
    ids_ptr: Pointer[Int32, MutAnyOrigin],
    off_ptr: Pointer[Int32, MutAnyOrigin],
    experts: Int,
    b_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    n_w: Int,
):
    """The whole grouped GEMM on the CPU worker threads (see the file header).
    With `prepacked`, b_ptr holds the weights as pack_expert_weights_cpu
    wrote them (n_w is still the unpacked column count)."""
    comptime swiglu = activation == "swiglu"
    comptime cols_per_panel = W if swiglu else NR
    # Packed weights are float32 when this kernel packs them, and keep their
    # dtype when pre-packed (bf16 then moves half the bytes).
    comptime pdtype = dtype if prepacked else DType.float32
    comptime PanelPtr = Pointer[Scalar[pdtype], MutUntrackedOrigin]
    # Decode when every expert has few rows: then each weight is used a few
    # times only and reading the weights is the cost, so jobs are wider
    # (longer runs of each weight row) but still at least two per worker.
    var max_rows = 0
    var busy_experts = 0
    for e in range(experts):
        var rows_e = Int(off_ptr.unsafe_load(e + 1)) - Int(off_ptr.unsafe_load(e))
        max_rows = max(max_rows, rows_e)
        busy_experts += 1 if rows_e > 0 else 0
    if max_rows == 0:
        return
    var decode = max_rows <= DECODE_ROWS
    var job_panels = NC_PANELS
    var kc_step = KC
    if decode:
        # Pre-packed panels are contiguous already: no wide jobs needed.
        var wide = not prepacked and max_rows <= DECODE_WIDE_ROWS
        job_panels = DECODE_PANELS_WIDE if wide else NC_PANELS
        # At least two jobs per worker.
        var jobs_per_expert = ceildiv(2 * parallelism_level(None), busy_experts)
        job_panels = max(1, min(job_panels, ceildiv(ceildiv(n_out, cols_per_panel), jobs_per_expert)))
        comptime if not prepacked:
            kc_step = DECODE_BLOCK // job_panels
    var nc = job_panels * cols_per_panel  # output columns per job
    var col_jobs = ceildiv(n_out, nc)
    var job_start = List[Int](length=experts + 1, fill=0)
    for e in range(experts):
        var rows_e = Int(off_ptr.unsafe_load(e + 1)) - Int(off_ptr.unsafe_load(e))
        job_start[e + 1] = job_start[e] + ceildiv(rows_e, MC) * col_jobs
    var total_jobs = job_start[experts]
    var job_start_ptr = job_start.unsafe_ptr()
    var workers = max(1, min(parallelism_level(None), total_jobs))
    # Pre-packed: full panels, then the ragged one (rem output columns).
    var full_panels = n_out // cols_per_panel
    var rem = n_out - full_panels * cols_per_panel

    def jobs_of_worker(wk: Int) {
        var c_ptr, var a_ptr, var ids_ptr, var off_ptr, var b_ptr, var job_start_ptr,
        var n_out, var k_dim, var n_w, var col_jobs, var total_jobs, var workers,
        var decode, var job_panels, var nc, var kc_step, var full_panels, var rem,
    }:
        comptime assert DECODE_BLOCK <= KC * NC_PANELS, "decode blocks fit the packing buffers"
        comptime assert DECODE_ROWS * DECODE_PANELS_WIDE <= MC * NC_PANELS, "decode tiles fit the scratch"
        # Packing buffers (pre-packed weights need one panel, for the ragged one).
        var pb = unsafe_alloc[Float32](NR * KC if prepacked else KC * NC_PANELS * NR)
        var pb_next = unsafe_alloc[Float32](1 if prepacked else KC * NC_PANELS * NR)
        var scratch = unsafe_alloc[Float32](MC * NC_PANELS * NR)
        var scratch_stride = job_panels * NR

        @always_inline
        def srow(row: Int, q: Int) {var scratch, var scratch_stride} -> F32Ptr:
            return scratch.unsafe_offset(row * scratch_stride + q * NR)

        # A job's expert (searching on from expert e_from) and its first column.
        @always_inline
        def expert_of(job: Int, e_from: Int) {var job_start_ptr} -> Int:
            var e = e_from
            while job >= job_start_ptr.unsafe_load(e + 1):
                e += 1
            return e

        @always_inline
        def col0_of(job: Int, e: Int) {var job_start_ptr, var col_jobs, var nc} -> Int:
            return ((job - job_start_ptr.unsafe_load(e)) % col_jobs) * nc

        var e = 0
        var packed_ahead = False  # pb already holds this block (decode pipeline)
        for job in range(wk, total_jobs, workers):
            e = expert_of(job, e)
            var row0 = Int(off_ptr.unsafe_load(e)) + ((job - job_start_ptr.unsafe_load(e)) // col_jobs) * MC
            var nrows = min(MC, Int(off_ptr.unsafe_load(e + 1)) - row0)
            var row_end = row0 + nrows
            var col0 = col0_of(job, e)
            var col_end = min(col0 + nc, n_out)
            var panels = ceildiv(col_end - col0, cols_per_panel)
            var b_e = b_ptr.unsafe_offset(e * k_dim * n_w)
            comptime if prepacked:
                # Nothing to pack. Decode walks each panel's K slices in
                # order, so the weights are read as one stream per job; prefill
                # keeps a K slice's rows of A in cache across the panels.
                var slices = ceildiv(k_dim, kc_step)
                for step in range(panels * slices):
                    var q = step // slices if decode else step % panels
                    var k0 = (step % slices if decode else step // panels) * kc_step
                    var kc = min(kc_step, k_dim - k0)
                    var col = col0 + q * cols_per_panel
                    var gq = col0 // cols_per_panel + q
                    var pq: PanelPtr
                    if gq < full_panels:
                        pq = rebind[PanelPtr](b_e.unsafe_offset((gq * k_dim + k0) * NR))
                    else:
                        var tail = rebind[Pointer[Scalar[dtype], MutUntrackedOrigin]](pb)
                        _tail_panel[dtype, swiglu](tail, b_e.unsafe_offset(full_panels * k_dim * NR), k0, kc, rem)
                        pq = rebind[PanelPtr](tail)
                    _panel_rows[dtype, pdtype, activation, gather, True](
                        a_ptr, ids_ptr, k_dim, k0, row0, row0, row_end, pq, kc, srow(0, q), scratch_stride, c_ptr, n_out,
                        col, min(col + cols_per_panel, col_end),
                    )
                continue
            for k0 in range(0, k_dim, kc_step):
                var kc = min(kc_step, k_dim - k0)
                if not packed_ahead:
                    _pack_b[dtype, swiglu](pb, b_e, k0, kc, n_w, col0, col_end, n_out)
                packed_ahead = False
                # Decode: pack the next block (this job's next slice, or the
                # next job's first one) while computing this one.
                var nb = _NextBlock[dtype](b_e, 0, 0, n_w, col0, 0)
                comptime if not swiglu:
                    if decode:
                        if k0 + kc < k_dim:
                            if (col_end - col0) % NR == 0:
                                nb = _NextBlock[dtype](b_e, k0 + kc, min(kc_step, k_dim - k0 - kc), n_w, col0, panels)
                        elif job + workers < total_jobs:
                            var ne = expert_of(job + workers, e)
                            var ncol0 = col0_of(job + workers, ne)
                            var ncols = min(ncol0 + nc, n_out) - ncol0
                            if ncols % NR == 0:
                                nb = _NextBlock[dtype](
                                    b_ptr.unsafe_offset(ne * k_dim * n_w), 0, min(kc_step, k_dim), n_w, ncol0, ncols // NR,
                                )
                var share = min(ceildiv(nb.units(), panels), kc)
                var done = 0
                for q in range(panels):
                    var col = col0 + q * cols_per_panel
                    var tile_end = min(col + cols_per_panel, col_end)
                    var pq = pb.unsafe_offset(q * kc * NR)
                    var units = min(share, nb.units() - done)
                    var r0 = row0
                    if units > 0:
                        # The tile that packs ahead has 4 rows: the packing
                        # needs registers beside the accumulators.
                        _row_tile[dtype, DType.float32, activation, gather, 4, True](
                            a_ptr, ids_ptr, k_dim, k0, r0, row_end, pq, kc, srow(0, q), scratch_stride, c_ptr, n_out, col,
                            tile_end, nb, pb_next, done, units,
                        )
                        r0 += 4
                        done += units
                    _panel_rows[dtype, DType.float32, activation, gather, False](
                        a_ptr, ids_ptr, k_dim, k0, r0, row0, row_end, pq, kc, srow(0, q), scratch_stride, c_ptr, n_out,
                        col, tile_end,
                    )
                if nb.units() > 0:
                    _pack_units[dtype](nb, pb_next, done, nb.units() - done)
                    var packed = pb_next
                    pb_next = pb
                    pb = packed
                    packed_ahead = True
        pb.unsafe_free()
        pb_next.unsafe_free()
        scratch.unsafe_free()

    sync_parallelize(jobs_of_worker, workers)
    _ = job_start^


def expert_matmul_gpu[dtype: DType, activation: StaticString, gather: Bool](
    ctx: DeviceContext,
    c_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    ldc: Int,
    a_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    lda: Int,
    k_dim: Int,
    ids_ptr: Pointer[Int32, MutAnyOrigin],
    offsets: List[Int],
    b_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    n_w: Int,
    gathered_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    wide_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    ldw: Int,
) raises:
    """The grouped GEMM on the GPU (see the file header). `offsets` are the
    expert offsets on the host. A has row stride lda (k_dim columns used);
    with `gather`, its rows are first gathered into gathered_ptr [rows, k_dim].
    The raw products (n_w columns) go to wide_ptr (row stride ldw); the
    activation then writes C (row stride ldc). wide_ptr may be c_ptr."""
    var experts = len(offsets) - 1
    var rows = offsets[experts]
    if rows == 0 or n_w == 0:
        return
    var a = a_ptr
    var a_stride = lda
    comptime if gather:
        gather_rows_gpu[dtype](ctx, gathered_ptr, a_ptr, ids_ptr, rows, k_dim)
        a = gathered_ptr
        a_stride = k_dim
    for e in range(experts):
        var r0 = offsets[e]
        gemm_gpu[dtype](
            ctx, wide_ptr.unsafe_offset(r0 * ldw), ldw, a.unsafe_offset(r0 * a_stride), a_stride,
            b_ptr.unsafe_offset(e * k_dim * n_w), n_w, offsets[e + 1] - r0, n_w, k_dim,
        )
    comptime if activation != "none":
        var n_out = n_w // 2 if activation == "swiglu" else n_w
        activation_gpu[dtype, activation](ctx, c_ptr, ldc, wide_ptr, ldw, rows, n_out)


def zero_dropped_rows_gpu[dtype: DType](
    ctx: DeviceContext,
    c_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    m_rows: Int,
    n_out: Int,
    valid_ptr: Pointer[Int32, MutAnyOrigin],
) raises:
    """Zero rows [valid_ptr[0], m_rows) of C (slots dropped by the capacity)."""
    var total = m_rows * n_out
    if total == 0:
        return
    var n_total = Int64(total)
    var n_n = Int64(n_out)

    def kernel() {var c_ptr, var valid_ptr, var n_total, var n_n}:
        var i = Int(block_idx.x) * 256 + Int(thread_idx.x)
        if i < Int(n_total) and i // Int(n_n) >= Int(valid_ptr.unsafe_load(0)):
            c_ptr.unsafe_store(i, Scalar[dtype](0))

    ctx.enqueue_function(kernel, grid_dim=ceildiv(total, 256), block_dim=256)


def check_activation[activation: StaticString]():
    comptime assert (
        activation == "none" or activation == "relu" or activation == "silu" or activation == "swiglu"
    ), "activation must be none, relu, silu or swiglu"


@extensibility.register("pymoe_moe_expert_matmul")
struct MoEExpertMatmul:
    @staticmethod
    def execute[
        activation: StaticString,
        gather: Bool,
        packed: Bool,
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        x: InputTensor[dtype=output.dtype, rank=2, ...],
        row_ids: InputTensor[dtype=DType.int32, rank=1, ...],
        expert_offsets: InputTensor[dtype=DType.int32, rank=1, ...],
        w: InputTensor[dtype=output.dtype, rank=3, ...],
        ctx: DeviceContext,
    ) raises:
        check_activation[activation]()
        comptime dtype = output.dtype
        var m_rows = output.dim_size(0)
        var n_out = output.dim_size(1)
        var c_ptr = output.unsafe_ptr()
        comptime if target == "gpu":
            comptime if packed:
                raise Error(PACKED_ON_GPU)
            var experts = w.dim_size(0)
            var k_dim = x.dim_size(1)
            var n_w = w.dim_size(2)
            zero_dropped_rows_gpu[dtype](ctx, c_ptr, m_rows, n_out, expert_offsets.unsafe_ptr().unsafe_offset(experts))
            var offsets = expert_offsets_to_host(ctx, expert_offsets.unsafe_ptr(), experts)
            # Scratch for this standalone op (the layer's moe_ffn uses pooled
            # workspaces instead): gathered rows, and SwiGLU's two halves.
            var rows = max(offsets[experts], 1)
            var gathered = ctx.enqueue_create_buffer[dtype](rows * k_dim if gather else 1)
            var wide = ctx.enqueue_create_buffer[dtype](rows * n_w if activation == "swiglu" else 1)
            var g_ptr = rebind[Pointer[Scalar[dtype], MutAnyOrigin]](gathered.unsafe_ptr())
            var w_ptr = rebind[Pointer[Scalar[dtype], MutAnyOrigin]](wide.unsafe_ptr())
            expert_matmul_gpu[dtype, activation, gather](
                ctx, c_ptr, n_out, x.unsafe_ptr(), k_dim, k_dim, row_ids.unsafe_ptr(), offsets,
                w.unsafe_ptr(), n_w, g_ptr, w_ptr if activation == "swiglu" else c_ptr,
                n_w if activation == "swiglu" else n_out,
            )
            # The scratch must outlive the kernels that use it.
            ctx.synchronize()
            _ = gathered^
            _ = wide^
            return
        var valid_rows = Int(expert_offsets.unsafe_ptr().unsafe_load(w.dim_size(0)))
        for r in range(valid_rows, m_rows):
            for c in range(n_out):
                c_ptr.unsafe_store(r * n_out + c, Scalar[dtype](0))
        if n_out == 0:
            return
        expert_matmul_cpu[dtype, activation, gather, packed](
            c_ptr, n_out, x.unsafe_ptr(), x.dim_size(1), row_ids.unsafe_ptr(),
            expert_offsets.unsafe_ptr(), w.dim_size(0), w.unsafe_ptr(), w.dim_size(2),
        )


comptime PACKED_ON_GPU = "packed expert weights are a CPU layout; the GPU kernels read [E, K, N] as it is"


@extensibility.register("pymoe_pack_expert_weights")
struct PackExpertWeights:
    """Expert weights [E, K, N] in the CPU kernels' pre-packed layout (same
    shape and dtype; see the file header). Run once when the weights load."""

    @staticmethod
    def execute[
        swiglu: Bool,
        target: StaticString,
    ](
        output: OutputTensor[rank=3, ...],
        w: InputTensor[dtype=output.dtype, rank=3, ...],
        ctx: DeviceContext,
    ) raises:
        comptime if target == "gpu":
            raise Error(PACKED_ON_GPU)
        else:
            pack_expert_weights_cpu[output.dtype, swiglu](
                output.unsafe_ptr(), w.unsafe_ptr(), w.dim_size(0), w.dim_size(1), w.dim_size(2),
            )
