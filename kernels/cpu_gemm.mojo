# The grouped expert GEMM on the CPU: expert_matmul_cpu (the op is
# registered in moe_expert_matmul.mojo, which documents what it computes).
#
# CPU schedule (the BLIS layering, so both weights and activations stream
# through the caches once per block instead of once per output tile):
# - jobs are (expert, block of MC rows, block of NC columns), spread over the
#   worker threads, so prefill (many rows per expert) and decode (a few rows,
#   wide columns) both keep every core busy; when there are few (expert, row
#   block) pairs (one expert with a few dozen rows), the column blocks narrow
#   so that the jobs spread evenly over the workers;
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
# Decode batches, when every expert has a few rows only, take the decode
# pipeline described in cpu_decode.mojo; pre-packed weights (the layout in
# cpu_pack.mojo) are read in place.
# For SwiGLU a panel holds W gate columns and the W matching up columns, so
# the epilogue forms silu(gate) * up from two accumulators without a pass
# over an intermediate tensor (GPT-OSS's clamped SwiGLU the same way).
# An expert bias (has_bias) is loaded into the accumulators when a tile starts
# its first K slice, so it is added before the activation at no cost per k
# step; without it the kernel is the same code as before (a compile-time flag).
# Jobs are dealt to the workers round-robin, so each worker gets a share of
# every expert (experts with more rows cost more).

from max.algorithm import sync_parallelize
from max.runtime.asyncrt import parallelism_level
from std.math import ceildiv, exp, fma
from std.memory import Pointer
from std.memory.alloc import unsafe_alloc
from std.sys.intrinsics import PrefetchOptions, prefetch

from .cpu_blocking import KC, MC, MR, NC_PANELS, NR, W, F32Ptr
from .cpu_decode import (
    DECODE_BLOCK,
    DECODE_PANELS_WIDE,
    DECODE_ROWS,
    DECODE_WIDE_ROWS,
    PIPELINE_PREFETCH_ROWS,
    NextBlock,
    pack_units,
)
from .activation import DEFAULT_SWIGLU_ALPHA, DEFAULT_SWIGLU_LIMIT, clamped_swiglu_f32, is_gated
from .cpu_pack import PACKED_PREFETCH_ROWS, pack_b, tail_panel


@always_inline
def _activate[activation: StaticString, width: Int](v: SIMD[DType.float32, width]) -> SIMD[DType.float32, width]:
    comptime if activation == "relu":
        return max(v, SIMD[DType.float32, width](0))
    elif activation == "silu":
        return v / (1.0 + exp(-v))
    else:
        return v


@always_inline
def _bias_vector[dtype: DType](bias: Pointer[Scalar[dtype], MutAnyOrigin], col: Int, col_end: Int) -> SIMD[DType.float32, W]:
    """bias[col : col + W] in float32, zeros from col_end on (ragged edge)."""
    if col + W <= col_end:
        return bias.unsafe_load[width=W](col).cast[DType.float32]()
    var v = SIMD[DType.float32, W](0)
    for j in range(max(0, col_end - col)):
        v[j] = bias.unsafe_load(col + j).cast[DType.float32]()
    return v


@always_inline
def _micro_tile[
    dtype: DType, pdtype: DType, activation: StaticString, mr: Int, pipelined: Bool, prefetch_b: Bool,
    has_bias: Bool, alpha: Float32, limit: Float32,
](
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
    nb: NextBlock[dtype],
    nb_dst: F32Ptr,
    nb_u0: Int,
    nb_units: Int,
    bias: Pointer[Scalar[dtype], MutAnyOrigin],
):
    """One mr x NR tile over a K slice. Partial sums go to `scratch` (row
    stride scratch_stride) between slices; the last slice applies the
    activation and stores rows < nrows and columns < col_end of C.
    With `has_bias`, `bias` is the expert's bias row (gated: gate biases, then
    the up biases from n_out on) and the first slice starts from it.
    When `pipelined`, its first `nb_units` (<= kc) steps also each pack one unit of the next
    block (from unit nb_u0, into nb_dst) and prefetch the weights
    PIPELINE_PREFETCH_ROWS rows below it: the loads that go to memory are then spread
    among the FMAs instead of stalling a separate packing pass."""
    comptime gated = is_gated[activation]()
    var acc = Array[SIMD[DType.float32, W], 2 * mr](fill=SIMD[DType.float32, W](0))
    if not first:
        comptime for i in range(mr):
            comptime for v in range(2):
                acc[2 * i + v] = scratch.unsafe_load[width=W](i * scratch_stride + v * W)
    else:
        comptime if has_bias:
            # Gated: lanes [0, W) are gate columns, [W, 2W) the matching up columns.
            var b0 = _bias_vector[dtype](bias, col, col_end)
            var b1: SIMD[DType.float32, W]
            comptime if gated:
                b1 = _bias_vector[dtype](bias.unsafe_offset(n_out), col, col_end)
            else:
                b1 = _bias_vector[dtype](bias, col + W, col_end)
            comptime for i in range(mr):
                acc[2 * i] = b0
                acc[2 * i + 1] = b1
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
            comptime if gated:
                var g = acc[2 * i]
                var y: SIMD[DType.float32, W]
                comptime if activation == "swiglu":
                    y = g / (1.0 + exp(-g)) * acc[2 * i + 1]
                else:
                    y = clamped_swiglu_f32[alpha, limit](g, acc[2 * i + 1])
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
    dtype: DType, pdtype: DType, activation: StaticString, gather: Bool, mr: Int, pipelined: Bool, prefetch_b: Bool,
    has_bias: Bool, alpha: Float32, limit: Float32,
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
    nb: NextBlock[dtype],
    nb_dst: F32Ptr,
    nb_u0: Int,
    nb_units: Int,
    bias: Pointer[Scalar[dtype], MutAnyOrigin],
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
    _micro_tile[dtype, pdtype, activation, mr, pipelined, prefetch_b, has_bias, alpha, limit](
        a_ptr, a_off, pb, kc, k0 == 0, k0 + kc >= k_dim, scratch, scratch_stride,
        c_ptr.unsafe_offset(r0 * n_out), n_out, min(mr, row_end - r0), col, col_end, nb, nb_dst, nb_u0, nb_units,
        bias,
    )


@always_inline
def _panel_rows[
    dtype: DType, pdtype: DType, activation: StaticString, gather: Bool, prefetch_b: Bool,
    has_bias: Bool, alpha: Float32, limit: Float32,
](
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
    bias: Pointer[Scalar[dtype], MutAnyOrigin],
):
    """Rows [r_from, row_end) of a block starting at row0, on one panel and K
    slice: full MR-row tiles, then the rest in one 4- or 2-row tile, so a
    decode block of 8 rows computes 8, not 12. `scratch` is row0's."""
    # These tiles pack nothing ahead: an empty next block.
    var none = NextBlock[dtype](a_ptr, 0, 0, 0, 0, 0)
    var r0 = r_from
    while r0 < row_end:
        var left = row_end - r0
        var s_r = scratch.unsafe_offset((r0 - row0) * scratch_stride)
        if left > 4:
            _row_tile[dtype, pdtype, activation, gather, MR, False, prefetch_b, has_bias, alpha, limit](
                a_ptr, ids_ptr, k_dim, k0, r0, row_end, pb, kc, s_r, scratch_stride, c_ptr, n_out, col, col_end,
                none, scratch, 0, 0, bias,
            )
            r0 += MR
        elif left > 2:
            _row_tile[dtype, pdtype, activation, gather, 4, False, prefetch_b, has_bias, alpha, limit](
                a_ptr, ids_ptr, k_dim, k0, r0, row_end, pb, kc, s_r, scratch_stride, c_ptr, n_out, col, col_end,
                none, scratch, 0, 0, bias,
            )
            r0 += 4
        else:
            _row_tile[dtype, pdtype, activation, gather, 2, False, prefetch_b, has_bias, alpha, limit](
                a_ptr, ids_ptr, k_dim, k0, r0, row_end, pb, kc, s_r, scratch_stride, c_ptr, n_out, col, col_end,
                none, scratch, 0, 0, bias,
            )
            r0 += 2


def expert_matmul_cpu[
    dtype: DType,
    activation: StaticString,
    gather: Bool,
    prepacked: Bool = False,
    has_bias: Bool = False,
    alpha: Float32 = DEFAULT_SWIGLU_ALPHA,
    limit: Float32 = DEFAULT_SWIGLU_LIMIT,
](
    c_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    n_out: Int,
    a_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    k_dim: Int,
    ids_ptr: Pointer[Int32, MutAnyOrigin],
    off_ptr: Pointer[Int32, MutAnyOrigin],
    experts: Int,
    b_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    n_w: Int,
    bias_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
):
    """The whole grouped GEMM on the CPU worker threads (see the file header).

    Parameters:
        dtype: The element type of A, B, C and the bias.
        activation: One of "none", "relu", "silu", "swiglu", "clamped_swiglu";
            the gated ones read B = [W_gate | W_up] and write n_w / 2 columns.
        gather: A's rows are a_ptr[ids_ptr[r]] (else a_ptr[r]).
        prepacked: b_ptr holds the weights as pack_expert_weights_cpu wrote
            them (n_w is still the unpacked column count).
        has_bias: Add bias_ptr[e, :] (row stride n_w) to each row of expert e
            before the activation; without it bias_ptr is not read.
        alpha: clamped_swiglu's sigmoid slope.
        limit: clamped_swiglu's clamp.

    Args:
        c_ptr: C [rows, n_out], row stride n_out.
        n_out: The output columns (n_w / 2 for the gated activations).
        a_ptr: A, row stride k_dim.
        k_dim: K.
        ids_ptr: The row ids (read when gathering).
        off_ptr: The expert offsets [experts + 1].
        experts: E.
        b_ptr: B [E, k_dim, n_w].
        n_w: B's columns.
        bias_ptr: The bias [E, n_w] (with has_bias).
    """
    comptime gated = is_gated[activation]()
    comptime cols_per_panel = W if gated else NR
    # Packed weights are float32 when this kernel packs them, and keep their
    # dtype when pre-packed (bf16 then moves half the bytes).
    comptime pdtype = dtype if prepacked else DType.float32
    comptime PanelPtr = Pointer[Scalar[pdtype], MutUntrackedOrigin]
    # Decode when every expert has few rows: then each weight is used a few
    # times only and reading the weights is the cost, so jobs are wider
    # (longer runs of each weight row) but still at least two per worker.
    var max_rows = 0
    var busy_experts = 0
    var row_blocks = 0  # (expert, MC rows) pairs
    for e in range(experts):
        var rows_e = Int(off_ptr.unsafe_load(e + 1)) - Int(off_ptr.unsafe_load(e))
        max_rows = max(max_rows, rows_e)
        busy_experts += 1 if rows_e > 0 else 0
        row_blocks += ceildiv(rows_e, MC)
    var threads = parallelism_level(None)
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
        var jobs_per_expert = ceildiv(2 * threads, busy_experts)
        job_panels = max(1, min(job_panels, ceildiv(ceildiv(n_out, cols_per_panel), jobs_per_expert)))
        comptime if not prepacked:
            kc_step = DECODE_BLOCK // job_panels
    else:
        # Few jobs, e.g. one expert with a few dozen rows (the offloading engine's host
        # expert, issue 23): NC_PANELS-wide jobs would leave workers idle (one expert of 32
        # rows ran on 3 of 16 threads for w1 and 4 for w2) or give some workers two while
        # others have one (3 jobs on 2 threads). So take the job width with the shortest
        # critical path, width * rounds of jobs over the workers (the widest among equals).
        var all_panels = ceildiv(n_out, cols_per_panel)
        if row_blocks * ceildiv(all_panels, NC_PANELS) < 2 * threads:
            var best = Int.MAX
            for width in range(NC_PANELS, 0, -1):
                var span = min(width, all_panels) * ceildiv(row_blocks * ceildiv(all_panels, width), threads)
                if span < best:
                    best = span
                    job_panels = width
    var nc = job_panels * cols_per_panel  # output columns per job
    var col_jobs = ceildiv(n_out, nc)
    var job_start = List[Int](length=experts + 1, fill=0)
    for e in range(experts):
        var rows_e = Int(off_ptr.unsafe_load(e + 1)) - Int(off_ptr.unsafe_load(e))
        job_start[e + 1] = job_start[e] + ceildiv(rows_e, MC) * col_jobs
    var total_jobs = job_start[experts]
    var job_start_ptr = job_start.unsafe_ptr()
    var workers = max(1, min(threads, total_jobs))
    # Pre-packed: full panels, then the ragged one (rem output columns).
    var full_panels = n_out // cols_per_panel
    var rem = n_out - full_panels * cols_per_panel

    def jobs_of_worker(wk: Int) {
        var c_ptr, var a_ptr, var ids_ptr, var off_ptr, var b_ptr, var bias_ptr, var job_start_ptr,
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
            var bias_e = bias_ptr.unsafe_offset(e * n_w if has_bias else 0)
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
                        tail_panel[dtype, gated](tail, b_e.unsafe_offset(full_panels * k_dim * NR), k0, kc, rem)
                        pq = rebind[PanelPtr](tail)
                    _panel_rows[dtype, pdtype, activation, gather, True, has_bias, alpha, limit](
                        a_ptr, ids_ptr, k_dim, k0, row0, row0, row_end, pq, kc, srow(0, q), scratch_stride, c_ptr, n_out,
                        col, min(col + cols_per_panel, col_end), bias_e,
                    )
                continue
            for k0 in range(0, k_dim, kc_step):
                var kc = min(kc_step, k_dim - k0)
                if not packed_ahead:
                    pack_b[dtype, gated](pb, b_e, k0, kc, n_w, col0, col_end, n_out)
                packed_ahead = False
                # Decode: pack the next block (this job's next slice, or the
                # next job's first one) while computing this one.
                var nb = NextBlock[dtype](b_e, 0, 0, n_w, col0, 0)
                comptime if not gated:
                    if decode:
                        if k0 + kc < k_dim:
                            if (col_end - col0) % NR == 0:
                                nb = NextBlock[dtype](b_e, k0 + kc, min(kc_step, k_dim - k0 - kc), n_w, col0, panels)
                        elif job + workers < total_jobs:
                            var ne = expert_of(job + workers, e)
                            var ncol0 = col0_of(job + workers, ne)
                            var ncols = min(ncol0 + nc, n_out) - ncol0
                            if ncols % NR == 0:
                                nb = NextBlock[dtype](
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
                        _row_tile[dtype, DType.float32, activation, gather, 4, True, False, has_bias, alpha, limit](
                            a_ptr, ids_ptr, k_dim, k0, r0, row_end, pq, kc, srow(0, q), scratch_stride, c_ptr, n_out, col,
                            tile_end, nb, pb_next, done, units, bias_e,
                        )
                        r0 += 4
                        done += units
                    _panel_rows[dtype, DType.float32, activation, gather, False, has_bias, alpha, limit](
                        a_ptr, ids_ptr, k_dim, k0, r0, row0, row_end, pq, kc, srow(0, q), scratch_stride, c_ptr, n_out,
                        col, tile_end, bias_e,
                    )
                if nb.units() > 0:
                    pack_units[dtype](nb, pb_next, done, nb.units() - done)
                    var packed = pb_next
                    pb_next = pb
                    pb = packed
                    packed_ahead = True
        pb.unsafe_free()
        pb_next.unsafe_free()
        scratch.unsafe_free()

    sync_parallelize(jobs_of_worker, workers)
    _ = job_start^
