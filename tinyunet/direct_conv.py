"""Register-blocked direct convolution (optional, with Numba): the shifted products at the CPU's speed.

A stride-1 convolution on the padded image laid out as rows (N*Hp*Wp, C) is a sum of shifted
products (conv.py, lesson 02):

    out[r, n] = sum_t sum_k a[starts[t] + r, k] * w[t, k, n]            (forward, and dx)
    dw[t, k, n] = sum_r a[starts[t] + r, k] * d[r, n]                    (the weight gradient)

BLAS runs each term as a matrix product. With the U-Net's 16-64 channels those products are thin
(K, N = 16-64): BLAS spends its time moving the output in and out of memory nine times, once per
term, and reaches 25-75 GFLOP/s on a core here. The loops below keep a tile of the *output* in
vector registers (tinyunet/simd.py) for all nine terms and all input channels, so each output value
is written once, and every instruction in the inner loop is a fused multiply-add on 16 lanes or the
load that feeds it. That is the method of oneDNN's direct convolutions, which PyTorch runs, and it
reaches ~100-110 GFLOP/s on one Zen 4 core for every U-Net layer shape (measured:
benchmarks/README.md). The naive version of the forward kernel, for one row r and one output
channel n, is the formula above; the fast version computes P rows x 16V output channels at once:

    for each tile of 16V output channels, for each block of P rows:
        acc[p][v] = 0                                   P x V vectors: registers
        for t in terms, for k in input channels:
            w_v = w[t, k, tile + 16v : ... + 16]        V vector loads
            for p: x = a[starts[t] + r + p, k] (in every lane);  acc[p][v] += x * w_v
        out[r + p, tile + 16v : ...] = acc[p][v]

Only the rows that are real outputs are computed (:func:`window_segments`): the BLAS form also
computes the rows of the padding and throws them away, 3% of the rows at 128x128 but 36% at 8x8.
The weight gradient keeps KB input channels x V vectors of sums over chunks of rows instead.

The kernels are generated for each block shape (P, V) from that template (a loop cannot name
P x V separate variables, and separate variables are what the compiler keeps in registers), and
compiled on first use (about 0.5 s each, a few per process; Numba cannot cache generated code).
They run on float32 arrays with C-contiguous rows and N a multiple of 16 on the NumPy backend;
everything else, and ``TINYUNET_KERNELS=numpy``, runs the BLAS products, which stay the reference
the tests compare these kernels against (tests/test_direct_conv.py).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from tinyunet import backend, kernels

__all__ = ["set_enabled", "runs", "usable", "window_segments", "shifted_sum", "shifted_weight_grad"]

_CHUNK = 256  # rows per pass of the weight gradient: a's and d's rows stay in L2 for all terms
_compiled: Dict[Tuple[str, int, int], Callable] = {}
_vector_budget: int = 0
_enabled = True  # and kernels.available(): Numba installed, TINYUNET_KERNELS not "numpy"


def set_enabled(enabled: bool) -> bool:
    """Switch these kernels on or off (BLAS's products instead), leaving BatchNorm's and ReLU's loops
    as they are (kernels.set_enabled switches all compiled code). Returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def _budget() -> int:
    """How many 16-lane sums a kernel keeps: half the vector registers (AVX-512 has 32 of 16 lanes,
    AVX2 16 of 8 lanes, i.e. 8 of ours), the rest for the loaded values. Measured with AVX-512
    (Zen 4, one core), 256 -> 256 channels at 8x8: 4 rows x 4 vectors 104 GFLOP/s, 8 x 2 106,
    6 x 4 (24 sums) 71, 12 x 2 25 (the compiler ran out of registers)."""
    global _vector_budget
    if not _vector_budget:
        from llvmlite import binding
        _vector_budget = 16 if "+avx512f" in binding.get_host_cpu_features().flatten() else 4
    return _vector_budget


def runs(array: Any) -> bool:
    """Whether the kernels can run on arrays like this one: a float32 NumPy array on the NumPy
    backend, Numba installed and the kernels switched on (:func:`set_enabled`, kernels.set_enabled)."""
    return (_enabled and backend.name() == "numpy" and isinstance(array, np.ndarray) and array.dtype == np.float32
            and kernels.available())


def usable(*arrays: Any) -> bool:
    """Whether the kernels take these arrays (:func:`runs`): float32, matrices of rows C-contiguous,
    stacks of matrices (3-D) with contiguous rows; the first one's last axis (the output channels) a
    multiple of 16."""
    def fits(a: Any) -> bool:
        if not (isinstance(a, np.ndarray) and a.dtype == np.float32):
            return False
        return a.flags.c_contiguous or (a.ndim == 3 and a.strides[2] == a.itemsize and min(a.strides) > 0
                                        and not any(s % a.itemsize for s in a.strides))
    return runs(arrays[0]) and all(fits(a) for a in arrays) and arrays[0].shape[-1] % 16 == 0


def _tile(n: int) -> int:
    """V: vectors of output channels per tile, the most that divide N and leave room for 4 rows."""
    return next((v for v in (4, 2) if (n // 16) % v == 0 and 4 * v <= _budget()), 1)


def _compile(source: str) -> Callable:
    from numba import njit

    from tinyunet import simd

    names = {name: getattr(simd, name) for name in ("vzero", "vload", "vstore", "vbroadcast", "vfma", "vadd")}
    exec(compile(source, "<tinyunet.direct_conv>", "exec"), names)
    return njit(nogil=True, boundscheck=False)(names["kernel"])


def _sum_source(p: int, v: int) -> str:
    """The forward/dx kernel for blocks of P rows x V vectors, over the rows of each segment (a tail
    loop takes its last rows); rows outside the segments are set to 0. It computes the output
    channels [n_first, n_last) and reads w[t, k, n] at t * w_term + k * w_k + n."""
    def block(rows: int, indent: str) -> list:
        acc = [[f"s{i}_{j}" for j in range(v)] for i in range(rows)]
        lines = [f"{indent}{acc[i][j]} = vzero()" for i in range(rows) for j in range(v)]
        lines += [f"{indent}for t in range(terms):",
                  f"{indent}    src = (starts[t] + r) * k_in",
                  f"{indent}    wt = t * w_term + n0",
                  f"{indent}    for k in range(k_in):"]
        lines += [f"{indent}        w{j} = vload(w, wt + k * w_k + {16 * j})" for j in range(v)]
        for i in range(rows):
            lines.append(f"{indent}        x = vbroadcast(a, src + {i} * k_in + k)")
            lines += [f"{indent}        {acc[i][j]} = vfma(x, w{j}, {acc[i][j]})" for j in range(v)]
        lines += [f"{indent}vstore(out, (r + {i}) * n_out + n0 + {16 * j}, {acc[i][j]})"
                  for i in range(rows) for j in range(v)]
        return lines

    def zeros(first: str, last: str, indent: str) -> list:
        return [f"{indent}for r in range({first}, {last}):"] + [
            f"{indent}    vstore(out, r * n_out + n0 + {16 * j}, vzero())" for j in range(v)]
    return "\n".join(["def kernel(out, a, starts, w, w_term, w_k, segments, n_first, n_last):",
                      "    m, n_out = out.shape",
                      "    k_in, terms = a.shape[1], starts.shape[0]",
                      f"    for n0 in range(n_first, n_last, {16 * v}):",
                      "        done = 0",
                      "        for s in range(segments.shape[0]):",
                      "            s0, s1 = segments[s, 0], segments[s, 1]",
                      *zeros("done", "s0", " " * 12),
                      f"            whole = s1 - (s1 - s0) % {p}",
                      f"            for r in range(s0, whole, {p}):",
                      *block(p, " " * 16),
                      "            for r in range(whole, s1):",
                      *block(1, " " * 16),
                      "            done = s1",
                      *zeros("done", "m", " " * 8)])


def _weight_grad_source(kb: int, v: int) -> str:
    """The weight-gradient kernel: KB input channels x V vectors of sums, over groups of segments of
    about _CHUNK rows (their rows of a and d stay in cache for all terms)."""
    acc = [[f"s{i}_{j}" for j in range(v)] for i in range(kb)]
    lines = ["def kernel(dw, a, starts, d, segments, n_first, n_last):",
             "    n_out = d.shape[1]",
             "    k_in, terms, count = a.shape[1], starts.shape[0], segments.shape[0]",
             "    g0 = 0",
             "    while g0 < count:",
             "        g1, rows = g0, 0",
             f"        while g1 < count and rows < {_CHUNK}:",
             "            rows += segments[g1, 1] - segments[g1, 0]",
             "            g1 += 1",
             "        for t in range(terms):",
             f"            for k0 in range(0, k_in, {kb}):",
             f"                for n0 in range(n_first, n_last, {16 * v}):"]
    lines += [f"                    {acc[i][j]} = vzero()" for i in range(kb) for j in range(v)]
    lines += ["                    for g in range(g0, g1):",
              "                        for r in range(segments[g, 0], segments[g, 1]):",
              "                            src = (starts[t] + r) * k_in + k0"]
    lines += [f"                            d{j} = vload(d, r * n_out + n0 + {16 * j})" for j in range(v)]
    for i in range(kb):
        lines.append(f"                            x = vbroadcast(a, src + {i})")
        lines += [f"                            {acc[i][j]} = vfma(x, d{j}, {acc[i][j]})" for j in range(v)]
    for i in range(kb):
        for j in range(v):
            lines += [f"                    o = (t * k_in + k0 + {i}) * n_out + n0 + {16 * j}",
                      f"                    vstore(dw, o, vadd(vload(dw, o), {acc[i][j]}))"]
    lines.append("        g0 = g1")
    return "\n".join(lines)


def window_segments(start: int, stop: int, wp: int, hp: int, col0: int, cols: int, line0: int,
                    lines: int) -> Any:
    """The rows of [start, stop) of a grid of images of hp lines of wp rows that lie in the window of
    lines [line0, line0 + lines) and columns [col0, col0 + cols) of each image, as (S, 2) int64
    [first, last) pairs counted from ``start``: the real outputs of a convolution whose rows
    include its padding (at 8x8 pixels a third of the rows are padding, at 128x128 3%)."""
    if col0 == 0 and cols == wp and line0 == 0 and lines == hp:
        return np.array([[0, stop - start]], dtype=np.int64)
    line = np.arange(start // wp, (stop - 1) // wp + 1)
    line = line[(line % hp >= line0) & (line % hp < line0 + lines)]
    first = np.maximum(line * wp + col0, start)
    last = np.minimum(line * wp + col0 + cols, stop)
    keep = first < last
    return np.stack([first[keep], last[keep]], axis=1) - start


def _kernel(kind: str, first: int, v: int) -> Callable:
    key = (kind, first, v)
    if key not in _compiled:
        _compiled[key] = _compile(_sum_source(first, v) if kind == "sum" else _weight_grad_source(first, v))
    return _compiled[key]


def _steps(w: Any) -> Tuple[int, int]:
    """(term, row) steps in elements of a stack of matrices w: (T, K, N) whose last axis is contiguous."""
    if w.ndim != 3 or w.strides[2] != w.itemsize or min(w.strides) < 0 or any(s % w.itemsize for s in w.strides):
        raise ValueError(f"the kernels read a stack of matrices (T, K, N) with contiguous rows, got strides {w.strides}")
    return w.strides[0] // w.itemsize, w.strides[1] // w.itemsize


def shifted_sum(out: Any, a: Any, starts: Any, w: Any, segments: Any,
                columns: Optional[Tuple[int, int]] = None) -> None:
    """out[r] = sum_t a[starts[t] + r] @ w[t] for the rows r of the segments, 0 for the other rows of
    out, in this thread.

    out: (M, N), a: (R, K) with R >= max(starts) + M, starts: (T,) int64, w: (T, K, N), any view whose
    rows are contiguous (e.g. the transpose of a (K, T, N) array); float32, out and a C-contiguous, N
    a multiple of 16 (:func:`usable`); segments: (S, 2) int64 [first, last) rows of out, in order
    (:func:`window_segments`). ``columns`` (first, last), multiples of 16: only out[:, first:last],
    the rest of out untouched (threads share out the output channels)."""
    first, last = columns or (0, out.shape[1])
    v = _tile(last - first)
    # P rows: a power of two, so that it divides the images' widths (a segment is one image line)
    rows = next(p for p in (8, 4, 2, 1) if p * v <= _budget())
    _kernel("sum", rows, v)(out, a, starts, w, *_steps(w), segments, first, last)


def shifted_weight_grad(a: Any, starts: Any, d: Any, segments: Any, out: Optional[Any] = None,
                        columns: Optional[Tuple[int, int]] = None) -> Any:
    """dw[t] = sum over the rows r of the segments of a[starts[t] + r]^T d[r], in this thread (rows of
    d outside them must be 0 or not count). a: (R, K), starts: (T,) int64, d: (M, N) (N a multiple
    of 16), segments: (S, 2) int64 rows of d -> dw: (T, K, N) float32, a new array or ``out``.
    ``columns`` (first, last), multiples of 16: only dw[:, :, first:last], the rest of ``out`` untouched
    (threads share out the output channels)."""
    k, n = a.shape[1], d.shape[1]
    first, last = columns or (0, n)
    v = _tile(last - first)
    kb = next(b for b in (16, 8, 4, 2, 1) if k % b == 0 and b * v <= _budget())
    dw = np.empty((starts.shape[0], k, n), dtype=np.float32) if out is None else out
    dw[:, :, first:last] = 0
    _kernel("grad", kb, v)(dw, a, starts, d, segments, first, last)
    return dw
