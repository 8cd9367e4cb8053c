"""Sums of matrix products added in place by NumPy's own BLAS (tinyunet/blas.py), and the fallback."""
import numpy as np
import pytest

from tinyunet.accel import blas
from tinyunet.accel import shifted


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
def test_shifted_matmuls_take_every_blas_layout_and_decline_the_others(dtype):
    """One term (starts = [0]) in the memory layouts the convolutions hand over: BLAS writes the
    product where the layout fits it (row- or column-major, a leading dimension wider than the
    matrix); where it does not (every other column, reversed rows), nothing is written, and
    shifted.shifted_sums' fallback gives the same product."""
    rng = np.random.default_rng(0)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for name, out, a, b in _operands(dtype, rng):
        expected = a.astype(np.float64) @ b.astype(np.float64)
        before = out.copy()
        took = blas.shifted_matmuls(out, a, [0], b[None])
        assert took == (name not in ("every other column (no BLAS layout)", "reversed rows", "K = 0")), name
        if took:
            np.testing.assert_allclose(out, expected, rtol=tol, atol=tol, err_msg=name)
        else:
            np.testing.assert_array_equal(out, before, err_msg=name)
        got = np.empty_like(out)
        shifted.shifted_sums(got, a, [0], np.ascontiguousarray(b)[None])
        np.testing.assert_allclose(got, expected, rtol=tol, atol=tol, err_msg=name)


def test_numpys_blas_is_found_here():
    """The NumPy wheels of these machines ship OpenBLAS with cblas_sgemm/dgemm: the direct path is
    what the tests here exercise (otherwise they would only test the fallback)."""
    assert blas.available(np.float32) and blas.available(np.float64)
    assert not blas.available(np.int64)


def test_without_a_callable_blas_it_declines_and_the_buffer_sums(monkeypatch):
    monkeypatch.setattr(blas, "_functions", {})
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((40, 5)), rng.standard_normal((3, 5, 3))
    out = np.full((30, 3), 7.0)
    assert not blas.shifted_matmuls(out, a, [0, 1, 10], b)
    assert (out == 7.0).all()
    shifted.shifted_sums(out, a, [0, 1, 10], b, blas_adds=True)
    np.testing.assert_allclose(out, sum(a[s:s + 30] @ b[t] for t, s in enumerate([0, 1, 10])), rtol=1e-12)


def test_sum_of_products_adds_every_term_through_one_buffer():
    """The portable path (CuPy, small products): out is written, not added to (it starts as
    garbage), and the sum is right for one term and for several."""
    rng = np.random.default_rng(3)
    flat = rng.standard_normal((12, 8)).astype(np.float32)
    weights = rng.standard_normal((5, 8, 6)).astype(np.float32)
    for terms in (1, 5):
        pairs = [(flat[k:k + 8], weights[k]) for k in range(terms)]
        got = shifted.sum_of_products(np.full((8, 6), np.nan, np.float32), pairs)
        expected = sum(a.astype(np.float64) @ b for a, b in pairs)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_shifted_matmuls_write_the_sum_of_row_shifted_products(dtype):
    """out = sum_t a[starts[t] : starts[t] + M] @ b[t] (the first term written, not added: out starts
    as garbage), also into a row slice of a bigger array and from a column slice of a."""
    rng = np.random.default_rng(4)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    big = rng.standard_normal((60, 7)).astype(dtype)
    for a in (big[:, :5], np.ascontiguousarray(big[:, 1:6])):      # rows of 7 (lda > K) or of 5
        b = rng.standard_normal((4, 5, 3)).astype(dtype)
        starts = [0, 1, 13, 60 - 20]                                  # up to the last row of a
        whole = np.full((30, 3), np.nan, dtype)
        out = whole[5:25]
        assert blas.shifted_matmuls(out, a, starts, b)
        expected = sum(a[s:s + 20].astype(np.float64) @ b[t] for t, s in enumerate(starts))
        np.testing.assert_allclose(out, expected, rtol=tol, atol=tol)
        assert np.isnan(whole[:5]).all() and np.isnan(whole[25:]).all()    # nothing outside the slice written


def test_shifted_matmuls_decline_what_blas_cannot_take():
    """False, and out untouched, for what the direct call cannot do: the caller then falls back."""
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((30, 4)), rng.standard_normal((2, 4, 3))
    out = np.full((10, 3), 7.0)
    declined = {
        "a slice past the end of a": (out, a, [0, 21], b),
        "a negative start": (out, a, [-1, 0], b),
        "column-major out": (np.full((3, 10), 7.0).T, a, [0, 1], b),
        "b not a stack": (out, a, [0], b[0]),
        "b of the wrong shape": (out, a, [0, 1], rng.standard_normal((2, 5, 3))),
        "mixed dtypes": (out, a.astype(np.float32), [0, 1], b),
        "integers": (np.zeros((10, 3), np.int64), np.ones((30, 4), np.int64), [0, 1], np.ones((2, 4, 3), np.int64)),
        "no terms": (out, a, [], b),
    }
    for name, (o, a_, starts, b_) in declined.items():
        before = o.copy()
        assert not blas.shifted_matmuls(o, a_, starts, b_), name
        np.testing.assert_array_equal(o, before, err_msg=name)


def test_shifted_sums_are_the_same_on_every_path(monkeypatch):
    """shifted.shifted_sums: BLAS straight from the memory, or views and sum_of_products' buffer (BLAS
    declined, or not asked to add), in one block of rows and in many."""
    rng = np.random.default_rng(6)
    for rows in (8, 40000):
        flat = rng.standard_normal((rows + 30, 8)).astype(np.float32)
        weights = rng.standard_normal((9, 8, 8)).astype(np.float32)
        starts = [i * 13 + j for i in range(3) for j in range(3)]
        expected = sum(flat[s:s + rows].astype(np.float64) @ weights[t] for t, s in enumerate(starts))
        results = []
        for adds, direct in ((True, True), (True, False), (False, True)):
            if not direct:
                monkeypatch.setattr(blas, "shifted_matmuls", lambda *args: False)
            out = np.full((rows, 8), np.nan, np.float32)
            shifted.shifted_sums(out, flat, starts, weights, blas_adds=adds)
            results.append(out)
            monkeypatch.undo()
        for got in results:
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transposed_is_a_contiguous_copy_of_the_transpose(dtype, monkeypatch):
    """OpenBLAS's omatcopy where NumPy's BLAS has it (these machines' wheels: checked), the copy of
    the transposed view otherwise and for what it does not take (strided input, no rows); the same
    numbers every way, and never a view of the input."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal((37, 53)).astype(dtype)
    assert blas._loaded().get(("omatcopy", np.dtype(dtype))) is not None
    for case in (a, a[:, ::2], a[3:20], np.empty((0, 4), dtype), a[:1]):
        got = blas.transposed(case)
        assert got.flags.c_contiguous and got.dtype == case.dtype and not np.shares_memory(got, case)
        np.testing.assert_array_equal(got, case.T)
    monkeypatch.setattr(blas, "_functions", {})   # no BLAS to call: NumPy's copy
    np.testing.assert_array_equal(blas.transposed(a), a.T)
