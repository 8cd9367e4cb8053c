"""BatchNorm2d: normalise each channel to zero mean and unit variance, then scale and shift.

Train mode uses the statistics of the batch (over N, H and W) and updates running averages;
eval mode uses the running averages, so a single image gives the same answer as in a batch.

Backward (train mode), with M = N*H*W values per channel, xhat = (x - mean) / std:

    dbeta  = sum(dout)                 dgamma = sum(dout * xhat)
    dx     = gamma / (M * std) * (M * dout - dbeta - xhat * dgamma)

The last line is the chain rule through mean and std collapsed into one expression; the lesson
derives it term by term.

Memory layout. The convolutions hand over NCHW-shaped arrays whose memory is channels-last (see
conv.py). The maths does not care, but speed does: broadcasting a (C,) vector against memory whose
fastest axis has only C = 16 numbers makes NumPy loop over 16-number pieces, ~5x slower than over
long contiguous runs. So each array is viewed as ``(N, H, W*C)`` rows of one image line each and the
per-channel vectors are tiled W times to match a row; NCHW-memory inputs keep the plain
``(1, C, 1, 1)`` broadcast. Both views are free reshapes; the formulas are the same.
"""
from __future__ import annotations

from typing import Any

from tinyunet.backend import xp
from tinyunet.nn.module import Module, Parameter


class _Layout:
    """How to broadcast and reduce per-channel vectors against an (N, C, H, W) array x."""

    def __init__(self, x: Any) -> None:
        n, c, h, w = x.shape
        self.shape = x.shape
        # channels-last memory: the channel axis is the fastest one (stride of one element)
        self.channels_last = x.strides[1] == x.itemsize and c > 1

    def view(self, a: Any) -> Any:
        """(N, C, H, W) -> (N, H, W*C) for channels-last (a copy only if a's memory is NCHW), else a."""
        if not self.channels_last:
            return a
        n, c, h, w = self.shape
        return a.transpose(0, 2, 3, 1).reshape(n, h, w * c)

    def unview(self, a: Any) -> Any:
        """Inverse of :meth:`view`: back to an (N, C, H, W)-shaped array (a view)."""
        if not self.channels_last:
            return a
        n, c, h, w = self.shape
        return a.reshape(n, h, w, c).transpose(0, 3, 1, 2)

    def per_channel(self, v: Any) -> Any:
        """(C,) -> broadcastable against view(a): tiled to (W*C,), or (1, C, 1, 1)."""
        return xp.tile(v, self.shape[3]) if self.channels_last else v.reshape(1, -1, 1, 1)

    def sum(self, a: Any) -> Any:
        """Per-channel sum of view(a) -> (C,)."""
        if not self.channels_last:
            return a.sum(axis=(0, 2, 3))
        n, c, h, w = self.shape
        return a.sum(axis=(0, 1)).reshape(w, c).sum(axis=0)


class BatchNorm2d(Module):
    buffer_names = ("running_mean", "running_var")

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = Parameter(xp.ones(num_features, dtype=xp.float32))
        self.bias = Parameter(xp.zeros(num_features, dtype=xp.float32))
        self.running_mean = xp.zeros(num_features, dtype=xp.float32)
        self.running_var = xp.ones(num_features, dtype=xp.float32)
        self.cache: Any = None

    def forward(self, x: Any) -> Any:
        """x: (N, C, H, W) -> (N, C, H, W) (same memory layout as x)."""
        layout = _Layout(x)
        pc = layout.per_channel
        xv = layout.view(x)
        if self.training:
            m = x.size // x.shape[1]
            mean = layout.sum(xv) / m
            centered = xv - pc(mean)
            var = layout.sum(centered * centered) / m  # biased: what normalises this batch
            inv_std = 1.0 / xp.sqrt(var + self.eps)
            xhat = centered
            xhat *= pc(inv_std)  # in place: centered is not needed any more
            mom = self.momentum
            self.running_mean = (1 - mom) * self.running_mean + mom * mean
            # the running variance is the unbiased estimate, as in PyTorch
            self.running_var = (1 - mom) * self.running_var + mom * var * (m / max(m - 1, 1))
        else:
            inv_std = 1.0 / xp.sqrt(self.running_var + self.eps)
            xhat = (xv - pc(self.running_mean)) * pc(inv_std)
        self.cache = (xhat, inv_std, self.training, layout)
        out = xhat * pc(self.weight.data)
        out += pc(self.bias.data)
        return layout.unview(out)

    def backward(self, dout: Any) -> Any:
        """dout: (N, C, H, W) -> dx: (N, C, H, W); accumulates weight/bias grads."""
        xhat, inv_std, training, layout = self.cache
        self.cache = None
        pc = layout.per_channel
        dv = layout.view(dout)
        dbeta = layout.sum(dv)
        dgamma = layout.sum(dv * xhat)
        self.weight.grad += dgamma
        self.bias.grad += dbeta
        scale = pc(self.weight.data * inv_std)
        if not training:  # the statistics are constants: a per-channel affine map
            return layout.unview(dv * scale)
        m = dout.size // dout.shape[1]
        dx = xhat * pc(dgamma / m)
        dx += pc(dbeta / m)
        # dx = scale * (dout - dbeta/m - xhat*dgamma/m), built in place to spare two big temporaries
        xp.subtract(dv, dx, out=dx)
        dx *= scale
        return layout.unview(dx)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"
