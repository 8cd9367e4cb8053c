"""Conv2d on a CPU: the frame every accelerated convolution shares, and its two unfolding methods.

The reference (tinyunet/nn/conv.py) computes a convolution as im2col + one matrix product per image,
on NCHW memory. The implementations here compute the same sums in other ways:

- :class:`Im2colConv` (here): the reference's im2col, image by image on every core, with the output
  written channels-last. For the RGB layer: its 3-channel pixels make every channels-last method
  move 12-byte pieces, while the NCHW columns give one product with K = 3*3*3 = 27.
- :class:`Im2rowConv` (here): im2col's channels-last twin, im2row: one row (kh*kw*Cin) per output
  pixel of the whole batch, so the batch is ONE tall product. For strides other than 1, and images
  too small for the shifted methods.
- ShiftedConv (shifted.py): nine shifted 1x1 products, no 9x copy; DirectConv (direct.py): the same
  sums as register-blocked compiled kernels; WinogradConv (winograd.py): F(2x2, 3x3).

Channels-last memory. Every implementation returns an NCHW-*shaped* view of (N, H, W, C) memory
(PyTorch's ``channels_last``): the next layer's ``x.transpose(0, 2, 3, 1)`` is then free, a pixel's
channels are contiguous (a row of a matrix product), and BatchNorm, ReLU and pooling read long
contiguous runs. The numbers are the same as the reference's, only their order in memory differs.

:class:`ConvImplementation` is the frame: bias, layouts in and out, and what the subclasses fill in,
``_forward(x)`` and ``_backward(dout)`` on (N, H, W, C) arrays.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

from tinyunet.accel import blas
from tinyunet.accel.implementation import Implementation
from tinyunet.accel.padding import zero_padded
from tinyunet.accel.parallel import map_batch_blocks, map_row_blocks, matmul, transposed_matmul
from tinyunet.accel.weight_layout import flipped_kernel_stack, kernel_stack
from tinyunet.backend import xp
from tinyunet.nn.conv import col2im, conv_output_size, im2col


def nhwc(x: Any) -> Any:
    """(N, C, H, W) -> the same numbers as (N, H, W, C): a view, free when x is channels-last in memory."""
    return x.transpose(0, 2, 3, 1)


def nchw(x: Any) -> Any:
    """(N, H, W, C) -> (N, C, H, W): a view (channels-last memory, NCHW shape), no copy."""
    return x.transpose(0, 3, 1, 2)


def channel_sum(a: Any) -> Any:
    """(N, H, W, C) -> (C,): the sum over every axis but the last (a bias gradient). Summed over
    (N, H) first, whose inner axis is W*C numbers long in channels-last memory, then over W: NumPy
    reduces long contiguous rows much faster than C-number pieces."""
    return a.sum(axis=(0, 1)).sum(axis=0)


def add_channel_vector(a: Any, v: Any) -> None:
    """a[n, y, x, c] += v[c] in place, for a (N, H, W, C) (a bias). Where each image row of a is W*C
    contiguous numbers, the row is one broadcast against v tiled W times: NumPy then loops over long
    rows instead of C-number pieces."""
    n, h, w, c = a.shape
    if a.strides[3] == a.itemsize and a.strides[2] == c * a.itemsize:
        rows = a.reshape(n, h, w * c)  # a view: the rows are contiguous (checked just above)
        rows += xp.tile(v, w)
    else:
        a += v


def output_size(layer: Any, h: int, w: int) -> Tuple[int, int]:
    kh, kw = layer.kernel_size
    return (conv_output_size(h, kh, layer.stride, layer.padding),
            conv_output_size(w, kw, layer.stride, layer.padding))


class ConvImplementation(Implementation):
    """One accelerated forward and backward of a Conv2d layer (tinyunet/nn/conv.py) for one input.

    ``forward(x)``: x (N, Cin, H, W), any memory layout -> (N, Cout, Hout, Wout), channels-last
    memory; keeps on itself what its backward needs. ``backward(dout)`` -> dx (N, Cin, H, W), or
    None when the layer asks for no input gradient (``layer.input_grad`` False: the image's layer);
    adds into the layer's ``weight.grad`` and ``bias.grad``.
    """

    def forward(self, x: Any) -> Any:
        out = self._forward(x)                                  # (N, Hout, Wout, Cout)
        if self.layer.bias is not None:
            add_channel_vector(out, self.layer.bias.data)
        return nchw(out)

    def backward(self, dout: Any) -> Any:
        dout = nhwc(dout)   # (N, Hout, Wout, Cout); free if dout is channels-last in memory
        if self.layer.bias is not None:
            self.layer.bias.grad += channel_sum(dout)
        dx = self._backward(dout)
        self.cache = None
        return None if dx is None else nchw(dx)

    def _forward(self, x: Any) -> Any:
        """x: (N, Cin, H, W) -> (N, Hout, Wout, Cout), without the bias."""
        raise NotImplementedError

    def _backward(self, dout: Any) -> Optional[Any]:
        """dout: (N, Hout, Wout, Cout) -> dx: (N, H, W, Cin), or None; adds into weight.grad."""
        raise NotImplementedError


class Im2colConv(ConvImplementation):
    """The reference's im2col, one image (block) at a time on every core, the output channels-last:
    per image, (Hout*Wout, K) @ (K, Cout) with K = Cin*kh*kw."""

    name = "im2col"

    def _forward(self, x: Any) -> Any:
        layer = self.layer
        kh, kw = layer.kernel_size
        n, k, cout = x.shape[0], layer.in_channels * kh * kw, layer.out_channels
        ho, wo = output_size(layer, x.shape[2], x.shape[3])
        out = xp.empty((n, ho, wo, cout), dtype=x.dtype)
        w_t = blas.transposed(layer.weight.data.reshape(cout, k))                  # (K, Cout)

        def images(start: int, stop: int) -> None:   # blocks of images in parallel, each its own columns
            cols = im2col(x[start:stop], kh, kw, layer.stride, layer.padding)       # (b, K, Ho*Wo)
            xp.matmul(cols.transpose(0, 2, 1), w_t, out=out[start:stop].reshape(stop - start, ho * wo, cout))
        map_row_blocks(images, n, ho * wo * k * cout)
        self.cache = x
        return out

    def _backward(self, dout: Any) -> Optional[Any]:
        layer = self.layer
        kh, kw = layer.kernel_size
        x, cout = self.cache, layer.out_channels
        n, k = x.shape[0], layer.in_channels * kh * kw
        d_rows = dout.reshape(n, -1, cout)                                          # (N, Ho*Wo, Cout)

        def images(start: int, stop: int) -> Any:    # the columns again (not kept: 9x the input's memory)
            cols = im2col(x[start:stop], kh, kw, layer.stride, layer.padding)       # (b, K, Ho*Wo)
            return xp.matmul(cols, d_rows[start:stop]).sum(axis=0)                  # (K, Cout)
        dw_t = sum(map_row_blocks(images, n, d_rows.shape[1] * k * cout))
        layer.weight.grad += blas.transposed(dw_t).reshape(layer.weight.data.shape)
        if not layer.input_grad:
            return None
        dcols = xp.matmul(layer.weight.data.reshape(cout, k).T, d_rows.transpose(0, 2, 1))
        return nhwc(col2im(dcols, x.shape, kh, kw, layer.stride, layer.padding))


def im2row(x: Any, kh: int, kw: int, stride: int, padding: int) -> Any:
    """Unfold patches into rows, channels-last: x (N, H, W, C) -> rows (N*Hout*Wout, kh*kw*C),
    column ``(i*kw + j)*C + c``, matching :func:`~tinyunet.accel.weight_layout.kernel_stack`. The
    padded border is written as zeros once; then one strided copy per kernel offset (i, j), each
    moving runs of C contiguous numbers (blocks of images in parallel)."""
    n, h, w, c = x.shape
    ho, wo = conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)
    if padding:
        x = zero_padded(x, padding)
    if kh == kw == 1 and stride == 1:
        return xp.ascontiguousarray(x).reshape(n * ho * wo, c)   # a 1x1 conv needs no unfolding
    rows = xp.empty((n, ho, wo, kh, kw, c), dtype=x.dtype)

    def images(start: int, stop: int) -> None:
        for i in range(kh):
            for j in range(kw):
                rows[start:stop, :, :, i, j] = x[start:stop, i:i + stride * ho:stride, j:j + stride * wo:stride]
    map_batch_blocks(images, rows, passes=2)
    return rows.reshape(n * ho * wo, kh * kw * c)


def row2im(rows: Any, x_shape: Tuple[int, ...], kh: int, kw: int, stride: int, padding: int) -> Any:
    """The adjoint of :func:`im2row`: rows (N*Hout*Wout, kh*kw*C) -> (N, H, W, C) with x_shape =
    (N, H, W, C), every row added back onto the patch it came from (overlaps sum)."""
    n, h, w, c = x_shape
    ho, wo = conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)
    rows = rows.reshape(n, ho, wo, kh, kw, c)
    out = xp.zeros((n, h + 2 * padding, w + 2 * padding, c), dtype=rows.dtype)
    for i in range(kh):
        for j in range(kw):
            out[:, i:i + stride * ho:stride, j:j + stride * wo:stride] += rows[:, :, :, i, j]
    return out[:, padding:padding + h, padding:padding + w]


class Im2rowConv(ConvImplementation):
    """rows = im2row(x), out = rows @ weight_t: one product for the whole batch, rows split between
    the threads. Backward: dweight = dout^T rows (blocks of output channels), dx by a gather (stride
    1: dout convolved with the flipped kernel) or row2im."""

    name = "im2row"

    def _weight_t(self) -> Any:
        """weight (Cout, Cin, kh, kw) -> (kh*kw*Cin, Cout), the column order of :func:`im2row`."""
        return xp.ascontiguousarray(kernel_stack(self.layer.weight.data)).reshape(-1, self.layer.out_channels)

    def _forward(self, x: Any) -> Any:
        layer = self.layer
        kh, kw = layer.kernel_size
        x = nhwc(x)
        ho, wo = output_size(layer, x.shape[1], x.shape[2])
        out = matmul(im2row(x, kh, kw, layer.stride, layer.padding), self._weight_t())   # (N*Ho*Wo, Cout)
        self.cache = x          # the rows are made again in backward: 9x the input's memory otherwise
        return out.reshape(x.shape[0], ho, wo, layer.out_channels)

    def _backward(self, dout: Any) -> Optional[Any]:
        layer = self.layer
        kh, kw = layer.kernel_size
        x, cout = self.cache, layer.out_channels
        n, h, w, c = x.shape
        rows = im2row(x, kh, kw, layer.stride, layer.padding)
        d2 = dout.reshape(-1, cout)                                # (N*Ho*Wo, Cout)
        # d2^T @ rows: (Cout, kh*kw*Cin), the batch summed inside the product, blocks of output
        # channels in parallel (no partial sums of the weight's size); in this order each output
        # channel's numbers land together in the gradient's (Cout, Cin, kh, kw) memory
        dw = transposed_matmul(d2, rows, partial_sums=False)
        layer.weight.grad += dw.reshape(cout, kh, kw, c).transpose(0, 3, 1, 2)
        if not layer.input_grad:
            return None
        if layer.stride == 1 and kh == kw and layer.padding <= kh - 1:
            # a gather instead of a scatter: dx is dout, zero-padded by k - 1 - padding, correlated
            # with the kernel flipped in both directions and its channel axes swapped (lesson 04):
            # one product, no overlapping adds into dx
            w_flip = flipped_kernel_stack(layer.weight.data)[::-1].reshape(-1, c)   # (kh*kw*Cout, Cin)
            drows = im2row(dout, kh, kw, 1, kh - 1 - layer.padding)                # (N*H*W, kh*kw*Cout)
            return matmul(drows, xp.ascontiguousarray(w_flip)).reshape(n, h, w, c)
        return row2im(matmul(d2, self._weight_t().T), x.shape, kh, kw, layer.stride, layer.padding)
