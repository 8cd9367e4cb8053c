"""BatchNorm2d on channels-last memory: NumPy passes over long image rows, or two compiled loops each way.

The reference (tinyunet/nn/norm.py) broadcasts (1, C, 1, 1) vectors against NCHW arrays. The
convolutions here hand over NCHW-shaped arrays whose memory is channels-last, and broadcasting a
(C,) vector against memory whose fastest axis has only C = 16 numbers makes NumPy loop over
16-number pieces, several times slower than over long contiguous runs. So :class:`RowsBatchNorm`
views each array as ``(N, H, W*C)`` rows of one image line each and tiles the per-channel vectors
W times to match a row; the formulas are the reference's, on blocks of images on every core.

:class:`CompiledBatchNorm` runs the same formulas as loops compiled by Numba (compiled_loops.py):
the per-channel sums in one pass, then the elementwise formula in another, each way, where the NumPy
passes read or write the activation ~8 times in forward and ~7 in backward. Its sums run in float64.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tinyunet.accel import compiled_loops
from tinyunet.accel.implementation import Implementation
from tinyunet.accel.parallel import map_batch_blocks
from tinyunet.backend import xp


def channels_last(x: Any) -> bool:
    """Whether x (N, C, H, W) has channels-last memory: the channel axis is the fastest one."""
    return x.ndim == 4 and x.strides[1] == x.itemsize and x.shape[1] > 1


class _Rows:
    """(N, C, H, W) arrays with channels-last memory viewed as (N, H, W*C) rows, and per-channel vectors
    tiled to (W*C,) to broadcast against them."""

    def __init__(self, shape: Any) -> None:
        self.shape = shape
        n, c, h, w = shape
        self.view_shape = (n, h, w * c)

    def view(self, a: Any) -> Any:
        """(N, C, H, W) -> (N, H, W*C) (a copy only if a's memory is not channels-last); a may be a block of images."""
        _, c, h, w = self.shape
        return a.transpose(0, 2, 3, 1).reshape(a.shape[0], h, w * c)

    def unview(self, a: Any) -> Any:
        """Inverse of :meth:`view`: back to an (N, C, H, W)-shaped array (a view)."""
        n, c, h, w = self.shape
        return a.reshape(-1, h, w, c).transpose(0, 3, 1, 2)

    def per_channel(self, v: Any) -> Any:
        return xp.tile(v, self.shape[3])

    def sum(self, a: Any) -> Any:
        """Per-channel sum of view(a) -> (C,)."""
        _, c, h, w = self.shape
        return a.sum(axis=(0, 1)).reshape(w, c).sum(axis=0)

    def dot(self, a: Any, b: Any) -> Any:
        """Per-channel sum of view(a) * view(b) -> (C,), without the product as a temporary array."""
        _, c, h, w = self.shape
        return xp.einsum("nhk,nhk->k", a, b).reshape(w, c).sum(axis=0)


class RowsBatchNorm(Implementation):
    """BatchNorm2d's forward and backward for one channels-last input, as NumPy passes over image rows."""

    name = "rows"

    @staticmethod
    def accepts(layer: Any, x: Any) -> bool:
        return channels_last(x)

    def forward(self, x: Any) -> Any:
        layer = self.layer
        rows = _Rows(x.shape)
        pc = rows.per_channel
        blocks = lambda fn: map_batch_blocks(fn, x, passes=2)  # noqa: E731
        centered = xp.empty(rows.view_shape, dtype=x.dtype)    # x - mean, (N, H, W*C), kept for backward
        if layer.training:
            m = x.size // x.shape[1]
            mean = sum(blocks(lambda start, stop: rows.sum(rows.view(x[start:stop])))) / m

            def center_and_sum_squares(start: int, stop: int) -> Any:
                c = centered[start:stop]
                xp.subtract(rows.view(x[start:stop]), pc(mean), out=c)
                return rows.dot(c, c)
            var = sum(blocks(center_and_sum_squares)) / m   # biased: what normalises this batch
            batch_mean, (mean, var, m) = mean, layer.combine_statistics(mean, var, m)
            if mean is not batch_mean:                       # SyncBatchNorm: all processes' mean
                centered -= pc(mean - batch_mean)
            inv_std = 1.0 / xp.sqrt(var + layer.eps)
            layer._update_running_stats(mean, var, m)
            shift = None                                     # centered holds x - mean already
        else:
            m = None
            inv_std = 1.0 / xp.sqrt(layer.running_var + layer.eps)
            shift = pc(layer.running_mean)
        scale, beta = pc(inv_std * layer.weight.data), pc(layer.bias.data)   # gamma / std, per channel
        out = xp.empty_like(centered)

        def normalise(start: int, stop: int) -> None:
            c = centered[start:stop]
            if shift is not None:  # eval: centered is not filled yet
                xp.subtract(rows.view(x[start:stop]), shift, out=c)
            xp.multiply(c, scale, out=out[start:stop])   # gamma * xhat
            out[start:stop] += beta
        blocks(normalise)
        self.cache = (centered, inv_std, m, rows)
        return rows.unview(out)

    def backward(self, dout: Any) -> Any:
        layer = self.layer
        centered, inv_std, m, rows = self.cache   # xhat = centered * inv_std; m None in eval mode
        self.cache = None
        pc = rows.per_channel
        blocks = lambda fn: map_batch_blocks(fn, dout, passes=3)  # noqa: E731

        def sums(start: int, stop: int) -> Any:
            dv = rows.view(dout[start:stop])
            return xp.stack([rows.sum(dv), rows.dot(dv, centered[start:stop])])
        dbeta, dout_dot_centered = sum(blocks(sums))
        dgamma = dout_dot_centered * inv_std                  # sum(dout * xhat)
        layer.weight.grad += dgamma
        layer.bias.grad += dbeta
        scale = pc(layer.weight.data * inv_std)
        training = m is not None
        if training:
            dbeta, dgamma = layer.combine_sums(dbeta, dgamma)
        dx = xp.empty_like(centered)

        def input_grad(start: int, stop: int) -> None:
            dv, d = rows.view(dout[start:stop]), dx[start:stop]
            if not training:  # the statistics are constants: a per-channel affine map
                xp.multiply(dv, scale, out=d)
                return
            # dx = scale * (dout - dbeta/m - xhat*dgamma/m), built in place to spare big temporaries
            xp.multiply(centered[start:stop], pc(dgamma * inv_std / m), out=d)   # xhat * dgamma / m
            d += pc(dbeta / m)
            xp.subtract(dv, d, out=d)
            d *= scale
        blocks(input_grad)
        return rows.unview(dx)


class CompiledBatchNorm(Implementation):
    """BatchNorm2d's forward and backward for one channels-last input, as compiled loops (Numba)."""

    name = "compiled"

    @staticmethod
    def accepts(layer: Any, x: Any) -> bool:
        return channels_last(x) and compiled_loops.usable(x)

    def forward(self, x: Any) -> Any:
        """The per-channel sums in one pass, then centered = x - mean and out = centered * gamma/std +
        beta in another."""
        layer = self.layer
        m = None
        if layer.training:
            mean, var = (v.astype(x.dtype) for v in compiled_loops.channel_mean_var(x))
            mean, var, m = layer.combine_statistics(mean, var, x.size // x.shape[1])
            layer._update_running_stats(mean, var, m)
        else:
            mean, var = layer.running_mean, layer.running_var
        inv_std = 1.0 / xp.sqrt(var + layer.eps)
        centered, out = compiled_loops.normalise(x, mean, inv_std * layer.weight.data, layer.bias.data)
        self.cache = (centered, inv_std, m)
        return out.transpose(0, 3, 1, 2)

    def backward(self, dout: Any) -> Any:
        """The sums of dout and dout * centered in one pass, then dx = gamma/std * (dout - dbeta/m -
        xhat * dgamma/m) in another (in eval mode, where the statistics are constants, dx = gamma/std * dout)."""
        layer = self.layer
        centered, inv_std, m = self.cache
        self.cache = None
        if not compiled_loops.usable(dout):   # a gradient in another layout: the loops need channels-last
            dout = np.ascontiguousarray(dout.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        dbeta, dout_dot_centered = (v.astype(dout.dtype) for v in compiled_loops.grad_sums(dout, centered))
        dgamma = dout_dot_centered * inv_std                  # sum(dout * xhat)
        layer.weight.grad += dgamma
        layer.bias.grad += dbeta
        scale = layer.weight.data * inv_std
        if m is not None:   # training: the statistics depend on x, the two correction terms
            dbeta, dgamma = layer.combine_sums(dbeta, dgamma)
            b, shift = -scale * dgamma * inv_std / m, -scale * dbeta / m
        else:          # the statistics are constants
            b = shift = xp.zeros_like(scale)
        return compiled_loops.affine_grad(dout, centered, scale, b, shift)
