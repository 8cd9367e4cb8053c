"""The register-blocked kernels of tinyunet/accel/direct_kernels.py (Numba): against float64 products
and the rows they compute. The layer that runs them (accel/direct.py) against the reference Conv2d:
tests/test_accel_conv.py."""
import numpy as np
import pytest

pytest.importorskip("numba")

from conftest import compiled_code as compiled  # noqa: E402
from tinyunet.accel import compiled_loops as kernels, direct_kernels as direct_conv  # noqa: E402

pytestmark = pytest.mark.usefixtures("numpy_backend")


def close(a, b, rtol=1e-5):
    """float32 sums of up to 2304 terms against float64 (a rounding error of ~1e-7 per term, mostly
    cancelling): within rtol of the largest value."""
    assert a.shape == b.shape
    error, scale = float(np.abs(a - b).max()), float(np.abs(b).max())
    assert error <= rtol * max(scale, 1e-30), f"error {error:.3g} of values up to {scale:.3g}"


def random_segments(rng, m, r, t):
    """Segments over m output rows reading an input of r rows with t taps: runs along the rows and
    down strided columns (out_step, src_step > 1), random tap masks (some empty), in random order,
    every output row in one segment; and the reference: for each output row its input row and mask."""
    order = rng.permutation(m)
    table, where, masks = [], np.full(m, -1), np.zeros(m, np.int64)
    i = 0
    while i < m:
        count = int(rng.integers(1, 20))
        rows = np.sort(order[i:i + count])
        i += len(rows)
        steps = np.diff(rows)
        out_step = int(steps[0]) if len(rows) > 1 and (steps == steps[0]).all() else None
        groups = [rows] if out_step else [[row] for row in rows]   # a run with one step, else single rows
        for g in groups:
            src_step = int(rng.integers(1, 4))
            src = int(rng.integers(0, r - 60 - src_step * len(g)))
            mask = int(rng.integers(0, 2 ** t))
            table.append((g[0], len(g), out_step or 1, src, src_step, mask))
            where[g] = src + src_step * np.arange(len(g))
            masks[g] = mask
    return np.array(table, dtype=np.int64), where, masks


# (K input channels, N output channels, M rows, T terms): 1, 2 and 4 vectors per tile, segments of
# every length (so blocks of 8, 4, 2 and 1 rows), and input channel counts 16, 8, 4, 2, 1 sums at a
# time divide
SHAPES = [(16, 16, 1000, 9), (3, 16, 37, 9), (32, 48, 101, 4), (64, 64, 517, 9), (256, 256, 803, 9),
          (16, 32, 5, 1), (5, 16, 300, 2), (24, 64, 77, 3), (12, 128, 40, 9)]


@pytest.fixture(params=[16, 4], ids=["avx512", "avx2"])
def register_budget(request, monkeypatch):
    """The kernels as this CPU gets them (16 sums of 16 lanes with AVX-512) and as a CPU with AVX2
    only would (4: smaller blocks), whatever this machine has."""
    monkeypatch.setattr(direct_conv, "_vector_budget", request.param)
    return request.param


@pytest.mark.parametrize("k, n, m, t", SHAPES)
def test_kernels_match_float64_products_on_their_segments(k, n, m, t, register_budget):
    rng = np.random.default_rng(k * n + m)
    a = rng.standard_normal((3 * m + 200, k), dtype=np.float32)
    w = rng.standard_normal((t, k, n), dtype=np.float32)
    d = rng.standard_normal((m, n), dtype=np.float32)
    starts = rng.integers(0, 60, t).astype(np.int64)
    segments, source, masks = random_segments(rng, m, a.shape[0], t)
    on = (masks[:, None] >> np.arange(t)) & 1                          # (m, t): the taps of each row
    expected = sum(on[:, [i]] * (a[source + s].astype(np.float64) @ w[i]) for i, s in enumerate(starts))
    out = np.full((m, n), np.nan, dtype=np.float32)        # every row is written: NaN would show
    assert direct_conv.usable(out, a, w)
    direct_conv.shifted_sum(out, a, starts, w, segments)
    close(out, expected)
    # the weights as a view with other strides (a (K, T, N) array's transpose), and a share of the
    # output channels: the same numbers, the other columns untouched
    w_view = np.ascontiguousarray(w.transpose(1, 0, 2)).transpose(1, 0, 2)
    share = np.full((m, n), 7.0, dtype=np.float32)
    assert direct_conv.usable(share, a, w_view)
    direct_conv.shifted_sum(share, a, starts, w_view, segments, columns=(0, n - 16) if n >= 32 else None)
    last = n - 16 if n >= 32 else n
    np.testing.assert_array_equal(share[:, :last], out[:, :last])
    assert (share[:, last:] == 7.0).all()
    dw = direct_conv.shifted_weight_grad(a, starts, d, segments)
    expected_dw = np.stack([(on[:, [i]] * a[source + s]).T.astype(np.float64) @ d for i, s in enumerate(starts)])
    close(dw, expected_dw)
    if n >= 32:  # a share of the output channels, into a given array: the others stay as they were
        share = np.full((t, k, n), 7.0, dtype=np.float32)
        direct_conv.shifted_weight_grad(a, starts, d, segments, out=share, columns=(16, n))
        close(share[:, :, 16:], expected_dw[:, :, 16:])
        assert (share[:, :, :16] == 7.0).all()


@pytest.mark.parametrize("images, out_h, out_w, in_h, in_w, taps", [
    (2, 6, 9, 6, 9, [(i - 1, j - 1) for i in range(3) for j in range(3)]),     # 3x3, padding 1
    (1, 4, 7, 6, 9, [(i, j) for i in range(3) for j in range(3)]),             # no padding
    (3, 8, 8, 8, 8, [(1 - i, 1 - j) for i in range(3) for j in range(3)]),     # the flipped kernel (dx)
    (1, 9, 11, 5, 7, [(i - 2, j - 2) for i in range(5) for j in range(5)]),    # 5x5 padding 4: no tap everywhere
    (2, 1, 1, 1, 1, [(i - 1, j - 1) for i in range(3) for j in range(3)]),     # a 1x1 image
    (1, 5, 3, 5, 3, [(0, 0)])])                                                 # 1x1 kernel
def test_clipped_segments_are_every_output_pixel_with_its_taps_inside_the_image(images, out_h, out_w, in_h,
                                                                               in_w, taps):
    """Brute force: each output pixel once, reading for each tap the input pixel it lands on, and
    exactly the taps that land inside the input image."""
    segments = direct_conv.clipped_segments(images, out_h, out_w, in_h, in_w, tuple(taps))
    assert segments.dtype == np.int64 and segments.shape[1] == 6 and not segments.flags.writeable
    seen = {}
    for first, count, out_step, src, src_step, mask in segments.tolist():
        for q in range(count):
            row = first + q * out_step
            assert row not in seen
            seen[row] = (src + q * src_step, mask)
    assert sorted(seen) == list(range(images * out_h * out_w))
    for row, (src, mask) in seen.items():
        n, y, x = row // (out_h * out_w), row // out_w % out_h, row % out_w
        for t, (di, dj) in enumerate(taps):
            inside = 0 <= y + di < in_h and 0 <= x + dj < in_w
            assert bool(mask >> t & 1) == inside, (row, t)
            if inside:
                assert src + di * in_w + dj == n * in_h * in_w + (y + di) * in_w + x + dj
    # in the order of the first rows, and long: the 8x8 image's lines and edge columns, not pixels
    assert (np.diff(segments[:, 0]) > 0).all()
    if out_h == out_w == 8:
        assert len(segments) == 3 * (8 + 6)


def test_segment_rows_split_the_table_into_blocks_of_rows():
    segments = direct_conv.clipped_segments(3, 10, 12, 10, 12, tuple((i - 1, j - 1) for i in range(3) for j in range(3)))
    total = int(segments[:, 1].sum())
    bounds = [0, 7, 100, 101, 250, total]
    blocks = [direct_conv.segment_rows(segments, a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    np.testing.assert_array_equal(np.concatenate(blocks), segments)     # each segment in one block
    for block, start in zip(blocks, bounds[:-1]):
        if len(block):      # a block starts with the segment that covers its first row
            before = int(segments[:, 1].cumsum()[np.flatnonzero((segments == block[0]).all(axis=1))[0]] - block[0, 1])
            assert before >= start


def test_usable_only_for_what_the_kernels_take():
    a, w = np.zeros((40, 16), np.float32), np.zeros((9, 16, 32), np.float32)
    out = np.zeros((30, 32), np.float32)
    assert direct_conv.usable(out, a, w)
    assert not direct_conv.usable(out.astype(np.float64), a, w)        # float32 only
    assert not direct_conv.usable(np.zeros((30, 24), np.float32), a, w)  # 24 output channels: not 16k
    assert not direct_conv.usable(np.zeros((30, 64), np.float32)[:, :32], a, w)  # not contiguous
    with compiled(False):
        assert not direct_conv.usable(out, a, w)
    before = direct_conv.set_enabled(False)  # the kernels alone off: BatchNorm's loops stay on
    try:
        assert not direct_conv.usable(out, a, w) and kernels.available()
    finally:
        direct_conv.set_enabled(before)
    assert direct_conv.usable(out, a, w)


def test_compiled_kernels_are_kept_in_the_cache_folder_for_the_next_process(tmp_path):
    """A kernel is compiled once per machine: its generated source lands in $TINYUNET_CACHE/kernels,
    Numba's machine code beside it, and a second process loads it instead of compiling it."""
    import subprocess
    import sys
    script = (
        "import numpy as np\n"
        "from tinyunet.accel import direct_kernels as direct_conv\n"
        "out, a, w = np.zeros((8, 16), np.float32), np.ones((20, 16), np.float32), np.ones((1, 16, 16), np.float32)\n"
        "direct_conv.shifted_sum(out, a, [0], w, np.array([[0, 8, 1, 0, 1, 1]], dtype=np.int64))\n"
        "assert (out == 16).all()\n"
        "kernel = direct_conv._compiled[('sum', 8, 1)]\n"
        "print(sum(kernel.stats.cache_hits.values()))\n")
    env = {**__import__("os").environ, "TINYUNET_CACHE": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True) for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr + runs[1].stderr
    assert [r.stdout.split()[-1] for r in runs] == ["0", "1"]     # compiled, then loaded
    kernels = tmp_path / "kernels"
    assert len(list(kernels.glob("tinyunet_kernel_*.py"))) == 1
    assert list(kernels.glob("__pycache__/tinyunet_kernel_*.nbi"))
