"""Weight layouts: PyTorch's (Cout, Cin, kh, kw), and the stacks of matrices the products read.

A convolution's weight is stored as PyTorch stores it, (Cout, Cin, kh, kw): what ``state_dict()``
gives, what a learner will meet next. The products want it otherwise: the shifted products of the
forward pass one (Cin, Cout) matrix per kernel offset, the input gradient's one (Cout, Cin) matrix
per offset, and the weight gradient comes out in the forward's layout and must go back. Each is a
transposition of the weight, at every training step, and how it is copied matters: NumPy copies a
transposed view number by number, each read from another cache line, where OpenBLAS's
``omatcopy`` (blas.transposed) moves blocks that stay in cache. For the U-Net's 256 -> 256
convolution (2.4 MB of weights), forward 0.5 -> 0.1 ms, the input gradient's 0.24 -> 0.15 ms,
the gradient back 0.9 -> 0.3 ms: about as much as the products of a small layer.

The trick is to see each layout change as *one* 2-D transposition of the weight's memory:
(Cout, Cin*kh*kw) -> (Cin*kh*kw, Cout) for the forward's stack, read as (Cin, kh*kw, Cout) and
viewed as (kh*kw, Cin, Cout); (Cout*Cin, kh*kw) -> (kh*kw, Cout*Cin) for the input gradient's.
"""
from __future__ import annotations

from typing import Any

from tinyunet.accel import blas
from tinyunet.backend import xp


def kernel_stack(weight: Any) -> Any:
    """weight (Cout, Cin, kh, kw) -> (kh*kw, Cin, Cout): for each kernel offset t = i*kw + j the
    (Cin, Cout) matrix ``weight[:, :, i, j].T`` that the shifted products multiply by.

    A view of the weight matrix's transpose (Cin*kh*kw, Cout): one fast copy (blas.transposed), rows
    contiguous, which is all BLAS and the direct kernels need. A copy of ``weight.transpose(2, 3, 1,
    0)`` would read each number from another cache line (256 -> 256 channels: 0.12 vs 0.5 ms, in
    every forward pass)."""
    cout, cin, kh, kw = weight.shape
    return blas.transposed(weight.reshape(cout, cin * kh * kw)).reshape(cin, kh * kw, cout).transpose(1, 0, 2)


def flipped_kernel_stack(weight: Any) -> Any:
    """weight (Cout, Cin, kh, kw) -> (kh*kw, Cout, Cin), C-contiguous: ``weight[:, :, i, j]`` at
    t = i*kw + j, the matrices of the input gradient (the channel axes swapped). One fast copy."""
    cout, cin, kh, kw = weight.shape
    return blas.transposed(weight.reshape(cout * cin, kh * kw)).reshape(kh * kw, cout, cin)


def stack_to_weight(stack: Any) -> Any:
    """The way back from :func:`kernel_stack`'s layout, for gradients: (kh*kw, Cin, Cout) -> (Cout, Cin,
    kh*kw), C-contiguous (reshape it to the weight's shape). Two fast copies: rows in (Cin, kh*kw)
    order (free when stack is kernel_stack's kind of view), then one transposition."""
    terms, cin, cout = stack.shape
    rows = xp.ascontiguousarray(stack.transpose(1, 0, 2)).reshape(cin * terms, cout)
    return blas.transposed(rows).reshape(cout, cin, terms)
