"""BatchNorm2d: normalise each channel to zero mean and unit variance, then scale and shift.

Train mode uses the statistics of the batch (over N, H and W) and updates running averages;
eval mode uses the running averages, so a single image gives the same answer as in a batch.

With M = N*H*W values per channel, mean and (biased) variance over them, xhat = (x - mean) / std:

    forward:   out = gamma * xhat + beta
    backward:  dbeta = sum(dout),   dgamma = sum(dout * xhat)
               dx = gamma / std * (dout - dbeta / M - xhat * dgamma / M)

The last line is the chain rule through mean and std collapsed into one expression; lesson 08
derives it term by term. In eval mode the statistics are constants, and dx = gamma / std * dout.
"""
from __future__ import annotations

from typing import Any

from tinyunet.backend import xp
from tinyunet.nn.module import Module, Parameter, accelerated


def per_channel(v: Any) -> Any:
    """(C,) -> (1, C, 1, 1): broadcasts against (N, C, H, W), one value per channel."""
    return v.reshape(1, -1, 1, 1)


class BatchNorm2d(Module):
    buffer_names = ("running_mean", "running_var")

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = Parameter(xp.ones(num_features, dtype=xp.float32))   # gamma
        self.bias = Parameter(xp.zeros(num_features, dtype=xp.float32))    # beta
        self.running_mean = xp.zeros(num_features, dtype=xp.float32)
        self.running_var = xp.ones(num_features, dtype=xp.float32)
        self.cache: Any = None
        self.fast: Any = None

    def forward(self, x: Any) -> Any:
        """x: (N, C, H, W) -> (N, C, H, W)."""
        self.fast = accelerated(self, x)     # the CPU acceleration, or None: the reference below
        if self.fast:
            return self.fast.forward(x)
        if self.training:
            mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))   # biased: what normalises this batch
            self._update_running_stats(mean, var, x.size // x.shape[1])
        else:
            mean, var = self.running_mean, self.running_var
        inv_std = 1.0 / xp.sqrt(var + self.eps)
        xhat = (x - per_channel(mean)) * per_channel(inv_std)
        self.cache = (xhat, inv_std, self.training)
        return per_channel(self.weight.data) * xhat + per_channel(self.bias.data)

    def backward(self, dout: Any) -> Any:
        """dout: (N, C, H, W) -> dx: (N, C, H, W); adds into weight.grad (gamma) and bias.grad (beta)."""
        if self.fast:
            return self.fast.backward(dout)
        xhat, inv_std, training = self.cache
        self.cache = None
        dbeta, dgamma = dout.sum(axis=(0, 2, 3)), (dout * xhat).sum(axis=(0, 2, 3))
        self.weight.grad += dgamma
        self.bias.grad += dbeta
        scale = per_channel(self.weight.data * inv_std)                      # gamma / std
        if not training:   # the statistics are constants: a per-channel affine map
            return scale * dout
        m = dout.size // dout.shape[1]
        return scale * (dout - per_channel(dbeta / m) - xhat * per_channel(dgamma / m))

    def _update_running_stats(self, mean: Any, var: Any, m: int) -> None:
        """Running averages of the batch statistics of m values per channel (used in eval mode)."""
        mom = self.momentum
        self.running_mean = (1 - mom) * self.running_mean + mom * mean
        # the running variance is the unbiased estimate, as in PyTorch
        self.running_var = (1 - mom) * self.running_var + mom * var * (m / max(m - 1, 1))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"
