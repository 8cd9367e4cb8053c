"""BatchNorm2d: normalise each channel to zero mean and unit variance, then scale and shift.

Train mode uses the statistics of the batch (over N, H and W) and updates running averages;
eval mode uses the running averages, so a single image gives the same answer as in a batch.

With M = N*H*W values per channel, mean and (biased) variance over them, xhat = (x - mean) / std:

    forward:   out = gamma * xhat + beta
    backward:  dbeta = sum(dout),   dgamma = sum(dout * xhat)
               dx = gamma / std * (dout - dbeta / M - xhat * dgamma / M)

The last line is the chain rule through mean and std collapsed into one expression; lesson 08
derives it term by term. In eval mode the statistics are constants, and dx = gamma / std * dout.

SyncBatchNorm (below) is the same layer when a batch is spread over several processes (lesson 18):
the statistics, and the two sums of the backward, are those of every process's images together.
"""
from __future__ import annotations

from typing import Any

import numpy as np

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
        m = None
        if self.training:
            mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))   # biased: what normalises this batch
            mean, var, m = self.combine_statistics(mean, var, x.size // x.shape[1])
            self._update_running_stats(mean, var, m)
        else:
            mean, var = self.running_mean, self.running_var
        inv_std = 1.0 / xp.sqrt(var + self.eps)
        xhat = (x - per_channel(mean)) * per_channel(inv_std)
        self.cache = (xhat, inv_std, m)
        return per_channel(self.weight.data) * xhat + per_channel(self.bias.data)

    def backward(self, dout: Any) -> Any:
        """dout: (N, C, H, W) -> dx: (N, C, H, W); adds into weight.grad (gamma) and bias.grad (beta)."""
        if self.fast:
            return self.fast.backward(dout)
        xhat, inv_std, m = self.cache
        self.cache = None
        dbeta, dgamma = dout.sum(axis=(0, 2, 3)), (dout * xhat).sum(axis=(0, 2, 3))
        self.weight.grad += dgamma
        self.bias.grad += dbeta
        scale = per_channel(self.weight.data * inv_std)                      # gamma / std
        if m is None:      # eval mode: the statistics are constants, a per-channel affine map
            return scale * dout
        dbeta, dgamma = self.combine_sums(dbeta, dgamma)
        return scale * (dout - per_channel(dbeta / m) - xhat * per_channel(dgamma / m))

    # One process normalises with its own batch: the statistics and sums are its own. SyncBatchNorm
    # overrides these two to add them up over the processes.
    def combine_statistics(self, mean: Any, var: Any, m: int) -> Any:
        """(mean, var, count) of this batch -> those that normalise it."""
        return mean, var, m

    def combine_sums(self, dbeta: Any, dgamma: Any) -> Any:
        """(sum of dout, sum of dout * xhat) over this batch -> those of backward's dx formula."""
        return dbeta, dgamma

    def _update_running_stats(self, mean: Any, var: Any, m: int) -> None:
        """Running averages of the batch statistics of m values per channel (used in eval mode)."""
        mom = self.momentum
        self.running_mean = (1 - mom) * self.running_mean + mom * mean
        # the running variance is the unbiased estimate, as in PyTorch
        self.running_var = (1 - mom) * self.running_var + mom * var * (m / max(m - 1, 1))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class SyncBatchNorm(BatchNorm2d):
    """BatchNorm2d over the images of all processes together (``group``: tinyunet.distributed).

    With a global batch spread over N processes, each would otherwise normalise its shard with the
    shard's own statistics, and the N processes would compute another step than one process with the
    whole batch. Here every process adds up, per channel, its count m_k, sum m_k * mean_k and sum of
    squares m_k * (var_k + mean_k^2) with the others (two allreduces: the counts on the host, the sums
    where the arrays live), so all of them normalise with

        M = sum m_k,   mean = sum(m_k mean_k) / M,   var = sum(m_k (var_k + mean_k^2)) / M - mean^2,

    and in backward the two sums of the dx formula, sum(dout) and sum(dout * xhat), are added up the
    same way (every image moved the mean and variance, so every image's gradient takes part). The
    parameters' own gradients stay this process's share: the gradient allreduce adds those up.
    The sums travel in float64: var = E[x^2] - mean^2 cancels digits.
    """

    def __init__(self, num_features: int, group: Any, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__(num_features, eps, momentum)
        self.group = group

    def combine_statistics(self, mean: Any, var: Any, m: int) -> Any:
        total = int(self.group.allreduce(np.array([m]))[0])  # counts are known on the host: sum them there
        mean64, var64 = mean.astype(xp.float64), var.astype(xp.float64)
        sums = self.group.allreduce(xp.concatenate([m * mean64, m * (var64 + mean64 * mean64)]))
        mean64 = sums[:self.num_features] / total
        var64 = sums[self.num_features:] / total - mean64 * mean64
        return mean64.astype(mean.dtype), var64.astype(var.dtype), total

    def combine_sums(self, dbeta: Any, dgamma: Any) -> Any:
        sums = self.group.allreduce(xp.stack([dbeta, dgamma]).astype(xp.float64))
        return sums[0].astype(dbeta.dtype), sums[1].astype(dgamma.dtype)

    @classmethod
    def convert(cls, model: Any, group: Any) -> Any:
        """Every BatchNorm2d of ``model`` made a SyncBatchNorm over ``group``, in place (its
        parameters, statistics and names unchanged). -> model"""
        for module in model.modules():
            if type(module) is BatchNorm2d:
                module.__class__, module.group = cls, group
        return model
