"""CrossEntropyLoss: per-pixel loop reference, PyTorch's weight / ignore_index rules, stability, gradients."""
import math

import numpy as np
import pytest

from tinyunet.nn import naive as ref
from tinyunet.gradcheck import check_loss
from tinyunet.losses import CrossEntropyLoss, DiceLoss, make_loss

pytestmark = pytest.mark.usefixtures("numpy_backend")

WEIGHT = np.array([0.5, 2.0, 1.0, 3.0])
# (weight, ignore_index): ignore inside the class range (2) and outside it (255, like "void" pixels)
VARIANTS = [(None, None), (WEIGHT, None), (None, 2), (WEIGHT, 2), (None, 255), (WEIGHT, 255)]
IDS = ["plain", "weight", "ignore2", "weight-ignore2", "ignore255", "weight-ignore255"]


def data(shape=(2, 4, 3, 5), seed=0, ignore=None, scale=1.0, target_dtype=np.int64):
    rng = np.random.default_rng(seed)
    n, c, h, w = shape
    logits = rng.standard_normal(shape) * scale
    target = rng.integers(0, c, (n, h, w))
    if ignore is not None:  # a few pixels carry the ignore value
        target[rng.random((n, h, w)) < 0.3] = ignore
        target[0, 0, 0] = ignore
        target[0, 0, 1] = 0 if ignore != 0 else 1
    return logits, target.astype(target_dtype)


@pytest.mark.parametrize("weight,ignore", VARIANTS, ids=IDS)
def test_forward_matches_per_pixel_reference(weight, ignore):
    logits, target = data(ignore=ignore)
    loss = CrossEntropyLoss(weight=weight, ignore_index=ignore).forward(logits, target)
    assert np.shape(loss) == ()  # a 0-d array, left on the device
    expected = ref.cross_entropy(logits, target, weight, ignore)
    assert float(loss) == pytest.approx(expected, rel=1e-12)


def test_weighted_mean_by_hand():
    # two pixels, two classes; logits (0, 0) give -log softmax = log 2 for either class,
    # logits (log 3, 0) with target 0 give -log(3/4)
    logits = np.array([[[[0.0, math.log(3.0)]], [[0.0, 0.0]]]])  # (1, 2, 1, 2)
    target = np.array([[[1, 0]]])
    l1, l2 = math.log(2.0), -math.log(0.75)
    assert float(CrossEntropyLoss().forward(logits, target)) == pytest.approx((l1 + l2) / 2, rel=1e-12)
    w = np.array([1.0, 4.0])  # pixel 1 has class 1 (weight 4), pixel 2 class 0 (weight 1)
    assert float(CrossEntropyLoss(weight=w).forward(logits, target)) == pytest.approx((4 * l1 + l2) / 5, rel=1e-12)
    assert float(CrossEntropyLoss(ignore_index=1).forward(logits, target)) == pytest.approx(l2, rel=1e-12)
    assert float(CrossEntropyLoss(weight=w, ignore_index=0).forward(logits, target)) == pytest.approx(l1, rel=1e-12)


@pytest.mark.parametrize("weight,ignore", VARIANTS, ids=IDS)
def test_gradient_matches_reference(weight, ignore):
    logits, target = data(seed=1, ignore=ignore)
    loss = CrossEntropyLoss(weight=weight, ignore_index=ignore)
    loss.forward(logits, target)
    grad = loss.backward()
    np.testing.assert_allclose(grad, ref.cross_entropy_grad(logits, target, weight, ignore), rtol=1e-10, atol=1e-14)
    if ignore is not None:  # ignored pixels get no gradient at all
        assert not grad.transpose(0, 2, 3, 1)[target == ignore].any()


@pytest.mark.parametrize("weight,ignore", VARIANTS, ids=IDS)
@pytest.mark.parametrize("shape", [(2, 4, 3, 5), (3, 4, 1, 3)])
def test_gradient_matches_finite_differences(weight, ignore, shape):
    # smooth in the logits everywhere: no kinks to avoid
    logits, target = data(shape=shape, seed=2, ignore=ignore)
    assert check_loss(CrossEntropyLoss(weight=weight, ignore_index=ignore), logits, target) <= 1e-6


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_huge_logits_are_stable(dtype):
    logits, target = data(seed=3, scale=1e4)
    logits = logits.astype(dtype)
    logits[0, :, 0, 0] = [1e4, -1e4, 1e4, 0.0]  # exact ties at a huge value too
    loss = CrossEntropyLoss(weight=WEIGHT, ignore_index=None)
    value = loss.forward(logits, target)
    grad = loss.backward()
    assert np.isfinite(float(value)) and np.isfinite(grad).all()
    expected = ref.cross_entropy(logits.astype(np.float64), target, WEIGHT)
    assert expected > 100  # really in the regime where exp(z) overflows
    assert float(value) == pytest.approx(expected, rel=1e-6 if dtype == np.float32 else 1e-12)
    np.testing.assert_allclose(grad, ref.cross_entropy_grad(logits.astype(np.float64), target, WEIGHT),
                               atol=1e-6 if dtype == np.float32 else 1e-12)


def test_perfect_prediction_has_zero_loss_not_nan():
    target = np.array([[[0, 1], [2, 1]]])
    logits = np.where(np.arange(3).reshape(1, 3, 1, 1) == target[:, None], 1e4, -1e4)
    loss = CrossEntropyLoss()
    assert float(loss.forward(logits, target)) == 0.0
    assert not loss.backward().any()


def test_all_ignored_batch_gives_zero_loss_and_gradient():
    logits, _ = data()
    target = np.full((2, 3, 5), 255)
    loss = CrossEntropyLoss(ignore_index=255)
    assert float(loss.forward(logits, target)) == 0.0
    assert not loss.backward().any()


def test_uint8_targets_with_void_label():
    logits, target = data(seed=4, ignore=255, target_dtype=np.uint8)
    assert target.dtype == np.uint8
    value = CrossEntropyLoss(weight=WEIGHT, ignore_index=255).forward(logits, target)
    assert float(value) == pytest.approx(ref.cross_entropy(logits, target, WEIGHT, 255), rel=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_preserved(dtype):
    logits, target = data(seed=5)
    loss = CrossEntropyLoss(weight=WEIGHT, ignore_index=1)  # float64 weights must not upcast float32
    value = loss.forward(logits.astype(dtype), target)
    assert value.dtype == dtype
    assert loss.backward().dtype == dtype
    assert float(value) == pytest.approx(ref.cross_entropy(logits.astype(dtype).astype(np.float64), target, WEIGHT, 1),
                                         rel=1e-5 if dtype == np.float32 else 1e-12)


# --- soft Dice and the sum of both ---------------------------------------------------------------

def dice_by_loops(logits, target, smooth=1.0):
    """1 - mean over classes of (2 sum p y + s) / (sum p + sum y + s), pixel by pixel in plain Python."""
    n, c, h, w = logits.shape
    inter, psum, ysum = [0.0] * c, [0.0] * c, [0.0] * c
    for i in range(n):
        for r in range(h):
            for q in range(w):
                z = [float(logits[i, k, r, q]) for k in range(c)]
                top = max(z)
                e = [math.exp(v - top) for v in z]
                for k in range(c):
                    p = e[k] / sum(e)
                    y = 1.0 if target[i, r, q] == k else 0.0
                    inter[k] += p * y
                    psum[k] += p
                    ysum[k] += y
    return 1 - sum((2 * inter[k] + smooth) / (psum[k] + ysum[k] + smooth) for k in range(c)) / c


@pytest.mark.parametrize("shape", [(2, 4, 3, 5), (3, 3, 1, 3), (1, 2, 4, 4)])
def test_dice_forward_matches_per_pixel_loops(shape):
    logits, target = data(shape=shape, seed=11, scale=2.0)
    target[target == shape[1] - 1] = 0  # one class absent from the target: its score rests on the smoothing
    value = DiceLoss().forward(logits, target)
    assert np.shape(value) == ()
    assert float(value) == pytest.approx(dice_by_loops(logits, target), rel=1e-12)


def test_dice_by_hand():
    # 2 classes, logits 0: p = 1/2 at each of 4 pixels, all of class 0.
    # class 0: I = 2, T = 2 + 4 -> (4 + 1) / (6 + 1); class 1: I = 0, T = 2 + 0 -> 1 / 3
    logits = np.zeros((1, 2, 2, 2))
    target = np.zeros((1, 2, 2), dtype=np.int64)
    assert float(DiceLoss().forward(logits, target)) == pytest.approx(1 - (5 / 7 + 1 / 3) / 2, rel=1e-12)
    # a sure, right prediction scores 1 for each class: loss 0
    sure = np.where(np.arange(3).reshape(1, 3, 1, 1) == np.array([[[0, 1], [2, 1]]])[:, None], 50.0, -50.0)
    assert float(DiceLoss().forward(sure, np.array([[[0, 1], [2, 1]]]))) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("shape", [(2, 4, 3, 5), (3, 3, 1, 3)])
@pytest.mark.parametrize("name", ["dice", "ce+dice"])
def test_dice_and_sum_gradients_match_finite_differences(shape, name):
    logits, target = data(shape=shape, seed=12, scale=2.0)
    assert check_loss(make_loss(name), logits, target) <= 1e-7


def test_sum_loss_is_the_sum_of_its_parts():
    logits, target = data(seed=13)
    ce, dice, both = CrossEntropyLoss(), DiceLoss(), make_loss("ce+dice")
    assert float(both.forward(logits, target)) == pytest.approx(
        ref.cross_entropy(logits, target) + dice_by_loops(logits, target), rel=1e-12)
    g = both.backward()
    ce.forward(logits, target)
    dice.forward(logits, target)
    np.testing.assert_allclose(g, ce.backward() + dice.backward(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dice_dtype_is_preserved(dtype):
    logits, target = data(seed=14)
    loss = DiceLoss()
    value = loss.forward(logits.astype(dtype), target)
    assert value.dtype == dtype and loss.backward().dtype == dtype
    assert float(value) == pytest.approx(dice_by_loops(logits.astype(dtype), target), rel=1e-5)


def test_make_loss_names():
    assert isinstance(make_loss("ce"), CrossEntropyLoss) and isinstance(make_loss("dice"), DiceLoss)
    assert [type(p) for p in make_loss("ce+dice").losses] == [CrossEntropyLoss, DiceLoss]
    with pytest.raises(ValueError, match="ce, dice, ce\\+dice"):
        make_loss("focal")


def test_softmax_and_dice_of_huge_logits():
    """softmax (used by Dice and by the predictions) subtracts the largest logit: logits of +-1000 give
    probabilities (1, 0, 0) and a finite Dice loss, not exp(1000) = inf."""
    from tinyunet.losses import softmax

    z = np.array([1000.0, 0.0, -1000.0], np.float32).reshape(1, 3, 1, 1).repeat(2, axis=2)
    np.testing.assert_allclose(softmax(z)[0, :, 0, 0], [1, 0, 0], atol=1e-6)
    assert np.isfinite(float(DiceLoss().forward(z, np.zeros((1, 2, 1), np.int64))))
