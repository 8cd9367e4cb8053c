"""Conv2d (stride 1) by register-blocked compiled kernels, reading the unpadded image (Numba).

The same shifted sums as shifted.py, but each term is not a BLAS product: the kernels
(direct_kernels.py) keep a tile of output sums in vector registers for all kh*kw terms and all input
channels, and write every output once. Near the border they skip the terms whose pixel lies in the
padding (which would add zeros), so nothing is padded: not x in forward, not dout or dx in backward.
Outputs are plain (N, Hout, Wout, C) arrays.

A tap t = (di, dj) of output pixel (y, x) reads input pixel (y + di, x + dj); with the images as
rows of pixels that is ``starts[t] = di*W + dj`` rows further on, and :func:`direct_kernels.clipped_segments`
lists the runs of rows that see the same taps. The input gradient is the same kind of sum, over the
kernel flipped (dx pixel (y, x) gathers dout pixel (y - i + p, x - j + p)).
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

from tinyunet.accel import direct_kernels
from tinyunet.accel.conv import ConvImplementation, nhwc, output_size
from tinyunet.accel.parallel import map_row_blocks, run_concurrently
from tinyunet.accel.weight_layout import flipped_kernel_stack, kernel_stack, stack_to_weight
from tinyunet.backend import xp

_IMAGE_CHANNELS = 4   # inputs of at most this many channels (an image's) are read as they are


def direct_sums(out: Any, a: Any, starts: List[int], w: Any, segments: Any, share_channels: bool) -> None:
    """out[r] = sum over the taps t of its segment of a[s + starts[t]] @ w[t], by the kernels on every
    core. out: (M, N), a: (R, K), w: (T, K, N) (rows contiguous), segments: (S, 6).

    The threads share out blocks of rows (each thread then reads all the weights and its rows), or,
    ``share_channels`` (where the weights outweigh the rows: the deep layers' 2.4 MB weights for the
    64 rows of an 8x8 image), blocks of output channels: each thread reads its share of the weights
    only. The kernels give the same numbers either way.
    """
    if not direct_kernels.usable(out, a, w):   # the kernels check no bounds: what they read must fit
        raise ValueError("direct_sums takes float32 NumPy rows (C-contiguous) and weights whose rows are "
                         "contiguous, with output channels in multiples of 16")
    m, n = out.shape
    terms, k = w.shape[:2]
    if share_channels:
        def channels(first: int, last: int) -> None:   # output channels [16 first, 16 last)
            direct_kernels.shifted_sum(out, a, starts, w, segments, columns=(16 * first, 16 * last))
        map_row_blocks(channels, n // 16, 16 * m * terms * k)
    else:
        def rows(start: int, stop: int) -> None:        # the segments that begin in rows [start, stop)
            direct_kernels.shifted_sum(out, a, starts, w, direct_kernels.segment_rows(segments, start, stop))
        map_row_blocks(rows, m, terms * k * n)


class DirectConv(ConvImplementation):
    """Stride-1 Conv2d on the direct kernels: float32 NumPy, output channels in multiples of 16,
    input channels too or at most 4 (an image's: its input gradient then runs on 16 channels, the
    others zero), at most 63 kernel offsets, Numba installed.

    The plan (choose.py): ``split_weight_grad``: the weight gradient as partial sums over blocks of
    rows (many rows), else blocks of output channels reading every row (few rows, big weights);
    ``share_channels``: (forward, input gradient) share out output channels between threads rather
    than rows (:func:`direct_sums`).
    """

    name = "direct"

    def __init__(self, layer: Any, split_weight_grad: bool = False,
                 share_channels: Tuple[bool, bool] = (False, False)) -> None:
        super().__init__(layer)
        self.split_weight_grad, self.share_channels = split_weight_grad, share_channels

    @staticmethod
    def accepts(layer: Any, x: Any) -> bool:
        kh, kw = layer.kernel_size
        return (layer.stride == 1 and direct_kernels.runs(x) and direct_kernels.runs(layer.weight.data)
                and layer.out_channels % 16 == 0
                and (layer.in_channels % 16 == 0 or layer.in_channels <= _IMAGE_CHANNELS)
                and kh * kw <= direct_kernels.MAX_TAPS)

    def plan(self, n: int, h: int, w: int, input_grad: bool = False) -> Tuple[Any, List[int]]:
        """(segments, starts) for n images of h x w pixels: of the forward pass (tap (i, j) of output
        pixel (y, x) reads input pixel (y + i - p, x + j - p)), or of the input gradient (dx pixel
        (y, x) gathers dout pixel (y - i + p, x - j + p)), taps in the weight stacks' order i*kw + j."""
        kh, kw = self.layer.kernel_size
        p = self.layer.padding
        ho, wo = output_size(self.layer, h, w)
        sign, grid = (-1, (n, h, w, ho, wo)) if input_grad else (1, (n, ho, wo, h, w))
        taps = tuple((sign * (i - p), sign * (j - p)) for i in range(kh) for j in range(kw))
        return direct_kernels.clipped_segments(*grid, taps), [di * grid[4] + dj for di, dj in taps]

    def _forward(self, x: Any) -> Any:
        """-> (N, Hout, Wout, Cout), C-contiguous."""
        layer = self.layer
        x = nhwc(x)
        n, h, w, c = x.shape
        rows = xp.ascontiguousarray(x).reshape(-1, c)   # (N*H*W, Cin); the U-Net's activations already are
        segments, starts = self.plan(n, h, w)
        out = xp.empty((n, *output_size(layer, h, w), layer.out_channels), dtype=x.dtype)
        direct_sums(out.reshape(-1, layer.out_channels), rows, starts, kernel_stack(layer.weight.data), segments,
                    self.share_channels[0])
        self.cache = rows.reshape(x.shape)
        return out

    def _backward(self, dout: Any) -> Optional[Any]:
        """-> dx: (N, H, W, Cin), C-contiguous, or None. The weight gradient sums over forward's
        segments, dx over its own."""
        layer = self.layer
        x = self.cache
        n, h, w, c = x.shape
        # rows in the layer's own precision (float32), whatever dout's
        d = xp.ascontiguousarray(dout, dtype=x.dtype).reshape(-1, layer.out_channels)
        a = x.reshape(-1, c)

        def weight_grad() -> None:
            dw = self._weight_grad(a, d, *self.plan(n, h, w))
            layer.weight.grad += stack_to_weight(dw).reshape(layer.weight.data.shape)
        if not layer.input_grad:
            weight_grad()
            return None
        wide = -(-c // 16) * 16                                   # the kernels write 16 channels at a time
        dx = xp.empty((n, h, w, wide), dtype=x.dtype)

        def input_grad() -> None:   # the kernel flipped, side by side with the weight gradient
            w_t = flipped_kernel_stack(layer.weight.data)         # (kh*kw, Cout, Cin)
            if wide != c:                                         # an image's 3: the other 13 zero, dropped
                w_t = xp.concatenate([w_t, xp.zeros(w_t.shape[:2] + (wide - c,), dtype=w_t.dtype)], axis=2)
            segments, starts = self.plan(n, h, w, input_grad=True)
            direct_sums(dx.reshape(-1, wide), d, starts, w_t, segments, self.share_channels[1])
        run_concurrently(weight_grad, input_grad)
        return dx[..., :c]

    def _weight_grad(self, a: Any, d: Any, segments: Any, starts: List[int]) -> Any:
        """dweight[t] = sum over forward's output rows of a[tap t of the row]^T d[row], by the kernels.
        a: (N*H*W, Cin), d: (N*Hout*Wout, Cout) -> (kh*kw, Cin, Cout).

        Split: each block of rows its share of the sum, the shares added (the only way to parallelise
        a 16x16 result). Else blocks of output channels, every row each: even shares and no partial
        sums, which would be one weight-sized array per block.
        """
        if not direct_kernels.usable(d, a):     # the kernels check no bounds: what they read must fit
            raise ValueError("the direct weight gradient takes float32 NumPy rows (C-contiguous)")
        rows, c, cout = d.shape[0], a.shape[1], self.layer.out_channels
        work = len(starts) * c * cout            # multiply-adds per output row
        if self.split_weight_grad:
            return sum(map_row_blocks(lambda start, stop: direct_kernels.shifted_weight_grad(
                a, starts, d, direct_kernels.segment_rows(segments, start, stop)), rows, work))
        dw = xp.empty((len(starts), c, cout), dtype=a.dtype)

        def some_channels(first: int, last: int) -> None:    # output channels [16 first, 16 last)
            direct_kernels.shifted_weight_grad(a, starts, d, segments, out=dw, columns=(16 * first, 16 * last))
        map_row_blocks(some_channels, cout // 16, 16 * rows * work // cout)
        return dw
