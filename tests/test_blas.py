"""out += a @ b through NumPy's own BLAS (tinyunet/blas.py), and its fallback."""
import numpy as np
import pytest

from tinyunet import blas
from tinyunet.nn import conv as conv_module


def _operands(dtype, rng):
    """(name, out, a, b) in the memory layouts the convolutions hand over, and some that BLAS can't take."""
    big = rng.standard_normal((40, 30)).astype(dtype)
    cases = {
        "contiguous": (rng.standard_normal((7, 5)), rng.standard_normal((7, 3)), rng.standard_normal((3, 5))),
        "row slices of a bigger array": (rng.standard_normal((9, 4)), big[3:12, 2:8], rng.standard_normal((6, 4))),
        "transposed (column-major) a and b": (rng.standard_normal((6, 8)), big[:5, :6].T, big[10:18, :5].T),
        "every other column (no BLAS layout)": (rng.standard_normal((5, 4)), big[:5, ::2], rng.standard_normal((15, 4))),
        "reversed rows": (rng.standard_normal((5, 4)), big[::-1][:5, :3], rng.standard_normal((3, 4))),
        "K = 0": (rng.standard_normal((3, 2)), np.empty((3, 0)), np.empty((0, 2))),
    }
    for name, (out, a, b) in cases.items():
        yield name, out.astype(dtype), np.asarray(a, dtype=dtype), np.asarray(b, dtype=dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_add_matmul_adds_the_product_in_every_layout(dtype):
    rng = np.random.default_rng(0)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for name, out, a, b in _operands(dtype, rng):
        expected = out.astype(np.float64) + a.astype(np.float64) @ b.astype(np.float64)
        blas.add_matmul(out, a, b)
        np.testing.assert_allclose(out, expected, rtol=tol, atol=tol, err_msg=name)


def test_add_matmuls_sums_several_terms_into_a_row_slice():
    """As the shifted products use it: out is a block of rows of a bigger array, the a's are
    overlapping row slices of one array."""
    rng = np.random.default_rng(1)
    flat = rng.standard_normal((50, 4)).astype(np.float32)
    weights = rng.standard_normal((3, 4, 6)).astype(np.float32)
    whole = np.zeros((30, 6), np.float32)
    out = whole[5:25]
    pairs = [(flat[k + 5:k + 25], weights[k]) for k in range(3)]
    blas.add_matmuls(out, pairs)
    expected = sum(a.astype(np.float64) @ b for a, b in pairs)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert not whole[:5].any() and not whole[25:].any()    # nothing outside the slice written


def test_numpys_blas_is_found_here():
    """The NumPy wheels of these machines ship OpenBLAS with cblas_sgemm/dgemm: the direct path is
    what the tests above exercise (otherwise they would only test the fallback)."""
    assert blas.available(np.float32) and blas.available(np.float64)
    assert not blas.available(np.int64)


def test_without_a_callable_blas_it_falls_back_to_numpy(monkeypatch):
    monkeypatch.setattr(blas, "_functions", {})
    rng = np.random.default_rng(2)
    out, a, b = rng.standard_normal((4, 3)), rng.standard_normal((4, 5)), rng.standard_normal((5, 3))
    expected = out + a @ b
    blas.add_matmul(out, a, b)
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    ints = np.ones((2, 2), np.int64)
    blas.add_matmul(ints, np.ones((2, 3), np.int64), np.ones((3, 2), np.int64))
    assert (ints == 4).all()


def test_sum_of_products_is_the_same_with_and_without_direct_blas(monkeypatch):
    """Both paths of conv.sum_of_products (BLAS adding into out; a buffer added by NumPy) give the
    sum of the products, for products above and below the size limit."""
    rng = np.random.default_rng(3)
    for rows in (8, 40000):                  # 40000 * 8 * 8 >= 2**21: the direct path
        flat = rng.standard_normal((rows + 4, 8)).astype(np.float32)
        weights = rng.standard_normal((5, 8, 8)).astype(np.float32)
        pairs = [(flat[k:k + rows], weights[k]) for k in range(5)]
        expected = sum(a.astype(np.float64) @ b for a, b in pairs)
        results = []
        for limit in (0, 10 ** 18):
            monkeypatch.setattr(conv_module, "_MIN_DIRECT_BLAS_WORK", limit)
            results.append(conv_module.sum_of_products(np.empty((rows, 8), np.float32), pairs))
        for got in results:
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
