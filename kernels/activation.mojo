# Element-wise activations: relu, silu and the SwiGLU product silu(gate) * up;
# and the float32 formulas the expert kernels fuse into their epilogues
# (silu_f32, clamped_swiglu_f32 for GPT-OSS, is_gated).
#
# `foreach` hands each closure a SIMD vector whose width is chosen at compile
# time for the tensor's dtype and the target, so one source gives an AVX2,
# AVX-512 or GPU specialisation. Arithmetic is done in float32 so that
# bfloat16 inputs keep their precision inside the activation.

import extensibility
from extensibility import InputTensor, OutputTensor, foreach
from max.gpu.host import DeviceContext
from std.math import exp
from std.utils.coord import Coord

# GPT-OSS's clamped SwiGLU constants, the kernels' defaults for alpha and limit
# (pymoe.ops passes the caller's as compile-time parameters).
comptime DEFAULT_SWIGLU_ALPHA: Float32 = 1.702
comptime DEFAULT_SWIGLU_LIMIT: Float32 = 7.0


@always_inline
def silu_f32[width: Int](v: SIMD[DType.float32, width]) -> SIMD[DType.float32, width]:
    return v / (1.0 + exp(-v))


@always_inline
def clamped_swiglu_f32[alpha: Float32, limit: Float32, width: Int](
    gate: SIMD[DType.float32, width], up: SIMD[DType.float32, width]
) -> SIMD[DType.float32, width]:
    """GPT-OSS's gated activation: g = min(gate, limit), u = clamp(up, -limit,
    limit), (u + 1) * g * sigmoid(alpha * g).

    Parameters:
        alpha: The sigmoid's slope (GPT-OSS: 1.702).
        limit: The clamp (GPT-OSS: 7.0); > 0.
        width: The SIMD width.

    Args:
        gate: The gate half of the GEMM's output.
        up: The up half.
    """
    var g = min(gate, SIMD[DType.float32, width](limit))
    var u = min(max(up, SIMD[DType.float32, width](-limit)), SIMD[DType.float32, width](limit))
    return (u + 1.0) * g / (1.0 + exp(-alpha * g))


def is_gated[activation: StaticString]() -> Bool:
    """Whether the expert weights hold [W_gate | W_up] side by side and the
    output is half their width (swiglu, clamped_swiglu)."""
    return activation == "swiglu" or activation == "clamped_swiglu"


@extensibility.register("pymoe_relu")
struct Relu:
    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor,
        x: InputTensor[dtype=output.dtype, rank=output.rank, ...],
        ctx: DeviceContext,
    ) raises:
        def relu[width: Int](idx: Coord[...]) {var x} -> SIMD[x.dtype, width]:
            var v = x.load[width](idx)
            return max(v, SIMD[x.dtype, width](0))

        foreach[target=target](relu, output, ctx)


@extensibility.register("pymoe_silu")
struct Silu:
    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor,
        x: InputTensor[dtype=output.dtype, rank=output.rank, ...],
        ctx: DeviceContext,
    ) raises:
        def silu[width: Int](idx: Coord[...]) {var x} -> SIMD[x.dtype, width]:
            var v = x.load[width](idx).cast[DType.float32]()
            return silu_f32(v).cast[x.dtype]()

        foreach[target=target](silu, output, ctx)


@extensibility.register("pymoe_swiglu")
struct SwiGLU:
    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor,
        gate: InputTensor[dtype=output.dtype, rank=output.rank, ...],
        up: InputTensor[dtype=output.dtype, rank=output.rank, ...],
        ctx: DeviceContext,
    ) raises:
        def swiglu[width: Int](idx: Coord[...]) {var gate, var up} -> SIMD[gate.dtype, width]:
            var g = gate.load[width](idx).cast[DType.float32]()
            var u = up.load[width](idx).cast[DType.float32]()
            return (silu_f32(g) * u).cast[gate.dtype]()

        foreach[target=target](swiglu, output, ctx)
