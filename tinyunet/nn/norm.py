"""BatchNorm2d: normalise each channel to zero mean and unit variance, then scale and shift.

Train mode uses the statistics of the batch (over N, H and W) and updates running averages;
eval mode uses the running averages, so a single image gives the same answer as in a batch.

Backward (train mode), with M = N*H*W values per channel, xhat = (x - mean) / std:

    dbeta  = sum(dout)                 dgamma = sum(dout * xhat)
    dx     = gamma / (M * std) * (M * dout - dbeta - xhat * dgamma)

The last line is the chain rule through mean and std collapsed into one expression; the lesson
derives it term by term.
"""
from __future__ import annotations

from typing import Any

from tinyunet.backend import xp
from tinyunet.nn.module import Module, Parameter

_AXES = (0, 2, 3)  # every axis but the channels


def _per_channel(v: Any) -> Any:
    """(C,) -> (1, C, 1, 1), to broadcast against NCHW."""
    return v.reshape(1, -1, 1, 1)


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
        """x: (N, C, H, W) -> (N, C, H, W)."""
        if self.training:
            m = x.size // x.shape[1]
            mean = x.mean(axis=_AXES)
            centered = x - _per_channel(mean)
            var = (centered * centered).mean(axis=_AXES)  # biased: what normalises this batch
            inv_std = 1.0 / xp.sqrt(var + self.eps)
            xhat = centered
            xhat *= _per_channel(inv_std)  # in place: centered is not needed any more
            mom = self.momentum
            self.running_mean = (1 - mom) * self.running_mean + mom * mean
            # the running variance is the unbiased estimate, as in PyTorch
            self.running_var = (1 - mom) * self.running_var + mom * var * (m / max(m - 1, 1))
        else:
            inv_std = 1.0 / xp.sqrt(self.running_var + self.eps)
            xhat = (x - _per_channel(self.running_mean)) * _per_channel(inv_std)
        self.cache = (xhat, inv_std, self.training)
        return xhat * _per_channel(self.weight.data) + _per_channel(self.bias.data)

    def backward(self, dout: Any) -> Any:
        """dout: (N, C, H, W) -> dx: (N, C, H, W); accumulates weight/bias grads."""
        xhat, inv_std, training = self.cache
        self.cache = None
        dbeta = dout.sum(axis=_AXES)
        dgamma = (dout * xhat).sum(axis=_AXES)
        self.weight.grad += dgamma
        self.bias.grad += dbeta
        scale = _per_channel(self.weight.data * inv_std)
        if not training:  # the statistics are constants: a per-channel affine map
            return dout * scale
        m = dout.size // dout.shape[1]
        dx = xhat * _per_channel(dgamma / m)
        dx += _per_channel(dbeta / m)
        # dx = scale * (dout - dbeta/m - xhat*dgamma/m), built in place to spare two big temporaries
        xp.subtract(dout, dx, out=dx)
        dx *= scale
        return dx

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"
