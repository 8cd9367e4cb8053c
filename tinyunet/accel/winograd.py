"""Winograd's minimal filtering F(2x2, 3x3): a 3x3 convolution with 2.25x fewer multiplications.

A padded 3x3 convolution (stride 1, padding 1) computes every 2x2 block of output pixels from the
4x4 input tile under it: 4 pixels x 9 weights = 36 multiply-adds per channel pair. Winograd (as used
for convnets by Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2015) needs only
16: transform the tile d (4x4) and the kernel g (3x3) into 4x4 arrays, multiply them elementwise,
and transform back:

    Y = A^T [ (G g G^T) * (B^T d B) ] A          Y: the 2x2 outputs, * elementwise

    B^T = [[1, 0, -1, 0],    G = [[1,    0,   0],    A^T = [[1, 1,  1,  0],
           [0, 1,  1, 0],         [1/2,  1/2, 1/2],         [0, 1, -1, -1]]
           [0, -1, 1, 0],         [1/2, -1/2, 1/2],
           [0, 1,  0, -1]]        [0,    0,   1]]

With channels, the elementwise product becomes a sum over input channels, separately for each of the
16 positions (a, b) of the 4x4 arrays: ``M[a, b] = V[a, b] @ U[a, b]`` with V[a, b]: (tiles, Cin), the
transformed input, and U[a, b]: (Cin, Cout), the transformed weight. So the convolution is 16 matrix
products of (tiles, Cin) @ (Cin, Cout), plus transforms that only add and subtract, where the direct
method needs 9 products of (pixels, Cin) @ (Cin, Cout), 4 pixels per tile: 16 / 36 of the multiply-adds.

Backward, for ``out = conv(x, w)``:

- the input gradient of a padded 3x3 stride-1 convolution is again such a convolution, of dout with
  the kernel flipped and its channel axes swapped: the same function, other weights;
- the weight gradient runs the chain rule through the formula: dM = A dY A^T per output tile, then
  dU[a, b] = V[a, b]^T @ dM[a, b] (16 products summed over the tiles) and dg = G^T dU G.

The transforms are memory traffic, not arithmetic: V is 4x the input's size and M 4x the output's. So
everything runs on chunks of tile rows (of all images at once, which also splits a batch of one): each
chunk pads its own rows, transforms them, runs its 16 products and writes its 2x2 outputs, with
temporaries of one chunk only (about 2 MB), and the chunks run in parallel (tinyunet/parallel.py).
Measured on one core, batch 8: with 64-256 channels the 16 products are 52-74% of the time and run at
85-97 GFLOP/s (BLAS speed), the transforms take the rest; with 32 channels and fewer the transforms,
which move C-number pieces, cost about what the saved multiplications did. So the chooser (choose.py)
uses this method from 64 channels on (benchmarks/README.md has the layer-by-layer measurements).

Float32 rounding: the transforms add and subtract a few numbers of similar size, and the error stays
at 1e-7 to 1e-6 of the largest output (tested against float64). F(4x4, 3x3), 6x6 tiles, would
multiply even less, but its transforms have coefficients up to 5: more rounding and more passes over
memory; not used.
Lesson 17 writes the same maths tile by tile, and tests/test_accel_conv.py checks this against the reference.
"""
from __future__ import annotations

from typing import Any, List

import numpy as np

from tinyunet.accel.conv import ConvImplementation, nhwc
from tinyunet.accel.padding import zero_border
from tinyunet.accel.parallel import ELEMENTWISE_WORK, map_row_blocks, run_concurrently
from tinyunet.accel.weight_layout import stack_to_weight
from tinyunet.backend import xp

# the three transform matrices of F(2x2, 3x3)
B_T = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=np.float64)
A_T = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64)
GG = np.kron(G, G)  # (16, 9): U[a*4 + b] = sum_ij G[a, i] G[b, j] g[i, j] for a flattened kernel g

# a chunk of tile rows transforms to at most this many bytes (V, 4x its input), so that the
# transforms run mostly in the core's cache, but as many as that: the 16 products get more rows
_CHUNK_BYTES = 1 << 21
_MIN_CHUNKS = 4  # and at least 4 chunks (where there are 4 tile rows): work for 2 or 4 threads


def _map_tile_rows(fn: Any, x: Any, cout: int) -> List[Any]:
    """fn(t0, t1) on chunks of x's tile rows, the chunks in parallel blocks; the results of each
    block's chunks are added (fn returns an array) or ignored (fn returns None).

    x: (N, H, W, C). The chunks depend on the sizes only (results do not depend on the threads).
    """
    n, h, w, c = x.shape
    tile_rows = h // 2
    per_row = 16 * n * (w // 2) * c * x.itemsize       # bytes of V per tile row
    rows = max(1, min(_CHUNK_BYTES // per_row, -(-tile_rows // _MIN_CHUNKS)))
    chunks = [(t0, min(t0 + rows, tile_rows)) for t0 in range(0, tile_rows, rows)]
    # per chunk: 16 products of Cin x Cout for each tile, and the transforms' ~24 passes
    work = rows * n * (w // 2) * (16 * c * cout + ELEMENTWISE_WORK * 24 * (c + cout))

    def some_chunks(first: int, last: int) -> Any:
        total = None
        for chunk in chunks[first:last]:
            part = fn(*chunk)
            if part is not None:
                total = part if total is None else total + part
        return total
    return map_row_blocks(some_chunks, len(chunks), work)


def winograd_weights(weight: Any, flipped: bool = False) -> Any:
    """U = G g G^T for every channel pair. weight: (Cout, Cin, 3, 3) -> U: (16, Cin, Cout), position
    a*4 + b first, so that U[k] is the (Cin, Cout) matrix of one of the 16 products (a transposed view).
    ``flipped``: the weights of the input gradient instead, a convolution with the kernel flipped and
    its channel axes swapped: U: (16, Cout, Cin), C-contiguous.

    U[a, b] = sum_ij G[a, i] G[b, j] g[i, j] = (G kron G) @ vec(g): one product (16, 9) @ (9, Cout*Cin)
    for all channel pairs (4 x 3 products per pair would be 65536 tiny calls at 256 channels). The
    flipped kernel g[2 - i, 2 - j] is vec(g) backwards: the columns of G kron G reversed, so the
    weight is read as it lies in memory either way (no copy of a transposed view).
    """
    cout, c = weight.shape[:2]
    gg = xp.asarray(np.ascontiguousarray(GG[:, ::-1]) if flipped else GG, dtype=weight.dtype)   # (16, 9)
    u = xp.matmul(gg, weight.reshape(cout * c, 9).T).reshape(16, cout, c)   # (16, Cout, Cin)
    return u if flipped else u.transpose(0, 2, 1)


def _padded_block(x: Any, r0: int, r1: int) -> Any:
    """Rows [r0 - 1, r1 + 1) of x zero-padded by one pixel on every side, channels-last.
    x: (N, H, W, C) -> (N, r1 - r0 + 2, W + 2, C)."""
    n, h, w, c = x.shape
    block = xp.empty((n, r1 - r0 + 2, w + 2, c), dtype=x.dtype)
    top, bottom = max(r0 - 1, 0), min(r1 + 1, h)          # the image rows that exist
    zero_border(block, top - r0 + 1, bottom - r0 + 1, 1, w + 1)
    block[:, top - r0 + 1:bottom - r0 + 1, 1:w + 1] = x[:, top:bottom]
    return block


def _input_transform(x: Any, t0: int, t1: int) -> Any:
    """V = B^T d B for the tiles of tile rows [t0, t1) of every image.
    x: (N, H, W, C) -> V: (16, N*(t1-t0)*W/2, C), position a*4 + b first."""
    n, h, w, c = x.shape
    d = _padded_block(x, 2 * t0, 2 * t1)                   # (N, 2*rows + 2, W + 2, C)
    rows, tw = t1 - t0, w // 2
    r = [d[:, i:i + 2 * rows:2] for i in range(4)]         # tile row i of every tile: (N, rows, W + 2, C)
    t = xp.empty((4, n, rows, w + 2, c), dtype=x.dtype)    # B^T d: combine the tile's rows
    xp.subtract(r[0], r[2], out=t[0])
    xp.add(r[1], r[2], out=t[1])
    xp.subtract(r[2], r[1], out=t[2])
    xp.subtract(r[1], r[3], out=t[3])
    v = xp.empty((4, 4, n, rows, tw, c), dtype=x.dtype)    # (B^T d) B: combine the tile's columns
    for a in range(4):
        col = [t[a][:, :, j:j + 2 * tw:2] for j in range(4)]
        xp.subtract(col[0], col[2], out=v[a, 0])
        xp.add(col[1], col[2], out=v[a, 1])
        xp.subtract(col[2], col[1], out=v[a, 2])
        xp.subtract(col[1], col[3], out=v[a, 3])
    return v.reshape(16, n * rows * tw, c)


def winograd_conv3x3(x: Any, u: Any) -> Any:
    """A 3x3 convolution, stride 1, padding 1, no bias, by F(2x2, 3x3).

    x: (N, H, W, Cin) (any memory layout) with H, W even, u: (16, Cin, Cout) from :func:`winograd_weights`
    -> (N, H, W, Cout), channels-last memory.
    """
    n, h, w, c = x.shape
    cout = u.shape[2]
    out = xp.empty((n, h, w, cout), dtype=x.dtype)

    def tile_rows(t0: int, t1: int) -> None:
        rows, tw = t1 - t0, w // 2
        m = xp.matmul(_input_transform(x, t0, t1), u)      # (16, tiles, Cout): the 16 products
        m = m.reshape(4, 4, n, rows, tw, cout)
        # A^T M A: first over the tile's rows (a), into its 2 output rows ...
        s0 = m[0] + m[1]
        s0 += m[2]
        s1 = m[1] - m[2]
        s1 -= m[3]
        o = out[:, 2 * t0:2 * t1]
        for dy, s in enumerate((s0, s1)):                  # ... then over its columns (b)
            left, right = o[:, dy::2, 0::2], o[:, dy::2, 1::2]
            xp.add(s[0], s[1], out=left)
            left += s[2]
            xp.subtract(s[1], s[2], out=right)
            right -= s[3]
    _map_tile_rows(tile_rows, x, cout)
    return out


def winograd_weight_grad(x: Any, dout: Any) -> Any:
    """d(loss)/d(weight) of ``winograd_conv3x3``: dU[k] = V[k]^T @ dM[k] summed over tiles, dM = A dY A^T.

    x: (N, H, W, Cin), dout: (N, H, W, Cout) -> dU: (16, Cin, Cout); :func:`winograd_weight_grad_to_kernel`
    turns it into the kernel's gradient (Cout, Cin, 3, 3).
    """
    n, h, w, c = x.shape
    cout = dout.shape[3]

    def tile_rows(t0: int, t1: int) -> Any:
        rows, tw = t1 - t0, w // 2
        v = _input_transform(x, t0, t1)                    # (16, tiles, Cin)
        dy = dout[:, 2 * t0:2 * t1]
        # dM = A dY A^T with A = A_T^T: rows first (R_a = sum_u A[a, u] dY[u]), then columns
        r = xp.empty((4, n, rows, w, cout), dtype=dout.dtype)
        y0, y1 = dy[:, 0::2], dy[:, 1::2]
        r[0] = y0
        xp.add(y0, y1, out=r[1])
        xp.subtract(y0, y1, out=r[2])
        xp.negative(y1, out=r[3])
        dm = xp.empty((4, 4, n, rows, tw, cout), dtype=dout.dtype)
        for a in range(4):
            z0, z1 = r[a][:, :, 0::2], r[a][:, :, 1::2]
            dm[a, 0] = z0
            xp.add(z0, z1, out=dm[a, 1])
            xp.subtract(z0, z1, out=dm[a, 2])
            xp.negative(z1, out=dm[a, 3])
        return xp.matmul(v.transpose(0, 2, 1), dm.reshape(16, -1, cout))   # (16, Cin, Cout)
    return sum(_map_tile_rows(tile_rows, x, cout))        # one (16, Cin, Cout) sum per block


def winograd_weight_grad_to_kernel(du: Any) -> Any:
    """dg = G^T dU G for every channel pair: the adjoint of :func:`winograd_weights`, one product
    (9, 16) @ (16, Cin*Cout), then the kernel's own layout (weight_layout.py). du: (16, Cin, Cout) ->
    (Cout, Cin, 3, 3), C-contiguous."""
    c, cout = du.shape[1:]
    gg_t = xp.asarray(GG.T, dtype=du.dtype)                                 # (9, 16)
    dg = xp.matmul(gg_t, du.reshape(16, c * cout))                         # (9, Cin*Cout): a kernel stack
    return stack_to_weight(dg.reshape(9, c, cout)).reshape(cout, c, 3, 3)


class WinogradConv(ConvImplementation):
    """Conv2d by F(2x2, 3x3): 3x3 kernel, stride 1, padding 1, even output sides. Backward: the
    weight gradient through the transforms, and dx as the same fast convolution of dout with the
    kernel flipped (lesson 04), side by side."""

    name = "winograd"

    @staticmethod
    def accepts(layer: Any, x: Any) -> bool:
        return (layer.kernel_size == (3, 3) and layer.stride == 1 and layer.padding == 1
                and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0)

    def _forward(self, x: Any) -> Any:
        self.cache = x = nhwc(x)
        return winograd_conv3x3(x, winograd_weights(self.layer.weight.data))

    def _backward(self, dout: Any) -> Any:
        layer, x = self.layer, self.cache

        def weight_grad() -> None:
            layer.weight.grad += winograd_weight_grad_to_kernel(winograd_weight_grad(x, dout))
        if not layer.input_grad:
            weight_grad()
            return None
        return run_concurrently(weight_grad,
                                lambda: winograd_conv3x3(dout, winograd_weights(layer.weight.data, flipped=True)))[1]
