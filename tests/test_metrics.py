"""Metrics: checked against a naive pixel-by-pixel reference and a hand-worked example."""
from __future__ import annotations

import math

import numpy as np
import pytest

from tinyunet.backend import to_device, to_host
from tinyunet.classes import CLASS_NAMES
from tinyunet.metrics import (
    ConfusionMeter,
    confusion_matrix,
    dice_per_class,
    iou_per_class,
    pixel_accuracy,
)


def naive_scores(pred, target, num_classes, ignore_index=None):
    """Independent reference: Python loops over pixels and set arithmetic on pixel positions."""
    pred, target = np.asarray(pred).ravel().tolist(), np.asarray(target).ravel().tolist()
    cm = [[0] * num_classes for _ in range(num_classes)]
    kept = [i for i, t in enumerate(target) if t != ignore_index]
    for i in kept:
        cm[target[i]][pred[i]] += 1
    iou, dice = [], []
    for c in range(num_classes):
        truth = {i for i in kept if target[i] == c}
        guess = {i for i in kept if pred[i] == c}
        union = truth | guess
        inter = truth & guess
        iou.append(len(inter) / len(union) if union else math.nan)
        sizes = len(truth) + len(guess)
        dice.append(2 * len(inter) / sizes if sizes else math.nan)
    acc = sum(pred[i] == target[i] for i in kept) / len(kept)
    return np.array(cm), acc, np.array(iou), np.array(dice)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ignore_index", [None, 255, 0])   # 0: a class id, not a "no"
def test_matches_naive_reference(seed, ignore_index):
    rng = np.random.default_rng(seed)
    C = 4
    target = rng.integers(0, C, size=(3, 7, 5))
    pred = rng.integers(0, C, size=(3, 7, 5))
    if ignore_index is not None:
        target[rng.random(target.shape) < 0.2] = ignore_index
    if seed == 0:
        pred[pred == 3] = 0  # class 3 never predicted: IoU must still be defined (0), not NaN
    ref_cm, ref_acc, ref_iou, ref_dice = naive_scores(pred, target, C, ignore_index)

    cm = to_host(confusion_matrix(to_device(pred), to_device(target), C, ignore_index))
    assert cm.dtype == np.int64 and cm.shape == (C, C)
    np.testing.assert_array_equal(cm, ref_cm)
    assert pixel_accuracy(cm) == pytest.approx(ref_acc)
    np.testing.assert_allclose(iou_per_class(cm), ref_iou)
    np.testing.assert_allclose(dice_per_class(cm), ref_dice)


def test_hand_worked_two_by_two():
    # target [[0, 0], [1, 1]], pred [[0, 1], [1, 1]]:
    # class 0: TP=1, FN=1, FP=0 -> IoU 1/2, Dice 2/3; class 1: TP=2, FP=1 -> IoU 2/3, Dice 4/5.
    target = np.array([[[0, 0], [1, 1]]])
    pred = np.array([[[0, 1], [1, 1]]])
    meter = ConfusionMeter(2, class_names=("a", "b"))
    meter.update(to_device(pred), to_device(target))
    scores = meter.compute()
    assert scores["confusion"] == [[1, 1], [0, 2]]
    assert scores["pixel_accuracy"] == pytest.approx(3 / 4)
    assert scores["iou"] == pytest.approx({"a": 1 / 2, "b": 2 / 3})
    assert scores["dice"] == pytest.approx({"a": 2 / 3, "b": 4 / 5})
    assert scores["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert scores["mdice"] == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_logits_are_argmaxed_and_batches_accumulate():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    target = rng.integers(0, 3, size=(2, 4, 4))
    meter = ConfusionMeter(3)
    assert meter.class_names == CLASS_NAMES
    meter.update(to_device(logits[:1]), to_device(target[:1]))
    meter.update(to_device(logits[1:]), to_device(target[1:]))
    ref_cm, *_ = naive_scores(logits.argmax(axis=1), target, 3)
    np.testing.assert_array_equal(meter.matrix(), ref_cm)
    meter.reset()
    assert meter.matrix().sum() == 0


def test_perfect_prediction_scores_one_and_absent_class_is_nan():
    target = np.array([[[0, 0, 1], [1, 0, 1]]], dtype=np.uint8)  # class 2 absent everywhere
    meter = ConfusionMeter(3)
    meter.update(to_device(target.copy()), to_device(target))
    scores = meter.compute()
    assert scores["pixel_accuracy"] == 1.0
    assert scores["iou"]["pet"] == scores["iou"]["background"] == 1.0
    assert math.isnan(scores["iou"]["outline"]) and math.isnan(scores["dice"]["outline"])
    assert scores["miou"] == 1.0 and scores["mdice"] == 1.0  # NaN class excluded from the mean


def test_ignore_index_pixels_are_not_counted():
    target = np.array([[0, 255], [1, 255]])
    pred = np.array([[0, 1], [1, 0]])  # wrong guesses only where ignored
    cm = to_host(confusion_matrix(to_device(pred), to_device(target), 2, ignore_index=255))
    np.testing.assert_array_equal(cm, [[1, 0], [0, 1]])
    meter = ConfusionMeter(2, class_names=("a", "b"), ignore_index=255)
    meter.update(to_device(pred), to_device(target))
    assert meter.compute()["pixel_accuracy"] == 1.0


def test_out_of_range_labels_raise():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(to_device(np.array([0, 1])), to_device(np.array([0, 5])), 3)
    meter = ConfusionMeter(3)
    meter.update(to_device(np.array([[0, 1]])), to_device(np.array([[0, 255]])))  # no ignore_index set
    with pytest.raises(ValueError, match="outside"):
        meter.compute()


def test_empty_meter_gives_nan_without_warnings():
    with np.errstate(all="raise"):
        scores = ConfusionMeter(3).compute()
    assert math.isnan(scores["pixel_accuracy"]) and math.isnan(scores["miou"])


def test_shape_mismatch_is_reported():
    meter = ConfusionMeter(3)
    with pytest.raises(ValueError, match="shape"):
        meter.update(to_device(np.zeros((1, 4, 4), dtype=np.int64)), to_device(np.zeros((1, 4, 5), dtype=np.int64)))
    with pytest.raises(ValueError, match="channels"):
        meter.update(to_device(np.zeros((1, 2, 4, 4))), to_device(np.zeros((1, 4, 4), dtype=np.int64)))


def test_scores_take_a_device_matrix_and_the_meter_never_syncs(fake_cupy):
    """pixel_accuracy / iou_per_class / dice_per_class copy a device matrix explicitly (one transfer
    each) instead of handing it to numpy; ConfusionMeter.update counts with a scatter-add, no transfer."""
    from tinyunet import backend
    from tinyunet.metrics import ConfusionMeter, dice_per_class, iou_per_class, pixel_accuracy

    cm_host = np.array([[5, 1, 0], [2, 7, 1], [0, 0, 4]])
    cm = backend.to_device(cm_host)
    fake_cupy.reset_counters()
    assert pixel_accuracy(cm) == pytest.approx(16 / 20)
    np.testing.assert_allclose(iou_per_class(cm), [5 / 8, 7 / 11, 4 / 5])
    np.testing.assert_allclose(dice_per_class(cm), [10 / 13, 14 / 18, 8 / 9])
    assert fake_cupy.stats["transfers"] == 3
    meter = ConfusionMeter(3)
    pred = backend.to_device(np.array([[0, 1], [2, 2]]))
    target = backend.to_device(np.array([[0, 2], [2, 1]]))
    fake_cupy.reset_counters()
    meter.update(pred, target)
    assert fake_cupy.stats["transfers"] == 0 and "bincount" not in fake_cupy.launches
    np.testing.assert_array_equal(meter.matrix(), [[1, 0, 0], [0, 0, 1], [0, 1, 1]])
