"""The layers as loops over every index, written for reading and for checking the layers against.

One function per formula, the loops spelled out: the convolution, the transposed convolution, max-
pooling, ReLU, concatenation, BatchNorm, softmax cross-entropy, and the variants' Sigmoid, Add,
Multiply and Upsample. They are deliberately independent of the rest of the package: nothing here
imports tinyunet, and where a layer *scatters* (transposed convolution) these *gather*, and where a
layer writes a matrix product (Upsample) these compute each output from its formula, so that a
mistake shared with the layers is unlikely. Everything runs in float64 on the host. Slow by design:
use them on small tensors only (the tests, the lessons' checks, and your own exercises).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np


def out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Number of kernel positions along an axis: floor((size + 2p - k) / s) + 1."""
    return (size + 2 * padding - kernel) // stride + 1


def conv2d(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray], stride: int = 1,
           padding: int = 0) -> np.ndarray:
    """out[n, o, y, x] = bias[o] + sum_{c, i, j} w[o, c, i, j] * x[n, c, y*s + i - p, x*s + j - p],
    where reads outside the input count as 0 (zero padding). Loops over every index."""
    n, cin, h, w = x.shape
    cout, cin_w, kh, kw = weight.shape
    assert cin == cin_w
    ho, wo = out_size(h, kh, stride, padding), out_size(w, kw, stride, padding)
    out = np.zeros((n, cout, ho, wo))
    for b in range(n):
        for o in range(cout):
            for y in range(ho):
                for xx in range(wo):
                    acc = 0.0 if bias is None else float(bias[o])
                    for c in range(cin):
                        for i in range(kh):
                            for j in range(kw):
                                r, q = y * stride + i - padding, xx * stride + j - padding
                                if 0 <= r < h and 0 <= q < w:
                                    acc += float(weight[o, c, i, j]) * float(x[b, c, r, q])
                    out[b, o, y, xx] = acc
    return out


def conv_transpose2d(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray], stride: int = 1,
                     padding: int = 0) -> np.ndarray:
    """Transposed convolution as a *gather* over output pixels.

    PyTorch's definition: input pixel (y, x) adds x[c, y, x] * w[c, o, i, j] to output pixel
    (y*s + i - p, x*s + j - p). So output pixel (Y, X) receives from every (i, j) for which
    y = (Y + p - i) / s is a whole number inside the input. weight: (Cin, Cout, kh, kw);
    output size (H - 1)*s - 2p + kh.
    """
    n, cin, h, w = x.shape
    cin_w, cout, kh, kw = weight.shape
    assert cin == cin_w
    ho, wo = (h - 1) * stride - 2 * padding + kh, (w - 1) * stride - 2 * padding + kw
    out = np.zeros((n, cout, ho, wo))
    for b in range(n):
        for o in range(cout):
            for Y in range(ho):
                for X in range(wo):
                    acc = 0.0 if bias is None else float(bias[o])
                    for c in range(cin):
                        for i in range(kh):
                            for j in range(kw):
                                ty, tx = Y + padding - i, X + padding - j
                                if ty % stride or tx % stride:
                                    continue
                                y, xx = ty // stride, tx // stride
                                if 0 <= y < h and 0 <= xx < w:
                                    acc += float(weight[c, o, i, j]) * float(x[b, c, y, xx])
                    out[b, o, Y, X] = acc
    return out


def maxpool2d(x: np.ndarray, kernel: int, stride: int) -> Tuple[np.ndarray, np.ndarray]:
    """Max over each window (floor mode, no padding) and the gradient-routing map.

    Returns (out, grad_of_sum): ``grad_of_sum`` is d(sum(out * g))/dx for g = 1 everywhere, i.e. how
    many windows picked each input pixel as *their first maximum in row-major scan order* (PyTorch's
    tie rule). For a general upstream gradient use :func:`maxpool2d_backward`.
    """
    out, _ = _maxpool_with_argmax(x, kernel, stride)
    return out, maxpool2d_backward(x, np.ones_like(out), kernel, stride)


def _maxpool_with_argmax(x: np.ndarray, kernel: int, stride: int):
    n, c, h, w = x.shape
    ho, wo = out_size(h, kernel, stride, 0), out_size(w, kernel, stride, 0)
    out = np.zeros((n, c, ho, wo))
    where = np.zeros((n, c, ho, wo, 2), dtype=int)
    for b in range(n):
        for ch in range(c):
            for y in range(ho):
                for xx in range(wo):
                    best, best_pos = -math.inf, None
                    for i in range(kernel):          # row-major scan: the first maximum wins,
                        for j in range(kernel):      # a later equal value does not replace it
                            v = float(x[b, ch, y * stride + i, xx * stride + j])
                            if v > best:
                                best, best_pos = v, (y * stride + i, xx * stride + j)
                    out[b, ch, y, xx] = best
                    where[b, ch, y, xx] = best_pos
    return out, where


def maxpool2d_backward(x: np.ndarray, dout: np.ndarray, kernel: int, stride: int) -> np.ndarray:
    """Each output's gradient goes to its window's first maximum; overlapping windows add up."""
    _, where = _maxpool_with_argmax(x, kernel, stride)
    dx = np.zeros(x.shape)
    n, c, ho, wo = dout.shape
    for b in range(n):
        for ch in range(c):
            for y in range(ho):
                for xx in range(wo):
                    r, q = where[b, ch, y, xx]
                    dx[b, ch, r, q] += dout[b, ch, y, xx]
    return dx


def relu(x: np.ndarray) -> np.ndarray:
    out = np.zeros(x.shape)
    for idx in np.ndindex(*x.shape):
        v = float(x[idx])
        out[idx] = v if v > 0 else 0.0
    return out


def concat(inputs: Sequence[np.ndarray], axis: int = 1) -> np.ndarray:
    """Copy the inputs one after the other along ``axis``, element by element."""
    shape = list(inputs[0].shape)
    shape[axis] = sum(t.shape[axis] for t in inputs)
    out = np.zeros(shape)
    offset = 0
    for t in inputs:
        for idx in np.ndindex(*t.shape):
            target = list(idx)
            target[axis] += offset
            out[tuple(target)] = t[idx]
        offset += t.shape[axis]
    return out


def batchnorm2d_train(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5):
    """Normalise each channel with the batch's mean and *biased* variance (divide by M = N*H*W).

    Returns (out, batch_mean, unbiased_batch_var) - the last two feed the running statistics.
    """
    n, c, h, w = x.shape
    out = np.zeros(x.shape)
    means, unbiased = np.zeros(c), np.zeros(c)
    for ch in range(c):
        values = [float(x[b, ch, i, j]) for b in range(n) for i in range(h) for j in range(w)]
        m = len(values)
        mean = sum(values) / m
        sq = sum((v - mean) ** 2 for v in values)
        var = sq / m
        means[ch], unbiased[ch] = mean, sq / (m - 1)
        for b in range(n):
            for i in range(h):
                for j in range(w):
                    out[b, ch, i, j] = gamma[ch] * (x[b, ch, i, j] - mean) / math.sqrt(var + eps) + beta[ch]
    return out, means, unbiased


def batchnorm2d_eval(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, running_mean: np.ndarray,
                     running_var: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    out = np.zeros(x.shape)
    for idx in np.ndindex(*x.shape):
        ch = idx[1]
        out[idx] = gamma[ch] * (x[idx] - running_mean[ch]) / math.sqrt(running_var[ch] + eps) + beta[ch]
    return out


def cross_entropy(logits: np.ndarray, target: np.ndarray, weight: Optional[np.ndarray] = None,
                  ignore_index: Optional[int] = None) -> float:
    """PyTorch's CrossEntropyLoss(reduction='mean') over pixels, one pixel at a time:

        loss = sum_p w[y_p] * (-log softmax(z_p)[y_p]) / sum_p w[y_p]   over pixels with y_p != ignore_index

    -log softmax(z)[y] = log(sum_k exp(z_k - zmax)) - (z_y - zmax): shifting by the max is exact maths
    and keeps exp() in range for huge logits.
    """
    n, c, h, w = logits.shape
    num, den = 0.0, 0.0
    for b, i, j in np.ndindex(n, h, w):
        y = int(target[b, i, j])
        if ignore_index is not None and y == ignore_index:
            continue
        z = [float(logits[b, k, i, j]) for k in range(c)]
        zmax = max(z)
        nll = math.log(sum(math.exp(v - zmax) for v in z)) - (z[y] - zmax)
        wy = 1.0 if weight is None else float(weight[y])
        num += wy * nll
        den += wy
    return num / den


def cross_entropy_grad(logits: np.ndarray, target: np.ndarray, weight: Optional[np.ndarray] = None,
                       ignore_index: Optional[int] = None) -> np.ndarray:
    """d loss / d logits = w[y_p] * (softmax(z_p) - onehot(y_p)) / sum_p w[y_p], per pixel."""
    n, c, h, w = logits.shape
    grad = np.zeros(logits.shape)
    pixels = [(b, i, j) for b in range(n) for i in range(h) for j in range(w)
              if ignore_index is None or int(target[b, i, j]) != ignore_index]
    den = sum(1.0 if weight is None else float(weight[int(target[p])]) for p in pixels)
    for b, i, j in pixels:
        y = int(target[b, i, j])
        z = [float(logits[b, k, i, j]) for k in range(c)]
        zmax = max(z)
        e = [math.exp(v - zmax) for v in z]
        s = sum(e)
        wy = 1.0 if weight is None else float(weight[y])
        for k in range(c):
            grad[b, k, i, j] = wy * (e[k] / s - (1.0 if k == y else 0.0)) / den
    return grad


# --- the layers of the U-Net variants -------------------------------------------------------

def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-v) per entry, in the form that cannot overflow for either sign of v."""
    out = np.zeros(x.shape)
    for idx in np.ndindex(*x.shape):
        v = float(x[idx])
        out[idx] = 1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v))
    return out


def source_index(out_index: Tuple[int, ...], shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """The entry of an input of ``shape`` that broadcasting reads for output entry ``out_index``:
    shapes align on the right, and an axis of size 1 is read at 0 whatever the output index."""
    tail = out_index[len(out_index) - len(shape):]
    return tuple(0 if size == 1 else i for i, size in zip(tail, shape))


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    shape = np.broadcast_shapes(a.shape, b.shape)
    out = np.zeros(shape)
    for idx in np.ndindex(*shape):
        out[idx] = float(a[source_index(idx, a.shape)]) + float(b[source_index(idx, b.shape)])
    return out


def add_backward(a: np.ndarray, b: np.ndarray, dout: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Every output entry passes its gradient (times 1) to the two entries it was made of."""
    da, db = np.zeros(a.shape), np.zeros(b.shape)
    for idx in np.ndindex(*dout.shape):
        da[source_index(idx, a.shape)] += dout[idx]
        db[source_index(idx, b.shape)] += dout[idx]
    return da, db


def multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    shape = np.broadcast_shapes(a.shape, b.shape)
    out = np.zeros(shape)
    for idx in np.ndindex(*shape):
        out[idx] = float(a[source_index(idx, a.shape)]) * float(b[source_index(idx, b.shape)])
    return out


def multiply_backward(a: np.ndarray, b: np.ndarray, dout: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Output entry a_i * b_j passes dout * b_j to a_i and dout * a_i to b_j."""
    da, db = np.zeros(a.shape), np.zeros(b.shape)
    for idx in np.ndindex(*dout.shape):
        i, j = source_index(idx, a.shape), source_index(idx, b.shape)
        da[i] += dout[idx] * b[j]
        db[j] += dout[idx] * a[i]
    return da, db


def _taps(out_pos: int, in_size: int, scale: float, mode: str):
    """[(input position, weight)] that output position ``out_pos`` reads along one axis (PyTorch rules:
    nearest reads floor(o / s); bilinear, align_corners=False, sits at (o + 0.5) / s - 0.5, clamped)."""
    if mode == "nearest":
        return [(min(int(math.floor(out_pos / scale)), in_size - 1), 1.0)]
    src = max((out_pos + 0.5) / scale - 0.5, 0.0)
    lo = int(math.floor(src))
    hi = min(lo + 1, in_size - 1)
    frac = src - lo
    return [(lo, 1.0 - frac), (hi, frac)]


def upsample(x: np.ndarray, scale: float, mode: str) -> np.ndarray:
    """(N, C, H, W) -> (N, C, floor(H*s), floor(W*s)), one output pixel at a time."""
    n, c, h, w = x.shape
    ho, wo = int(h * scale), int(w * scale)
    out = np.zeros((n, c, ho, wo))
    for b, ch, y, xx in np.ndindex(n, c, ho, wo):
        out[b, ch, y, xx] = sum(wy * wx * float(x[b, ch, iy, ix])
                                for iy, wy in _taps(y, h, scale, mode) for ix, wx in _taps(xx, w, scale, mode))
    return out


def upsample_backward(x_shape, dout: np.ndarray, scale: float, mode: str) -> np.ndarray:
    """Scatter: each output gradient goes back to the input pixels it was mixed from, times their weight."""
    h, w = x_shape[2], x_shape[3]
    dx = np.zeros(x_shape)
    for b, ch, y, xx in np.ndindex(*dout.shape):
        for iy, wy in _taps(y, h, scale, mode):
            for ix, wx in _taps(xx, w, scale, mode):
                dx[b, ch, iy, ix] += wy * wx * dout[b, ch, y, xx]
    return dx
