"""A vector of 16 float32 numbers as a Numba type: the registers a fast convolution keeps its sums in.

Numba compiles loops over array elements, and the compiler vectorises what it can; but it does not
*register-block* a convolution: keep a tile of output sums in vector registers while the inputs
stream past, which is what makes a convolution kernel run at the CPU's arithmetic speed instead of
at the speed of its memory (measured: every loop formulation we tried ran at 6-13 GFLOP/s on one
core, see benchmarks/README.md). With an explicit vector type, a sum written as a variable *is* a
register: ``acc = vfma(x, w, acc)`` compiles to one fused multiply-add instruction on 16 lanes.

The operations are LLVM's own (``<16 x float>`` values, ``llvm.fma``), so the code is portable:
with AVX-512 one instruction per operation, with AVX2 two, and the results are the same IEEE
float32 arithmetic everywhere. Six operations are all the convolution kernels need
(tinyunet/direct_conv.py):

    vzero()                  16 zeros
    vload(a, i)              a's flat memory [i, i + 16) as a vector (a: C-contiguous float32)
    vstore(a, i, v)          write v to a's flat memory [i, i + 16)
    vbroadcast(a, i)         a's flat element i in all 16 lanes
    vfma(x, y, acc)          x * y + acc, lane by lane, one rounding (fused multiply-add)
    vadd(x, y)               x + y

No bounds are checked: the callers compute every index from the arrays' shapes. Needs Numba
(``pip install -e '.[fast]'``); importing this module without it raises ImportError.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

LANES = 16
_VECTOR = ir.VectorType(ir.FloatType(), LANES)


class Float32x16(types.Type):
    """The Numba type of a vector value (lives in a register, never in an array)."""

    def __init__(self) -> None:
        super().__init__(name=f"float32x{LANES}")


float32x16 = Float32x16()


@register_model(Float32x16)
class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VECTOR)


def _address(context, builder, array_type, array, index, element_type):
    """Pointer to element ``index`` of the array's flat memory, typed as ``element_type``."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [index]), ir.PointerType(element_type))


@intrinsic
def vzero(typingctx):
    def codegen(context, builder, signature, args):
        return ir.Constant(_VECTOR, [0.0] * LANES)
    return float32x16(), codegen


@intrinsic
def vload(typingctx, array, index):
    def codegen(context, builder, signature, args):
        return builder.load(_address(context, builder, signature.args[0], *args, _VECTOR), align=4)
    return float32x16(array, index), codegen


@intrinsic
def vstore(typingctx, array, index, vector):
    def codegen(context, builder, signature, args):
        builder.store(args[2], _address(context, builder, signature.args[0], args[0], args[1], _VECTOR), align=4)
        return context.get_dummy_value()
    return types.void(array, index, vector), codegen


@intrinsic
def vbroadcast(typingctx, array, index):
    def codegen(context, builder, signature, args):
        value = builder.load(_address(context, builder, signature.args[0], *args, ir.FloatType()))
        first = builder.insert_element(ir.Constant(_VECTOR, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
        lanes = ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES)
        return builder.shuffle_vector(first, ir.Constant(_VECTOR, ir.Undefined), lanes)
    return float32x16(array, index), codegen


@intrinsic
def vfma(typingctx, x, y, acc):
    def codegen(context, builder, signature, args):
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VECTOR, [_VECTOR] * 3),
                                             f"llvm.fma.v{LANES}f32")
        return builder.call(fma, args)
    return float32x16(x, y, acc), codegen


@intrinsic
def vadd(typingctx, x, y):
    def codegen(context, builder, signature, args):
        return builder.fadd(*args)
    return float32x16(x, y), codegen
