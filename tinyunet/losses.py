"""Softmax cross-entropy over pixels: the loss a segmentation network is trained with.

For each pixel with logits z (C values) and true class y:

    loss = -log softmax(z)[y] = logsumexp(z) - z[y]
    dloss/dz = softmax(z) - onehot(y)

averaged over the counted pixels (weighted by ``weight[y]`` when class weights are given, as in
PyTorch). Subtracting max(z) before exponentiating keeps exp() from overflowing: it cancels out of
the softmax exactly.
"""
from __future__ import annotations

from typing import Any, Optional

from tinyunet.backend import to_device, xp


class CrossEntropyLoss:
    def __init__(self, weight: Optional[Any] = None, ignore_index: Optional[int] = None) -> None:
        self.weight = None if weight is None else to_device(weight)
        self.ignore_index = ignore_index
        self.cache: Any = None

    def __call__(self, logits: Any, target: Any) -> Any:
        return self.forward(logits, target)

    def forward(self, logits: Any, target: Any) -> Any:
        """logits: (N, C, H, W) float, target: (N, H, W) int -> 0-d array (mean loss, on the device)."""
        num_classes = logits.shape[1]
        # NCHW memory, so that the reductions over the classes run along long contiguous rows (free
        # for NCHW logits; the CPU acceleration hands over channels-last memory, tinyunet/accel)
        logits = xp.ascontiguousarray(logits)
        shifted = logits - logits.max(axis=1, keepdims=True)
        exp = xp.exp(shifted)
        sum_exp = exp.sum(axis=1, keepdims=True)
        log_probs = shifted - xp.log(sum_exp)
        valid = xp.ones(target.shape, dtype=bool) if self.ignore_index is None else target != self.ignore_index
        safe_target = xp.where(valid, target, 0)
        onehot = xp.arange(num_classes).reshape(1, -1, 1, 1) == safe_target[:, None]
        # per-pixel weight: weight[y] for counted pixels, 0 for ignored ones
        w = valid.astype(logits.dtype)
        if self.weight is not None:
            w = w * self.weight.astype(logits.dtype)[safe_target]
        total = w.sum()
        # an all-ignored batch has no loss and no gradient (avoid 0/0)
        norm = xp.maximum(total, xp.asarray(1e-12, dtype=logits.dtype))
        picked = (log_probs * onehot).sum(axis=1)  # log softmax(z)[y], (N, H, W)
        loss = -(picked * w).sum() / norm
        exp /= sum_exp  # softmax, in place
        self.cache = (exp, onehot, w, norm)
        return loss

    def backward(self) -> Any:
        """-> dlogits: (N, C, H, W), the gradient of the mean loss."""
        probs, onehot, w, norm = self.cache
        self.cache = None
        probs -= onehot
        probs *= (w / norm)[:, None]
        return probs
