# The GPU's cuBLAS path of the grouped expert GEMM (not registered ops): for
# float32, widths the tensor-core kernel does not take, and few large experts
# with many rows each, where cuBLAS's Hopper GEMMs beat it (gpu_grouped_gemm.mojo,
# cublas_is_faster). Everything else runs gpu_grouped_gemm.mojo, which never
# synchronises with the host.
#
# - gemm_gpu: one row-major C = A @ B through cuBLAS on the op's stream, with
#   explicit row strides so that a GEMM can read or write a column block of a
#   wider buffer (the SwiGLU halves). cuBLAS is column-major, so the row-major
#   product is issued as C^T = B^T @ A^T. Tensor cores are used for bfloat16
#   (float32 accumulation); float32 runs in full float32 (no TF32), so fp32
#   keeps the 1e-5 error bound of the reference tests.
#   We call cuBLAS rather than write a Hopper GEMM (wgmma + TMA) ourselves:
#   the per-expert GEMMs are ordinary large GEMMs once the rows are grouped,
#   and MAX's own vendor-BLAS handle (one per device context, created lazily)
#   is the supported way to reach it from a kernel.
# - gemm_batched_gpu: the same for a batch of equally sized GEMMs at fixed
#   strides, one launch (cublasGemmStridedBatchedEx): the small-batch path of
#   moe_ffn runs every expert as one batch without reading the offsets back.
# - expert_offsets_to_host: the grouped GEMM needs each expert's row count on
#   the host to size its launches, so the dispatch's offsets (E+1 int32) are
#   copied back and the stream is synchronised once per layer call.
# - gather_rows_gpu / activation_gpu: the memory-bound steps around the GEMMs,
#   vectorised 16 bytes per thread when the row lengths allow it.
# - expert_matmul_gpu: the cuBLAS grouped GEMM of pymoe_moe_expert_matmul and
#   moe_ffn, built from the pieces above. The expert offsets are
#   read back to the host (one stream sync), the gathered rows are copied
#   into a contiguous block, and each expert's rows are one cuBLAS GEMM
#   (tensor cores in bf16) writing the raw products; a memory-bound pass then
#   applies the activation (SwiGLU folds its two halves). Unlike the CPU path
#   the activation is not fused into the GEMM: cuBLAS has no SiLU epilogue.
#   Expert biases (GPT-OSS) are added in that same pass, before the
#   activation (ExpertBias says how a row finds its expert); with a bias the
#   pass also runs for activation "none". Without one (a compile-time flag)
#   the pass is the code it was.
#   zero_dropped_rows_gpu zeroes the op's rows past the last expert.

from _cublas.cublas import (
    Algorithm,
    ComputeType,
    _convert_to_cublas_datatype,
    check_cublas_error,
    cublasGemmEx,
    cublasGemmStridedBatchedEx,
    cublasMath_t,
    cublasOperation_t,
    cublasSetMathMode,
)
from linalg.matmul.vendor.blas import _get_global_handle
from max.gpu import block_idx, thread_idx
from max.gpu.host import DeviceBuffer, DeviceContext
from std.math import ceildiv, exp
from std.memory import Pointer
from std.sys import size_of

from .activation import DEFAULT_SWIGLU_ALPHA, DEFAULT_SWIGLU_LIMIT, clamped_swiglu_f32, is_gated
from .gpu_launch import pdl_attributes, pdl_begin

comptime GPU_BLOCK = 256


def gemm_gpu[dtype: DType](
    ctx: DeviceContext,
    c: Pointer[Scalar[dtype], MutAnyOrigin],
    ldc: Int,
    a: Pointer[Scalar[dtype], MutAnyOrigin],
    lda: Int,
    b: Pointer[Scalar[dtype], MutAnyOrigin],
    ldb: Int,
    m: Int,
    n: Int,
    k: Int,
) raises:
    """C[m, n] = A[m, k] @ B[k, n], all row-major with row strides ldc/lda/ldb."""
    comptime assert dtype == DType.float32 or dtype == DType.bfloat16, "gemm_gpu: float32 or bfloat16"
    if m == 0 or n == 0:
        return
    var handle = _get_global_handle[dtype](ctx)._get_cublas()
    check_cublas_error(cublasSetMathMode(handle, cublasMath_t.CUBLAS_DEFAULT_MATH))  # no TF32
    var alpha = Float32(1.0)
    var beta = Float32(0.0)
    comptime cublas_type = _convert_to_cublas_datatype[dtype]()
    check_cublas_error(
        cublasGemmEx(
            handle,
            cublasOperation_t.CUBLAS_OP_N,
            cublasOperation_t.CUBLAS_OP_N,
            Int32(n),
            Int32(m),
            Int32(k),
            rebind[Pointer[NoneType, ImmutAnyOrigin]](Pointer(to=alpha).bitcast[NoneType]()),
            rebind[Pointer[NoneType, ImmutAnyOrigin]](b.bitcast[NoneType]()),
            cublas_type,
            Int32(ldb),
            rebind[Pointer[NoneType, ImmutAnyOrigin]](a.bitcast[NoneType]()),
            cublas_type,
            Int32(lda),
            rebind[Pointer[NoneType, ImmutAnyOrigin]](Pointer(to=beta).bitcast[NoneType]()),
            c.bitcast[NoneType](),
            cublas_type,
            Int32(ldc),
            ComputeType.COMPUTE_32F,
            Algorithm.DEFAULT,
        )
    )


def gemm_batched_gpu[dtype: DType](
    ctx: DeviceContext,
    c: Pointer[Scalar[dtype], MutAnyOrigin],
    ldc: Int,
    stride_c: Int,
    a: Pointer[Scalar[dtype], MutAnyOrigin],
    lda: Int,
    stride_a: Int,
    b: Pointer[Scalar[dtype], MutAnyOrigin],
    ldb: Int,
    stride_b: Int,
    m: Int,
    n: Int,
    k: Int,
    batch: Int,
) raises:
    """C_i = A_i @ B_i for i < batch in one cuBLAS launch, where X_i starts
    stride_x elements after X_{i-1} (stride 0 repeats the same matrix);
    row-major as gemm_gpu."""
    comptime assert dtype == DType.float32 or dtype == DType.bfloat16, "gemm_batched_gpu: float32 or bfloat16"
    if m == 0 or n == 0 or batch == 0:
        return
    var handle = _get_global_handle[dtype](ctx)._get_cublas()
    check_cublas_error(cublasSetMathMode(handle, cublasMath_t.CUBLAS_DEFAULT_MATH))  # no TF32
    var alpha = Float32(1.0)
    var beta = Float32(0.0)
    comptime cublas_type = _convert_to_cublas_datatype[dtype]()
    check_cublas_error(
        cublasGemmStridedBatchedEx(
            handle,
            cublasOperation_t.CUBLAS_OP_N,
            cublasOperation_t.CUBLAS_OP_N,
            Int64(n),
            Int64(m),
            Int64(k),
            rebind[Pointer[NoneType, ImmutAnyOrigin]](Pointer(to=alpha).bitcast[NoneType]()),
            rebind[Pointer[NoneType, ImmutAnyOrigin]](b.bitcast[NoneType]()),
            cublas_type,
            Int64(ldb),
            Int64(stride_b),
            rebind[Pointer[NoneType, ImmutAnyOrigin]](a.bitcast[NoneType]()),
            cublas_type,
            Int64(lda),
            Int64(stride_a),
            rebind[Pointer[NoneType, ImmutAnyOrigin]](Pointer(to=beta).bitcast[NoneType]()),
            c.bitcast[NoneType](),
            cublas_type,
            Int64(ldc),
            Int64(stride_c),
            Int64(batch),
            ComputeType.COMPUTE_32F,
            Algorithm.DEFAULT,
        )
    )


def expert_offsets_to_host(
    ctx: DeviceContext, off_ptr: Pointer[Int32, MutAnyOrigin], experts: Int
) raises -> List[Int]:
    """The dispatch's expert_offsets [E+1] as host integers (synchronises the stream)."""
    var n = experts + 1
    var host = List[Int32](length=n, fill=0)
    var view = DeviceBuffer[DType.int32](ctx, off_ptr, n, owning=False)
    ctx.enqueue_copy(host.unsafe_ptr(), view)
    ctx.synchronize()
    var out = List[Int](capacity=n)
    for i in range(n):
        out.append(Int(host[i]))
    return out^


def _vector_width[dtype: DType]() -> Int:
    return 16 // size_of[Scalar[dtype]]()


def aligned16[dtype: DType](*ptrs: Pointer[Scalar[dtype], MutAnyOrigin]) -> Bool:
    """Whether every pointer is 16-byte aligned, so 16-byte vector accesses
    are legal (a tensor shared from PyTorch may be an offset view)."""
    for p in ptrs:
        if Int(p) % 16 != 0:
            return False
    return True


def gather_rows_gpu[dtype: DType](
    ctx: DeviceContext,
    dst: Pointer[Scalar[dtype], MutAnyOrigin],
    src: Pointer[Scalar[dtype], MutAnyOrigin],
    ids: Pointer[Int32, MutAnyOrigin],
    rows: Int,
    width: Int,
) raises:
    """dst[r, :] = src[ids[r], :] for r < rows (both with row stride `width`)."""
    comptime VW = _vector_width[dtype]()
    if rows == 0 or width == 0:
        return
    if width % VW == 0 and aligned16[dtype](dst, src):
        _gather[dtype, VW](ctx, dst, src, ids, rows, width)
    else:
        _gather[dtype, 1](ctx, dst, src, ids, rows, width)


def _gather[dtype: DType, vw: Int](
    ctx: DeviceContext,
    dst: Pointer[Scalar[dtype], MutAnyOrigin],
    src: Pointer[Scalar[dtype], MutAnyOrigin],
    ids: Pointer[Int32, MutAnyOrigin],
    rows: Int,
    width: Int,
) raises:
    # Rows start on 16-byte boundaries when width is a multiple of vw (MAX
    # buffers are aligned), so tell the compiler: otherwise it splits the
    # vector accesses into scalar ones.
    comptime ALIGN = vw * size_of[Scalar[dtype]]()
    var vecs = width // vw
    var n_total = Int64(rows * vecs)
    var n_vecs = Int64(vecs)
    var n_w = Int64(width)

    def kernel() {var dst, var src, var ids, var n_total, var n_vecs, var n_w}:
        pdl_begin()
        var i = Int(block_idx.x) * GPU_BLOCK + Int(thread_idx.x)
        if i >= Int(n_total):
            return
        var r = i // Int(n_vecs)
        var c = (i % Int(n_vecs)) * vw
        var s = Int(ids.unsafe_load(r))
        dst.unsafe_store[alignment=ALIGN](r * Int(n_w) + c, src.unsafe_load[width=vw, alignment=ALIGN](s * Int(n_w) + c))

    ctx.enqueue_function(kernel, attributes=pdl_attributes(), grid_dim=ceildiv(Int(n_total), GPU_BLOCK), block_dim=GPU_BLOCK)


struct ExpertBias[dtype: DType](ImplicitlyCopyable):
    """Where activation_gpu finds each row's expert bias: bias[e, :] (row
    stride ld; gated: the gate biases, then the up biases from n_out on) for
    the row's expert e. Rows are grouped by expert, so e is found from the
    expert offsets on the device (the routed layout: offsets[e] <= r <
    offsets[e + 1]) or, when rows_per_expert > 0, is r // rows_per_expert (the
    every-expert layout of moe_ffn). Read only when the kernel has a bias."""

    var ptr: Pointer[Scalar[Self.dtype], MutUntrackedOrigin]
    var ld: Int
    var offsets: Pointer[Int32, MutUntrackedOrigin]  # [experts + 1], on the device
    var experts: Int
    var rows_per_expert: Int

    def __init__(
        out self,
        ptr: Pointer[Scalar[Self.dtype], MutAnyOrigin],
        ld: Int,
        offsets: Pointer[Int32, MutAnyOrigin],
        experts: Int,
        rows_per_expert: Int,
    ):
        self.ptr = rebind[Pointer[Scalar[Self.dtype], MutUntrackedOrigin]](ptr)
        self.ld = ld
        self.offsets = rebind[Pointer[Int32, MutUntrackedOrigin]](offsets)
        self.experts = experts
        self.rows_per_expert = rows_per_expert


def activation_gpu[
    dtype: DType,
    activation: StaticString,
    has_bias: Bool = False,
    alpha: Float32 = DEFAULT_SWIGLU_ALPHA,
    limit: Float32 = DEFAULT_SWIGLU_LIMIT,
](
    ctx: DeviceContext,
    dst: Pointer[Scalar[dtype], MutAnyOrigin],
    ldd: Int,
    src: Pointer[Scalar[dtype], MutAnyOrigin],
    lds: Int,
    rows: Int,
    n_out: Int,
    bias: ExpertBias[dtype],
) raises:
    """dst[r, c] = act(src[r, c] (+ bias)) for r < rows, c < n_out; for the
    gated activations, h = src[r, :] (+ bias) and dst[r, c] = silu(h[c]) *
    h[n_out + c] ("swiglu") or clamped_swiglu(h[c], h[n_out + c]). dst may be
    src (each element is read and written by the same thread), computed in
    float32.

    Parameters:
        dtype: The element type.
        activation: "none", "relu", "silu", "swiglu" or "clamped_swiglu".
        has_bias: Add the row's expert bias (see ExpertBias) first.
        alpha: clamped_swiglu's sigmoid slope.
        limit: clamped_swiglu's clamp.
    """
    comptime VW = _vector_width[dtype]()
    if rows == 0 or n_out == 0:
        return
    var vectors = n_out % VW == 0 and ldd % VW == 0 and lds % VW == 0 and aligned16[dtype](dst, src)
    comptime if has_bias:
        vectors = vectors and bias.ld % VW == 0 and aligned16[dtype](rebind[Pointer[Scalar[dtype], MutAnyOrigin]](bias.ptr))
    if vectors:
        _activation[dtype, activation, VW, has_bias, alpha, limit](ctx, dst, ldd, src, lds, rows, n_out, bias)
    else:
        _activation[dtype, activation, 1, has_bias, alpha, limit](ctx, dst, ldd, src, lds, rows, n_out, bias)


def _activation[dtype: DType, activation: StaticString, vw: Int, has_bias: Bool, alpha: Float32, limit: Float32](
    ctx: DeviceContext,
    dst: Pointer[Scalar[dtype], MutAnyOrigin],
    ldd: Int,
    src: Pointer[Scalar[dtype], MutAnyOrigin],
    lds: Int,
    rows: Int,
    n_out: Int,
    bias: ExpertBias[dtype],
) raises:
    comptime ALIGN = vw * size_of[Scalar[dtype]]()
    comptime gated = is_gated[activation]()
    var vecs = n_out // vw
    var n_total = Int64(rows * vecs)
    var n_vecs = Int64(vecs)
    var n_ldd = Int64(ldd)
    var n_lds = Int64(lds)
    var n_half = Int64(n_out)
    var bias_ptr = bias.ptr
    var offsets = bias.offsets
    var n_ldb = Int64(bias.ld)
    var n_experts = Int64(bias.experts)
    var n_rpe = Int64(bias.rows_per_expert)

    def kernel() {
        var dst, var src, var n_total, var n_vecs, var n_ldd, var n_lds, var n_half,
        var bias_ptr, var offsets, var n_ldb, var n_experts, var n_rpe,
    }:
        pdl_begin()
        var i = Int(block_idx.x) * GPU_BLOCK + Int(thread_idx.x)
        if i >= Int(n_total):
            return
        var r = i // Int(n_vecs)
        var c = (i % Int(n_vecs)) * vw
        var v = src.unsafe_load[width=vw, alignment=ALIGN](r * Int(n_lds) + c).cast[DType.float32]()
        var up = SIMD[DType.float32, vw](0)
        comptime if gated:
            up = src.unsafe_load[width=vw, alignment=ALIGN](r * Int(n_lds) + Int(n_half) + c).cast[DType.float32]()
        comptime if has_bias:
            # The row's expert: the last e with offsets[e] <= r (empty experts
            # share an offset with the next one), by bisection over E + 1
            # offsets that stay in cache; or r // rows_per_expert.
            var e: Int
            if Int(n_rpe) > 0:
                e = r // Int(n_rpe)
            else:
                var lo = 0
                var hi = Int(n_experts)
                while hi - lo > 1:
                    var mid = (lo + hi) // 2
                    if Int(offsets.unsafe_load(mid)) <= r:
                        lo = mid
                    else:
                        hi = mid
                e = lo
            var b_row = e * Int(n_ldb)
            v += bias_ptr.unsafe_load[width=vw, alignment=ALIGN](b_row + c).cast[DType.float32]()
            comptime if gated:
                up += bias_ptr.unsafe_load[width=vw, alignment=ALIGN](b_row + Int(n_half) + c).cast[DType.float32]()
        comptime if activation == "relu":
            v = max(v, SIMD[DType.float32, vw](0))
        elif activation == "silu":
            v = v / (1.0 + exp(-v))
        elif activation == "swiglu":
            v = v / (1.0 + exp(-v)) * up
        elif activation == "clamped_swiglu":
            v = clamped_swiglu_f32[alpha, limit](v, up)
        dst.unsafe_store[alignment=ALIGN](r * Int(n_ldd) + c, v.cast[dtype]())

    ctx.enqueue_function(kernel, attributes=pdl_attributes(), grid_dim=ceildiv(Int(n_total), GPU_BLOCK), block_dim=GPU_BLOCK)


def expert_matmul_gpu[
    dtype: DType,
    activation: StaticString,
    gather: Bool,
    has_bias: Bool = False,
    alpha: Float32 = DEFAULT_SWIGLU_ALPHA,
    limit: Float32 = DEFAULT_SWIGLU_LIMIT,
](
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
    bias: ExpertBias[dtype],
) raises:
    """The grouped GEMM on the GPU (see the file header). `offsets` are the
    expert offsets on the host. A has row stride lda (k_dim columns used);
    with `gather`, its rows are first gathered into gathered_ptr [rows, k_dim].
    The raw products (n_w columns) go to wide_ptr (row stride ldw); the
    activation (after `bias` when has_bias) then writes C (row stride ldc).
    wide_ptr may be c_ptr; with activation "none" and no bias it must be."""
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
    comptime if activation != "none" or has_bias:
        var n_out = n_w // 2 if is_gated[activation]() else n_w
        activation_gpu[dtype, activation, has_bias, alpha, limit](ctx, c_ptr, ldc, wide_ptr, ldw, rows, n_out, bias)


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
        pdl_begin()
        var i = Int(block_idx.x) * 256 + Int(thread_idx.x)
        if i < Int(n_total) and i // Int(n_n) >= Int(valid_ptr.unsafe_load(0)):
            c_ptr.unsafe_store(i, Scalar[dtype](0))

    ctx.enqueue_function(kernel, attributes=pdl_attributes(), grid_dim=ceildiv(total, 256), block_dim=256)
