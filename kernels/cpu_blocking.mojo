# The CPU grouped GEMM's register tile and cache blocks (cpu_gemm.mojo), in
# one place because the packing buffers, the scratch tile and the decode
# blocks are all sized from them (cpu_gemm.mojo asserts that they fit).

from std.memory import Pointer
from std.sys import simd_width_of

comptime W = simd_width_of[DType.float32]()
# Micro-kernel tile: MR rows x NR = 2 vectors of columns.
comptime MR = 6
comptime NR = 2 * W
# Cache blocking: KC-deep slices; MC rows (a multiple of MR) per job; NC_PANELS
# packed panels (NC_PANELS * NR packed columns) per job.
comptime KC = 512
comptime MC = 32 * MR
comptime NC_PANELS = 16

comptime F32Ptr = Pointer[Float32, MutUntrackedOrigin]
