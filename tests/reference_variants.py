"""Naive references for the layers of the U-Net variants (Sigmoid, Add, Multiply, Upsample).

Same rules as reference.py: explicit loops, float64 on the host, nothing imported from tinyunet.
Where the package writes a layer as a matrix product (Upsample) the reference computes each output
pixel from its formula, and the backward references *scatter* each output gradient onto the inputs
it came from, so a mistake shared with the package is unlikely.
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np


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
