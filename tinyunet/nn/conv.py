"""Conv2d: a 2-D convolution (cross-correlation, as in PyTorch) as matrix products.

A convolution is a sum of matrix products, and BLAS (CPU) or cuBLAS (GPU) run matrix products close
to the machine's peak. There are two classic ways to get there; both live here.

1. *im2col*: copy every kh×kw×C patch the kernel sees into a column, so the whole convolution is one
   product ``weight (Cout, C*kh*kw) @ cols (C*kh*kw, Hout*Wout)``. :func:`im2col` / :func:`col2im`
   are this textbook NCHW form (used by the lessons and tests); :func:`im2row` / :func:`row2im` are
   the channels-last form, rows (N*Hout*Wout, kh*kw*C), which makes the batch ONE product (the
   Conv2d uses it for strided convolutions). The price: a copy kh*kw (= 9) times the input's size.

2. *Shifted 1x1 products* (what Conv2d runs for stride 1, i.e. every conv of the U-Net): a 3x3
   convolution is the sum of nine 1x1 convolutions, one per kernel offset (i, j), each applied to
   the input shifted by (i, j). A 1x1 convolution over channels-last memory is a plain product
   ``x (pixels, C) @ weight[:, :, i, j].T (C, Cout)``. The shift costs nothing if we work on the
   *padded image flattened to (N*Hp*Wp, C) rows*: moving (i, j) in the image is moving
   ``i*Wp + j`` rows down, so each term reads the contiguous slice ``flat[off : off + L]``:

       out_flat[q] = sum_{i,j} flat[q + i*Wp + j] @ w[i, j]           q = n*Hp*Wp + y*Wp + x

   Row q is a true output pixel when y < Hout and x < Wout; the other rows (windows that run off
   the right or bottom edge into the next row or image) are computed too and thrown away: ~3% extra
   work at 128x128, and no 9x copy at all. Measured on 2 cores for the U-Net's first level
   (8x16x128x128, 16 -> 16 channels): im2row + one product 57 ms, nine shifted products 12 ms.
   On small images the thrown-away rows are no longer few (56% extra at 8x8) while a 9x copy is
   cheap, so outputs of at most 16x16 pixels use im2row again; and the RGB layer, whose 3-number
   channel rows make every channels-last method slow, uses the textbook im2col of the NCHW image,
   one product per image with K = 27 (:meth:`Conv2d._method`).

3. *Winograd's F(2x2, 3x3)* (winograd.py) for the wide, deep layers (3x3, padding 1, >= 64 channels):
   16 products per 2x2 output tile instead of 36 multiply-adds, for adds and subtracts around them.

4. *Direct kernels* (direct_conv.py, optional: Numba installed, float32, channels in multiples of
   16): the same shifted sums, but as compiled loops that keep a tile of outputs in vector
   registers for all nine terms, reading the *unpadded* image. Near the border they skip the
   terms whose pixel lies in the padding (which would add zeros), so nothing is padded: not x in
   forward, not dout or dx in backward. The layers' outputs are then plain (N, Hout, Wout, C)
   arrays. :meth:`Conv2d._forward_direct` / :meth:`Conv2d._backward_direct`; the method is still
   called "shifted".

Backward of the shifted form, with dflat = dout placed at the same rows q (zeros elsewhere):

    dweight[:, :, i, j] = (flat[off : off + L]^T @ dflat)^T        sum over the batch inside the product
    dflat_x[r] = sum_{i,j} dflat[r - off] @ w[i, j]^T              each term goes back where it came from
    dbias = dout summed over N, H, W

The input gradient is again a sum of nine shifted products (the kernel flipped: shifts go the other
way), so forward and backward share :func:`sum_of_shifted_products`. All three run on blocks of rows in
parallel on the CPU (tinyunet/parallel.py), and the weight and input gradients, which do not depend
on each other, run side by side (``run_concurrently``: each on its share of the cores, so the two
threads meet once per layer rather than at every one of its many short calls). The weight gradient
pads the input a block of rows at a time, so the two side by side never hold a padded copy of the
input next to dout's and dx's. Standard training step on 2 cores, the code before against this
(also Winograd's layers side by side), 4 runs alternating: 372-422 -> 349-401 ms (4.5-8.4% less
each time), peak memory 180.3 -> 179.3 MB.

Arrays stay NCHW in *shape* everywhere (the public convention), but the layers hand back NCHW-shaped
*views* of channels-last memory (``out.transpose(0, 3, 1, 2)``, no copy); the next conv's
``x.transpose(0, 2, 3, 1)`` is then free, and every elementwise op in between (BatchNorm, ReLU) keeps
the memory order of its input. That is PyTorch's "channels_last memory format": the same tensor,
only the order of the numbers in memory differs, so results never depend on it.

:func:`conv2d_naive` is the same maths as six nested loops, for reading and for the tests.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple

import numpy as np

from tinyunet import backend, blas, direct_conv
from tinyunet.backend import host_rng, to_device, xp
from tinyunet.nn.module import Module, Parameter
from tinyunet.nn.padding import zero_border, zero_padded
from tinyunet.nn.weight_layout import flipped_kernel_stack, kernel_stack, stack_to_weight
from tinyunet.nn.winograd import (winograd_conv3x3, winograd_weight_grad, winograd_weight_grad_to_kernel,
                                  winograd_weights)
from tinyunet.parallel import map_batch_blocks, map_row_blocks, matmul, run_concurrently, transposed_matmul


# Conv2d's weight gradient: at least this many rows are summed as partial sums per block of rows,
# fewer as whole products per kernel offset, or blocks of output channels with the direct kernels
# (see Conv2d._weight_grad_shifted, _weight_grad_direct)
_ROWS_TO_SPLIT_SUMS = 16384
# ... and with this many input channels those partial sums come from joined rows (same method)
_MIN_JOINED_CHANNELS, _MAX_JOINED_CHANNELS = 8, 16
# stride-1 outputs of at most this many pixels use im2row, and inputs of at most this many
# channels im2col (see Conv2d._method)
_MAX_IM2ROW_PIXELS = 256
# ... with the direct kernels (direct_conv.py) running the shifted ones: layers of fewer multiply-adds
# than this (too small to share between threads: their fixed costs outweigh the products)
_MIN_SHIFTED_WORK_DIRECT = 2 ** 24
_MAX_IM2COL_CHANNELS = 4
# padded 3x3 stride-1 convolutions with at least this many input and output channels, and at least
# this many 2x2 output tiles in the batch, use Winograd's F(2x2, 3x3) (see Conv2d._method)
_MIN_WINOGRAD_CHANNELS = 64
_MIN_WINOGRAD_TILES = 512
# ... and with the direct kernels running the shifted products (direct_conv.py), at least this many
_MIN_WINOGRAD_CHANNELS_DIRECT = 128
# products of at least this many multiply-adds are added into the sum by BLAS itself (blas.py);
# for smaller ones the microseconds of the direct call cost more than the pass it saves (with
# blas.shifted_matmuls' few microseconds per term, 2**16 rather than 2**21: batch-1 step pair ratios
# 0.971, 0.986, 0.979; standard step 0.971)
_MIN_DIRECT_BLAS_WORK = 2 ** 16


def sum_of_products(out: Any, pairs: List[Tuple[Any, Any]]) -> Any:
    """out[...] = sum of a @ b over (a, b) in pairs. out: (M, N); each a: (M, K), b: (K, N).

    NumPy's matmul can only *write* its result (BLAS's C = A @ B + beta * C with beta = 0), so every
    term after the first goes through one out-sized buffer (not one temporary per term) and is
    added. This is the portable version (CuPy, small products, a NumPy whose BLAS we cannot call);
    :func:`sum_of_shifted_products` lets BLAS add the terms itself where it can.
    """
    buf = None
    for k, (a, b) in enumerate(pairs):
        if k == 0:
            xp.matmul(a, b, out=out)
        else:
            if buf is None:
                buf = xp.empty_like(out)
            xp.matmul(a, b, out=buf)
            out += buf
    return out


def sum_of_shifted_products(out: Any, a: Any, starts: List[int], b: Any) -> Any:
    """out[...] = sum over t of a[starts[t] : starts[t] + M] @ b[t]: :func:`sum_of_products` of row
    slices of one matrix with a stack of weights, the convolution's shifted products. out: (M, N),
    a: (R, K), b: (T, K, N). On NumPy with products of at least 2**16 multiply-adds BLAS runs them
    straight from a's and b's memory and adds each term into out itself (tinyunet/blas.py: 10-25%
    faster for the U-Net's shifted products than the buffer), without a view per term."""
    m = out.shape[0]
    if not (backend.name() == "numpy" and m * a.shape[1] * out.shape[1] >= _MIN_DIRECT_BLAS_WORK
            and blas.shifted_matmuls(out, a, starts, b)):
        sum_of_products(out, [(a[start:start + m], b[t]) for t, start in enumerate(starts)])
    return out


def shifted_sums(out: Any, a: Any, starts: List[int], w: Any) -> None:
    """out[r] = sum over t of a[starts[t] + r] @ w[t] for every row r of out, by BLAS on every core:
    blocks of rows in parallel (tinyunet/parallel.py). out: (M, N), a: (R, K), w: (T, K, N)."""
    def rows(start: int, stop: int) -> None:
        sum_of_shifted_products(out[start:stop], a, [s + start for s in starts], w)
    map_row_blocks(rows, out.shape[0], w.shape[0] * w.shape[1] * out.shape[1])


def direct_sums(out: Any, a: Any, starts: List[int], w: Any, segments: Any) -> None:
    """The same sums by direct_conv's kernels, on every core, for the rows of the segments (all of
    out's rows). out: (M, N), a: (R, K), w: (T, K, N) (rows contiguous), segments: (S, 6)
    (direct_conv.clipped_segments).

    The threads share out blocks of rows (each thread then reads all the weights, and its rows), or
    where the weights outweigh the rows' inputs (T*N > M: the deep layers, a 2.4 MB weight for the 64
    rows of an 8x8 image), blocks of output channels: each thread reads its share of the weights only
    (256 -> 256 channels at 8x8, batch 1, the forward's kernels on 2 threads: 0.56 -> 0.46 ms). The
    kernels give the same numbers either way.
    """
    if not direct_conv.usable(out, a, w):   # the kernels check no bounds: what they read must fit
        raise ValueError("direct_sums takes float32 NumPy rows (C-contiguous) and weights whose rows are "
                         "contiguous, with output channels in multiples of 16")
    m, n = out.shape
    terms, k = w.shape[:2]
    if m < terms * n:
        def channels(first: int, last: int) -> None:   # output channels [16 first, 16 last)
            direct_conv.shifted_sum(out, a, starts, w, segments, columns=(16 * first, 16 * last))
        map_row_blocks(channels, n // 16, 16 * m * terms * k)
    else:
        def rows(start: int, stop: int) -> None:        # the segments that begin in rows [start, stop)
            direct_conv.shifted_sum(out, a, starts, w, direct_conv.segment_rows(segments, start, stop))
        map_row_blocks(rows, m, terms * k * n)


def pair(value: Any) -> Tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def im2col(x: Any, kh: int, kw: int, stride: int, padding: int) -> Any:
    """Unfold kernel-sized patches into columns (the textbook NCHW layout; lessons and tests).

    x: (N, C, H, W) -> cols: (N, C*kh*kw, Hout*Wout), row index ``c*kh*kw + i*kw + j``,
    matching ``weight.reshape(Cout, C*kh*kw)``. One strided copy per kernel offset (i, j):
    kh*kw vectorised copies, no loop over pixels or images.
    """
    n, c, h, w = x.shape
    ho, wo = conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)
    if padding:
        x = xp.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    cols = xp.empty((n, c, kh, kw, ho, wo), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = x[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride]
    return cols.reshape(n, c * kh * kw, ho * wo)


def col2im(cols: Any, x_shape: Tuple[int, ...], kh: int, kw: int, stride: int, padding: int) -> Any:
    """The adjoint of :func:`im2col`: add every column back where its patch came from.

    cols: (N, C*kh*kw, Hout*Wout) -> (N, C, H, W). Overlapping patches *sum*, which is exactly the
    chain rule for an input pixel used by several output pixels.
    """
    n, c, h, w = x_shape
    ho, wo = conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)
    cols = cols.reshape(n, c, kh, kw, ho, wo)
    out = xp.zeros((n, c, h + 2 * padding, w + 2 * padding), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            out[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride] += cols[:, :, i, j]
    if padding:
        out = out[:, :, padding:padding + h, padding:padding + w]
    return out


def channel_sum(a: Any) -> Any:
    """(N, H, W, C) -> (C,): the sum over every axis but the last (a bias gradient).

    Summed over (N, H) first, whose inner axis is W*C numbers long in channels-last memory, then
    over W: NumPy reduces long contiguous rows much faster than C-number pieces (8x128x128x16:
    2.7 -> 0.2 ms).
    """
    return a.sum(axis=(0, 1)).sum(axis=0)


def add_channel_vector(a: Any, v: Any) -> None:
    """a[n, y, x, c] += v[c] in place, for a (N, H, W, C) (a bias).

    Where each image row of a is W*C contiguous numbers (every output of the layers here), the row
    is one broadcast against v tiled W times: NumPy then loops over long rows instead of C-number
    pieces (8x128x128x3, the U-Net's head: 0.81 -> 0.08 ms).
    """
    n, h, w, c = a.shape
    if a.strides[3] == a.itemsize and a.strides[2] == c * a.itemsize:
        rows = a.reshape(n, h, w * c)  # a view: the rows are contiguous (checked just above)
        rows += xp.tile(v, w)
    else:
        a += v


def nhwc(x: Any) -> Any:
    """(N, C, H, W) -> the same numbers as (N, H, W, C): a view, free when x is channels-last in memory."""
    return x.transpose(0, 2, 3, 1)


def nchw(x: Any) -> Any:
    """(N, H, W, C) -> (N, C, H, W): a view (channels-last memory, NCHW shape), no copy."""
    return x.transpose(0, 3, 1, 2)


def im2row(x: Any, kh: int, kw: int, stride: int, padding: int) -> Any:
    """Unfold patches into rows, channels-last: the layout the layers use (see the module docstring).

    x: (N, H, W, C) -> rows: (N*Hout*Wout, kh*kw*C), column index ``(i*kw + j)*C + c``, matching
    ``weight.transpose(2, 3, 1, 0).reshape(kh*kw*C, Cout)``. The padded border is written as zeros
    once; then one strided copy per kernel offset (i, j), each moving runs of C contiguous numbers
    (blocks of images in parallel on the CPU).
    """
    n, h, w, c = x.shape
    ho, wo = conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)
    if padding:
        x = zero_padded(x, padding)  # zeros + one copy, instead of xp.pad
    if kh == kw == 1 and stride == 1:
        return xp.ascontiguousarray(x).reshape(n * ho * wo, c)  # a 1x1 conv needs no unfolding
    rows = xp.empty((n, ho, wo, kh, kw, c), dtype=x.dtype)

    def images(start: int, stop: int) -> None:
        for i in range(kh):
            for j in range(kw):
                rows[start:stop, :, :, i, j] = x[start:stop, i:i + stride * ho:stride, j:j + stride * wo:stride]
    map_batch_blocks(images, rows, passes=2)
    return rows.reshape(n * ho * wo, kh * kw * c)


def row2im(rows: Any, x_shape: Tuple[int, ...], kh: int, kw: int, stride: int, padding: int) -> Any:
    """The adjoint of :func:`im2row`: add every row back onto the patch it came from.

    rows: (N*Hout*Wout, kh*kw*C) -> (N, H, W, C) with x_shape = (N, H, W, C). Overlaps *sum*.
    """
    n, h, w, c = x_shape
    ho, wo = conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)
    rows = rows.reshape(n, ho, wo, kh, kw, c)
    out = xp.zeros((n, h + 2 * padding, w + 2 * padding, c), dtype=rows.dtype)
    for i in range(kh):
        for j in range(kw):
            out[:, i:i + stride * ho:stride, j:j + stride * wo:stride] += rows[:, :, :, i, j]
    if padding:
        out = out[:, padding:padding + h, padding:padding + w]
    return out


def conv2d_naive(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray], stride: int = 1,
                 padding: int = 0) -> np.ndarray:
    """Reference convolution with explicit loops (slow; for reading and testing only).

    x: (N, C, H, W), weight: (Cout, C, kh, kw), bias: (Cout,) or None -> (N, Cout, Hout, Wout)
    out[n, o, y, x] = bias[o] + sum_{c,i,j} weight[o, c, i, j] * xpad[n, c, y*stride + i, x*stride + j]
    """
    n, c, h, w = x.shape
    cout, _, kh, kw = weight.shape
    ho, wo = conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)
    xpad = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    out = np.zeros((n, cout, ho, wo), dtype=x.dtype)
    for b in range(n):
        for o in range(cout):
            for y in range(ho):
                for xx in range(wo):
                    patch = xpad[b, :, y * stride:y * stride + kh, xx * stride:xx * stride + kw]
                    out[b, o, y, xx] = np.sum(patch * weight[o]) + (bias[o] if bias is not None else 0)
    return out


def kaiming_uniform(shape: Tuple[int, ...], fan_in: int) -> Any:
    """PyTorch's default conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn on the host."""
    bound = 1.0 / math.sqrt(fan_in)
    return to_device(host_rng().uniform(-bound, bound, size=shape).astype(np.float32))


class Conv2d(Module):
    """2-D convolution over NCHW input; weight (out_channels, in_channels, kh, kw) as in PyTorch.

    stride 1: nine (kh*kw) shifted 1x1 products on the padded, flattened input (module docstring),
    or with Numba the direct kernels on the unpadded input; forward keeps only the input x for
    backward. Other strides, and small outputs: ``im2row(x) @ weight_t``. At most 4 input channels:
    ``im2col(x)`` per image. 3x3 with padding 1 and many channels in and out: Winograd's F(2x2, 3x3)
    (:meth:`_method`). The output is NCHW-shaped with channels-last memory.

    ``keep_cols`` (the im2row method only) keeps the im2row matrix from forward for backward
    (saves one unfolding, costs ~kh*kw times the input's memory until backward).

    ``method``: None (default) picks the method by shape; "im2col", "im2row", "shifted" or "winograd"
    forces one, e.g. to compare them (the results agree to rounding). Forcing "shifted" needs
    stride 1, "winograd" a 3x3 kernel, stride 1, padding 1 and even output sides.
    """

    METHODS = ("im2col", "im2row", "shifted", "winograd")

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: int = 1,
                 padding: int = 0, bias: bool = True, keep_cols: bool = False,
                 method: Optional[str] = None) -> None:
        if method is not None and method not in self.METHODS:
            raise ValueError(f"method must be None or one of {', '.join(self.METHODS)}, got {method!r}")
        self.method = method
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = pair(kernel_size)
        self.stride, self.padding, self.keep_cols = stride, padding, keep_cols
        kh, kw = self.kernel_size
        fan_in = in_channels * kh * kw
        self.weight = Parameter(kaiming_uniform((out_channels, in_channels, kh, kw), fan_in))
        self.bias = Parameter(kaiming_uniform((out_channels,), fan_in)) if bias else None
        self.cache: Any = None
        # False for a layer that reads the data itself: backward then skips the input's gradient and
        # returns None (nobody needs d(loss)/d(image); PyTorch skips it because images do not require grad)
        self.input_grad = True

    def forward(self, x: Any) -> Any:
        """x: (N, Cin, H, W) -> (N, Cout, Hout, Wout) (channels-last memory)."""
        kh, kw = self.kernel_size
        if x.shape[2] + 2 * self.padding < kh or x.shape[3] + 2 * self.padding < kw:
            raise ValueError(f"Conv2d input {x.shape[2]}x{x.shape[3]} (padding {self.padding}) is smaller "
                             f"than the kernel {self.kernel_size}")
        method = self._method(x.shape[0], conv_output_size(x.shape[2], kh, self.stride, self.padding),
                              conv_output_size(x.shape[3], kw, self.stride, self.padding))
        if method == "im2col":
            out = self._forward_im2col(x)
        elif method == "winograd":
            out = self._forward_winograd(nhwc(x))
        elif method == "shifted" and self._runs_direct(x):
            out = self._forward_direct(nhwc(x))
        elif method == "shifted":
            out = self._forward_shifted(nhwc(x))
        else:
            out = self._forward_im2row(nhwc(x))
        if self.bias is not None:
            add_channel_vector(out, self.bias.data)  # out: (N, Hout, Wout, Cout)
        return nchw(out)

    def backward(self, dout: Any) -> Any:
        """dout: (N, Cout, Hout, Wout) -> dx: (N, Cin, H, W); accumulates weight/bias grads."""
        dout = nhwc(dout)  # (N, Hout, Wout, Cout); free if dout is channels-last in memory
        if self.bias is not None:
            self.bias.grad += channel_sum(dout)
        backward = {"im2col": self._backward_im2col, "shifted": self._backward_shifted,
                    "im2row": self._backward_im2row, "winograd": self._backward_winograd}[self._method(*dout.shape[:3])]
        dx = backward(dout)
        self.cache = None
        return None if dx is None else nchw(dx)

    def _method(self, n: int, ho: int, wo: int) -> str:
        """Which method (``self.method`` if set), for a batch of n outputs of ho x wo: "im2col" for inputs of at most 4 channels
        (the RGB layer; "shifted" where the direct kernels run); "winograd" for padded 3x3 stride-1 layers with at least 64 channels in and
        out and 512 output tiles of 2x2; else shifted products ("shifted", stride 1), or im2row and one
        product ("im2row": other strides, and small images; with the direct kernels, small layers).

        Winograd (winograd.py) multiplies 16/36 as much, but its transforms move 4x the input and the
        output through memory, and its 16 products are (tiles, Cin) @ (Cin, Cout): it pays where the
        channels are many and the tiles enough. Measured, batch 8 on 2 cores, forward + backward,
        against the method used otherwise: 128 -> 64 channels at 32x32 22.5 -> 15.1 ms, 128 -> 128 at
        16x16 10.9 -> 8.1, 256 -> 128 at 16x16 22.2 -> 14.3, 64 -> 64 at 32x32 14.6 -> 13.7; slower
        with 32 channels (32 -> 32 at 64x64: 14.2 -> 17.5 ms) and for few tiles (batch 1, 64 -> 64
        at 32x32, 256 tiles: 2.0 -> 2.8 ms). Standard step, alternating in one process: median
        361 -> 338 ms; base 32: 1200 -> 936 ms.

        With the direct kernels (direct_conv.py: Numba installed, float32, channels in multiples of
        16) the shifted products run at ~100 GFLOP/s per core instead of 25-75, and beat Winograd up
        to 64 channels on either side: Winograd then needs 128 in and out. Measured, batch 8 on 2
        cores, forward + backward, shifted (direct) against Winograd: 64 -> 64 at 32x32 11.4 vs 12.4
        ms, 128 -> 64 at 32x32 22.5 vs 25.2, 64 -> 128 at 16x16 7.0 vs 7.6; 128 -> 128 at 16x16 13.4 vs
        11.7, 256 -> 128 at 16x16 27.3 vs 22.9 (Winograd's fewer multiplications win there); again
        with the kernels that copy no padding: 64 -> 64 at 32x32 8.4 vs 10.2 ms, 128 -> 64 at 32x32
        17.4 vs 17.0, 128 -> 128 at 16x16 8.7 vs 8.5, 256 -> 128 at 16x16 16.8 vs 15.0. They
        compute the real outputs only, not the padding's rows, so they beat im2row at 8x8 too (256 ->
        256 channels: 12.7 vs 13.8 ms), and at batch 1 since the threads share out the deep layers'
        output channels (:func:`direct_sums`) and the weights change layout in one fast copy
        (weight_layout.py): batch 1, 256 -> 256 at 8x8 3.56 vs 3.99 ms, 128 -> 256 at 8x8 1.57 vs
        1.83, 128 -> 128 at 16x16 1.79 vs 2.41, 256 -> 128 at 16x16 3.34 vs 4.18 (batch-1 step,
        alternating in one process: pair ratio 0.960). Only layers too small to share between threads
        (fewer than 2**24 multiply-adds) keep im2row: batch 1, 32 -> 32 at 8x8 0.15 vs 0.47 ms,
        256 -> 256 at 4x4 1.67 vs 1.87.

        Few channels: every method that works on channels-last rows moves C-number pieces (12 bytes
        for RGB) and runs products with K = C = 3; the textbook im2col copies whole image rows of the
        NCHW input instead and gives one product with K = Cin*kh*kw = 27 (3 -> 16 channels at 128x128,
        batch 8, 2 cores: forward 4.7 -> 2.6 ms, weight gradient 4.8 -> 2.2 ms). The direct kernels take
        the image as it is, 3 channels per pixel, with 3 sums in flight in the weight gradient (its
        input gradient, seldom needed, on 16 channels, 13 of them zero): 3 -> 16 at 128x128 without
        dx, forward + backward, batch 8 3.54 -> 2.33 ms, batch 1 0.67 -> 0.46 ms.

        Small images: the shifted products also compute the rows of the padding, (Ho + kh - 1) *
        (Wo + kw - 1) rows for Ho * Wo pixels, 3% extra work at 128x128 but 27% at 16x16 and 56% at
        8x8, where the 9x copy of im2row is small. Measured, U-Net layers at batch 8
        on 2 cores, forward + backward: 256 -> 256 channels at 8x8 18.5 -> 14.6 ms, 128 -> 128 at 16x16
        15.0 -> 13.6 ms; at 32x32 im2row is slower (64 -> 64: 13.5 -> 16.5 ms). Standard training step,
        3 alternating runs: min 410-428 -> 395-412 ms."""
        winograd_fits = (self.kernel_size == (3, 3) and self.stride == 1 and self.padding == 1
                         and ho % 2 == 0 and wo % 2 == 0)
        if self.method is not None:
            if (self.method == "winograd" and not winograd_fits) or (self.method == "shifted" and self.stride != 1):
                raise ValueError(f"Conv2d method {self.method!r} does not apply to {self} with a "
                                 f"{ho}x{wo} output")
            return self.method
        if self.in_channels <= _MAX_IM2COL_CHANNELS:   # an image: its input gradient is seldom needed
            return "shifted" if self._direct() and self.stride == 1 else "im2col"
        fewest = _MIN_WINOGRAD_CHANNELS_DIRECT if self._direct() else _MIN_WINOGRAD_CHANNELS
        if (winograd_fits and min(self.in_channels, self.out_channels) >= fewest
                and n * ho * wo // 4 >= _MIN_WINOGRAD_TILES):
            return "winograd"
        work = n * ho * wo * self.in_channels * self.out_channels * self.kernel_size[0] * self.kernel_size[1]
        if self.stride != 1 or (work < _MIN_SHIFTED_WORK_DIRECT if self._direct() else ho * wo <= _MAX_IM2ROW_PIXELS):
            return "im2row"
        return "shifted"

    def _direct(self) -> bool:
        """Whether direct_conv's kernels run this layer's shifted products: float32 NumPy weights,
        output channels in multiples of 16, input channels too or at most 4 (an image's: its input
        gradient then runs on 16 channels, the others zero), at most 63 kernel offsets, Numba."""
        return (direct_conv.runs(self.weight.data) and self.out_channels % 16 == 0
                and (self.in_channels % 16 == 0 or self.in_channels <= _MAX_IM2COL_CHANNELS)
                and self.kernel_size[0] * self.kernel_size[1] <= direct_conv.MAX_TAPS)

    def _runs_direct(self, x: Any) -> bool:
        return self._direct() and direct_conv.runs(x)

    # --- stride 1: shifted 1x1 products ----------------------------------------------------
    def _offsets(self, wp: int):
        """(i, j, row offset i*Wp + j) for every kernel position."""
        kh, kw = self.kernel_size
        return [(i, j, i * wp + j) for i in range(kh) for j in range(kw)]

    def _padded_rows(self, x: Any) -> Any:
        """x: (N, H, W, C) -> the zero-padded image as rows (N*Hp*Wp, C), contiguous channels-last."""
        n, h, w, c = x.shape
        p = self.padding
        if p == 0 and x.flags.c_contiguous:  # e.g. the 1x1 head after a ReLU: already rows, no copy
            return x.reshape(-1, c)
        return zero_padded(x, p).reshape(-1, c)  # also makes NCHW memory channels-last

    def _forward_shifted(self, x: Any) -> Any:
        """x: (N, H, W, Cin) -> (N, Hout, Wout, Cout), a view into an (N, Hp, Wp, Cout) buffer."""
        kh, kw = self.kernel_size
        n, h, w, c = x.shape
        p = self.padding
        hp, wp = h + 2 * p, w + 2 * p
        ho, wo = hp - kh + 1, wp - kw + 1
        flat = self._padded_rows(x)                              # (N*Hp*Wp, Cin)
        length = flat.shape[0] - (kh - 1) * wp - (kw - 1)      # rows whose whole window is in flat
        w_ij = kernel_stack(self.weight.data)                    # (kh*kw, Cin, Cout): one matrix per offset
        offsets = self._offsets(wp)
        out = xp.empty((n * hp * wp, self.out_channels), dtype=x.dtype)
        out[length:] = 0  # the last rows' windows would run off the end: not computed, and dropped below

        shifted_sums(out[:length], flat, [off for _, _, off in offsets], w_ij)   # every term a slice of flat
        # keep x itself, not the padded copy: in the U-Net x is a ReLU's output, which the ReLU keeps
        # for its own backward anyway, so this costs no memory; backward pads it again, a block at a time
        self.cache = (x, length)
        # rows with y >= Hout or x >= Wout were windows off the edge: drop them (a view, no copy)
        return out.reshape(n, hp, wp, self.out_channels)[:, :ho, :wo]

    def _padded_lines(self, x: Any, first: int, last: int) -> Any:
        """Lines [first, last) of the zero-padded batch (N*Hp lines of Wp pixels) as rows
        ((last - first)*Wp, C): the same numbers as ``_padded_rows(x)[first*Wp:last*Wp]``, without
        padding the rest. x: (N, H, W, C)."""
        n, h, w, c = x.shape
        p = self.padding
        if p == 0 and x.flags.c_contiguous:  # no padding (the 1x1 head): the lines are x's own rows
            return x.reshape(-1, c)[first * w:last * w]
        hp, wp = h + 2 * p, w + 2 * p
        piece = xp.zeros((last - first, wp, c), dtype=x.dtype)
        whole0, whole1 = -(-first // hp), last // hp              # the images wholly inside: one copy
        if whole0 < whole1:
            images = piece[whole0 * hp - first:whole1 * hp - first].reshape(whole1 - whole0, hp, wp, c)
            images[:, p:p + h, p:p + w] = x[whole0:whole1]
        for image in {first // hp, (last - 1) // hp} - set(range(whole0, whole1)):   # cut at an end
            top = image * hp + p                                  # padded line of the image's line 0
            y0, y1 = max(first - top, 0), min(last - top, h)      # its lines inside [first, last)
            if y0 < y1:
                piece[top + y0 - first:top + y1 - first, p:p + w] = x[image, y0:y1]
        return piece.reshape(-1, c)

    def _weight_grad_shifted(self, x: Any, dflat: Any, wp: int) -> Any:
        """dweight[i, j] = flat[off : off + L]^T @ dflat, flat = the padded input as rows (N*Hp*Wp, Cin).
        x: (N, H, W, Cin), dflat: (L, Cout), wp: the padded image's width Wp -> (kh, kw, Cin, Cout).

        Two ways to share the work between threads. Many rows (the wide images of the top levels, few
        channels): each block of rows pads just the lines it reads (:meth:`_padded_lines`, so the
        whole padded copy never exists in backward) and computes its share of the sum over pixels
        for every offset, and the shares are added - the only way to parallelise a 16x16 result.
        Fewer rows (the deep levels: 256x256 weights): whole products, offsets shared out - partial
        sums there would be one weight-sized array per block (at batch 1, 4 x 2.4 MB at the
        bottleneck: the step's peak).
        """
        kh, kw = self.kernel_size
        offsets = self._offsets(wp)
        n, h, _, c = x.shape
        length = dflat.shape[0]
        work = length * c * self.out_channels  # multiply-adds of one offset's product
        if length >= _ROWS_TO_SPLIT_SUMS:
            # narrow layers: products with only 8-16 input rows run far below BLAS speed, so per block
            # each pixel's row is joined with its kw-1 right neighbours, (rows, kw*Cin) - one copy - and
            # one product per kernel row i gives dweight[i, 0..kw-1] together (measured, 16 -> 16 at
            # 128x128, batch 8: backward 18.7 -> 14.0 ms; for 3 input channels the copy costs more, and
            # for 32 too: 32 -> 16 at 128x128 backward 32.0 -> 30.3 ms with the plain products)
            joined = kw > 1 and _MIN_JOINED_CHANNELS <= c <= _MAX_JOINED_CHANNELS
            reach = offsets[-1][2]                                # the farthest row a window reads

            def rows(start: int, stop: int) -> Any:
                first = start // wp
                flat = self._padded_lines(x, first, min(-(-(stop + reach) // wp), n * (h + 2 * self.padding)))
                start_in, stop_in = start - first * wp, stop - first * wp   # the block's rows in flat
                part = xp.empty((kh, kw, c, self.out_channels), dtype=x.dtype)
                if joined:
                    wide = xp.concatenate([flat[start_in + j:stop_in + (kh - 1) * wp + j] for j in range(kw)], axis=1)
                    part_rows = part.reshape(kh, kw * c, self.out_channels)
                    for i in range(kh):  # (kw*Cin, rows) @ (rows, Cout)
                        xp.matmul(wide[i * wp:i * wp + stop - start].T, dflat[start:stop], out=part_rows[i])
                    return part
                for i, j, off in offsets:  # (Cin, rows) @ (rows, Cout)
                    xp.matmul(flat[off + start_in:off + stop_in].T, dflat[start:stop], out=part[i, j])
                return part
            # not helped by the input gradient's thread when joined: each block copies ~3 MB of joined
            # rows, and a helper's second copy lands at the step's peak (16 -> 16 at 128x128: peak RSS
            # 179.1 -> 181.8 MB helped), for no gain in time there (backward 24.70 vs 24.73 ms)
            return sum(map_row_blocks(rows, length, kh * kw * c * self.out_channels, helped=not joined))
        flat = self._padded_rows(x)
        dw = xp.empty((kh, kw, c, self.out_channels), dtype=x.dtype)

        def some_offsets(first: int, last: int) -> None:
            for i, j, off in offsets[first:last]:  # (Cin, L) @ (L, Cout)
                xp.matmul(flat[off:off + length].T, dflat, out=dw[i, j])
        map_row_blocks(some_offsets, len(offsets), work)
        return dw

    def _backward_shifted(self, dout: Any) -> Any:
        """dout: (N, Hout, Wout, Cout) -> dx: (N, H, W, Cin)."""
        kh, kw = self.kernel_size
        x, length = self.cache
        if length is None:   # forward ran the direct kernels
            return self._backward_direct(dout, x)
        n, h, w, c = x.shape
        p = self.padding
        hp, wp = h + 2 * p, w + 2 * p
        ho, wo = dout.shape[1], dout.shape[2]
        offsets = self._offsets(wp)
        # dout on forward's (N*Hp*Wp) row grid, 0 on the thrown-away rows, after `front` rows of zeros
        # (the dx gather below reads up to `front` rows before row 0)
        front = offsets[-1][2]
        dbig = xp.empty((front + n * hp * wp, self.out_channels), dtype=dout.dtype)
        dbig[:front] = 0
        dgrid = dbig[front:].reshape(n, hp, wp, self.out_channels)

        def images(start: int, stop: int) -> None:
            zero_border(dgrid[start:stop], 0, ho, 0, wo)
            dgrid[start:stop, :ho, :wo] = dout[start:stop]
        map_batch_blocks(images, dgrid, passes=2)
        dflat = dbig[front:front + length]                       # (L, Cout)

        def weight_grad() -> None:
            dw = self._weight_grad_shifted(x, dflat, wp).reshape(kh * kw, c, self.out_channels)
            self.weight.grad += stack_to_weight(dw).reshape(self.weight.data.shape)
        if not self.input_grad:
            weight_grad()
            return None
        # Forward sent flat[q + off] @ w[i, j] to output row q. Gathered per input row r = q + off:
        #     dxflat[r] = sum_{i,j} dflat[r - off] @ w[i, j]^T        (dflat = 0 outside [0, L))
        # the same sum of shifted products as forward, shifted the other way (a convolution with the
        # flipped kernel). Each block owns its rows of dx: blocks never write the same memory.
        # (kh*kw, Cout, Cin): each offset's matrix transposed
        w_t = flipped_kernel_stack(self.weight.data)
        total = n * hp * wp
        dxflat = xp.empty((total, c), dtype=dout.dtype)          # gradient of the padded input

        run_concurrently(weight_grad,   # independent: side by side (tinyunet/parallel.py)
                         lambda: shifted_sums(dxflat, dbig, [front - off for _, _, off in offsets], w_t))
        return dxflat.reshape(n, hp, wp, c)[:, p:p + h, p:p + w]   # drop the padding (a view)

    # --- stride 1 with the direct kernels (direct_conv.py): the padding is never copied ----------
    def _direct_plan(self, n: int, h: int, w: int, input_grad: bool = False) -> Tuple[Any, List[int]]:
        """(segments, starts) of the direct kernels for an input of n images of h x w pixels: of the
        forward pass (tap (i, j) of output pixel (y, x) reads input pixel (y + i - p, x + j - p)), or
        of the input gradient (dx pixel (y, x) gathers dout pixel (y - i + p, x - j + p): the kernel
        flipped), the taps in the order of the weight stacks (t = i*kw + j)."""
        kh, kw = self.kernel_size
        p = self.padding
        ho, wo = conv_output_size(h, kh, 1, p), conv_output_size(w, kw, 1, p)
        sign, grid = (-1, (n, h, w, ho, wo)) if input_grad else (1, (n, ho, wo, h, w))
        taps = tuple((sign * (i - p), sign * (j - p)) for i in range(kh) for j in range(kw))
        return direct_conv.clipped_segments(*grid, taps), [di * grid[4] + dj for di, dj in taps]

    def _forward_direct(self, x: Any) -> Any:
        """x: (N, H, W, Cin) -> (N, Hout, Wout, Cout), C-contiguous: the kernels read the image as it
        is and skip the taps that fall into the padding (direct_conv.clipped_segments), so neither
        the input nor the output has a padded copy."""
        n, h, w, c = x.shape
        kh, kw = self.kernel_size
        rows = xp.ascontiguousarray(x).reshape(-1, c)   # (N*H*W, Cin); the U-Net's activations already are
        segments, starts = self._direct_plan(n, h, w)
        out = xp.empty((n, conv_output_size(h, kh, 1, self.padding), conv_output_size(w, kw, 1, self.padding),
                        self.out_channels), dtype=x.dtype)
        direct_sums(out.reshape(-1, self.out_channels), rows, starts, kernel_stack(self.weight.data), segments)
        self.cache = (rows.reshape(x.shape), None)
        return out

    def _backward_direct(self, dout: Any, x: Any) -> Any:
        """dout: (N, Hout, Wout, Cout), x: forward's (N, H, W, Cin), contiguous -> dx: (N, H, W, Cin),
        C-contiguous, or None. The weight gradient sums over forward's segments, dx over its own."""
        n, h, w, c = x.shape
        # rows of float32 (the layer's own precision); BatchNorm's gradient in the U-Net already is
        d = xp.ascontiguousarray(dout, dtype=x.dtype).reshape(-1, self.out_channels)
        a = x.reshape(-1, c)

        def weight_grad() -> None:
            dw = self._weight_grad_direct(a, d, *self._direct_plan(n, h, w))
            self.weight.grad += stack_to_weight(dw).reshape(self.weight.data.shape)
        if not self.input_grad:
            weight_grad()
            return None
        wide = -(-c // 16) * 16                                   # the kernels write 16 channels at a time
        dx = xp.empty((n, h, w, wide), dtype=x.dtype)

        def input_grad() -> None:   # the kernel flipped, side by side with the weight gradient
            w_t = flipped_kernel_stack(self.weight.data)          # (kh*kw, Cout, Cin)
            if wide != c:                                         # an image's 3: the other 13 zero, dropped
                w_t = xp.concatenate([w_t, xp.zeros(w_t.shape[:2] + (wide - c,), dtype=w_t.dtype)], axis=2)
            segments, starts = self._direct_plan(n, h, w, input_grad=True)
            direct_sums(dx.reshape(-1, wide), d, starts, w_t, segments)
        run_concurrently(weight_grad, input_grad)
        return dx[..., :c]

    def _weight_grad_direct(self, a: Any, d: Any, segments: Any, starts: List[int]) -> Any:
        """dweight[t] = sum over forward's output rows of a[tap t of the row]^T d[row], by the kernels.
        a: (N*H*W, Cin), d: (N*Hout*Wout, Cout) -> (kh*kw, Cin, Cout).

        Many rows (the top levels): each block of rows its share of the sum, the shares added - the
        only way to parallelise a 16x16 result. Fewer (the deep levels: 256x256 weights): blocks of
        output channels, every row each - even shares and no partial sums, which would be one
        weight-sized array per block (at batch 1, 4 x 2.4 MB at the bottleneck: the step's peak).
        """
        if not direct_conv.usable(d, a):     # the kernels check no bounds: what they read must fit
            raise ValueError("the direct weight gradient takes float32 NumPy rows (C-contiguous)")
        rows, c = d.shape[0], a.shape[1]
        work = len(starts) * c * self.out_channels            # multiply-adds per output row
        if rows >= _ROWS_TO_SPLIT_SUMS:
            return sum(map_row_blocks(lambda start, stop: direct_conv.shifted_weight_grad(
                a, starts, d, direct_conv.segment_rows(segments, start, stop)), rows, work))
        dw = xp.empty((len(starts), c, self.out_channels), dtype=a.dtype)

        def some_channels(first: int, last: int) -> None:    # output channels [16 first, 16 last)
            direct_conv.shifted_weight_grad(a, starts, d, segments, out=dw, columns=(16 * first, 16 * last))
        map_row_blocks(some_channels, self.out_channels // 16, 16 * rows * work // self.out_channels)
        return dw

    # --- 3x3, stride 1, padding 1, many channels: Winograd's F(2x2, 3x3) (winograd.py) -------------
    def _forward_winograd(self, x: Any) -> Any:
        """x: (N, H, W, Cin) -> (N, H, W, Cout)."""
        self.cache = x
        return winograd_conv3x3(x, winograd_weights(self.weight.data))

    def _backward_winograd(self, dout: Any) -> Any:
        """dout: (N, H, W, Cout) -> dx: (N, H, W, Cin), or None."""
        x = self.cache

        def weight_grad() -> None:
            self.weight.grad += winograd_weight_grad_to_kernel(winograd_weight_grad(x, dout))
        if not self.input_grad:
            weight_grad()
            return None
        # dx: the convolution of dout with the kernel flipped and its channel axes swapped, side by side
        # with the weight gradient (independent; tinyunet/parallel.py)
        return run_concurrently(weight_grad,
                                lambda: winograd_conv3x3(dout, winograd_weights(self.weight.data, flipped=True)))[1]

    # --- few input channels: the textbook im2col, image by image ------------------------------
    def _forward_im2col(self, x: Any) -> Any:
        """x: (N, Cin, H, W), any memory layout -> (N, Hout, Wout, Cout)."""
        kh, kw = self.kernel_size
        n, k = x.shape[0], self.in_channels * kh * kw
        ho = conv_output_size(x.shape[2], kh, self.stride, self.padding)
        wo = conv_output_size(x.shape[3], kw, self.stride, self.padding)
        out = xp.empty((n, ho, wo, self.out_channels), dtype=x.dtype)
        w_t = blas.transposed(self.weight.data.reshape(self.out_channels, k))           # (Cin*kh*kw, Cout)

        def images(start: int, stop: int) -> None:  # blocks of images in parallel; each its own columns
            cols = im2col(x[start:stop], kh, kw, self.stride, self.padding)            # (b, K, Ho*Wo)
            # (Ho*Wo, K) @ (K, Cout) per image: the output comes out channels-last
            xp.matmul(cols.transpose(0, 2, 1), w_t, out=out[start:stop].reshape(stop - start, ho * wo, -1))
        map_row_blocks(images, n, ho * wo * k * self.out_channels)
        self.cache = x
        return out

    def _backward_im2col(self, dout: Any) -> Any:
        """dout: (N, Hout, Wout, Cout) -> dx: (N, H, W, Cin) (a view of NCHW memory), or None."""
        kh, kw = self.kernel_size
        x = self.cache
        n, k = x.shape[0], self.in_channels * kh * kw
        d_rows = dout.reshape(n, -1, self.out_channels)                  # (N, Ho*Wo, Cout)

        def images(start: int, stop: int) -> Any:  # columns again (not kept: 9x the input's memory)
            cols = im2col(x[start:stop], kh, kw, self.stride, self.padding)            # (b, K, Ho*Wo)
            return xp.matmul(cols, d_rows[start:stop]).sum(axis=0)                     # (K, Cout)
        dw_t = sum(map_row_blocks(images, n, d_rows.shape[1] * k * self.out_channels))
        self.weight.grad += blas.transposed(dw_t).reshape(self.weight.data.shape)
        if not self.input_grad:
            return None
        dcols = xp.matmul(self.weight.data.reshape(self.out_channels, k).T, d_rows.transpose(0, 2, 1))
        return nhwc(col2im(dcols, x.shape, kh, kw, self.stride, self.padding))   # (b, K, Ho*Wo) -> NCHW

    # --- other strides: im2row and one product -----------------------------------------------
    def _weight_t(self) -> Any:
        """weight (Cout, C, kh, kw) -> (kh*kw*C, Cout), the column order of :func:`im2row`."""
        return xp.ascontiguousarray(kernel_stack(self.weight.data)).reshape(-1, self.out_channels)

    def _forward_im2row(self, x: Any) -> Any:
        """x: (N, H, W, Cin) -> (N, Hout, Wout, Cout)."""
        kh, kw = self.kernel_size
        n, h, w, _ = x.shape
        ho = conv_output_size(h, kh, self.stride, self.padding)
        wo = conv_output_size(w, kw, self.stride, self.padding)
        rows = im2row(x, kh, kw, self.stride, self.padding)        # (N*Ho*Wo, kh*kw*Cin)
        out = matmul(rows, self._weight_t())                       # (N*Ho*Wo, Cout)
        self.cache = (rows if self.keep_cols else x, x.shape)
        return out.reshape(n, ho, wo, self.out_channels)

    def _backward_im2row(self, dout: Any) -> Any:
        """dout: (N, Hout, Wout, Cout) -> dx: (N, H, W, Cin)."""
        kh, kw = self.kernel_size
        saved, x_shape = self.cache
        rows = saved if self.keep_cols else im2row(saved, kh, kw, self.stride, self.padding)
        d2 = dout.reshape(-1, self.out_channels)                   # (N*Ho*Wo, Cout)
        # d2^T @ rows: (Cout, kh*kw*Cin), the batch summed inside the product, blocks of output channels
        # in parallel (no partial sums of the weight's size). In this order each output channel's
        # kh*kw*Cin numbers land close together in the gradient's (Cout, Cin, kh, kw) memory: the add
        # is 2.4x faster than from (kh*kw*Cin, Cout) (256 -> 256 at 8x8, batch 8, backward 10.8 -> 10.1
        # ms; batch 1 3.4 -> 2.7 ms)
        dw = transposed_matmul(d2, rows, partial_sums=False)
        self.weight.grad += dw.reshape(self.out_channels, kh, kw, x_shape[3]).transpose(0, 3, 1, 2)
        if not self.input_grad:
            return None
        n, h, w, c = x_shape
        if self.stride == 1 and kh == kw and self.padding <= kh - 1:
            # a gather instead of a scatter: dx is dout, zero-padded by k - 1 - padding, correlated
            # with the kernel flipped in both directions and its channel axes swapped (the same maths
            # as the shifted form's dx, written as one product): no overlapping adds into dx
            w_flip = flipped_kernel_stack(self.weight.data)[::-1].reshape(-1, c)   # (kh*kw*Cout, Cin)
            drows = im2row(dout, kh, kw, 1, kh - 1 - self.padding)           # (N*H*W, kh*kw*Cout)
            return matmul(drows, xp.ascontiguousarray(w_flip)).reshape(n, h, w, c)
        drows = matmul(d2, self._weight_t().T)                     # (N*Ho*Wo, kh*kw*Cin)
        return row2im(drows, x_shape, kh, kw, self.stride, self.padding)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}"
                + (f", method={self.method!r}" if self.method else ""))
