# Weight packing for the CPU grouped GEMM (cpu_gemm.mojo).
#
# pack_b packs a block of one expert's weights per call into the NR-wide
# float32 column panels that the micro-kernel reads (cpu_gemm.mojo says why).
#
# Pre-packed weights (prepacked=True; pymoe_pack_expert_weights writes them
# once, when MoELayer loads its weights on the CPU): each expert's [K, N] is
# stored as its NR-wide panels one after another, panel q = K rows of NR
# values (the order pack_b writes, in the weights' dtype), and the ragged last panel
# (rem < NR output columns) as K rows of rem values (SwiGLU: rem gate, then
# rem up): K * N values, so the tensor keeps its shape [E, K, N]. The
# micro-kernel then reads the panels in place: nothing is packed per call,
# only the ragged panel is copied (zero-padded) per K slice. Decode walks
# each panel's K slices in order, so a job reads one contiguous stream and
# prefetches PACKED_PREFETCH_ROWS panel rows ahead (crossing into the next
# panel at the end); prefill keeps the K-slice-outer order so a slice of A
# stays in L2 across the panels. (Before and after on the 2-core EPYC: docs/RESULTS.md,
# "Results on CPU", and the result files it names.)

from max.algorithm import sync_parallelize
from std.math import ceildiv
from std.memory import Pointer
from std.sys import size_of
from std.sys.intrinsics import PrefetchOptions, prefetch

from .cpu_blocking import NR, W

# Weight rows prefetched ahead while packing: the rows of a block are a page
# apart, which the hardware prefetchers do not follow.
comptime PREFETCH_ROWS = 8

# Pre-packed panels: rows prefetched ahead of the micro-kernel (2 KiB of
# float32; the panel streams cross pages, where hardware prefetchers stop).
comptime PACKED_PREFETCH_ROWS = 32


@always_inline
def pack_b[dtype: DType, swiglu: Bool, pdtype: DType = DType.float32](
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


@always_inline
def tail_panel[dtype: DType, swiglu: Bool](
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
        pack_b[dtype, swiglu, dtype](dst, src, 0, k_dim, n_w, 0, full * cols_per_panel, n_out)
        var tail = dst.unsafe_offset(full * k_dim * NR)
        var c0 = full * cols_per_panel
        for kk in range(k_dim):
            for j in range(rem):
                tail.unsafe_store(kk * rem * width + j, src.unsafe_load(kk * n_w + c0 + j))
                comptime if swiglu:
                    tail.unsafe_store(kk * rem * width + rem + j, src.unsafe_load(kk * n_w + n_out + c0 + j))

    sync_parallelize(pack_expert, experts)
