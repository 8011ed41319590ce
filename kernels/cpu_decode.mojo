# The CPU grouped GEMM's decode pipeline (cpu_gemm.mojo runs it).
#
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
# The packing ahead runs inside the micro-kernel (cpu_gemm.mojo, `pipelined`),
# one unit (panel-row) per k step; NextBlock names the block it packs, and
# pack_units packs the units that the micro-kernels did not.

from std.memory import Pointer

from .cpu_blocking import MR, NR, F32Ptr

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


struct NextBlock[dtype: DType](ImplicitlyCopyable):
    """The weight block the decode schedule packs while it computes the
    current one: rows [k0, k0 + kc) of one expert, `panels` NR-wide column
    panels from col0 (full panels only), packed as pack_b packs them.
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
def pack_units[dtype: DType](nb: NextBlock[dtype], dst: F32Ptr, u0: Int, n: Int):
    """Pack units [u0, u0 + n) of `nb` into dst (outside a micro-kernel)."""
    for u in range(u0, u0 + n):
        var r = u // nb.panels
        var j = u % nb.panels
        var v = nb.src.unsafe_load[width=NR](r * nb.n_w + j * NR)
        dst.unsafe_store((j * nb.kc + r) * NR, v.cast[DType.float32]())
