# Element-wise activations: relu, silu and the SwiGLU product silu(gate) * up.
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


@always_inline
def silu_f32[width: Int](v: SIMD[DType.float32, width]) -> SIMD[DType.float32, width]:
    return v / (1.0 + exp(-v))


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
