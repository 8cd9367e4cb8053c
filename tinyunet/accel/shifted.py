"""Conv2d (stride 1) as nine shifted 1x1 products: im2col's sums without im2col's 9x copy.

A 3x3 convolution is the sum of nine 1x1 convolutions, one per kernel offset (i, j), each applied to
the input shifted by (i, j). A 1x1 convolution over channels-last memory is a plain product
``x (pixels, Cin) @ weight[:, :, i, j].T (Cin, Cout)``. The shift costs nothing on the *padded image
flattened to (N*Hp*Wp, Cin) rows*: moving (i, j) in the image is moving ``i*Wp + j`` rows down, so
each term reads the contiguous slice ``flat[off : off + L]``:

    out_flat[q] = sum_{i,j} flat[q + i*Wp + j] @ w[i, j]            q = n*Hp*Wp + y*Wp + x

Row q is a true output pixel when y < Hout and x < Wout; the other rows (windows that run off the
right or bottom edge into the next row or image) are computed too and thrown away: a few percent
extra work on large images, more on small ones (the chooser's rule, choose.py).

Backward, with dflat = dout placed at the same rows q (zeros elsewhere):

    dweight[:, :, i, j] = (flat[off : off + L]^T @ dflat)^T          the batch summed inside the product
    dflat_x[r] = sum_{i,j} dflat[r - off] @ w[i, j]^T                each term goes back where it came from

The input gradient is again a sum of nine shifted products, the kernel flipped (shifts go the other
way), so forward and backward share :func:`shifted_sums`. The weight and input gradients do not
depend on each other and run side by side (parallel.run_concurrently).
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

from tinyunet.accel import blas
from tinyunet.accel.conv import ConvImplementation, nhwc
from tinyunet.accel.padding import zero_border, zero_padded
from tinyunet.accel.parallel import map_batch_blocks, map_row_blocks, run_concurrently
from tinyunet.accel.weight_layout import flipped_kernel_stack, kernel_stack, stack_to_weight
from tinyunet.backend import xp


def sum_of_products(out: Any, pairs: List[Tuple[Any, Any]]) -> Any:
    """out[...] = sum of a @ b over (a, b) in pairs. out: (M, N); each a: (M, K), b: (K, N).

    NumPy's matmul can only *write* its result (BLAS's C = A @ B + beta * C with beta = 0), so every
    term after the first goes through one out-sized buffer and is added.
    """
    buf = None
    for k, (a, b) in enumerate(pairs):
        if k == 0:
            xp.matmul(a, b, out=out)
        else:
            if buf is None:
                buf = xp.empty_like(out)
            xp.matmul(a, b, out=buf)
            out += buf
    return out


def shifted_sums(out: Any, a: Any, starts: List[int], w: Any, blas_adds: bool = True) -> None:
    """out[r] = sum over t of a[starts[t] + r] @ w[t] for every row r of out, blocks of rows in
    parallel. out: (M, N), a: (R, K), w: (T, K, N). ``blas_adds``: BLAS adds each term into out
    itself (blas.shifted_matmuls: beta = 1, one pass less per term) where it can, else a buffer."""
    def rows(start: int, stop: int) -> None:
        block, block_starts = out[start:stop], [s + start for s in starts]
        if not (blas_adds and blas.shifted_matmuls(block, a, block_starts, w)):
            sum_of_products(block, [(a[s:s + stop - start], w[t]) for t, s in enumerate(block_starts)])
    map_row_blocks(rows, out.shape[0], w.shape[0] * w.shape[1] * out.shape[1])


class ShiftedConv(ConvImplementation):
    """Stride-1 Conv2d as shifted products by BLAS on the padded, flattened input.

    The chooser (choose.py) fixes the plan: ``split_weight_grad``: the weight gradient as partial
    sums over blocks of rows (many rows), else whole products per kernel offset shared out between
    threads (few rows, big weights: partial sums would be a weight-sized array per block);
    ``join_rows``: in those partial sums, each pixel's row joined with its kw-1 right neighbours so
    that one product per kernel row gives kw offsets at once (thin layers, where products of 8-16
    input channels run far below BLAS speed); ``blas_adds``: BLAS adds the terms itself.
    """

    name = "shifted"

    def __init__(self, layer: Any, split_weight_grad: bool = False, join_rows: bool = False,
                 blas_adds: bool = True) -> None:
        super().__init__(layer)
        self.split_weight_grad, self.join_rows, self.blas_adds = split_weight_grad, join_rows, blas_adds

    @staticmethod
    def accepts(layer: Any, x: Any) -> bool:
        return layer.stride == 1

    def _offsets(self, wp: int) -> List[Tuple[int, int, int]]:
        """(i, j, row offset i*Wp + j) for every kernel position."""
        kh, kw = self.layer.kernel_size
        return [(i, j, i * wp + j) for i in range(kh) for j in range(kw)]

    def _padded_rows(self, x: Any) -> Any:
        """x: (N, H, W, C) -> the zero-padded image as rows (N*Hp*Wp, C), contiguous channels-last."""
        p = self.layer.padding
        if p == 0 and x.flags.c_contiguous:   # e.g. a 1x1 head after a ReLU: already rows, no copy
            return x.reshape(-1, x.shape[3])
        return zero_padded(x, p).reshape(-1, x.shape[3])   # also makes NCHW memory channels-last

    def _forward(self, x: Any) -> Any:
        """-> (N, Hout, Wout, Cout), a view into an (N, Hp, Wp, Cout) buffer."""
        layer = self.layer
        x = nhwc(x)
        kh, kw = layer.kernel_size
        n, h, w, c = x.shape
        p, cout = layer.padding, layer.out_channels
        hp, wp = h + 2 * p, w + 2 * p
        flat = self._padded_rows(x)                              # (N*Hp*Wp, Cin)
        length = flat.shape[0] - (kh - 1) * wp - (kw - 1)      # rows whose whole window is in flat
        out = xp.empty((n * hp * wp, cout), dtype=x.dtype)
        out[length:] = 0  # the last rows' windows would run off the end: not computed, and dropped below
        shifted_sums(out[:length], flat, [off for _, _, off in self._offsets(wp)], kernel_stack(layer.weight.data),
                     self.blas_adds)
        # keep x itself, not the padded copy: in the U-Net x is a ReLU's output, which the ReLU keeps
        # for its own backward anyway, so this costs no memory; backward pads it again, a block at a time
        self.cache = (x, length)
        # rows with y >= Hout or x >= Wout were windows off the edge: drop them (a view, no copy)
        return out.reshape(n, hp, wp, cout)[:, :hp - kh + 1, :wp - kw + 1]

    def _backward(self, dout: Any) -> Optional[Any]:
        layer = self.layer
        kh, kw = layer.kernel_size
        x, length = self.cache
        n, h, w, c = x.shape
        p, cout = layer.padding, layer.out_channels
        hp, wp = h + 2 * p, w + 2 * p
        ho, wo = dout.shape[1], dout.shape[2]
        offsets = self._offsets(wp)
        # dout on forward's (N*Hp*Wp) row grid, 0 on the thrown-away rows, after `front` rows of zeros
        # (the dx gather below reads up to `front` rows before row 0)
        front = offsets[-1][2]
        dbig = xp.empty((front + n * hp * wp, cout), dtype=dout.dtype)
        dbig[:front] = 0
        dgrid = dbig[front:].reshape(n, hp, wp, cout)

        def images(start: int, stop: int) -> None:
            zero_border(dgrid[start:stop], 0, ho, 0, wo)
            dgrid[start:stop, :ho, :wo] = dout[start:stop]
        map_batch_blocks(images, dgrid, passes=2)
        dflat = dbig[front:front + length]                       # (L, Cout)

        def weight_grad() -> None:
            dw = self._weight_grad(x, dflat, wp).reshape(kh * kw, c, cout)
            layer.weight.grad += stack_to_weight(dw).reshape(layer.weight.data.shape)
        if not layer.input_grad:
            weight_grad()
            return None
        # Forward sent flat[q + off] @ w[i, j] to output row q. Gathered per input row r = q + off:
        #     dxflat[r] = sum_{i,j} dflat[r - off] @ w[i, j]^T        (dflat = 0 outside [0, L))
        # the same sum of shifted products as forward, shifted the other way. Each block owns its rows.
        dxflat = xp.empty((n * hp * wp, c), dtype=dout.dtype)   # the gradient of the padded input
        run_concurrently(weight_grad, lambda: shifted_sums(dxflat, dbig, [front - off for _, _, off in offsets],
                                                           flipped_kernel_stack(layer.weight.data), self.blas_adds))
        return dxflat.reshape(n, hp, wp, c)[:, p:p + h, p:p + w]   # drop the padding (a view)

    def _padded_lines(self, x: Any, first: int, last: int) -> Any:
        """Lines [first, last) of the zero-padded batch (N*Hp lines of Wp pixels) as rows
        ((last - first)*Wp, C): the same numbers as ``_padded_rows(x)[first*Wp:last*Wp]``, without
        padding the rest. x: (N, H, W, C)."""
        n, h, w, c = x.shape
        p = self.layer.padding
        if p == 0 and x.flags.c_contiguous:   # no padding (a 1x1 head): the lines are x's own rows
            return x.reshape(-1, c)[first * w:last * w]
        hp, wp = h + 2 * p, w + 2 * p
        piece = xp.zeros((last - first, wp, c), dtype=x.dtype)
        whole0, whole1 = -(-first // hp), last // hp              # the images wholly inside: one copy
        if whole0 < whole1:
            images = piece[whole0 * hp - first:whole1 * hp - first].reshape(whole1 - whole0, hp, wp, c)
            images[:, p:p + h, p:p + w] = x[whole0:whole1]
        for image in {first // hp, (last - 1) // hp} - set(range(whole0, whole1)):   # cut at an end
            top = image * hp + p                                  # padded line of the image's line 0
            y0, y1 = max(first - top, 0), min(last - top, h)      # its lines inside [first, last)
            if y0 < y1:
                piece[top + y0 - first:top + y1 - first, p:p + w] = x[image, y0:y1]
        return piece.reshape(-1, c)

    def _weight_grad(self, x: Any, dflat: Any, wp: int) -> Any:
        """dweight[i, j] = flat[off : off + L]^T @ dflat, flat = the padded input as rows (N*Hp*Wp, Cin).
        x: (N, H, W, Cin), dflat: (L, Cout), wp: the padded image's width Wp -> (kh, kw, Cin, Cout).

        Split (many rows): each block of rows pads just the lines it reads (:meth:`_padded_lines`, so
        the whole padded copy never exists in backward) and computes its share of the sum over pixels
        for every offset; the shares are added - the only way to parallelise a 16x16 result. Else
        whole products, the offsets shared out between threads.
        """
        kh, kw = self.layer.kernel_size
        cout = self.layer.out_channels
        offsets = self._offsets(wp)
        n, h, _, c = x.shape
        length = dflat.shape[0]
        if self.split_weight_grad:
            reach = offsets[-1][2]                                # the farthest row a window reads
            joined = self.join_rows and kw > 1

            def rows(start: int, stop: int) -> Any:
                first = start // wp
                flat = self._padded_lines(x, first, min(-(-(stop + reach) // wp), n * (h + 2 * self.layer.padding)))
                start_in, stop_in = start - first * wp, stop - first * wp   # the block's rows in flat
                part = xp.empty((kh, kw, c, cout), dtype=x.dtype)
                if joined:    # (rows, kw*Cin): each pixel beside its kw-1 right neighbours, one copy
                    wide = xp.concatenate([flat[start_in + j:stop_in + (kh - 1) * wp + j] for j in range(kw)], axis=1)
                    part_rows = part.reshape(kh, kw * c, cout)
                    for i in range(kh):  # (kw*Cin, rows) @ (rows, Cout)
                        xp.matmul(wide[i * wp:i * wp + stop - start].T, dflat[start:stop], out=part_rows[i])
                    return part
                for i, j, off in offsets:  # (Cin, rows) @ (rows, Cout)
                    xp.matmul(flat[off + start_in:off + stop_in].T, dflat[start:stop], out=part[i, j])
                return part
            # joined blocks are not helped by the input gradient's thread: each copies its joined rows,
            # and a helper's second copy would land at the step's memory peak
            return sum(map_row_blocks(rows, length, kh * kw * c * cout, helped=not joined))
        flat = self._padded_rows(x)
        dw = xp.empty((kh, kw, c, cout), dtype=x.dtype)

        def some_offsets(first: int, last: int) -> None:
            for i, j, off in offsets[first:last]:  # (Cin, L) @ (L, Cout)
                xp.matmul(flat[off:off + length].T, dflat, out=dw[i, j])
        map_row_blocks(some_offsets, len(offsets), length * c * cout)
        return dw
