"""A sum of matrix products added in place by BLAS: the one feature of BLAS that NumPy's matmul
does not expose.

BLAS's matrix product is ``C = alpha * A @ B + beta * C``; NumPy always calls it with beta = 0, so a
sum of products (a convolution's nine shifted terms, conv.py) had to write each term into a buffer
and add the buffer to the sum: one more pass over the output per term. With beta = 1 BLAS adds
each term into the output itself, while the output's tile is in its registers. Measured for the
nine shifted products of a 3x3 convolution over a batch of 8 at 128x128 (blocks of rows on 2
cores): 16 -> 16 channels 6.2 -> 5.2 ms, 16 -> 32 13.1 -> 9.9 ms, 64 -> 32 36.7 -> 30.4 ms.

So on NumPy :func:`shifted_matmuls` calls ``cblas_sgemm`` / ``cblas_dgemm`` of the BLAS library
NumPy itself loaded, through ``ctypes`` (no new dependency; ctypes lets go of the GIL during the
call, so threads run their products at the same time, unlike SciPy's wrappers, which hold it).
It is specialised for the convolution's pattern, row slices of one matrix times a stack of weights:
one check of the layouts and pointer arithmetic per term instead of a view and its checks (~5 us
each, with the GIL held): the shifted layers' forward 4-7% faster than with a general
``out += a @ b`` per term (16 -> 16 at 128x128, batch 8, 2 cores: 10.1 -> 9.2 ms; 64 -> 32 at
64x64: 10.8 -> 10.2 ms). Where that library or its symbols are not found (another NumPy build,
CuPy arrays), or an array's memory does not fit BLAS (a stride that is not a row or column step),
it declines and the caller sums the products through a buffer (conv.sum_of_products).
"""
from __future__ import annotations

import ctypes
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from tinyunet import backend

__all__ = ["shifted_matmuls", "available", "transposed"]

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112   # the CBLAS enums
_functions: Optional[Dict[Any, Any]] = None      # dtype (gemm) or ("omatcopy", dtype) -> ctypes function


def _numpy_blas_path() -> Optional[str]:
    """The BLAS library that NumPy loaded (threadpoolctl finds the loaded ones; NumPy's lies in its
    own package folder, e.g. numpy.libs/)."""
    from threadpoolctl import threadpool_info
    site = os.path.dirname(os.path.dirname(os.path.abspath(np.__file__)))
    for info in threadpool_info():
        path = os.path.abspath(info.get("filepath") or "")
        if info.get("user_api") == "blas" and path.startswith(site + os.sep) \
                and os.path.relpath(path, site).startswith("numpy"):   # numpy.libs/, numpy/.dylibs/, ...
            return path
    return None


def _library() -> Optional[ctypes.CDLL]:
    path = _numpy_blas_path()
    if path is None:
        return None
    try:
        return ctypes.CDLL(path)
    except OSError:
        return None


def _symbol(lib: Optional[ctypes.CDLL], routine: str) -> Tuple[Any, Any]:
    """(function, its integer type) of a CBLAS routine such as "sgemm" in the library, or (None, None).
    NumPy's wheels ship OpenBLAS with 64-bit integers and prefixed, suffixed names."""
    for name, integer in ((f"scipy_cblas_{routine}64_", ctypes.c_int64), (f"cblas_{routine}64_", ctypes.c_int64),
                          (f"scipy_cblas_{routine}", ctypes.c_int32), (f"cblas_{routine}", ctypes.c_int32)):
        function = getattr(lib, name, None) if lib is not None else None
        if function is not None:
            return function, integer
    return None, None


def _load() -> Dict[Any, Any]:
    """dtype -> cblas_?gemm of NumPy's BLAS, and ("omatcopy", dtype) -> cblas_?omatcopy (an OpenBLAS
    extension) where the library has it."""
    functions: Dict[Any, Any] = {}
    lib = _library()
    for dtype, letter, scalar in ((np.dtype(np.float32), "s", ctypes.c_float),
                                  (np.dtype(np.float64), "d", ctypes.c_double)):
        function, integer = _symbol(lib, f"{letter}gemm")
        if function is not None:   # order, transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc
            function.restype = None
            function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, integer, integer, integer, scalar,
                                 ctypes.c_void_p, integer, ctypes.c_void_p, integer, scalar,
                                 ctypes.c_void_p, integer]
            functions[dtype] = function
        function, integer = _symbol(lib, f"{letter}omatcopy")
        if function is not None:   # order, trans, rows, cols, alpha, A, lda, B, ldb
            function.restype = None
            function.argtypes = [ctypes.c_int, ctypes.c_int, integer, integer, scalar, ctypes.c_void_p, integer,
                                 ctypes.c_void_p, integer]
            functions["omatcopy", dtype] = function
    return functions


def _loaded() -> Dict[Any, Any]:
    global _functions
    if _functions is None:
        _functions = _load()
    return _functions


def available(dtype: Any) -> bool:
    """Whether :func:`shifted_matmuls` can call BLAS directly for NumPy arrays of this dtype."""
    return np.dtype(dtype) in _loaded()


def _layout(a: np.ndarray) -> Optional[tuple]:
    """(transpose flag, leading dimension) of a 2-D array whose rows or columns are contiguous."""
    item = a.itemsize
    rows, cols = a.shape
    if a.strides[1] == item and a.strides[0] % item == 0 and a.strides[0] >= max(cols, 1) * item:
        return _NO_TRANS, a.strides[0] // item
    if a.strides[0] == item and a.strides[1] % item == 0 and a.strides[1] >= max(rows, 1) * item:
        return _TRANS, a.strides[1] // item          # column-major: BLAS reads it transposed
    return None


def _pointer(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _gemm_into(out: Any) -> Optional[Tuple[Any, int]]:
    """(the BLAS function, out's leading dimension) where BLAS can write into out directly, else None:
    a NumPy array of a dtype we have a gemm for, non-empty, whose rows are contiguous (BLAS writes C
    row by row here)."""
    function = _functions.get(out.dtype) if isinstance(out, np.ndarray) and available(out.dtype) else None
    lc = _layout(out) if function is not None and out.shape[0] and out.shape[1] else None
    return (function, lc[1]) if lc is not None and lc[0] == _NO_TRANS else None


def shifted_matmuls(out: Any, a: Any, starts: Sequence[int], b: Any) -> bool:
    """out[...] = sum over t of a[starts[t] : starts[t] + M] @ b[t], by BLAS directly: the first term
    written (beta = 0), the others added (beta = 1). out: (M, N), a: (R, K), b: (T, K, N), one float
    dtype, every starts[t] + M <= R. Returns False, having done nothing, where BLAS cannot be called
    (not NumPy, another BLAS, a layout BLAS does not take): the caller then takes another way.

    A convolution's shifted products (conv.py) are row slices of one matrix times a stack of weights:
    the layouts are checked once and each term's pointers are computed, where a view and its checks
    per term cost ~5 us more while the thread holds the GIL (~950 products per U-Net training step).
    """
    direct = _gemm_into(out)
    if direct is None or not isinstance(a, np.ndarray) or not isinstance(b, np.ndarray) \
            or a.dtype != out.dtype or b.dtype != out.dtype or b.ndim != 3 or not len(starts):
        return False
    (function, ldc), (m, n), k = direct, out.shape, a.shape[1]
    la, lb = _layout(a), _layout(b[0])
    if la is None or lb is None or not k or min(starts) < 0 or max(starts) + m > a.shape[0] \
            or b.shape[1:] != (k, n):
        return False
    pa, pb, c = _pointer(a), _pointer(b), _pointer(out)
    row, term = a.strides[0], b.strides[0]          # bytes from one row of a, one term of b, to the next
    for t, start in enumerate(starts):
        function(_ROW_MAJOR, la[0], lb[0], m, n, k, 1.0, pa + start * row, la[1], pb + t * term, lb[1],
                 1.0 if t else 0.0, c, ldc)
    return True


def transposed(a: Any) -> Any:
    """a.T as a new C-contiguous array: a: (M, N) -> (N, M), on any backend.

    The layers turn a weight from PyTorch's layout into the one their products read, and its
    gradient back, at every step (conv.py). NumPy copies a transposed view number by number, each
    read from another cache line; OpenBLAS's ``cblas_somatcopy`` moves it in blocks that stay in
    cache: a 256 x 2304 float32 matrix (the U-Net's 256 -> 256 convolution) in 0.12 ms instead of
    0.49. Used where NumPy's BLAS has it (an OpenBLAS extension), for C-contiguous NumPy arrays;
    elsewhere (CuPy, another BLAS) the plain copy of the view.
    """
    function = _loaded().get(("omatcopy", a.dtype)) if isinstance(a, np.ndarray) and a.ndim == 2 else None
    if function is None or not a.flags.c_contiguous or not a.size:
        return backend.xp.ascontiguousarray(a.T)
    rows, cols = a.shape
    out = np.empty((cols, rows), dtype=a.dtype)
    function(_ROW_MAJOR, _TRANS, rows, cols, 1.0, _pointer(a), cols, _pointer(out), rows)
    return out
