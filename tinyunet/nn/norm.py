"""BatchNorm2d: normalise each channel to zero mean and unit variance, then scale and shift.

Train mode uses the statistics of the batch (over N, H and W) and updates running averages;
eval mode uses the running averages, so a single image gives the same answer as in a batch.

Backward (train mode), with M = N*H*W values per channel, xhat = (x - mean) / std:

    dbeta  = sum(dout)                 dgamma = sum(dout * xhat)
    dx     = gamma / (M * std) * (M * dout - dbeta - xhat * dgamma)

The last line is the chain rule through mean and std collapsed into one expression; the lesson
derives it term by term. The layer keeps ``x - mean`` rather than xhat for backward (the same memory)
and folds 1/std into the per-channel constants: forward then normalises, scales and shifts in two
passes over the activation instead of three.

Memory layout. The convolutions hand over NCHW-shaped arrays whose memory is channels-last (see
conv.py). The maths does not care, but speed does: broadcasting a (C,) vector against memory whose
fastest axis has only C = 16 numbers makes NumPy loop over 16-number pieces, ~5x slower than over
long contiguous runs. So each array is viewed as ``(N, H, W*C)`` rows of one image line each and the
per-channel vectors are tiled W times to match a row; NCHW-memory inputs keep the plain
``(1, C, 1, 1)`` broadcast. Both views are free reshapes; the formulas are the same.

Compiled loops. The NumPy passes read or write the activation ~8 times in forward and ~7 in backward.
Where Numba is installed, channels-last batches (what the convolutions hand over) run the same
formulas as two compiled loops each way instead, the per-channel sums and then the elementwise
formula (``_forward_compiled`` / ``_backward_compiled``, tinyunet/kernels.py: standard training
step, all BatchNorms 76 -> 43 ms). The NumPy passes stay the reference, and are what CuPy runs.
"""
from __future__ import annotations

from typing import Any

from tinyunet import kernels
from tinyunet.backend import xp
from tinyunet.nn.module import Module, Parameter
from tinyunet.parallel import map_batch_blocks


class _Layout:
    """How to broadcast and reduce per-channel vectors against an (N, C, H, W) array x."""

    def __init__(self, x: Any) -> None:
        n, c, h, w = x.shape
        self.shape = x.shape
        # channels-last memory: the channel axis is the fastest one (stride of one element)
        self.channels_last = x.strides[1] == x.itemsize and c > 1

    @property
    def view_shape(self) -> tuple:
        """The shape :meth:`view` gives the whole batch."""
        n, c, h, w = self.shape
        return (n, h, w * c) if self.channels_last else self.shape

    def view(self, a: Any) -> Any:
        """(N, C, H, W) -> (N, H, W*C) for channels-last (a copy only if a's memory is NCHW), else a."""
        if not self.channels_last:
            return a
        _, c, h, w = self.shape
        return a.transpose(0, 2, 3, 1).reshape(a.shape[0], h, w * c)   # a may be a block of images

    def unview(self, a: Any) -> Any:
        """Inverse of :meth:`view`: back to an (N, C, H, W)-shaped array (a view)."""
        if not self.channels_last:
            return a
        n, c, h, w = self.shape
        return a.reshape(-1, h, w, c).transpose(0, 3, 1, 2)

    def per_channel(self, v: Any) -> Any:
        """(C,) -> broadcastable against view(a): tiled to (W*C,), or (1, C, 1, 1)."""
        return xp.tile(v, self.shape[3]) if self.channels_last else v.reshape(1, -1, 1, 1)

    def sum(self, a: Any) -> Any:
        """Per-channel sum of view(a) -> (C,)."""
        if not self.channels_last:
            return a.sum(axis=(0, 2, 3))
        _, c, h, w = self.shape
        return a.sum(axis=(0, 1)).reshape(w, c).sum(axis=0)

    def dot(self, a: Any, b: Any) -> Any:
        """Per-channel sum of view(a) * view(b) -> (C,), without the product as a temporary array
        (einsum multiplies and adds in one pass: 2-2.5x faster than (a * b) summed)."""
        if not self.channels_last:
            return xp.einsum("nchw,nchw->c", a, b)
        _, c, h, w = self.shape
        return xp.einsum("nhk,nhk->k", a, b).reshape(w, c).sum(axis=0)


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
        if layout.channels_last and kernels.usable(x):
            return self._forward_compiled(x, layout)
        pc = layout.per_channel
        # each pass below runs on blocks of images in parallel on the CPU (tinyunet/parallel.py); the
        # per-channel sums come back one per block and are added up
        blocks = lambda fn: map_batch_blocks(fn, x, passes=2)  # noqa: E731
        centered = xp.empty(layout.view_shape, dtype=x.dtype)  # x - mean, (N, H, W*C), kept for backward
        if self.training:
            m = x.size // x.shape[1]
            # x itself is only read (a conv's output: a view that skips the padding rows), and the
            # subtraction writes our own contiguous copy: two passes over x, no separate copy
            mean = sum(blocks(lambda start, stop: layout.sum(layout.view(x[start:stop])))) / m

            def center_and_sum_squares(start: int, stop: int) -> Any:
                c = centered[start:stop]
                xp.subtract(layout.view(x[start:stop]), pc(mean), out=c)
                return layout.dot(c, c)
            var = sum(blocks(center_and_sum_squares)) / m   # biased: what normalises this batch
            inv_std = 1.0 / xp.sqrt(var + self.eps)
            self._update_running_stats(mean, var, m)
            shift = None                                        # centered holds x - mean already
        else:
            inv_std = 1.0 / xp.sqrt(self.running_var + self.eps)
            shift = pc(self.running_mean)
        scale, beta = pc(inv_std * self.weight.data), pc(self.bias.data)   # gamma / std, per channel
        out = xp.empty_like(centered)

        def normalise(start: int, stop: int) -> None:
            c = centered[start:stop]
            if shift is not None:  # eval: centered is not filled yet
                xp.subtract(layout.view(x[start:stop]), shift, out=c)
            xp.multiply(c, scale, out=out[start:stop])   # gamma * xhat
            out[start:stop] += beta
        blocks(normalise)
        self.cache = (centered, inv_std, self.training, layout)
        return layout.unview(out)

    def backward(self, dout: Any) -> Any:
        """dout: (N, C, H, W) -> dx: (N, C, H, W); accumulates weight/bias grads."""
        centered, inv_std, training, layout = self.cache   # xhat = centered * inv_std
        self.cache = None
        if layout.channels_last and kernels.usable(dout):
            return self._backward_compiled(dout, centered, inv_std, training, layout)
        pc = layout.per_channel
        blocks = lambda fn: map_batch_blocks(fn, dout, passes=3)  # noqa: E731

        def sums(start: int, stop: int) -> Any:
            dv = layout.view(dout[start:stop])
            return xp.stack([layout.sum(dv), layout.dot(dv, centered[start:stop])])
        dbeta, dout_dot_centered = sum(blocks(sums))
        dgamma = dout_dot_centered * inv_std                  # sum(dout * xhat)
        self.weight.grad += dgamma
        self.bias.grad += dbeta
        scale = pc(self.weight.data * inv_std)
        m = dout.size // dout.shape[1]
        dx = xp.empty_like(centered)

        def input_grad(start: int, stop: int) -> None:
            dv, d = layout.view(dout[start:stop]), dx[start:stop]
            if not training:  # the statistics are constants: a per-channel affine map
                xp.multiply(dv, scale, out=d)
                return
            # dx = scale * (dout - dbeta/m - xhat*dgamma/m), built in place to spare big temporaries
            xp.multiply(centered[start:stop], pc(dgamma * inv_std / m), out=d)   # xhat * dgamma / m
            d += pc(dbeta / m)
            xp.subtract(dv, d, out=d)
            d *= scale
        blocks(input_grad)
        return layout.unview(dx)

    def _update_running_stats(self, mean: Any, var: Any, m: int) -> None:
        """Running averages of the batch statistics of m values per channel (used in eval mode)."""
        mom = self.momentum
        self.running_mean = (1 - mom) * self.running_mean + mom * mean
        # the running variance is the unbiased estimate, as in PyTorch
        self.running_var = (1 - mom) * self.running_var + mom * var * (m / max(m - 1, 1))

    # --- the same maths as compiled loops (tinyunet/kernels.py, optional Numba): two passes each way -----
    def _forward_compiled(self, x: Any, layout: _Layout) -> Any:
        """x: (N, C, H, W), channels-last memory -> (N, C, H, W), channels-last: the per-channel sums
        in one pass, then centered = x - mean and out = centered * gamma/std + beta in another."""
        if self.training:
            mean, var = (v.astype(x.dtype) for v in kernels.channel_mean_var(x))
            self._update_running_stats(mean, var, x.size // x.shape[1])
        else:
            mean, var = self.running_mean, self.running_var
        inv_std = 1.0 / xp.sqrt(var + self.eps)
        centered, out = kernels.normalise(x, mean, inv_std * self.weight.data, self.bias.data)
        self.cache = (centered.reshape(layout.view_shape), inv_std, self.training, layout)
        return out.transpose(0, 3, 1, 2)

    def _backward_compiled(self, dout: Any, centered: Any, inv_std: Any, training: bool, layout: _Layout) -> Any:
        """dout: (N, C, H, W), channels-last memory -> dx: the sums of dout and dout * centered in one
        pass, then dx = gamma/std * (dout - dbeta/m - xhat * dgamma/m) in another (in eval mode, where
        the statistics are constants, dx = gamma/std * dout)."""
        n, c, h, w = layout.shape
        centered = centered.reshape(n, h, w, c)
        dbeta, dout_dot_centered = (v.astype(dout.dtype) for v in kernels.grad_sums(dout, centered))
        dgamma = dout_dot_centered * inv_std                  # sum(dout * xhat)
        self.weight.grad += dgamma
        self.bias.grad += dbeta
        scale, m = self.weight.data * inv_std, n * h * w
        if training:   # the statistics depend on x: the two correction terms
            b, shift = -scale * dgamma * inv_std / m, -scale * dbeta / m
        else:          # the statistics are constants
            b = shift = xp.zeros_like(scale)
        return kernels.affine_grad(dout, centered, scale, b, shift)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"
