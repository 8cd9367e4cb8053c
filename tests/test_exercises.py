"""The exercise checks (tinyunet/exercises.py) can fail: each one is run here on a stub, on a planted
classic mistake (and must name it in its hint), and on a right answer written independently of the
check's own reference (and must pass, returning the learner's function)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from tinyunet import exercises as E
from tinyunet.nn import naive


def stub(*args, **kwargs):
    raise NotImplementedError


def assert_verdict(used, mine, out, hint):
    """hint None: the answer passed and the check returned it; else it failed, the hint part of the
    report names the slip, and the reference stands in."""
    if hint is None:
        assert used is mine and ": PASS" in out, out
    else:
        assert used is not mine and ": FAIL " in out and hint in out.split("hint:")[1], out


# --- right answers, written here from the formulas (not the references the checks use) ------------------

def im2col_loops(x, kh, kw, stride=1, padding=0):
    n, c, h, w = x.shape
    xp_ = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    ho, wo = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    cols = np.zeros((n, c * kh * kw, ho * wo), dtype=x.dtype)
    for ci in range(c):
        for i in range(kh):
            for j in range(kw):
                for y in range(ho):
                    for q in range(wo):
                        cols[:, ci * kh * kw + i * kw + j, y * wo + q] = xp_[:, ci, y * stride + i, q * stride + j]
    return cols


def conv_forward_naive(x, w, b, stride=1, padding=0):
    return naive.conv2d(x, w, b, stride, padding)


def maxpool_forward(x):
    n, c, h, w = x.shape
    win = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
    return win.max(-1), win.argmax(-1)


def linear_backward(x, w, dout):
    return dout @ w, dout.T @ x, dout.sum(axis=0)


def sgd_step(params, lr):
    for p in params:
        p.data -= lr * p.grad


def adam_step(params, ms, vs, t, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
    for p, m, v in zip(params, ms, vs):
        m[...] = betas[0] * m + (1 - betas[0]) * p.grad
        v[...] = betas[1] * v + (1 - betas[1]) * p.grad ** 2
        p.data -= lr * (m / (1 - betas[0] ** t)) / (np.sqrt(v / (1 - betas[1] ** t)) + eps)


def ring_allreduce_by_messages(arrays):
    """A ring written as messages: every step, a list of (destination, chunk index, values) per process."""
    n = len(arrays)
    bounds = np.linspace(0, len(arrays[0]), n + 1).astype(int)
    piece = lambda r, c: arrays[r][bounds[c]:bounds[c + 1]]
    for phase in ("reduce", "gather"):
        for s in range(n - 1):
            messages = [((r + 1) % n, (r - s + (phase == "gather")) % n, piece(r, (r - s + (phase == "gather")) % n).copy())
                        for r in range(n)]
            for dest, c, values in messages:
                if phase == "reduce":
                    piece(dest, c)[...] += values
                else:
                    piece(dest, c)[...] = values
    return arrays


def sync_bn_forward(xs, gamma, beta, eps=1e-5):
    whole = np.concatenate(xs)
    mu, var = whole.mean(axis=(0, 2, 3)), whole.var(axis=(0, 2, 3))
    s = 1 / np.sqrt(var + eps)
    xhats = [(x - mu[:, None, None]) * s[:, None, None] for x in xs]
    return [gamma[:, None, None] * xh + beta[:, None, None] for xh in xhats], (xhats, s, gamma, whole.size // whole.shape[1])


def sync_bn_backward(dys, cache):
    xhats, s, gamma, m = cache
    dy, xh = np.concatenate(dys), np.concatenate(xhats)
    dbeta, dgamma = dy.sum(axis=(0, 2, 3)), (dy * xh).sum(axis=(0, 2, 3))
    dx = (gamma * s)[:, None, None] * (dy - dbeta[:, None, None] / m - xh * dgamma[:, None, None] / m)
    bounds = np.cumsum([0] + [d.shape[0] for d in dys])
    return [(dx[a:b], (d * h).sum(axis=(0, 2, 3)), d.sum(axis=(0, 2, 3)))
            for a, b, d, h in zip(bounds[:-1], bounds[1:], dys, xhats)]


RIGHT = [
    (E.check_im2col, im2col_loops, ()),
    (E.check_conv2d_forward, conv_forward_naive, ()),
    (E.check_maxpool_forward, maxpool_forward, ()),
    (E.check_linear_backward, linear_backward, ()),
    (E.check_sgd_step, sgd_step, ()),
    (E.check_adam_step, adam_step, ()),
    (E.check_ring_allreduce, ring_allreduce_by_messages, ()),
    (E.check_sync_bn_forward, sync_bn_forward, ()),
    (E.check_sync_bn_backward, sync_bn_backward, (sync_bn_forward,)),
]


@pytest.mark.parametrize("check, mine, extra", RIGHT, ids=lambda v: getattr(v, "__name__", ""))
def test_right_answer_passes(check, mine, extra, capsys):
    assert check(mine, *extra) is mine
    out = capsys.readouterr().out
    assert ": PASS" in out and "FAIL" not in out


# --- planted mistakes: each check must fail and name the mistake -----------------------------------------

def conv_backward_first_image_dw(x, w, dout, stride=1, padding=0):
    dx, dw, db = E.reference_conv2d_backward(x, w, dout, stride, padding)
    return dx, E.reference_conv2d_backward(x[:1], w, dout[:1], stride, padding)[1], db


def col2im_overwriting(cols, x_shape, kh, kw, stride=1, padding=0):
    return E._col2im_assigning(cols, x_shape, kh, stride, padding)


def maxpool_backward_spread(dout, argmax):
    return np.repeat(np.repeat(dout, 2, axis=2), 2, axis=3)


def relu_backward_reversed(dout, mask):
    return dout * ~mask


def bn_forward(x, gamma, beta, eps=1e-5):
    mu, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    s = 1 / np.sqrt(var + eps)
    xhat = (x - mu.reshape(1, -1, 1, 1)) * s.reshape(1, -1, 1, 1)
    return gamma.reshape(1, -1, 1, 1) * xhat + beta.reshape(1, -1, 1, 1), (x, mu, var, s, xhat, gamma)


def bn_backward_eval_formula(dy, cache):
    x, mu, var, s, xhat, gamma = cache
    return (gamma * s).reshape(1, -1, 1, 1) * dy, (dy * xhat).sum(axis=(0, 2, 3)), dy.sum(axis=(0, 2, 3))


def softmax_forward(z, t):
    shifted = z - z.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))    # no log(0) for a far-off class
    return -np.take_along_axis(log_p, t[:, None], axis=1).mean(), np.exp(log_p)


def softmax_backward_not_averaged(probs, target):
    return probs - (np.arange(probs.shape[1]).reshape(1, -1, 1, 1) == target[:, None])


def unet_backward_forgot_fork(model, d):
    d = model.head.backward(d)
    for i in reversed(range(model.depth)):
        d, _ = model.decode_backward(i, d)
    d = model.bottleneck.backward(d)
    for block, pool in zip(reversed(model.down), reversed(model.pool)):
        d = block.backward(pool.backward(d))
    return d


def concat_backward_swapped(dout, ca):
    cb = dout.shape[1] - ca
    return dout[:, cb:], dout[:, :cb]


def momentum_without_velocity(params, velocities, lr, momentum=0.9):
    for p, v in zip(params, velocities):
        v[...] = momentum * v + p.grad
        p.data -= lr * p.grad


def adam_without_correction(params, ms, vs, t, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
    for p, m, v in zip(params, ms, vs):
        m[...] = 0.9 * m + 0.1 * p.grad
        v[...] = 0.999 * v + 0.001 * p.grad ** 2
        p.data -= lr * m / (np.sqrt(v) + eps)


def linear_backward_db_axis(x, w, dout):
    return dout @ w, dout.T @ x, dout.sum(axis=1)


def ring_reduce_scatter(arrays):
    """The reduce-scatter half of a ring allreduce, in place (sequential sends) -> each array's chunks."""
    n = len(arrays)
    chunks = [np.array_split(a, n) for a in arrays]
    for step in range(n - 1):
        for r in range(n):
            chunks[(r + 1) % n][(r - step) % n] += chunks[r][(r - step) % n]
    return chunks


def ring_without_all_gather(arrays):
    ring_reduce_scatter(arrays)
    return arrays


def ring_all_gather_adding(arrays):
    n = len(arrays)
    chunks = ring_reduce_scatter(arrays)
    for step in range(n - 1):
        sent = [chunks[r][(r + 1 - step) % n].copy() for r in range(n)]
        for r in range(n):
            chunks[(r + 1) % n][(r + 1 - step) % n] += sent[r]
    return arrays

def sync_bn_forward_own_statistics(xs, gamma, beta, eps=1e-5):
    outs, caches = zip(*[sync_bn_forward([x], gamma, beta, eps) for x in xs])
    return [o[0] for o in outs], None


def sync_bn_backward_local_sums(dys, cache):
    xhats, s, gamma, m = cache
    return [sync_bn_backward([dy], ([xh], s, gamma, m))[0] for dy, xh in zip(dys, xhats)]


def sync_bn_backward_whole_dgamma(dys, cache):
    result = sync_bn_backward(dys, cache)
    dgamma, dbeta = sum(r[1] for r in result), sum(r[2] for r in result)
    return [(r[0], dgamma, dbeta) for r in result]


BUGS = [
    (E.check_conv2d_backward, conv_backward_first_image_dw, (), "sum over the batch"),
    (E.check_col2im, col2im_overwriting, (), "+="),
    (E.check_maxpool_backward, maxpool_backward_spread, (maxpool_forward,), "only the winner"),
    (E.check_relu_backward, relu_backward_reversed, (lambda x: (np.maximum(x, 0), x > 0),), "mask is reversed"),
    (E.check_bn_backward, bn_backward_eval_formula, (bn_forward,), "eval mode"),
    (E.check_softmax_ce_backward, softmax_backward_not_averaged, (softmax_forward,), "divide by their number"),
    (E.check_unet_backward, unet_backward_forgot_fork, (), "fork"),
    (E.check_concat_backward, concat_backward_swapped, (), "swapped"),
    (E.check_momentum_step, momentum_without_velocity, (), "step with the velocity"),
    (E.check_adam_step, adam_without_correction, (), "bias correction"),
    (E.check_linear_backward, linear_backward_db_axis, (), "axis 0"),
    (E.check_im2col, lambda x, kh, kw, s=1, p=0: E.reference_im2col(x, kh, kw, s, 0), (), "padding"),
    (E.check_ring_allreduce, ring_without_all_gather, (), "all-gather"),
    (E.check_ring_allreduce, ring_all_gather_adding, (), "do not add"),
    (E.check_ring_allreduce, lambda arrays: [sum(arrays)] * len(arrays), (), "in place"),
    (E.check_sync_bn_forward, sync_bn_forward_own_statistics, (), "its own statistics"),
    (E.check_sync_bn_backward, sync_bn_backward_local_sums, (sync_bn_forward,), "whole batch"),
    (E.check_sync_bn_backward, sync_bn_backward_whole_dgamma, (sync_bn_forward,), "N times"),
]


@pytest.mark.parametrize("check, mine, extra, hint", BUGS, ids=lambda v: getattr(v, "__name__", ""))
def test_planted_mistake_fails_with_its_hint(check, mine, extra, hint, capsys):
    used = check(mine, *extra)
    out = capsys.readouterr().out
    assert ": FAIL " in out and "PASS" not in out, out
    assert hint in out.split("hint:")[1], out
    assert used is not mine, "after a failure the reference stands in"


CHECKS = [(E.check_im2col, ()), (E.check_conv2d_forward, ()), (E.check_col2im, ()), (E.check_conv2d_backward, ()),
          (E.check_maxpool_forward, ()), (E.check_maxpool_backward, (maxpool_forward,)),
          (E.check_conv_transpose_forward, ()), (E.check_conv_transpose_backward, ()), (E.check_concat_backward, ()),
          (E.check_relu_backward, (lambda x: (np.maximum(x, 0), x > 0),)), (E.check_bn_backward, (bn_forward,)),
          (E.check_softmax_ce_backward, (softmax_forward,)), (E.check_unet_backward, ()),
          (E.check_linear_backward, ()), (E.check_sgd_step, ()), (E.check_momentum_step, ()), (E.check_adam_step, ()),
          (E.check_ring_allreduce, ()), (E.check_sync_bn_forward, ()), (E.check_sync_bn_backward, (sync_bn_forward,)),
          (E.check_gate_backward, ()), (E.check_train_steps, ()), (E.check_iou_per_class, ()), (E.check_pixel_accuracy, ()),
          (E.check_trimap_to_labels, ()), (E.check_conv2d_shifted, ()), (E.check_residual_backward, ()), (E.check_resize_nearest, ()), (E.check_conv3x3_flat_rows, ()), (E.check_timed, ())]


@pytest.mark.parametrize("check, extra", CHECKS, ids=lambda v: getattr(v, "__name__", ""))
def test_stub_fails_and_reference_stands_in(check, extra, capsys):
    reference = check(stub, *extra)
    out = capsys.readouterr().out
    assert "FAIL  not written yet" in out and "hint:" in out
    assert reference is not stub
    assert check(reference, *extra) is reference        # the stand-in passes its own check
    assert ": PASS" in capsys.readouterr().out


def test_wrong_shape_is_named(capsys):
    E.check_conv2d_forward(lambda x, w, b, s=1, p=0: np.zeros((1, 2, 3)))
    out = capsys.readouterr().out
    assert "wrong shape" in out and "(1, 2, 3)" in out


def test_checks_leave_the_acceleration_as_it_was():
    from tinyunet import backend

    before = backend.accelerate()
    E.check_conv2d_backward(E.reference_conv2d_backward)
    assert backend.accelerate() == before


# --- the checks of lessons 06-08 catch the slips a learner makes (found by working through them) ---------

def mini_unet():
    """Lesson 07's one-level mini U-Net: (conv1, pool, conv2, up, cat, conv3) and its forward."""
    from tinyunet.nn import Concat, Conv2d, ConvTranspose2d, MaxPool2d

    layers = (Conv2d(2, 3, 3, padding=1).double(), MaxPool2d(2), Conv2d(3, 6, 3, padding=1).double(),
              ConvTranspose2d(6, 3, 2, stride=2).double(), Concat(axis=1), Conv2d(6, 2, 3, padding=1).double())
    conv1, pool, conv2, up, cat, conv3 = layers

    def forward(x):
        s = conv1.forward(x)
        return conv3.forward(cat.forward(up.forward(conv2.forward(pool.forward(s))), s))
    return layers, forward


def skip_backward_by_slicing(layers):
    """A right answer that splits the concat's gradient by hand (3 channels of d, then 3 of s)."""
    conv1, pool, conv2, up, cat, conv3 = layers

    def backward(dout, use_skip_gradient=True):
        dcat = conv3.backward(dout)
        ds = pool.backward(conv2.backward(up.backward(dcat[:, :3])))
        return conv1.backward(ds + dcat[:, 3:] if use_skip_gradient else ds)
    return backward


def skip_backward_right_dx_wrong_weights(layers):
    conv1, pool, conv2, up, cat, conv3 = layers

    def backward(dout, use_skip_gradient=True):
        dd, ds = cat.backward(conv3.backward(dout))
        dpath = pool.backward(conv2.backward(up.backward(dd)))
        up.weight.grad *= 5
        conv2.weight.grad *= -1
        conv3.weight.grad[...] = 0
        return conv1.backward(dpath + ds if use_skip_gradient else dpath)
    return backward


def skip_backward_ignoring_the_flag(layers):
    right = skip_backward_by_slicing(layers)
    return lambda dout, use_skip_gradient=True: right(dout)


def skip_backward_swapped(layers):
    conv1, pool, conv2, up, cat, conv3 = layers

    def backward(dout, use_skip_gradient=True):
        ds, dd = cat.backward(conv3.backward(dout))
        dpath = pool.backward(conv2.backward(up.backward(dd)))
        return conv1.backward(dpath + ds if use_skip_gradient else dpath)
    return backward


def skip_backward_forgot_fork(layers):
    right = skip_backward_by_slicing(layers)
    return lambda dout, use_skip_gradient=True: right(dout, use_skip_gradient=False)


@pytest.mark.parametrize("answer, hint", [
    (skip_backward_by_slicing, None),
    (skip_backward_right_dx_wrong_weights, "compare one small case"),
    (skip_backward_ignoring_the_flag, "use_skip_gradient=False, leave out"),
    (skip_backward_swapped, "in the order cat.forward took"),
    (skip_backward_forgot_fork, "the fork"),
])
def test_skip_check_compares_every_gradient_and_the_flag(answer, hint, capsys):
    """The mini U-Net's check: a right answer passes; wrong weight gradients with the right dx fail (the
    check once compared the weights' gradient arrays with themselves); so do an ignored flag and the
    concat's gradients taken in the wrong order, each with its hint."""
    layers, forward = mini_unet()
    mine = answer(layers)
    used = E.check_skip_backward(mine, forward, layers)
    out = capsys.readouterr().out
    assert_verdict(used, mine, out, hint)


def bn_backward_right(dy, cache):
    """The staged derivation (lesson 08's four steps), written out here."""
    x, mu, var, s, xhat, gamma = cache
    axes, c = (0, 2, 3), lambda v: v.reshape(1, -1, 1, 1)
    m = x.size // x.shape[1]
    dxhat = c(gamma) * dy
    dvar = (dxhat * (x - c(mu))).sum(axis=axes) * -0.5 * s ** 3
    dmu = -s * dxhat.sum(axis=axes)
    return (dxhat * c(s) + c(dvar) * 2 * (x - c(mu)) / m + c(dmu) / m, (dy * xhat).sum(axis=axes), dy.sum(axis=axes))


def bn_backward_without_eps(dy, cache):
    x, mu, var, s, xhat, gamma = cache
    s = 1 / np.sqrt(var)
    return bn_backward_right(dy, (x, mu, var, s, (x - mu.reshape(1, -1, 1, 1)) * s.reshape(1, -1, 1, 1), gamma))


def bn_backward_without(term):
    def backward(dy, cache):
        x, mu, var, s, xhat, gamma = cache
        axes, c = (0, 2, 3), lambda v: v.reshape(1, -1, 1, 1)
        m = x.size // x.shape[1]
        dxhat = c(gamma) * dy
        dx = dxhat * c(s)
        if term != "dvar":
            dx = dx + c((dxhat * (x - c(mu))).sum(axis=axes) * -0.5 * s ** 3) * 2 * (x - c(mu)) / m
        if term != "dmu":
            dx = dx + c(-s * dxhat.sum(axis=axes)) / m
        return dx, (dy * xhat).sum(axis=axes), dy.sum(axis=axes)
    return backward


def softmax_backward_divided_by(what):
    def backward(probs, target):
        n, classes = probs.shape[:2]
        grad = probs - (np.arange(classes).reshape(1, -1, 1, 1) == target[:, None])
        return grad / (n if what == "images" else probs.size)
    return backward


def upconv_backward_averaged(x, w, dout, stride=1, padding=0):
    dx, dw, db = E.reference_conv_transpose_backward(x, w, dout, stride, padding)
    return dx, E.host(dw) / x.shape[0], E.host(db) / x.shape[0]


def upconv_forward_square_only(x, w, b, stride=1, padding=0):
    k = w.shape[2]   # assumes kh == kw
    return E.reference_conv_transpose_forward(x, w[:, :, :k, :k] if w.shape[3] >= k else w, b, stride, padding)


@pytest.mark.parametrize("check, mine, extra, hint", [
    (E.check_bn_backward, bn_backward_right, (bn_forward,), None),
    (E.check_bn_backward, bn_backward_without_eps, (bn_forward,), "eps is missing"),
    (E.check_bn_backward, lambda dy, cache: tuple(bn_backward_right(dy, cache)[i] for i in (0, 2, 1)), (bn_forward,),
     "return dx, dgamma, dbeta"),
    (E.check_bn_backward, bn_backward_without("dvar"), (bn_forward,), "variance's term"),
    (E.check_bn_backward, bn_backward_without("dmu"), (bn_forward,), "mean's term"),
    (E.check_softmax_ce_backward, softmax_backward_divided_by("images"), (softmax_forward,), "divided by the N images"),
    (E.check_softmax_ce_backward, softmax_backward_divided_by("logits"), (softmax_forward,), "divided by every logit"),
    (E.check_conv_transpose_backward, upconv_backward_averaged, (), "averaged over the batch"),
    (E.check_conv_transpose_forward, lambda x, w, b, s=1, p=0: naive.conv_transpose2d(x, w[:, :, ::-1, ::-1], b, s, p),
     (), "flipped"),
    (E.check_conv_transpose_forward, upconv_forward_square_only, (), "the right one"),   # a 2x3 kernel
])
def test_lesson_slips_fail_with_their_hints(check, mine, extra, hint, capsys):
    used = check(mine, *extra)
    out = capsys.readouterr().out
    assert_verdict(used, mine, out, hint)


def test_a_second_backward_after_one_forward_says_why():
    from tinyunet import backend
    from tinyunet.nn import Conv2d

    before = backend.set_acceleration(False)
    try:
        conv = Conv2d(2, 3, 3, padding=1).double()
        x = np.random.default_rng(0).standard_normal((1, 2, 4, 4))
        out = conv.forward(x)
        conv.backward(np.ones_like(out))
        with pytest.raises(RuntimeError, match="add their gradients first"):
            conv.backward(np.ones_like(out))
    finally:
        backend.set_acceleration(before)


def maxpool_forward_last_of_ties(x):
    out, argmax = maxpool_forward(x)
    n, c, h, w = x.shape
    win = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
    return out, 3 - win[..., ::-1].argmax(-1)


def maxpool_forward_mask_of_maxima(x):
    n, c, h, w = x.shape
    win = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
    return win.max(-1), win == win.max(-1, keepdims=True)


def maxpool_backward_to_every_maximum(dout, mask):
    n, c, ho, wo = dout.shape
    return (mask * dout[..., None]).reshape(n, c, ho, wo, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, 2 * ho, 2 * wo)


def maxpool_forward_wrong_argmax_order(x):
    out, argmax = maxpool_forward(x)
    return out, np.array([0, 2, 1, 3])[argmax]          # numbered column by column


def im2col_square_kernel(x, kh, kw, stride=1, padding=0):
    return im2col_loops(x, kh, kh, stride, padding)


def conv_backward_averaged_db(x, w, dout, stride=1, padding=0):
    dx, dw, db = E.reference_conv2d_backward(x, w, dout, stride, padding)
    return dx, dw, E.host(db) / x.shape[0]


@pytest.mark.parametrize("check, mine, extra, hint", [
    (E.check_maxpool_forward, maxpool_forward_last_of_ties, (), "takes the last maximum"),
    (E.check_maxpool_forward, maxpool_forward_mask_of_maxima, (), "one integer per output value"),
    (E.check_maxpool_forward, maxpool_forward_wrong_argmax_order, (), "numbered 0..3 row by row"),
    (E.check_maxpool_backward, maxpool_backward_to_every_maximum, (maxpool_forward_mask_of_maxima,),
     "every maximum got the gradient"),
    (E.check_im2col, im2col_square_kernel, (), "the right one"),
    (E.check_conv2d_backward, conv_backward_averaged_db, (), "averaged over the batch"),
    (E.check_linear_backward, lambda x, w, dout: (dout @ w, dout.T @ x / len(x), dout.sum(axis=0)), (),
     "divided by the batch size"),
])
def test_pooling_and_convolution_slips_fail_with_their_hints(check, mine, extra, hint, capsys):
    """Found by working through lessons 02-05 as a learner: ties (ReLU zeros are common), the argmax's
    numbering, non-square kernels and batch averages each fail with a hint that names them."""
    used = check(mine, *extra)
    out = capsys.readouterr().out
    assert used is not mine and ": FAIL " in out and hint in out.split("hint:")[1], out


def adam_t_from_zero(params, ms, vs, t, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
    for p, m, v in zip(params, ms, vs):
        m[...] = betas[0] * m + (1 - betas[0]) * p.grad
        v[...] = betas[1] * v + (1 - betas[1]) * p.grad ** 2
        with np.errstate(divide="ignore", invalid="ignore"):
            p.data -= lr * (m / (1 - betas[0] ** (t - 1))) / (np.sqrt(v / (1 - betas[1] ** (t - 1))) + eps)


def adam_without_eps(params, ms, vs, t, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
    for p, m, v in zip(params, ms, vs):
        m[...] = betas[0] * m + (1 - betas[0]) * p.grad
        v[...] = betas[1] * v + (1 - betas[1]) * p.grad ** 2
        with np.errstate(divide="ignore", invalid="ignore"):
            p.data -= lr * (m / (1 - betas[0] ** t)) / np.sqrt(v / (1 - betas[1] ** t))


def adam_eps_inside(params, ms, vs, t, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
    for p, m, v in zip(params, ms, vs):
        m[...] = betas[0] * m + (1 - betas[0]) * p.grad
        v[...] = betas[1] * v + (1 - betas[1]) * p.grad ** 2
        p.data -= lr * (m / (1 - betas[0] ** t)) / np.sqrt(v / (1 - betas[1] ** t) + eps)


def momentum_rebinding(params, velocities, lr, momentum=0.9):
    for i, p in enumerate(params):
        velocities[i] = momentum * velocities[i] + p.grad
        p.data -= lr * velocities[i]


def ring_in_different_orders(arrays):
    """Every process adds the others' arrays in its own order: the same sum up to the last bits."""
    n = len(arrays)
    sums = [sum(arrays[(r + k) % n] for k in range(n)) for r in range(n)]
    for a, s in zip(arrays, sums):
        a[...] = s
    return arrays


def sync_bn_forward_without_eps(xs, gamma, beta, eps=1e-5):
    return sync_bn_forward(xs, gamma, beta, eps=0.0)


@pytest.mark.parametrize("check, mine, extra, hint", [
    (E.check_adam_step, adam_t_from_zero, (), "t = 0"),
    (E.check_adam_step, adam_without_eps, (), "without eps"),
    (E.check_adam_step, adam_eps_inside, (), "outside the square root"),
    (E.check_momentum_step, momentum_rebinding, (), "in place"),
    (E.check_ring_allreduce, ring_in_different_orders, (), "same bits"),
    (E.check_sync_bn_forward, sync_bn_forward_without_eps, (), "compare one small case"),
])
def test_optimizer_and_process_slips_fail(check, mine, extra, hint, capsys):
    """Found by working through lessons 09, 11 and 18 as a learner: a NaN result used to PASS (NaN > tol is
    False), Adam's eps never mattered on the check's gradients, a rebound velocity list was not seen, and
    processes holding sums that differ in the last bits passed."""
    used = check(mine, *extra)
    out = capsys.readouterr().out
    assert used is not mine and ": FAIL " in out and hint in out.split("hint:")[1], out


def momentum_step(params, velocities, lr, momentum=0.9):
    for p, v in zip(params, velocities):
        v *= momentum
        v += p.grad
        p.data -= lr * v


def sgd_step_lr_written_in(params, lr):
    for p in params:
        p.data -= 0.1 * p.grad


def momentum_step_written_in(params, velocities, lr, momentum=0.9):
    momentum_step(params, velocities, lr, 0.9)


def adam_step_default_betas(params, ms, vs, t, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
    adam_step(params, ms, vs, t, lr)


def sgd_step_scaling_grad(params, lr):
    for p in params:
        p.grad *= lr
        p.data -= p.grad


def momentum_step_through_grad(params, velocities, lr, momentum=0.9):
    for p, v in zip(params, velocities):
        p.grad += momentum * v
        v[...] = p.grad
        p.data -= lr * v


def adam_step_squaring_grad(params, ms, vs, t, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
    for p, m, v in zip(params, ms, vs):
        m[...] = betas[0] * m + (1 - betas[0]) * p.grad
        g = p.grad
        g **= 2
        v[...] = betas[1] * v + (1 - betas[1]) * g
        p.data -= lr * (m / (1 - betas[0] ** t)) / (np.sqrt(v / (1 - betas[1] ** t)) + eps)


def sgd_step_zeroing_grad(params, lr):
    sgd_step(params, lr)
    for p in params:
        p.grad[...] = 0


def momentum_step_sutskever(params, velocities, lr, momentum=0.9):
    for p, v in zip(params, velocities):
        v *= momentum
        v += lr * p.grad
        p.data -= v


def sgd_step_rebinding_data(params, lr):
    for p in params:
        p.data = p.data - lr * p.grad        # a new array for the weights: right, though not in place


@pytest.mark.parametrize("check, mine, hint", [
    (E.check_sgd_step, sgd_step_lr_written_in, "wrong with lr 0.3: use every argument"),
    (E.check_momentum_step, momentum_step_written_in, "wrong with lr 0.3, momentum 0.95: use every argument"),
    (E.check_adam_step, adam_step_default_betas, "wrong with lr 0.3, betas (0.8, 0.99), eps 0.001: use every"),
    (E.check_sgd_step, sgd_step_scaling_grad, "leave it as it is"),
    (E.check_momentum_step, momentum_step_through_grad, "leave it as it is"),
    (E.check_adam_step, adam_step_squaring_grad, "leave it as it is"),
    (E.check_sgd_step, sgd_step_zeroing_grad, "leave it as it is"),
    (E.check_momentum_step, momentum_step_sutskever, "Sutskever's form"),
    (E.check_momentum_step, momentum_step, None),
    (E.check_sgd_step, sgd_step_rebinding_data, None),
])
def test_optimizer_checks_after_a_learners_walkthrough(check, mine, hint, capsys):
    """Found by working through lesson 11 as a learner: a learning rate, momentum or betas written into the
    code passed (the check used one setting), a step that wrote into p.grad passed, and Sutskever's momentum
    (the same weights while lr is constant, another velocity) passed."""
    used = check(mine)
    assert_verdict(used, mine, capsys.readouterr().out, hint)


def ring_plain_sum(arrays):
    total = np.sum(arrays, axis=0)
    for a in arrays:
        a[...] = total
    return arrays


def ring_through_process_0(arrays):
    for a in arrays[1:]:
        arrays[0] += a
    for a in arrays[1:]:
        a[...] = arrays[0]
    return arrays


def ring_schedule(arrays, steps_per_phase, direction=1, rebind_gather=False, copy_sent=True):
    """The ring of the text, with knobs: the number of steps of each phase, the direction (r sends to
    r + direction), the all-gather rebinding the list's entries, sending views instead of copies."""
    n = len(arrays)
    chunks = [np.array_split(a, n) for a in arrays]
    take = (lambda v: v.copy()) if copy_sent else (lambda v: v)
    for step in range(steps_per_phase):
        sent = [take(chunks[r][(r - direction * step) % n]) for r in range(n)]
        for r in range(n):
            chunks[(r + direction) % n][(r - direction * step) % n] += sent[r]
    for step in range(steps_per_phase):
        c = lambda r: (r + direction * (1 - step)) % n
        sent = [take(chunks[r][c(r)]) for r in range(n)]
        for r in range(n):
            if rebind_gather:
                chunks[(r + direction) % n][c(r)] = sent[r]
            else:
                chunks[(r + direction) % n][c(r)][...] = sent[r]
    return arrays


def ring_elementwise(arrays):
    """The text's ring, each chunk added and copied value by value: the same traffic."""
    n = len(arrays)
    chunks = [np.array_split(a, n) for a in arrays]
    for phase in ("reduce", "gather"):
        for step in range(n - 1):
            c = [(r - step + (phase == "gather")) % n for r in range(n)]
            sent = [chunks[r][c[r]].copy() for r in range(n)]
            for r in range(n):
                target = chunks[(r + 1) % n][c[r]]
                for i in range(len(target)):
                    target[i] = target[i] + sent[r][i] if phase == "reduce" else sent[r][i]
    return arrays


@pytest.mark.parametrize("mine, hint", [
    (ring_plain_sum, "the traffic is not a ring's"),
    (ring_through_process_0, "the traffic is not a ring's"),
    (lambda arrays: ring_schedule(arrays, len(arrays)), "the traffic is not a ring's"),
    (lambda arrays: ring_schedule(arrays, len(arrays) - 1, rebind_gather=True), "replaces an entry of your list"),
    (lambda arrays: ring_schedule(arrays, len(arrays) - 1), None),
    (lambda arrays: ring_schedule(arrays, len(arrays) - 1, direction=-1), None),
    (lambda arrays: ring_schedule(arrays, len(arrays) - 1, copy_sent=False), None),
    (ring_elementwise, None),
])
def test_ring_check_after_a_learners_walkthrough(mine, hint, capsys):
    """Found by working through lesson 18 as a learner: the plain sum, everything through process 0 and N
    steps per phase passed (the check saw only the sums); the all-gather's rebinding was told the
    all-gather was missing. A ring the other way, views sent without copies (no process sends and receives
    one chunk in the same step) and value-by-value writes are rings, and pass."""
    used = E.check_ring_allreduce(mine)
    assert_verdict(used, mine, capsys.readouterr().out, hint)


def ring_with_copyto(arrays):
    """The text's ring, every write through np.copyto / np.add with out= (a right answer)."""
    n = len(arrays)
    chunks = [np.array_split(a, n) for a in arrays]
    for step in range(n - 1):
        sent = [chunks[r][(r - step) % n].copy() for r in range(n)]
        for r in range(n):
            target = chunks[(r + 1) % n][(r - step) % n]
            np.add(target, sent[r], out=target)
    for step in range(n - 1):
        sent = [chunks[r][(r + 1 - step) % n].copy() for r in range(n)]
        for r in range(n):
            np.copyto(chunks[(r + 1) % n][(r + 1 - step) % n], sent[r])
    return arrays


def ring_through_asarray(arrays):
    """The plain sum, written through np.asarray (a view the count does not see)."""
    total = np.sum([np.asarray(a) for a in arrays], axis=0)
    for a in arrays:
        np.asarray(a)[...] = total
    return arrays


@pytest.mark.parametrize("mine, hint", [(ring_with_copyto, None), (ring_through_asarray, "write past the count")])
def test_ring_check_sees_copyto_and_uncounted_writes(mine, hint, capsys):
    """Found by a second learner: np.copyto with a copied chunk crashed the check (a recursion in its
    counting), and writes through np.asarray(a) went uncounted and were blamed on the ring's traffic."""
    used = E.check_ring_allreduce(mine)
    assert_verdict(used, mine, capsys.readouterr().out, hint)


def test_the_ring_checks_count_of_received_values_against_a_count_by_hand():
    """The counting arrays: the text's ring on 3 processes of 9 values writes 2 x 2 chunks of 3 = 12 values
    into each; the plain sum 9; a write into a copy counts for nobody; a += through a slice counts once."""
    arrays = [np.arange(9.0) for _ in range(3)]
    assert E.received_by_ring(lambda a: ring_schedule(a, 2), arrays) == [12, 12, 12]
    assert E.received_by_ring(ring_plain_sum, arrays) == [9, 9, 9]
    def mixed(a):
        b = a[0].copy()
        b += 1                     # a copy: not process 0's memory
        a[1][2:5] += 1             # 3 values of process 1, once
        np.add(a[2][:4], 1, out=a[2][:4])
        np.copyto(a[0][:2], 7.0)
    assert E.received_by_ring(mixed, arrays) == [2, 3, 4]


def sync_bn_forward_in_place(xs, gamma, beta, eps=1e-5):
    outs, cache = sync_bn_forward([x.copy() for x in xs], gamma, beta, eps)
    for x, o in zip(xs, outs):
        x[...] = o                  # the right outputs, written over the caller's shards
    return xs, cache


def sync_bn_backward_in_place(dys, cache):
    result = sync_bn_backward([d.copy() for d in dys], cache)
    for d in dys:
        d *= 0
    return result


def sync_bn_forward_keeping_std(xs, gamma, beta, eps=1e-5):
    outs, (xhats, s, g, m) = sync_bn_forward(xs, gamma, beta, eps)
    return outs, (xhats, 1 / s, g, m)     # the standard deviation where the text keeps its inverse


def sync_bn_backward_lists(dys, cache):
    return [list(r) for r in sync_bn_backward(dys, cache)]


def sync_bn_forward_counting_images(xs, gamma, beta, eps=1e-5):
    """M = the number of images, not of values per channel: the variance from the sums goes negative."""
    m = sum(x.shape[0] for x in xs)
    mean = sum(x.sum(axis=(0, 2, 3)) for x in xs) / m
    var = sum((x * x).sum(axis=(0, 2, 3)) for x in xs) / m - mean ** 2
    with np.errstate(invalid="ignore"):
        s = 1 / np.sqrt(var + eps)
    xhats = [(x - mean[:, None, None]) * s[:, None, None] for x in xs]
    return [gamma[:, None, None] * xh + beta[:, None, None] for xh in xhats], (xhats, s, gamma, m)


@pytest.mark.parametrize("check, mine, extra, hint", [
    (E.check_sync_bn_forward, sync_bn_forward_in_place, (), "leave the inputs as they were"),
    (E.check_sync_bn_backward, sync_bn_backward_in_place, (sync_bn_forward,), "leave the inputs as they were"),
    (E.check_sync_bn_backward, sync_bn_backward, (sync_bn_forward_keeping_std,), "look at what your sync_bn_forward keeps"),
    (E.check_sync_bn_backward, sync_bn_backward_lists, (sync_bn_forward,), None),
    (E.check_sync_bn_forward, sync_bn_forward_counting_images, (), "divided by the wrong count"),
])
def test_sync_bn_checks_after_a_learners_walkthrough(check, mine, extra, hint, capsys):
    """Found by working through lesson 18 as a learner: a forward or backward that wrote over its inputs
    passed (and the lesson's next cell failed), a forward keeping the standard deviation in its cache passed
    and its right backward was blamed, a list per shard instead of a tuple failed, and M counted in images
    got Adam's hint."""
    used = check(mine, *extra)
    assert_verdict(used, mine, capsys.readouterr().out, hint)


def im2col_for_the_lessons_x(x, kh, kw, stride=1, padding=0):
    n, c, h, w = 2, 3, 7, 6              # the lesson's x, written into the code
    return im2col_loops(x.reshape(n, c, h, w), kh, kw, stride, padding)


def conv_forward_four_outputs(x, w, b, stride=1, padding=0):
    cols = E.reference_im2col(x, *w.shape[2:], stride, padding)
    ho = (x.shape[2] + 2 * padding - w.shape[2]) // stride + 1
    out = w.reshape(4, -1) @ cols + b.reshape(1, 4, 1)     # Cout = 4 written in
    return out.reshape(x.shape[0], 4, ho, -1)


def conv_backward_list(x, w, dout, stride=1, padding=0):
    return list(E.reference_conv2d_backward(x, w, dout, stride, padding))


def maxpool_forward_from_zero(x):
    """The max of each window started at 0 (right while every value is >= 0)."""
    n, c, h, w = x.shape
    out, argmax = np.zeros((n, c, h // 2, w // 2)), np.zeros((n, c, h // 2, w // 2), dtype=int)
    for k, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        v = x[:, :, i::2, j::2]
        better = v > out
        out, argmax = np.where(better, v, out), np.where(better, k, argmax)
    return out, argmax


def maxpool_forward_writing_into_x(x):
    out, argmax = maxpool_forward(x.copy())
    x[:, :, ::2, ::2] = 0
    return out, argmax


@pytest.mark.parametrize("check, mine, extra, hint", [
    (E.check_im2col, lambda *a: im2col_loops(*a).astype(np.float32), (), "keep the precision you are given"),
    (E.check_conv2d_forward, lambda *a: conv_forward_naive(*a).astype(np.float32), (), "keep the precision"),
    (E.check_conv2d_backward, lambda *a: tuple(np.asarray(g, np.float32) for g in E.reference_conv2d_backward(*a)), (),
     "keep the precision"),
    (E.check_maxpool_forward, lambda x: (maxpool_forward(x)[0].astype(np.float32), maxpool_forward(x)[1]), (),
     "keep the precision"),
    (E.check_im2col, im2col_for_the_lessons_x, (), "written into the code"),
    (E.check_conv2d_forward, conv_forward_four_outputs, (), "written into the code"),
    (E.check_maxpool_forward, maxpool_forward_from_zero, (), "compare one small case"),
    (E.check_maxpool_forward, maxpool_forward_writing_into_x, (), "leave the inputs as they were"),
    (E.check_maxpool_forward, lambda x: (maxpool_forward(x)[0], maxpool_forward(x)[1].astype(np.float64)), (),
     "an integer array"),
    (E.check_col2im, lambda *a: np.asarray(E.reference_col2im(*a), dtype=np.float32), (), "keep the dtype you are given"),
    (E.check_col2im, lambda *a: np.asarray(E.reference_col2im(np.asarray(a[0], np.float32), *a[1:]), np.float64), (),
     "about 7 digits"),
    (E.check_conv2d_backward, conv_backward_list, (), None),
    (E.check_maxpool_forward, lambda x: list(maxpool_forward(x)), (), None),
])
def test_convolution_and_pooling_checks_after_a_learners_walkthrough(check, mine, extra, hint, capsys):
    """Found by working through lessons 03-05 as a learner: float32 results passed (7 digits within the
    tolerance; a float32 buffer cast back too), sizes written into the code passed (every case had the lesson's x), a max started from 0
    passed (every input was >= 0), an argmax of floats passed, a forward that wrote into x was told its
    argmax was wrong, and a list of the right arrays failed as "not three arrays"."""
    used = check(mine, *extra)
    assert_verdict(used, mine, capsys.readouterr().out, hint)


def bn_backward_compact(dy, cache):
    """Lesson 08's one-line backward, written here from the formula."""
    x, mu, var, s, xhat, gamma = cache
    m = x.size // x.shape[1]
    c = lambda v: v.reshape(1, -1, 1, 1)
    dbeta, dgamma = dy.sum(axis=(0, 2, 3)), (dy * xhat).sum(axis=(0, 2, 3))
    return c(gamma * s / m) * (m * dy - c(dbeta) - xhat * c(dgamma)), dgamma, dbeta


def bn_backward_scribbling_on_the_cache(dy, cache):
    result = bn_backward_compact(dy, cache)
    cache[0][...] = 0            # the caller's x, kept in the cache
    return result


def bn_forward_unbiased(x, gamma, beta, eps=1e-5):
    mu, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3), ddof=1)
    s = 1 / np.sqrt(var + eps)
    xhat = (x - mu.reshape(1, -1, 1, 1)) * s.reshape(1, -1, 1, 1)
    return gamma.reshape(1, -1, 1, 1) * xhat + beta.reshape(1, -1, 1, 1), (x, mu, var, s, xhat, gamma)


def softmax_forward_naive(z, t):
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)  # exp(1000) is inf
        return -np.log(np.take_along_axis(p, t[:, None], axis=1)).mean(), p


def softmax_forward_summed(z, t):
    loss, p = softmax_forward(z, t)
    return loss * t.size, p


def conv_transpose_backward_flipped_dw(x, w, dout, stride=1, padding=0):
    dx, dw, db = E.reference_conv_transpose_backward(x, w, dout, stride, padding)
    return dx, np.asarray(dw)[:, :, ::-1, ::-1], db


@pytest.mark.parametrize("check, mine, extra, hint", [
    (E.check_bn_backward, bn_backward_scribbling_on_the_cache, (bn_forward,), "leave the inputs as they were"),
    (E.check_bn_backward, bn_backward_compact, (bn_forward_unbiased,), "look at your bn_forward"),
    (E.check_bn_backward, bn_backward_compact, (bn_forward,), None),
    (E.check_concat_backward, lambda dout, ca: (dout[:, :ca], dout[:, ca:ca + 3]), (), "your db has shape (2, 3, 3, 4)"),
    (E.check_relu_backward, lambda dout, mask: dout * mask, (lambda x: (np.maximum(x, 0), x >= 0),), "not x >= 0"),
    (E.check_softmax_ce_backward, lambda p, t: E.reference_softmax_ce_backward(p, t), (softmax_forward_naive,),
     "exp(1000) overflows"),
    (E.check_softmax_ce_backward, lambda p, t: E.reference_softmax_ce_backward(p, t), (softmax_forward_summed,),
     "sum over the pixels"),
    (E.check_conv_transpose_backward, conv_transpose_backward_flipped_dw, (), "flipped in space"),
])
def test_layer_checks_after_a_learners_walkthrough(check, mine, extra, hint, capsys):
    """Found by working through lessons 06-08 as a learner: a backward that wrote into its cache passed, a
    wrong forward was blamed on the backward, a concat gradient cut at the lesson's 3 channels passed, a ReLU
    mask x >= 0 passed (no input was 0), a softmax without the max subtracted and a summed loss passed (the
    forward was never looked at), and a flipped dw got "another order"."""
    used = check(mine, *extra)
    assert_verdict(used, mine, capsys.readouterr().out, hint)


def unet_backward_depth_2(model, dlogits):
    """Right for depth 2, the depth written into the code."""
    d = model.head.backward(dlogits)
    skips = []
    for i in [1, 0]:
        d_up, d_skip = model.concat[i].backward(model.up_conv[i].backward(d))
        skips.append(d_skip)
        d = model.up[i].backward(d_up)
    d = model.bottleneck.backward(d)
    for level in [1, 0]:
        d = model.down[level].backward(model.pool[level].backward(d) + skips[1 - level])
    return d


def unet_backward_zeroing_dlogits(model, dlogits):
    result = E.reference_unet_backward(model, dlogits.copy())
    dlogits[...] = 0
    return result


def unet_backward_head_twice_as_large(model, dlogits):
    """The head's gradient doubled: the head's own weights are the first wrong ones from the top."""
    return E.reference_unet_backward(model, dlogits * 2)


@pytest.mark.parametrize("check, mine, hint", [
    (E.check_linear_backward, lambda x, w, d: tuple(np.asarray(a, np.float64) for a in linear_backward(
        x.astype(np.float32), w.astype(np.float32), d.astype(np.float32))), "about 7 digits"),
    (E.check_linear_backward, lambda x, w, d: (d @ w, d.T @ x, d[:5].sum(axis=0)), "compare one small case"),
    (E.check_linear_backward, lambda x, w, d: (d @ w.T, d.T @ x, d.sum(axis=0)), "a transpose missing"),
    (E.check_unet_backward, unet_backward_depth_2, "shapes that do not fit"),
    (E.check_unet_backward, unet_backward_zeroing_dlogits, "leave the inputs as they were"),
    (E.check_unet_backward, unet_backward_head_twice_as_large, "first wrong one in backward's order"),
])
def test_linear_and_unet_checks_after_a_learners_walkthrough(check, mine, hint, capsys):
    """Found by working through lessons 02 and 09 as a learner: arithmetic in float32 cast back to float64
    passed (within 1e-6), a batch of 5 written into db passed, dout @ w.T was hinted at a size written into the
    code; a U-Net backward written for depth 2 passed (the check had one depth), one that wrote into dlogits
    passed, and a wrong whole-network gradient got "compare one small case by hand"."""
    used = check(mine)
    out = capsys.readouterr().out
    assert used is not mine and ": FAIL " in out, out
    assert hint in out, out


def adam_step_kingma(params, ms, vs, t, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
    """The Adam paper's efficient form: eps on sqrt(v), not on sqrt(v_hat)."""
    for p, m, v in zip(params, ms, vs):
        m[...] = betas[0] * m + (1 - betas[0]) * p.grad
        v[...] = betas[1] * v + (1 - betas[1]) * p.grad ** 2
        p.data -= lr * np.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t) * m / (np.sqrt(v) + eps)


def softmax_forward_log_of_p(z, t):
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        return -np.log(np.take_along_axis(p, t[:, None], axis=1)).mean(), p      # log(0) for a far-off class


def skip_backward_clearing_the_gradients(conv1, pool, conv2, up, cat, conv3):
    def backward(dout, use_skip_gradient=True):
        for layer in (conv1, conv2, up, conv3):
            layer.zero_grad()
        dd, ds_skip = cat.backward(conv3.backward(dout))
        ds_down = pool.backward(conv2.backward(up.backward(dd)))
        return conv1.backward(ds_down + ds_skip if use_skip_gradient else ds_down)
    return backward


def test_hints_after_rerunning_the_walkthroughs_answers(capsys):
    """Rerunning every learner answer of the day against the stricter checks: the Adam paper's efficient form
    got "eps goes outside the square root" (it is outside), a forward taking log(p) was told to subtract the
    max (it did), and clearing the gradients inside the skip's backward passed."""
    used = E.check_adam_step(adam_step_kingma)
    assert_verdict(used, adam_step_kingma, capsys.readouterr().out, "efficient form")
    mine = lambda p, t: E.reference_softmax_ce_backward(p, t)
    used = E.check_softmax_ce_backward(mine, softmax_forward_log_of_p)
    assert_verdict(used, mine, capsys.readouterr().out, "not log(p)")
    from tinyunet import backend
    from tinyunet.nn import Concat, Conv2d, ConvTranspose2d, MaxPool2d

    backend.seed(0)
    layers = (Conv2d(2, 3, 3, padding=1).double(), MaxPool2d(2), Conv2d(3, 3, 3, padding=1).double(),
              ConvTranspose2d(3, 3, 2, stride=2).double(), Concat(axis=1), Conv2d(6, 2, 3, padding=1).double())
    conv1, pool, conv2, up, cat, conv3 = layers
    forward = lambda x: conv3.forward(cat.forward(up.forward(conv2.forward(pool.forward(s := conv1.forward(x)))), s))
    mine = skip_backward_clearing_the_gradients(*layers)
    used = E.check_skip_backward(mine, forward, layers)
    assert_verdict(used, mine, capsys.readouterr().out, "cleared the gradients")


def trimap_to_labels_in_place(trimap):
    trimap = np.asarray(trimap)
    if not np.isin(trimap, [1, 2, 3]).all():
        raise ValueError(f"trimap values must be 1, 2 or 3, found {np.setdiff1d(trimap, [1, 2, 3])}")
    trimap -= 1                                   # the caller's trimap becomes the labels
    return trimap.astype(np.uint8)


def test_trimap_check_wants_the_bad_value_named(capsys):
    """The lesson's docstring asks for a ValueError naming the value: a bare "broken trimap" fails."""
    def silent(trimap):
        trimap = np.asarray(trimap)
        if not np.isin(trimap, [1, 2, 3]).all():
            raise ValueError("broken trimap")
        return (trimap - 1).astype(np.uint8)

    used = E.check_trimap_to_labels(silent)
    assert_verdict(used, silent, capsys.readouterr().out, "say what was found")


def test_trimap_check_refuses_writing_into_the_trimap(capsys):
    """Found by a second walk through lesson 12: a trimap_to_labels that subtracted 1 in place passed."""
    used = E.check_trimap_to_labels(trimap_to_labels_in_place)
    assert_verdict(used, trimap_to_labels_in_place, capsys.readouterr().out, "leave the inputs as they were")


def sgd_step_emptying_the_list(params, lr):
    while params:
        p = params.pop()
        p.data -= lr * p.grad


def momentum_step_of_its_own(params, velocities, lr, momentum=0.9):
    """Keeps its velocities in a function attribute, restarting when the ones given are zero."""
    own = momentum_step_of_its_own.__dict__.setdefault("v", {})
    for i, (p, v) in enumerate(zip(params, velocities)):
        if not np.any(v):
            own[i] = np.zeros_like(p.data)
        own[i] = momentum * own[i] + p.grad
        v[...] = own[i]
        p.data -= lr * own[i]


def momentum_step_lazy(params, velocities, lr, momentum=0.9):
    for p, v in zip(params, velocities):
        if not np.any(p.grad):
            continue                                     # "nothing to do": but the velocity still moves p
        v *= momentum
        v += p.grad
        p.data -= lr * v


def adam_step_counting_itself(params, ms, vs, t, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
    adam_step_counting_itself.t = 1 if not np.any(ms[0]) else adam_step_counting_itself.t + 1
    adam_step(params, ms, vs, adam_step_counting_itself.t, lr, betas, eps)


@pytest.mark.parametrize("check, mine, hint", [
    (E.check_sgd_step, lambda params, lr: params.clear(), "the weights did not move"),
    (E.check_sgd_step, sgd_step_emptying_the_list, "changed the lists"),
    (E.check_sgd_step, lambda params, lr: sgd_step(params[:2], lr), "did not move"),
    (E.check_sgd_step, lambda params, lr: sgd_step(params, min(lr, 0.1)), "use every argument"),
    (E.check_momentum_step, momentum_step_of_its_own, "no counter or state of your own"),
    (E.check_momentum_step, momentum_step_lazy, "also one whose gradient is zero"),
    (E.check_adam_step, adam_step_counting_itself, "use the t and the state you are given"),
    (E.check_adam_step, lambda params, ms, vs, t, lr=1e-3, betas=(0.9, 0.999), eps=1e-8:
     adam_step(params, ms, vs, min(t, 3), lr, betas, eps), "use the t"),
])
def test_optimizer_checks_after_a_second_walkthrough(check, mine, hint, capsys):
    """Found by a second learner trying to break lesson 11's checks: an emptied parameter list passed with
    0 comparisons, two parameters only (the check had two), lr capped at 0.1, velocities or a step count of the
    function's own, a lazy step that skips zero gradients, t capped at 3 - each passed."""
    used = check(mine)
    out = capsys.readouterr().out
    assert used is not mine and ": FAIL " in out and hint in out, out


def sync_bn_forward_counting_along_w(xs, gamma, beta, eps=1e-5):
    """M as x.size // x.shape[-1]: the right count while C == W, as in the lesson's example."""
    m = sum(x.size // x.shape[-1] for x in xs)
    mean = sum(x.sum(axis=(0, 2, 3)) for x in xs) / m
    var = sum((x * x).sum(axis=(0, 2, 3)) for x in xs) / m - mean ** 2
    s = 1 / np.sqrt(np.abs(var) + eps)
    xhats = [(x - mean[:, None, None]) * s[:, None, None] for x in xs]
    return [gamma[:, None, None] * xh + beta[:, None, None] for xh in xhats], (xhats, s, gamma, m)


_stashed = {}


def sync_bn_forward_stashing(xs, gamma, beta, eps=1e-5):
    outs, cache = sync_bn_forward(xs, gamma, beta, eps)
    _stashed["cache"] = cache                     # the backward reads the last forward's, not its own
    return outs, cache


def sync_bn_backward_from_the_stash(dys, cache):
    return sync_bn_backward(dys, _stashed["cache"])


@pytest.mark.parametrize("check, mine, extra, hint", [
    (E.check_sync_bn_forward, lambda xs, gamma, beta, eps=1e-5: sync_bn_forward(xs, gamma, beta), (), "eps 0.1"),
    (E.check_sync_bn_forward, sync_bn_forward_counting_along_w, (), "of (4, 5, 6)"),
    (E.check_sync_bn_backward, sync_bn_backward_from_the_stash, (sync_bn_forward_stashing,), "compare one small case"),
])
def test_sync_bn_checks_after_a_second_walkthrough(check, mine, extra, hint, capsys):
    """Found by a second learner: eps ignored passed (the check always used 1e-5), M counted along W passed
    (C == W = 3 in every case), and a backward reading the last forward's cache from a global passed (one
    forward, then its backward: no other layer in between)."""
    used = check(mine, *extra)
    out = capsys.readouterr().out
    assert used is not mine and ": FAIL " in out and hint in out, out


def im2col_stride_1_or_2(x, kh, kw, stride=1, padding=0):
    return im2col_loops(x, kh, kw, 1 if stride == 1 else 2, padding)     # stride 3 taken for 2


def maxpool_forward_column_major_ties(x):
    n, c, h, w = x.shape
    win = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
    order = np.array([0, 2, 1, 3])                                        # column by column
    return win.max(-1), order[win[..., order].argmax(-1)]


def maxpool_forward_from_minus_5(x):
    n, c, h, w = x.shape
    win = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
    best, arg = np.full(win.shape[:-1], -5.0), np.zeros(win.shape[:-1], dtype=int)
    for k in range(4):
        better = win[..., k] > best
        best, arg = np.where(better, win[..., k], best), np.where(better, k, arg)
    return best, arg


_last = {}


def relu_forward_remembered(x):
    _last["x"] = x
    return np.maximum(x, 0), x > 0


def bn_backward_recomputing_s(dy, cache):
    x, mu, var, _, _, gamma = cache
    s = 1 / np.sqrt(var + 1e-5)                          # eps written in: the cache's s is the one to use
    xhat = (x - mu[:, None, None]) * s[:, None, None]
    return bn_backward_compact(dy, (x, mu, var, s, xhat, gamma))


def softmax_forward_remembered(z, t):
    loss, p = softmax_forward(z, t)
    _last["probs"] = p
    return loss, p


@pytest.mark.parametrize("check, mine, extra, hint", [
    (E.check_im2col, im2col_stride_1_or_2, (), "stride 3"),
    (E.check_im2col, lambda x, *a: im2col_loops(x, *a).astype(np.float64), (), "keep the dtype you are given"),
    (E.check_maxpool_forward, maxpool_forward_column_major_ties, (), "column by column"),
    (E.check_maxpool_forward, maxpool_forward_from_minus_5, (), "compare one small case"),
    (E.check_relu_backward, lambda dout, mask: dout * mask, (lambda x: (np.maximum(x, 0), x > 0.05),), "ReLU"),
    (E.check_relu_backward, lambda dout, mask: dout * (_last["x"] > 0), (relu_forward_remembered,), "ReLU"),
    (E.check_bn_backward, bn_backward_recomputing_s, (bn_forward,), "eps 0.001"),
    (E.check_softmax_ce_backward, lambda p, t: E.reference_softmax_ce_backward(_last["probs"], t),
     (softmax_forward_remembered,), "CrossEntropyLoss"),
    (E.check_concat_backward, lambda dout, ca: (dout[:, :ca], dout[:, ca:ca + 5]), (), "(2, 7, 3, 4)"),
    (E.check_iou_per_class, lambda cm: E.reference_iou_per_class(cm.astype(np.int16)), (), "counts above 32767"),
])
def test_layer_checks_that_a_learner_tried_to_break(check, mine, extra, hint, capsys):
    """Found by a learner trying to break lessons 03-08 and 13: a stride written as 1 or 2, columns of float64
    for a float32 x, ties broken column by column, a max started from -5, a ReLU mask of x > 0.05, a backward
    reading what the last forward left in a global (another forward now runs in between), a BatchNorm
    backward with eps written in, a concat cut at 5 channels, an IoU in int16 - each passed."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        used = check(mine, *extra)
    out = capsys.readouterr().out
    assert used is not mine and ": FAIL " in out and hint in out, out


def relu_backward_in_place(dout, mask):
    dout[~mask] = 0              # right numbers, but the caller's dout is changed
    return dout


def softmax_ce_backward_in_place(probs, target):
    n, k, h, w = probs.shape
    probs[np.arange(n)[:, None, None], target, np.arange(h)[:, None], np.arange(w)] -= 1   # the forward's cache
    return probs / (n * h * w)


def concat_backward_returning_views(dout, ca):
    return dout[:, :ca], dout[:, ca:]      # views are fine: nothing is written


@pytest.mark.parametrize("check, mine, extra, hint", [
    (E.check_relu_backward, relu_backward_in_place, (lambda x: (np.maximum(x, 0), x > 0),), "Add hands one dout to two paths"),
    (E.check_softmax_ce_backward, softmax_ce_backward_in_place, (softmax_forward,), "a forward's cache serves"),
    (E.check_concat_backward, concat_backward_returning_views, (), None),
])
def test_answers_that_change_their_inputs_fail(check, mine, extra, hint, capsys):
    """An answer with the right numbers that writes into an array it was given fails, with a hint saying why
    (Add hands one dout to both paths of a fork; a forward's cache serves its backward); views that write
    nothing pass."""
    used = check(mine, *extra)
    assert_verdict(used, mine, capsys.readouterr().out, hint)


def gate_backward_by_layers(dout, x, s, sig, alpha, Wx, Wg, Wpsi, Ah, Aw):
    """A right answer through tinyunet's own layers' backward passes (not the check's NumPy formulas)."""
    from tinyunet import backend
    from tinyunet.nn import Conv2d, Multiply, ReLU, Sigmoid, Upsample

    before = backend.set_acceleration(False)
    try:
        ci, c = Wx.shape[:2]
        mult, up, sigmoid, relu = Multiply(), Upsample(2, mode="bilinear"), Sigmoid(), ReLU()
        psi, wg, wx = Conv2d(ci, 1, 1).double(), Conv2d(Wg.shape[1], ci, 1).double(), Conv2d(c, ci, 2, stride=2, bias=False).double()
        psi.weight.data[...], wg.weight.data[...], wx.weight.data[...] = Wpsi[:, :, None, None], Wg[:, :, None, None], Wx
        # replay the forward with s and sig as given, so each layer holds what its backward needs
        relu.forward(s)
        q = np.log(sig / (1 - sig))
        sigmoid.forward(q)
        up.forward(sig)
        mult.forward(x, alpha)
        psi.forward(np.maximum(s, 0))
        wg.forward(np.zeros((x.shape[0], Wg.shape[1], s.shape[2], s.shape[3])))
        wx.forward(x)
        dx_mult, dalpha = mult.backward(dout)
        ds = relu.backward(psi.backward(sigmoid.backward(up.backward(dalpha.sum(axis=1, keepdims=True)))))
        return dx_mult + wx.backward(ds), wg.backward(ds)
    finally:
        backend.set_acceleration(before)


def gate_slip(slip):
    def backward(dout, x, s, sig, alpha, Wx, Wg, Wpsi, Ah, Aw):
        return E._gate_backward_variant(dout, dict(x=x, s=s, sig=sig, alpha=alpha, Wx=Wx, Wg=Wg, Wpsi=Wpsi, Ah=Ah, Aw=Aw), slip)
    return backward


@pytest.mark.parametrize("mine, hint", [
    (gate_backward_by_layers, None),
    (gate_slip("sigmoid"), "sig * (1 - sig)"), (gate_slip("mean"), "summed over the channels"),
    (gate_slip("relu"), "mask (s > 0)"), (gate_slip("fork"), "x forks"), (gate_slip("product"), "the gate's own path"),
    (lambda *args: E.reference_gate_backward(*args)[::-1], "the right one"),
])
def test_gate_backward_check(mine, hint, capsys):
    """Lesson 16's attention-gate exercise: an answer through the package's layers passes; each classic slip
    fails with its hint; the reference stands in after a failure and passes its own check."""
    used = E.check_gate_backward(mine)
    out = capsys.readouterr().out
    assert_verdict(used, mine, out, hint)
    if hint is not None:
        assert E.check_gate_backward(used) is used


def resize_nearest_loops(mask, height, width):
    """A right answer written here with loops and floats: the input pixel that holds each output centre."""
    H, W = mask.shape
    out = np.empty((height, width), dtype=mask.dtype)
    for i in range(height):
        for j in range(width):
            out[i, j] = mask[int((i + 0.5) * H / height), int((j + 0.5) * W / width)]
    return out


def resize_nearest_corner(mask, height, width):
    H, W = mask.shape
    return mask[(np.arange(height) * H // height)[:, None], (np.arange(width) * W // width)[None, :]]


def resize_nearest_rounded(mask, height, width):
    H, W = mask.shape
    rows = np.minimum(np.round((np.arange(height) + 0.5) * H / height).astype(int), H - 1)
    cols = np.minimum(np.round((np.arange(width) + 0.5) * W / width).astype(int), W - 1)
    return mask[rows[:, None], cols[None, :]]


def resize_nearest_averaging(mask, height, width):
    """Bilinear on class ids (what the lesson warns against), rounded back to integers."""
    from PIL import Image
    return np.round(np.asarray(Image.fromarray(mask.astype(np.float32)).resize((width, height), Image.BILINEAR))).astype(mask.dtype)


@pytest.mark.parametrize("mine, hint", [
    (resize_nearest_loops, None),
    (resize_nearest_corner, "top-left corner"),
    (resize_nearest_rounded, "round() picks the nearer pixel *border*"),
    (resize_nearest_averaging, "never averaged"),
    (lambda mask, height, width: resize_nearest_loops(mask, width, height), "wrong axis order"),
    (lambda mask, height, width: resize_nearest_loops(mask, height, width).astype(np.int64), "index the mask"),
])
def test_resize_nearest_check(mine, hint, capsys):
    """Lesson 12's nearest-neighbour exercise: a loop answer passes; the corner, rounding, averaging,
    swapped-size and dtype slips fail with their hints."""
    used = E.check_resize_nearest(mine)
    assert_verdict(used, mine, capsys.readouterr().out, hint)


def resize_nearest_ceil(mask, height, width):
    """Right except where a centre falls exactly on a border: there it takes the upper-left pixel."""
    H, W = mask.shape
    rows = np.ceil((np.arange(height) + 0.5) * H / height).astype(int) - 1
    cols = np.ceil((np.arange(width) + 0.5) * W / width).astype(int) - 1
    return mask[rows[:, None], cols[None, :]]


def resize_nearest_in_place(mask, height, width):
    out = resize_nearest_loops(mask, height, width)
    mask[...] = 0
    return out


@pytest.mark.parametrize("mine, hint", [
    (resize_nearest_ceil, "belongs to the lower-right one"),
    (resize_nearest_in_place, "leave the inputs as they were"),
    (lambda mask, height, width: resize_nearest_loops(mask, height, width).tolist(), "return a NumPy array"),
])
def test_resize_nearest_check_more_slips(mine, hint, capsys):
    """Found by a learner's walkthrough: ceil(x) - 1 passed while every case avoided exact ties, and a
    function that overwrote its input or returned a list was not told so."""
    used = E.check_resize_nearest(mine)
    assert_verdict(used, mine, capsys.readouterr().out, hint)


def test_a_wrong_mask_is_told_how_many_pixels_differ(capsys):
    """Class ids are right or wrong: a mask off in one pixel of the first case (37x29 -> 16x11, 176 pixels)
    is told "1 of 176", not a relative error of the ids."""
    def one_pixel_off(mask, height, width):
        out = resize_nearest_loops(mask, height, width)
        out[0, 0] = 3 if out[0, 0] != 3 else 7   # another id that the mask holds
        return out

    used = E.check_resize_nearest(one_pixel_off)
    out = capsys.readouterr().out
    assert used is not one_pixel_off
    assert "1 of 176 values differ from PIL's NEAREST" in out and "relative error" not in out


def test_resize_cases_ties_only_at_exact_scales_and_pillow_takes_the_centre():
    """The check's cases put an output centre on a border between input pixels only where the scale is a
    whole factor (exact in floating point), and on all of them Pillow's NEAREST is the centre rule, floor
    at a tie (checked with a mask whose every pixel is distinct)."""
    from PIL import Image

    ties = 0
    for (H, W), (h, w) in E.RESIZE_CASES:
        for n, m in ((H, h), (W, w)):
            tied = any((2 * i + 1) * n % (2 * m) == 0 for i in range(m))
            assert not tied or n % m == 0, (n, m)
            ties += tied
        distinct = np.arange(H * W, dtype=np.int32).reshape(H, W)
        pillow = np.asarray(Image.fromarray(distinct).resize((w, h), Image.NEAREST))
        assert np.array_equal(pillow, resize_nearest_loops(distinct, h, w)), ((H, W), (h, w))
    assert ties >= 2, "a case with ties is what tells floor from ceil - 1"


def conv3x3_flat_rows_by_rows(x, w, b):
    """A right answer written here: each output row of flat gathered from its nine window rows one by one."""
    n, c, h, wd = x.shape
    hp, wp = h + 2, wd + 2
    flat = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))).transpose(0, 2, 3, 1).reshape(-1, c)
    out = np.empty((n, w.shape[0], h, wd))
    for img in range(n):
        for y in range(h):
            for q in range(wd):
                top_left = img * hp * wp + y * wp + q
                window = np.stack([flat[top_left + i * wp + j] for i in range(3) for j in range(3)])   # (9, C)
                out[img, :, y, q] = np.einsum("kc,okc->o", window, w.reshape(w.shape[0], c, 9).transpose(0, 2, 1)) + b
    return out


def conv3x3_flat_rows_zeroing_x(x, w, b):
    out = conv3x3_flat_rows_by_rows(x, w, b)
    x[...] = 0                   # "free" the input: the caller's array
    return out


def conv3x3_flat_rows_empty(x, w, b):
    """An accumulator from np.empty whose last entry is never written (NaN stands in for its garbage)."""
    out = conv3x3_flat_rows_by_rows(x, w, b)
    out[-1, -1, -1, -1] = np.nan
    return out


@pytest.mark.parametrize("mine, hint", [
    (conv3x3_flat_rows_by_rows, None),
    (lambda x, w, b: E._flat_rows_variant(x, w, b, "width"), "the *padded* width"),
    (lambda x, w, b: E._flat_rows_variant(x, w, b, "centre"), "keep [:, :H, :W]"),
    (lambda x, w, b: E._flat_rows_variant(x, w, b, "nchw"), "flatten channels-last"),
    (lambda x, w, b: conv3x3_flat_rows_by_rows(x, w.transpose(0, 1, 3, 2), b), "row offset i and column offset j"),
    (lambda x, w, b: E._flat_rows_variant(x, w, b, "short"), "L is one short"),
    (lambda x, w, b: E._flat_rows_variant(x, w, b, "untransposed"), "w[:, :, i, j].T, (C, Cout)"),
    (lambda x, w, b: conv3x3_flat_rows_by_rows(x, w[:, :, ::-1, ::-1], b), "the kernel is flipped"),
    (lambda x, w, b: conv3x3_flat_rows_by_rows(x, w, 0 * b), "the bias is missing"),
    (conv3x3_flat_rows_zeroing_x, "leave the inputs as they were"),
    (conv3x3_flat_rows_empty, "np.empty"),
])
def test_conv3x3_flat_rows_check(mine, hint, capsys):
    """Lesson 17's flattened-rows exercise: an answer gathered row by row passes; the slips fail with their hints
    (the last six were found by a learner's walkthrough: an answer that zeroed x after its result passed, and
    a missing bias, L one short, a missing .T and a NaN got no hint that named them)."""
    used = E.check_conv3x3_flat_rows(mine)
    assert_verdict(used, mine, capsys.readouterr().out, hint)


def timed_written_here(fn, sync, warmup=2, repeat=5):
    """A right answer written differently: another clock, statistics.median, the runs kept as end - start."""
    import statistics
    import time

    for _ in range(warmup):
        fn()
    sync()
    runs = []
    for _ in range(repeat):
        start = time.monotonic()
        fn()
        sync()
        runs.append(time.monotonic() - start)
    return statistics.median(runs)


def timed_slip(slip):
    def timed(fn, sync, warmup=2, repeat=5):
        import time

        for _ in range(0 if slip == "no warm-up" else warmup):
            fn()
        runs = []
        for _ in range(repeat):
            if slip != "no sync before":
                sync()
            start = time.perf_counter()
            fn()
            if slip != "no sync after":
                sync()
            runs.append(time.perf_counter() - start)
        if slip == "never appended":
            with warnings.catch_warnings():        # NumPy warns of the empty median, then gives NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                return float(np.median([]))
        seconds = float({"mean": np.mean, "max": np.max, "total": np.sum}.get(slip, np.median)(runs))
        return {"ms": 1000, "ns": 1e9, "negative": -1}.get(slip, 1) * seconds
    return timed


@pytest.mark.parametrize("mine, hint", [
    (timed_written_here, None),
    (timed_slip("no sync after"), "the time of the launch only"),
    (timed_slip("no sync before"), "sync() before starting the clock too"),
    (timed_slip("no warm-up"), "call fn() warmup times"),
    (timed_slip("mean"), "take the median"),
    (timed_slip("ms"), "return seconds, not ms"),
    (timed_slip("max"), "not the mean or the max"),
    (timed_slip("total"), "the total of the runs"),
    (timed_slip("ns"), "nanoseconds"),
    (timed_slip("negative"), "end - start"),
    (timed_slip("never appended"), "the median of an empty list"),
])
def test_timed_check(mine, hint, capsys):
    """Lesson 15's timing exercise, on the simulated asynchronous device: a right answer written here passes;
    each of the classic GPU-timing mistakes fails with its hint (the last five from a learner's walkthrough:
    a NaN from an empty list passed, and the max, a total, nanoseconds and end - start reversed were hinted
    at as a missing sync)."""
    used = E.check_timed(mine)
    assert_verdict(used, mine, capsys.readouterr().out, hint)


def test_simulated_device_queues_work_until_sync():
    """The simulated device the timing check relies on: a call returns at once, sync() waits for the queued
    work, which adds up across calls; the first call's set-up is paid at once."""
    import time

    device = E.SimulatedDevice([0.05, 0.05], first=0.05)
    start = time.perf_counter()
    device.run()
    launched = time.perf_counter() - start
    device.run()
    queued = time.perf_counter() - start
    device.sync()
    done = time.perf_counter() - start
    assert 0.045 < launched < 0.08 and queued < 0.08 and 0.145 < done < 0.2, (launched, queued, done)


def residual_backward_layer_by_layer(block, dout):
    """A right answer written here: the ReLU's mask from its saved output, then every layer of both paths
    one by one (not Sequential.backward, not Add.backward), the two paths' gradients summed at x."""
    ds = dout * (block.relu.out > 0)
    d_branch, d_shortcut = ds, ds
    for layer in reversed(block.branch.layers):
        d_branch = layer.backward(d_branch)
    for layer in reversed(block.shortcut.layers if block.shortcut is not None else []):
        d_shortcut = layer.backward(d_shortcut)
    return d_branch + d_shortcut


def residual_backward_scaling_dout(block, dout):
    """Right numbers, but the ReLU's mask is applied to the caller's dout in place."""
    dout *= block.relu.out > 0
    d_branch, d_shortcut = block.add.backward(dout)
    if block.shortcut is not None:
        d_shortcut = block.shortcut.backward(d_shortcut)
    return block.branch.backward(d_branch) + d_shortcut


def residual_backward_relu_twice(block, dout):
    print("ds norm", np.linalg.norm(block.relu.backward(dout)))     # a debug print that uses up the ReLU's mask
    return E._residual_slip("")(block, dout)


def shortcut_not_run_backward(block, dout):
    """ds handed to x as it is, also past a projection shortcut's layers (3 channels onto x's 2)."""
    ds = block.relu.backward(dout)
    return block.branch.backward(ds) + ds


@pytest.mark.parametrize("mine, hint", [
    (residual_backward_layer_by_layer, None),
    (E._residual_slip("relu"), "start with ds = block.relu.backward(dout)"),
    (E._residual_slip("relu_branch"), "the shortcut too"),
    (E._residual_slip("fork"), "the fork adds"),
    (shortcut_not_run_backward, "shapes that do not fit"),
    (E._residual_slip("fork_mean"), "not averaged"),
    (lambda block, dout: block.backward(dout), "use the parts' backward"),
    (residual_backward_scaling_dout, "changes the caller's"),
    (lambda block, dout: residual_backward_layer_by_layer(block, dout).astype(np.float32), "keep it"),
    (residual_backward_relu_twice, "called a second time after one forward"),
])
def test_residual_backward_check(mine, hint, capsys):
    """Lesson 16's residual-block exercise: a layer-by-layer answer passes; each slip fails with its hint (the
    last five were found by a learner's walkthrough: block.backward itself passed, and so did a dout changed
    in place and a float32 dx)."""
    used = E.check_residual_backward(mine)
    assert_verdict(used, mine, capsys.readouterr().out, hint)


def train_steps_written_out(model, optimizer, loss_fn, batches):
    """A right loop written here, with the optimizer step as Adam's formula would not be: the package's."""
    model.train()
    out = []
    for x, y in batches:
        for p in model.parameters():
            p.grad[...] = 0
        logits = model.forward(x)
        out.append(float(loss_fn.forward(logits, y)))
        model.backward(loss_fn.backward())
        optimizer.step()
    return out


def train_steps_slip(kind):
    return E._train_mistake(kind)


def iou_from_sets(cm):
    """IoU counted from the definition: |pred ∩ true| / |pred ∪ true| per class, over a pixel list."""
    true, pred = np.repeat(np.arange(cm.shape[0]), cm.sum(axis=1)), np.concatenate(
        [np.repeat(np.arange(cm.shape[1]), row) for row in cm])
    result = []
    for c in range(cm.shape[0]):
        union = np.sum((true == c) | (pred == c))
        result.append(np.sum((true == c) & (pred == c)) / union if union else np.nan)
    return np.array(result)


@pytest.mark.parametrize("check, mine, hint", [
    (E.check_train_steps, train_steps_written_out, None),
    (E.check_train_steps, train_steps_slip("no zero_grad"), "gradients accumulate"),
    (E.check_train_steps, train_steps_slip("no step"), "never moved"),
    (E.check_train_steps, train_steps_slip("eval"), "model.train()"),
    (E.check_iou_per_class, iou_from_sets, None),
    (E.check_iou_per_class, lambda cm: np.diag(cm) / (cm.sum(0) + cm.sum(1)), "counts TP once"),
    (E.check_iou_per_class, lambda cm: np.diag(cm) / cm.sum(1), "recall"),
    (E.check_iou_per_class, lambda cm: np.nan_to_num(E.reference_iou_per_class(cm)), "NaN there"),
    (E.check_col2im, lambda cols, shape, kh, kw, s=1, p=0: E.host(E.reference_col2im(cols, shape, kh, kw, s, p)).astype(np.float32),
     "keep the dtype"),
])
def test_training_loop_and_metric_checks(check, mine, hint, capsys):
    """Lesson 13's loop and IoU and lesson 10's col2im: a right answer written independently passes; each
    slip that still made the loss fall (no zero_grad, eval mode) or the float32 buffer fails with its hint."""
    with np.errstate(invalid="ignore", divide="ignore"):
        used = check(mine)
    out = capsys.readouterr().out
    assert_verdict(used, mine, out, hint)


def train_steps_counting_first(model, optimizer, loss_fn, batches):
    steps = sum(1 for _ in batches)        # a first pass over a loader that allows one
    return train_steps_written_out(model, optimizer, loss_fn, batches) if steps else []


def train_steps_two_forwards(model, optimizer, loss_fn, batches):
    model.train()
    out = []
    for x, y in batches:
        optimizer.zero_grad()
        out.append(float(loss_fn.forward(model.forward(x), y)))
        model.forward(x)                   # a second forward (for a prediction): BatchNorm's statistics move again
        loss_fn.forward(model.forward(x), y)
        model.backward(loss_fn.backward())
        optimizer.step()
    return out


def train_steps_keeping_loss_objects(model, optimizer, loss_fn, batches):
    model.train()
    out = []
    for x, y in batches:
        optimizer.zero_grad()
        loss = loss_fn.forward(model.forward(x), y)
        model.backward(loss_fn.backward())
        optimizer.step()
        out.append(loss)
    return out


def train_steps_optimizer_on_copies(model, optimizer, loss_fn, batches):
    import copy
    from tinyunet.optim import Adam

    mine = Adam(copy.deepcopy(model.parameters()), lr=1e-2)
    return train_steps_written_out(model, mine, loss_fn, batches)


def iou_nan_where_never_predicted(cm):
    tp = np.diag(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cm.sum(0) > 0, tp / (cm.sum(0) + cm.sum(1) - tp), np.nan)


def iou_zeroing_the_diagonal(cm):
    tp = np.diag(cm).copy()
    np.fill_diagonal(cm, 0)                # the caller's matrix
    with np.errstate(invalid="ignore", divide="ignore"):
        return tp / (tp + cm.sum(0) + cm.sum(1))


@pytest.mark.parametrize("check, mine, hint", [
    (E.check_train_steps, train_steps_counting_first, "one-pass loader"),
    (E.check_train_steps, train_steps_two_forwards, "a second forward also moves"),
    (E.check_train_steps, train_steps_slip("zero_grad last"), "cleared after the step"),
    (E.check_train_steps, train_steps_keeping_loss_objects, "append float(loss)"),
    (E.check_train_steps, train_steps_optimizer_on_copies, "copies of the parameters"),
    (E.check_train_steps, lambda *a: np.array(train_steps_written_out(*a)), None),
    (E.check_iou_per_class, iou_nan_where_never_predicted, "IoU 0, a real score"),
    (E.check_iou_per_class, lambda cm: np.where(np.diag(cm) > 0, E.reference_iou_per_class(cm), np.nan), "IoU 0"),
    (E.check_iou_per_class, iou_zeroing_the_diagonal, "leave the inputs as they were"),
])
def test_loop_and_iou_checks_after_a_learners_walkthrough(check, mine, hint, capsys):
    """Found by working through lesson 13 as a learner: a loop that read the batches twice passed (the check
    gave a list, the lesson a one-pass loader), two forwards per step passed (BatchNorm's statistics were not
    compared), zero_grad after the step passed (the model came with no gradients), loss objects instead of
    floats passed; an IoU of NaN for a class never predicted passed, and so did one that wrote into cm."""
    used = check(mine)
    assert_verdict(used, mine, capsys.readouterr().out, hint)


def pixel_accuracy_counted(model, batches):
    """A right answer written here: the hits summed with xp on the device, one to_host at the end."""
    from tinyunet.backend import to_device, to_host, xp

    model.eval()
    hits, pixels = [], 0
    for x, y in batches:
        labels = to_device(y)
        hits.append(xp.sum(model.forward(to_device(x)).argmax(axis=1) == labels))
        pixels += labels.size
    return float(to_host(xp.stack(hits).sum())) / pixels


def pixel_accuracy_per_batch_float(model, batches):
    from tinyunet.backend import to_device

    model.eval()
    right = total = 0
    for x, y in batches:
        right += float((model.forward(to_device(x)).argmax(axis=1) == to_device(y)).sum())   # waits every batch
        total += y.size
    return right / total


def pixel_accuracy_slip(kind):
    """The right loop with one slip: "host batches" (no to_device), "np.sum" on device arrays, "train mode" (no
    model.eval()), "labels alone" (never asks the model), "two forwards" per batch, "y twice" (uploaded twice)."""
    from tinyunet.backend import to_device

    def accuracy(model, batches):
        if kind != "train mode":
            model.eval()
        right = total = 0
        for x_host, y_host in batches:
            x, y = (x_host, y_host) if kind == "host batches" else (to_device(x_host), to_device(y_host))
            if kind == "two forwards":
                model.forward(x)
            hits = (y == 0) if kind == "labels alone" else model.forward(x).argmax(axis=1) == y
            right = right + (np.sum(hits) if kind == "np.sum" else hits.sum())
            total += to_device(y_host).size if kind == "y twice" else y.size
        return float(right) / total
    return accuracy


def pixel_accuracy_mean_of_batches(model, batches):
    from tinyunet.backend import to_device, xp

    model.eval()
    return float(xp.stack([(model.forward(to_device(x)).argmax(axis=1) == to_device(y)).mean()
                           for x, y in batches]).mean())


def pixel_accuracy_predictions_to_host(model, batches):
    from tinyunet.backend import to_device, to_host, xp

    model.eval()
    predictions, labels = [], []
    for x, y in batches:
        predictions.append(model.forward(to_device(x)).argmax(axis=1))
        labels.append(y)
    return float((to_host(xp.concatenate(predictions)) == np.concatenate(labels)).mean())   # one copy, many values


def pixel_accuracy_counting_in_uint8(model, batches):
    from tinyunet.backend import to_device, xp

    model.eval()
    right, total = xp.zeros((), dtype=np.uint8), 0
    for x, y in batches:
        right += (model.forward(to_device(x)).argmax(axis=1) == to_device(y)).sum().astype(np.uint8)
        total += y.size
    return float(right) / total


@pytest.mark.parametrize("mine, hint", [
    (pixel_accuracy_counted, None),
    (pixel_accuracy_per_batch_float, "waits for the GPU at every batch"),
    (pixel_accuracy_slip("host batches"), "copy each batch with to_device"),
    (pixel_accuracy_slip("np.sum"), "numpy cannot read a device array"),
    (pixel_accuracy_slip("train mode"), "model.eval()"),
    (pixel_accuracy_mean_of_batches, "the weight of four"),
    (pixel_accuracy_slip("labels alone"), "one forward per batch"),
    (pixel_accuracy_predictions_to_host, "not the predictions"),
    (pixel_accuracy_slip("two forwards"), "one forward per batch"),
    (pixel_accuracy_slip("y twice"), "copy each batch once"),
    (pixel_accuracy_counting_in_uint8, "argmax over axis 1"),
])
def test_pixel_accuracy_check_on_the_cupy_stand_in(mine, hint, capsys):
    """Lesson 15's evaluation on the strict CuPy stand-in: a right answer passes with one transfer; a float()
    per batch, host batches, np.sum on device arrays, train mode and a mean of the batches' means each fail
    with their hint; and after a learner's walkthrough: the labels alone (the check's model once predicted one
    class), the predictions copied back, two forwards, y uploaded twice and a uint8 count. The backend is
    NumPy again afterwards."""
    from tinyunet import backend

    used = E.check_pixel_accuracy(mine)
    assert_verdict(used, mine, capsys.readouterr().out, hint)
    assert backend.name() == "numpy"


def trimap_by_table(trimap):
    """A right answer from the class table itself."""
    from tinyunet.classes import CLASSES

    trimap = np.asarray(trimap)
    out = np.full(trimap.shape, 255, np.uint8)
    for c in CLASSES:
        out[trimap == c.trimap_value] = c.id
    if (out == 255).any():
        raise ValueError(f"not a trimap value: {np.setdiff1d(trimap, [1, 2, 3])}")
    return out


@pytest.mark.parametrize("mine, hint", [
    (trimap_by_table, None),
    (lambda t: (np.asarray(t) - 1).astype(np.uint8), "raise ValueError"),
    (lambda t: np.asarray(t), "value - 1"),
    (lambda t: np.choose(np.asarray(t) - 1, [1, 0, 2]).astype(np.uint8), "swapped"),
    (lambda t: trimap_by_table(t).astype(np.int64), "uint8"),
])
def test_trimap_check(mine, hint, capsys):
    used = E.check_trimap_to_labels(mine)
    out = capsys.readouterr().out
    assert_verdict(used, mine, out, hint)


def conv_shifted_written_out(x, w, b, padding):
    """A right answer: each output pixel's window, as a dot product (loops over output positions)."""
    n, c, h, wd = x.shape
    cout, _, kh, kw = w.shape
    xp_ = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    ho, wo = h + 2 * padding - kh + 1, wd + 2 * padding - kw + 1
    out = np.empty((n, cout, ho, wo))
    for y in range(ho):
        for q in range(wo):
            out[:, :, y, q] = np.einsum("nckl,ockl->no", xp_[:, :, y:y + kh, q:q + kw], w) + b
    return out


def conv_shifted_square(x, w, b, padding):
    k = w.shape[2]
    return conv_shifted_written_out(x, w[:, :, :, :k] if w.shape[3] >= k else w, b, padding)


@pytest.mark.parametrize("mine, hint", [
    (conv_shifted_written_out, None),
    (lambda x, w, b, p: conv_shifted_written_out(x, w, np.zeros_like(b), p), "the bias is missing"),
    (lambda x, w, b, p: conv_shifted_written_out(x, w[:, :, ::-1, ::-1], b, p), "flipped"),
    (conv_shifted_square, "the right one"),
])
def test_conv2d_shifted_check(mine, hint, capsys):
    used = E.check_conv2d_shifted(mine)
    out = capsys.readouterr().out
    assert_verdict(used, mine, out, hint)


def test_a_crash_names_the_line_and_the_call(capsys):
    """An exception in the learner's function names its line in the learner's code and the arguments of the
    call that raised (arrays by shape): "read the error above" had nothing above it."""
    E.check_conv2d_forward(conv_forward_four_outputs)
    out = capsys.readouterr().out
    assert "in conv_forward_four_outputs, line" in out and "w.reshape(4, -1) @ cols" in out
    assert "called with (array (3, 2, 5, 8) float64, array (5, 2, 3, 3) float64, array (5,) float64, 1, 1)" in out


def test_a_check_that_compared_nothing_is_no_pass(capsys):
    """A run that made no comparison (an answer that emptied what it was given, say) is a FAIL, never
    "PASS ... (0 comparisons)"."""
    reference = lambda: None
    mine = lambda: None
    assert E.verdict("f", mine, reference, lambda fn: [], "nothing") is reference
    assert "FAIL  nothing was compared" in capsys.readouterr().out
