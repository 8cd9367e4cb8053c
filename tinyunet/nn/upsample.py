"""Upsample: enlarge H and W by a scale factor, by nearest-neighbour or bilinear interpolation.

Both modes are *linear* maps that act on the rows and the columns separately: every output row is a
fixed weighted mix of input rows, and the same for columns. Written as two small matrices,
A_h (Hout, H) and A_w (Wout, W), with one row of interpolation weights per output position:

    forward:   out = A_h @ x @ A_w^T            (for every image and channel at once)
    backward:  dx  = A_h^T @ dout @ A_w          (the transpose of a linear map is its adjoint)

Nearest: output position o copies input floor(o / s), so A has a single 1 per row. Bilinear (as
PyTorch's ``align_corners=False``): output position o sits at input coordinate (o + 0.5) / s - 0.5
(clamped at 0) and mixes its two neighbouring inputs by distance, the last one repeated at the edge.
For s = 2 that is 0.75 * nearest + 0.25 * next nearest. The matrices are tiny (Hout x H), built on
the device in a few vectorised operations, and the products run as batched matmuls.
"""
from __future__ import annotations

from typing import Any

from tinyunet.backend import xp
from tinyunet.nn.module import Module

MODES = ("nearest", "bilinear")


def interpolation_matrix(in_size: int, out_size: int, scale: float, mode: str, dtype: Any) -> Any:
    """(out_size, in_size) weights: row o holds how much each input position contributes to output o."""
    o = xp.arange(out_size, dtype=xp.float64)
    if mode == "nearest":
        src = xp.floor(o / scale)            # as PyTorch's mode="nearest"
        lo, hi, frac = src, src, xp.zeros_like(src)
    else:
        src = xp.maximum((o + 0.5) / scale - 0.5, 0.0)
        lo = xp.floor(src)
        hi = xp.minimum(lo + 1, in_size - 1)  # at the last input, its "next" neighbour is itself
        frac = src - lo
    positions = xp.arange(in_size, dtype=xp.float64)[None, :]
    lo, hi, frac = xp.minimum(lo, in_size - 1)[:, None], hi[:, None], frac[:, None]
    matrix = (positions == lo) * (1 - frac) + (positions == hi) * frac
    return matrix.astype(dtype)


class Upsample(Module):
    """Enlarge (N, C, H, W) to (N, C, floor(H * s), floor(W * s)); no learnable parameters."""

    def __init__(self, scale_factor: float = 2, mode: str = "nearest") -> None:
        if mode not in MODES:
            raise ValueError(f"unknown upsampling mode {mode!r}: choose one of {', '.join(MODES)}")
        if scale_factor <= 0:
            raise ValueError(f"scale_factor must be positive, got {scale_factor}")
        self.scale_factor, self.mode = scale_factor, mode
        self.cache: Any = None

    def forward(self, x: Any) -> Any:
        """x: (N, C, H, W) -> (N, C, floor(H * s), floor(W * s))."""
        h, w = x.shape[2], x.shape[3]
        s = self.scale_factor
        a_h = interpolation_matrix(h, int(h * s), s, self.mode, x.dtype)   # (Hout, H)
        a_w = interpolation_matrix(w, int(w * s), s, self.mode, x.dtype)   # (Wout, W)
        self.cache = (a_h, a_w)
        # (N, C, H, W) @ (W, Wout) -> (N, C, H, Wout); then (Hout, H) @ that -> (N, C, Hout, Wout)
        return xp.matmul(a_h, xp.matmul(x, a_w.T))

    def backward(self, dout: Any) -> Any:
        """dout: (N, C, Hout, Wout) -> dx: (N, C, H, W)."""
        a_h, a_w = self.cache
        self.cache = None
        return xp.matmul(xp.matmul(a_h.T, dout), a_w)

    def extra_repr(self) -> str:
        return f"scale_factor={self.scale_factor}, mode={self.mode!r}"
