"""Segmentation metrics from a confusion matrix: pixel accuracy, IoU and Dice.

Everything starts from one ``(C, C)`` integer matrix ``cm`` where ``cm[t, p]`` counts the pixels whose
true class is ``t`` and whose predicted class is ``p`` (rows = truth, columns = prediction). For a
class ``c``::

    TP = cm[c, c]            FP = cm[:, c].sum() - TP        FN = cm[c, :].sum() - TP
    IoU  = TP / (TP + FP + FN)
    Dice = 2 TP / (2 TP + FP + FN)
    pixel accuracy = trace(cm) / cm.sum()

The matrix is built on the device (one scatter-add per batch) and summed over the whole validation
set before any ratio is taken, so the scores are dataset-level, not an average of per-image scores.
Only :meth:`ConfusionMeter.compute` / :meth:`ConfusionMeter.matrix` copy it to the host.

A class with no true and no predicted pixels has ``0 / 0`` for IoU and Dice: it is reported as NaN
and left out of ``miou`` / ``mdice`` (it says nothing about the model, and counting it as 0 or 1 would
move the mean either way).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from tinyunet.backend import to_host, xp
from tinyunet.classes import CLASS_NAMES

__all__ = [
    "confusion_matrix",
    "pixel_accuracy",
    "iou_per_class",
    "dice_per_class",
    "ConfusionMeter",
]


def _counts(pred: Any, target: Any, num_classes: int, ignore_index: Optional[int]) -> Any:
    """Flat pair counts on the device: ``(C*C + 2,)`` int64.

    Bins ``0 .. C*C-1`` are the confusion matrix in row-major order (``target * C + pred``); bin
    ``C*C`` collects ignored pixels and bin ``C*C+1`` pixels whose label or prediction is outside
    ``[0, C)``. Sending unwanted pixels to spare bins (instead of boolean-masking them out) keeps the
    work on the device with no host sync, because the output size never depends on the data; so does
    the scatter-add ``add.at`` (``bincount`` would read the largest index back to size its output: on
    CuPy, a sync per call).
    """
    C = num_classes
    pred = xp.asarray(pred).astype(xp.int64, copy=False).ravel()
    target = xp.asarray(target).astype(xp.int64, copy=False).ravel()  # int64: uint8 * C could overflow
    if pred.shape != target.shape:
        raise ValueError(f"prediction has {pred.size} pixels but target has {target.size}")
    valid = (target >= 0) & (target < C) & (pred >= 0) & (pred < C)
    index = xp.where(valid, target * C + pred, C * C + 1)
    if ignore_index is not None:
        index = xp.where(target == ignore_index, C * C, index)
    counts = xp.zeros(C * C + 2, dtype=xp.int64)
    xp.add.at(counts, index, 1)
    return counts


def confusion_matrix(pred: Any, target: Any, num_classes: int, ignore_index: Optional[int] = None) -> Any:
    """Confusion matrix of one batch, on the device.

    Args:
        pred: predicted class ids, any shape (typically ``(N, H, W)``), integer.
        target: true class ids, same number of pixels as ``pred``.
        num_classes: ``C``.
        ignore_index: target value whose pixels are not counted (e.g. 255), or None.

    Returns:
        ``(C, C)`` int64 ``xp`` array, rows = true class, columns = predicted class.

    Raises:
        ValueError: a non-ignored label or prediction is outside ``[0, C)`` (this check costs one
        scalar copy to the host; :class:`ConfusionMeter` defers it to ``compute()`` instead).
    """
    counts = _counts(pred, target, num_classes, ignore_index)
    bad = int(to_host(counts[-1]))
    if bad:
        raise ValueError(f"{bad} pixels have a label or prediction outside [0, {num_classes})")
    return counts[: num_classes * num_classes].reshape(num_classes, num_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` as float64 with NaN where ``den == 0`` (and no divide-by-zero warning)."""
    num = num.astype(np.float64)
    den = den.astype(np.float64)
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def pixel_accuracy(cm: Any) -> float:
    """Fraction of counted pixels predicted correctly: ``trace(cm) / sum(cm)`` (NaN if empty)."""
    cm = to_host(cm)
    return float(_ratio(np.trace(cm), cm.sum()))


def iou_per_class(cm: Any) -> np.ndarray:
    """Intersection over union per class from a ``(C, C)`` matrix (host or device) -> ``(C,)`` float64
    on the host, NaN if 0/0."""
    cm = to_host(cm)
    tp = np.diag(cm)
    return _ratio(tp, cm.sum(axis=0) + cm.sum(axis=1) - tp)  # |pred ∪ true| = pred + true - both


def dice_per_class(cm: Any) -> np.ndarray:
    """Dice (F1) per class from a ``(C, C)`` matrix (host or device) -> ``(C,)`` float64 on the host,
    NaN if 0/0."""
    cm = to_host(cm)
    return _ratio(2 * np.diag(cm), cm.sum(axis=0) + cm.sum(axis=1))


def _nanmean(values: np.ndarray) -> float:
    """Mean over the non-NaN entries; NaN if there are none (np.nanmean would warn)."""
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else float("nan")


class ConfusionMeter:
    """Accumulates a confusion matrix over batches on the device; scores on demand.

    Example::

        meter = ConfusionMeter(NUM_CLASSES)
        for x, y in batches:
            meter.update(model.forward(x), y)     # logits (N, C, H, W), labels (N, H, W)
        scores = meter.compute()                  # {"miou": ..., "iou": {"pet": ...}, ...}
    """

    def __init__(
        self,
        num_classes: int,
        class_names: Optional[Sequence[str]] = None,
        ignore_index: Optional[int] = None,
    ) -> None:
        """``class_names`` defaults to the project's class table when its length matches, else "0", "1", ..."""
        if class_names is None:
            class_names = CLASS_NAMES if len(CLASS_NAMES) == num_classes else [str(c) for c in range(num_classes)]
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names given for {num_classes} classes")
        self.num_classes = num_classes
        self.class_names = tuple(class_names)
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        """Forget everything counted so far (call at the start of each evaluation)."""
        self._counts = xp.zeros(self.num_classes * self.num_classes + 2, dtype=xp.int64)

    def update(self, logits_or_pred: Any, target: Any) -> None:
        """Add one batch.

        Args:
            logits_or_pred: logits ``(N, C, H, W)`` (argmax over axis 1 is taken) or class ids ``(N, H, W)``.
            target: true class ids ``(N, H, W)``.
        """
        target = xp.asarray(target)
        scores = xp.asarray(logits_or_pred)
        if scores.ndim == target.ndim + 1:
            if scores.shape[1] != self.num_classes:
                raise ValueError(f"logits have {scores.shape[1]} channels, expected {self.num_classes}")
            pred = scores.argmax(axis=1)
        elif scores.ndim == target.ndim:
            pred = scores
        else:
            raise ValueError(
                f"expected logits (N, C, H, W) or predictions (N, H, W) for target {tuple(target.shape)}, "
                f"got shape {tuple(scores.shape)}"
            )
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        # No host sync here: the out-of-range count rides along and is checked in matrix().
        self._counts += _counts(pred, target, self.num_classes, self.ignore_index)

    def sum_over_processes(self, group: Any) -> None:
        """Add up the counts of every process of ``group`` (tinyunet.distributed.ProcessGroup): afterwards
        each process holds the counts of all their batches, and computes the scores of the whole split."""
        group.allreduce(self._counts)

    def matrix(self) -> np.ndarray:
        """The accumulated ``(C, C)`` int64 matrix on the host (rows = truth, columns = prediction)."""
        counts = to_host(self._counts)
        C = self.num_classes
        if counts[-1]:
            raise ValueError(f"{int(counts[-1])} pixels had a label or prediction outside [0, {C})")
        return counts[: C * C].reshape(C, C).copy()

    def compute(self) -> dict:
        """Scores of everything seen since the last reset.

        Returns:
            ``{"pixel_accuracy": float, "miou": float, "mdice": float,
            "iou": {name: float}, "dice": {name: float}, "confusion": [[int]*C]*C}``.
            Per-class values are NaN for a class absent from both truth and prediction; the means
            skip NaN (and are NaN only if nothing was counted).
        """
        cm = self.matrix()
        iou = iou_per_class(cm)
        dice = dice_per_class(cm)
        return {
            "pixel_accuracy": pixel_accuracy(cm),
            "miou": _nanmean(iou),
            "mdice": _nanmean(dice),
            "iou": {n: float(v) for n, v in zip(self.class_names, iou)},
            "dice": {n: float(v) for n, v in zip(self.class_names, dice)},
            "confusion": cm.tolist(),
        }
