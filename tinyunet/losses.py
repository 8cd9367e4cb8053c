"""The losses a segmentation network is trained with: softmax cross-entropy over pixels, soft Dice,
and their sum (:func:`make_loss`).

For each pixel with logits z (C values) and true class y:

    loss = -log softmax(z)[y] = logsumexp(z) - z[y]
    dloss/dz = softmax(z) - onehot(y)

averaged over the counted pixels (weighted by ``weight[y]`` when class weights are given, as in
PyTorch). Subtracting max(z) before exponentiating keeps exp() from overflowing: it cancels out of
the softmax exactly.

With a process ``group`` (tinyunet.distributed: a batch spread over several processes), each loss
adds up its sums over the processes before dividing: every process then holds the loss of the whole
batch, and the gradient of its own pixels' share of it (lesson 18).
"""
from __future__ import annotations

from typing import Any, Optional

from tinyunet.backend import to_device, xp


def softmax(logits: Any) -> Any:
    """(N, C, H, W) logits -> class probabilities over axis 1 (max subtracted first: no overflow)."""
    e = xp.exp(logits - logits.max(axis=1, keepdims=True))
    e /= e.sum(axis=1, keepdims=True)
    return e


class CrossEntropyLoss:
    def __init__(self, weight: Optional[Any] = None, ignore_index: Optional[int] = None,
                 group: Optional[Any] = None) -> None:
        self.weight = None if weight is None else to_device(weight)
        self.ignore_index = ignore_index
        self.group = group
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
        picked = (log_probs * onehot).sum(axis=1)  # log softmax(z)[y], (N, H, W)
        total, summed = w.sum(), -(picked * w).sum()
        if self.group is not None:                 # the whole batch's counted pixels and summed loss
            total, summed = self.group.allreduce(xp.stack([total, summed]))
        # an all-ignored batch has no loss and no gradient (avoid 0/0)
        norm = xp.maximum(total, xp.asarray(1e-12, dtype=logits.dtype))
        loss = summed / norm
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


class DiceLoss:
    """Soft multi-class Dice loss: one minus the mean over classes of a batch's soft Dice score.

    With p = softmax(z) over classes and y the one-hot target, for class c (sums over every pixel
    of the batch, so a class missing from one image does not make that image's score 0/0):

        I_c = sum_i p_ci y_ci,   T_c = sum_i p_ci + sum_i y_ci,   dice_c = (2 I_c + s) / (T_c + s)
        loss = 1 - mean_c dice_c

    Unlike cross-entropy, every class weighs the same however few pixels it has: the thin outline
    band counts as much as the background. The smoothing s (1 pixel) keeps an absent class finite.

    Backward, first to the probabilities, then through the softmax:

        dloss/dp_ci = -(1/C) (2 y_ci (T_c + s) - (2 I_c + s)) / (T_c + s)^2
        dloss/dz_ci = p_ci (g_ci - sum_k p_ki g_ki)          (g = dloss/dp)
    """

    def __init__(self, smooth: float = 1.0, group: Optional[Any] = None) -> None:
        self.smooth = smooth
        self.group = group
        self.cache: Any = None

    def __call__(self, logits: Any, target: Any) -> Any:
        return self.forward(logits, target)

    def forward(self, logits: Any, target: Any) -> Any:
        """logits: (N, C, H, W) float, target: (N, H, W) int -> 0-d array (on the device)."""
        num_classes = logits.shape[1]
        logits = xp.ascontiguousarray(logits)  # see CrossEntropyLoss.forward
        probs = softmax(logits)
        onehot = (xp.arange(num_classes).reshape(1, -1, 1, 1) == target[:, None]).astype(probs.dtype)
        inter = (probs * onehot).sum(axis=(0, 2, 3))  # (C,)
        total = probs.sum(axis=(0, 2, 3)) + onehot.sum(axis=(0, 2, 3))
        if self.group is not None:                     # the sums over the whole batch
            inter, total = self.group.allreduce(xp.stack([inter, total]))
        total = total + self.smooth
        self.cache = (probs, onehot, inter, total)
        return 1 - ((2 * inter + self.smooth) / total).mean()

    def backward(self) -> Any:
        """-> dlogits: (N, C, H, W)."""
        probs, onehot, inter, total = self.cache
        self.cache = None
        num_classes = probs.shape[1]
        per_class = (1, -1, 1, 1)
        g = (2 * inter + self.smooth).reshape(per_class) - 2 * onehot * total.reshape(per_class)
        g *= (1 / (num_classes * total * total)).reshape(per_class)
        return probs * (g - (probs * g).sum(axis=1, keepdims=True))


class SumLoss:
    """The sum of several losses (e.g. cross-entropy + Dice); its gradient is the sum of theirs."""

    def __init__(self, *losses: Any) -> None:
        self.losses = losses

    def __call__(self, logits: Any, target: Any) -> Any:
        return self.forward(logits, target)

    def forward(self, logits: Any, target: Any) -> Any:
        return sum(loss.forward(logits, target) for loss in self.losses)

    def backward(self) -> Any:
        grads = [loss.backward() for loss in self.losses]
        for g in grads[1:]:
            grads[0] += g
        return grads[0]


LOSSES = ("ce", "dice", "ce+dice")


def make_loss(name: str, group: Optional[Any] = None) -> Any:
    """``"ce"`` (cross-entropy), ``"dice"`` (soft Dice) or ``"ce+dice"`` (their sum); with a process
    ``group``, each the loss of the batch of all its processes."""
    parts = {"ce": CrossEntropyLoss, "dice": DiceLoss}
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}")
    losses = [parts[p](group=group) for p in name.split("+")]
    return SumLoss(*losses) if len(losses) > 1 else losses[0]
