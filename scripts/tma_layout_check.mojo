# Kernel-only check, the first step of loading the grouped GEMM's W tiles with TMA (the Hopper
# bulk tensor copy) instead of cp.async: does one TMA box of W, with 128-byte swizzle, land in
# shared memory exactly as the wgmma tile's B layout expects (kernels/gpu_grouped_gemm.mojo,
# _grouped_gemm_wgmma: a [64 k][64 n] block, k row kr at kr * 128 bytes, its 16-byte chunk c at
# chunk c ^ (kr % 8))? W is [E, K, N] bf16 seen as a 3D tensor (N, K, E innermost first), so
# a box never reads into the next expert and K tails are zero-filled. Cases: inside an expert,
# at a K tail, at an N edge. Prints the mismatches per case (0 expected).
# Build: mojo build -I . --target-accelerator=sm_90a -o tma_layout_check scripts/tma_layout_check.mojo
# and run with Mojo's runtime libraries on LD_LIBRARY_PATH (as scripts/grouped_gemm_kernel_bench.mojo).
from max.gpu import barrier, thread_idx
from max.gpu.host import DeviceBuffer, DeviceContext
from max.gpu.host.nvidia.tma import TMADescriptor, TensorMapSwizzle, create_tma_descriptor, prefetch_tma_descriptor
from max.gpu.memory import AddressSpace, cp_async_bulk_tensor_shared_cluster_global
from max.gpu.sync import mbarrier_arrive_expect_tx_shared, mbarrier_init, mbarrier_try_wait_parity_shared
from std.memory import Pointer, stack_allocation
from std.utils import IndexList

comptime BOX_K = 64
comptime BOX_N = 64  # 128 bytes of bf16: the swizzle span
comptime THREADS = 256


@__llvm_arg_metadata(wdesc, `nvvm.grid_constant`)
def box_kernel(wdesc: TMADescriptor, dst: Pointer[BFloat16, MutAnyOrigin], n0: Int32, k0: Int32, e: Int32):
    var smem = stack_allocation[BOX_K * BOX_N, BFloat16, address_space=AddressSpace.SHARED, alignment=1024]()
    var bar = stack_allocation[1, Int64, address_space=AddressSpace.SHARED, alignment=8]()
    if thread_idx.x == 0:
        prefetch_tma_descriptor(Pointer(to=wdesc).unsafe_bitcast[NoneType]())
        mbarrier_init(bar, Int32(1))
    barrier()
    if thread_idx.x == 0:
        mbarrier_arrive_expect_tx_shared(bar, Int32(BOX_K * BOX_N * 2))
        cp_async_bulk_tensor_shared_cluster_global(
            smem, Pointer(to=wdesc).unsafe_bitcast[NoneType](), bar, IndexList[3](Int(n0), Int(k0), Int(e))
        )
    mbarrier_try_wait_parity_shared(bar, Int32(0), Int32(0))
    for i in range(Int(thread_idx.x), BOX_K * BOX_N, THREADS):
        dst.unsafe_store(i, smem.unsafe_load(i))


def value(e: Int, k: Int, n: Int) -> BFloat16:
    # distinct small integers (exact in bf16) per element, never 0
    return Float32(1 + (e * 37 + k * 11 + n * 3) % 251).cast[DType.bfloat16]()


def check(ctx: DeviceContext, E: Int, K: Int, N: Int, n0: Int, k0: Int, e: Int) raises:
    var h_w = ctx.enqueue_create_host_buffer[DType.bfloat16](E * K * N)
    var h_o = ctx.enqueue_create_host_buffer[DType.bfloat16](BOX_K * BOX_N)
    ctx.synchronize()
    for ee in range(E):
        for k in range(K):
            for n in range(N):
                h_w[(ee * K + k) * N + n] = value(ee, k, n)
    var d_w = ctx.enqueue_create_buffer[DType.bfloat16](E * K * N)
    var d_o = ctx.enqueue_create_buffer[DType.bfloat16](BOX_K * BOX_N)
    ctx.enqueue_copy(d_w, h_w)
    # Innermost-last here: shape (E, K, N), strides in elements; the box is one expert's [64 k][64 n].
    var desc = create_tma_descriptor[DType.bfloat16, 3, TensorMapSwizzle.SWIZZLE_128B](
        DeviceBuffer[DType.bfloat16](ctx, d_w.unsafe_ptr(), 1, owning=False),
        IndexList[3](E, K, N), IndexList[3](K * N, N, 1), IndexList[3](1, BOX_K, BOX_N),
    )
    var po = Pointer[BFloat16, MutAnyOrigin](unsafe_from_address=Int(d_o.unsafe_ptr()))
    ctx.enqueue_function[box_kernel](desc, po, Int32(n0), Int32(k0), Int32(e), grid_dim=1, block_dim=THREADS)
    ctx.enqueue_copy(h_o, d_o)
    ctx.synchronize()
    var bad = 0
    for kr in range(BOX_K):
        for c in range(BOX_N // 8):
            for i in range(8):
                var k = k0 + kr
                var n = n0 + c * 8 + i
                var want = value(e, k, n) if k < K and n < N else BFloat16(0)
                var got = h_o[(kr * 8 + (c ^ (kr % 8))) * 8 + i]
                if got != want:
                    bad += 1
    print("tma box E", E, "K", K, "N", N, "at n", n0, "k", k0, "expert", e, "mismatches", bad)


def main() raises:
    var ctx = DeviceContext()
    check(ctx, 4, 256, 384, 64, 128, 2)  # inside an expert
    check(ctx, 4, 200, 384, 128, 192, 1)  # K tail: rows 200..255 zero, not expert 2's
    check(ctx, 3, 128, 200, 192, 0, 2)  # N edge: columns 200..255 zero
