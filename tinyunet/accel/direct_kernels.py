"""Register-blocked direct convolution (optional, with Numba): the shifted products at the CPU's speed.

A stride-1 convolution is a sum of shifted products (conv.py, lesson 03): each kernel offset, a
*tap* t = (di, dj), multiplies the input shifted by (di, dj) with one (Cin, Cout) matrix. With the
images laid out as rows of pixels (N*H*W, C), a shift by (di, dj) is a shift by di*W + dj rows:

    out[r, n] = sum_t sum_k a[r + starts[t], k] * w[t, k, n]            (forward, and dx)
    dw[t, k, n] = sum_r a[r + starts[t], k] * d[r, n]                    (the weight gradient)

BLAS runs each term as a matrix product. With the U-Net's 16-64 channels those products are thin
(K, N = 16-64): BLAS spends its time moving the output in and out of memory nine times, once per
term, and reaches 25-75 GFLOP/s on a core here. The loops below keep a tile of the *output* in
vector registers (tinyunet/simd.py) for all nine terms and all input channels, so each output value
is written once, and every instruction in the inner loop is a fused multiply-add on 16 lanes or the
load that feeds it. That is the method of oneDNN's direct convolutions, which PyTorch runs, and it
reaches ~100-115 GFLOP/s on one Zen 4 core for every U-Net layer shape (measured:
benchmarks/README.md). The naive version of the forward kernel, for one row r and one output
channel n, is the formula above; the fast version computes P rows x 16V output channels at once:

    for each tile of 16V output channels, for each block of P rows:
        acc[p][v] = 0                                   P x V vectors: registers
        for t in terms, for k in input channels:
            w_v = w[t, k, tile + 16v : ... + 16]        V vector loads
            for p: x = a[r + p + starts[t], k] (in every lane);  acc[p][v] += x * w_v
        out[r + p, tile + 16v : ...] = acc[p][v]

**The padding is never copied.** Near an image's border some taps fall outside the image, where
the padded image has zeros. The BLAS form copies the image into a zero-framed buffer first (and the
gradient into another in backward: ~20 ms of copies per U-Net training step, 6% of it). The kernels
instead run over *segments* of output rows (:func:`clipped_segments`): runs of pixels that see the
same taps, each with a bit mask of the taps that land inside the image, and a term whose bit is 0
is skipped - it would have added zeros. A segment is one line of an image's interior (every tap
valid in its middle), or one column at the left or right edge (a few taps missing), going down
the lines; so the blocks of P rows stay long. A segment is a row of the (S, 6) int64 table

    out_first, count, out_step, src_first, src_step, mask

for its rows q = 0 .. count-1: output row ``out_first + q*out_step``, reading input rows
``src_first + q*src_step + starts[t]`` for the taps t in ``mask``. The sums are the same as with a
zero-padded copy, term by term in the same order: the same numbers, bit for bit.

The weight gradient keeps KB input channels x V vectors of sums over groups of segments instead
(their rows of a and d stay in cache for all terms).

The kernels are generated for each block shape (P, V) from that template (a loop cannot name
P x V separate variables, and separate variables are what the compiler keeps in registers), and
compiled on first use (0.3-1 s each, a few per process), and Numba keeps their machine code in
``$TINYUNET_CACHE/kernels`` for the next process (:func:`_compile`).
They run on float32 arrays with C-contiguous rows and N a multiple of 16 on the NumPy backend;
everything else, and ``TINYUNET_KERNELS=numpy``, runs the BLAS products, which stay the reference
the tests compare these kernels against (tests/test_direct_conv.py).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from tinyunet import backend
from tinyunet.accel import compiled_loops
from tinyunet.cache import default_cache_dir

__all__ = ["set_enabled", "runs", "usable", "clipped_segments", "segment_rows", "shifted_sum",
           "shifted_weight_grad", "MAX_TAPS"]

_CHUNK = 256  # rows per pass of the weight gradient: a's and d's rows stay in L2 for all terms
MAX_TAPS = 63  # a segment's taps are the bits of one int64
_NARROW = 4  # column ranges narrower than this run down the lines (a segment per column), wider along them
_compiled: Dict[Tuple[str, int, int], Callable] = {}
_vector_budget: int = 0
_enabled = True  # and compiled_loops.available(): Numba installed, TINYUNET_KERNELS not "numpy"


def set_enabled(enabled: bool) -> bool:
    """Switch these kernels on or off (BLAS's products instead), leaving BatchNorm's and ReLU's loops
    as they are (kernels.set_enabled switches all compiled code). Returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def enabled() -> bool:
    """Whether the kernels may run: switched on (:func:`set_enabled`) and Numba installed."""
    return _enabled and compiled_loops.available()


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
            and compiled_loops.available())


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


_IMPORTS = "from tinyunet.accel.simd import vadd, vbroadcast, vfma, vload, vstore, vzero\n\n\n"


def _kernel_file(source: str) -> Optional[Path]:
    """The kernel's source as a module file in ``$TINYUNET_CACHE/kernels`` (default_cache_dir), named
    by a hash of it and of simd.py, written once (atomically); None where the folder is not writable.
    Numba keeps a function's machine code only for functions in files, beside the file."""
    from tinyunet.accel import simd
    text = _IMPORTS + source + "\n"
    key = hashlib.sha256((text + Path(simd.__file__).read_text()).encode()).hexdigest()[:16]
    path = default_cache_dir() / "kernels" / f"tinyunet_kernel_{key}.py"
    if path.exists():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
            f.write(text)
        os.replace(f.name, path)
    except OSError:
        return None
    return path


def _compile(source: str) -> Callable:
    """Compile a generated kernel; from a module file where it can be written, so that Numba caches
    its machine code there (a process after the first loads it in ~0.1 s instead of compiling it in
    0.3-1 s; the standard step's five kernels: its first step 6.4 -> 0.7 s), else from the text."""
    from numba import njit

    path = _kernel_file(source)
    if path is None:
        names: Dict[str, Any] = {}
        exec(compile(_IMPORTS + source, "<tinyunet.direct_conv>", "exec"), names)
        return njit(nogil=True, boundscheck=False)(names["kernel"])
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module   # Numba's cached code refers to its module by name
    spec.loader.exec_module(module)
    return njit(nogil=True, boundscheck=False, cache=True)(module.kernel)


def _sum_source(p: int, v: int) -> str:
    """The forward/dx kernel for blocks of P rows x V vectors, over the rows of each segment (the
    last rows of a segment in blocks of P/2, P/4, ..., 1). It computes the output channels
    [n_first, n_last) and reads w[t, k, n] at t * w_term + k * w_k + n."""
    def block(rows: int, indent: str) -> list:
        acc = [[f"s{i}_{j}" for j in range(v)] for i in range(rows)]
        lines = [f"{indent}{acc[i][j]} = vzero()" for i in range(rows) for j in range(v)]
        lines += [f"{indent}for t in range(terms):",
                  f"{indent}    if (mask >> t) & 1:",
                  f"{indent}        src = (s0 + q * sstep + starts[t]) * k_in",
                  f"{indent}        wt = t * w_term + n0",
                  f"{indent}        for k in range(k_in):"]
        lines += [f"{indent}            w{j} = vload(w, wt + k * w_k + {16 * j})" for j in range(v)]
        for i in range(rows):
            lines.append(f"{indent}            x = vbroadcast(a, src + {i} * step + k)")
            lines += [f"{indent}            {acc[i][j]} = vfma(x, w{j}, {acc[i][j]})" for j in range(v)]
        for i in range(rows):
            lines.append(f"{indent}o = (o0 + (q + {i}) * ostep) * n_out + n0")
            lines += [f"{indent}vstore(out, o + {16 * j}, {acc[i][j]})" for j in range(v)]
        return lines

    lines = ["def kernel(out, a, starts, w, w_term, w_k, segments, n_first, n_last):",
             "    n_out = out.shape[1]",
             "    k_in, terms = a.shape[1], starts.shape[0]",
             f"    for n0 in range(n_first, n_last, {16 * v}):",
             "        for s in range(segments.shape[0]):",
             "            o0, count, ostep = segments[s, 0], segments[s, 1], segments[s, 2]",
             "            s0, sstep, mask = segments[s, 3], segments[s, 4], segments[s, 5]",
             "            step = sstep * k_in",
             "            q = 0",
             f"            while q + {p} <= count:",
             *block(p, " " * 16),
             f"                q += {p}"]
    rows = p // 2
    while rows:
        lines += [f"            if q + {rows} <= count:", *block(rows, " " * 16), f"                q += {rows}"]
        rows //= 2
    return "\n".join(lines)


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
             "            rows += segments[g1, 1]",
             "            g1 += 1",
             "        for t in range(terms):",
             f"            for k0 in range(0, k_in, {kb}):",
             f"                for n0 in range(n_first, n_last, {16 * v}):"]
    lines += [f"                    {acc[i][j]} = vzero()" for i in range(kb) for j in range(v)]
    lines += ["                    for g in range(g0, g1):",
              "                        if (segments[g, 5] >> t) & 1:",
              "                            o0, ostep = segments[g, 0], segments[g, 2]",
              "                            s0, sstep = segments[g, 3] + starts[t], segments[g, 4]",
              "                            for q in range(segments[g, 1]):",
              "                                src = (s0 + q * sstep) * k_in + k0",
              "                                row = (o0 + q * ostep) * n_out + n0"]
    lines += [f"                                d{j} = vload(d, row + {16 * j})" for j in range(v)]
    for i in range(kb):
        lines.append(f"                                x = vbroadcast(a, src + {i})")
        lines += [f"                                {acc[i][j]} = vfma(x, d{j}, {acc[i][j]})" for j in range(v)]
    for i in range(kb):
        for j in range(v):
            lines += [f"                    o = (t * k_in + k0 + {i}) * n_out + n0 + {16 * j}",
                      f"                    vstore(dw, o, vadd(vload(dw, o), {acc[i][j]}))"]
    lines.append("        g0 = g1")
    return "\n".join(lines)


@functools.lru_cache(maxsize=128)
def clipped_segments(images: int, out_h: int, out_w: int, in_h: int, in_w: int,
                     taps: Tuple[Tuple[int, int], ...]) -> Any:
    """The segments (module docstring) of a stride-1 correlation whose output pixel (y, x) reads,
    for each tap t = (di, dj), the input pixel (y + di, x + dj) where that lies inside the in_h x
    in_w image (elsewhere the padding: nothing). Pixels are rows numbered n*h*w + y*w + x in both
    images; ``starts`` for these segments are di * in_w + dj. Every output row is in one segment.
    -> (S, 6) int64, read-only, in the order of the segments' first rows (cached: one per layer).

    E.g. a 3x3 convolution with padding 1 (taps (i - 1, j - 1)): per image, each line's pixels
    1 .. W-2 (all taps in the image but on the first and last line), and the columns x = 0 and
    x = W-1 going down (three taps missing), split where the first and last lines begin.
    """
    di = np.array([t[0] for t in taps], dtype=np.int64)
    dj = np.array([t[1] for t in taps], dtype=np.int64)
    bits = np.int64(1) << np.arange(len(taps), dtype=np.int64)
    lines = np.arange(out_h)
    line_mask = (((lines[:, None] + di >= 0) & (lines[:, None] + di < in_h)) * bits).sum(axis=1)
    # the columns where some tap enters or leaves the image cut each line into ranges of equal taps
    cuts = np.unique(np.clip(np.concatenate([[0, out_w], -dj, in_w - dj]), 0, out_w))
    rows = []
    for x0, x1 in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
        column_mask = int((((x0 + dj >= 0) & (x0 + dj < in_w)) * bits).sum())
        if x1 - x0 >= _NARROW:          # along each line
            rows += [(y * out_w + x0, x1 - x0, 1, y * in_w + x0, 1, int(line_mask[y]) & column_mask)
                     for y in range(out_h)]
            continue
        first = np.flatnonzero(np.diff(line_mask, prepend=-1))          # runs of lines with equal taps
        last = np.append(first[1:], out_h)
        for x in range(x0, x1):         # down each column, one segment per run of lines
            rows += [(y * out_w + x, y1 - y, out_w, y * in_w + x, in_w, int(line_mask[y]) & column_mask)
                     for y, y1 in zip(first.tolist(), last.tolist())]
    image = np.array(sorted(rows), dtype=np.int64)
    table = np.tile(image, (images, 1))
    n = np.repeat(np.arange(images, dtype=np.int64), len(image))
    table[:, 0] += n * (out_h * out_w)
    table[:, 3] += n * (in_h * in_w)
    table.setflags(write=False)
    return table


def segment_rows(segments: Any, start: int, stop: int) -> Any:
    """The segments whose first row, counted in the table's order, lies in [start, stop): the rows
    of a block of ``sum(segments[:, 1])`` rows (a view; blocks never share a segment)."""
    before = np.cumsum(segments[:, 1]) - segments[:, 1]
    first, last = np.searchsorted(before, [start, stop])
    return segments[first:last]


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


def shifted_sum(out: Any, a: Any, starts: Sequence[int], w: Any, segments: Any,
                columns: Optional[Tuple[int, int]] = None) -> None:
    """out[o] = sum over the taps t of its segment of a[s + starts[t]] @ w[t], for each row o of the
    segments (reading row s), in this thread; other rows of out untouched.

    out: (M, N), a: (R, K), starts: (T,) int64, w: (T, K, N), any view whose rows are contiguous;
    float32, out and a C-contiguous, N a multiple of 16 (:func:`usable`); segments: (S, 6) int64
    (module docstring, :func:`clipped_segments`). ``columns`` (first, last), multiples of 16: only
    out[:, first:last] (threads share out the output channels)."""
    first, last = columns or (0, out.shape[1])
    v = _tile(last - first)
    rows = next(p for p in (8, 4, 2, 1) if p * v <= _budget())   # P: a power of two, the tail in halves
    _kernel("sum", rows, v)(out, a, np.asarray(starts, dtype=np.int64), w, *_steps(w), segments, first, last)


def shifted_weight_grad(a: Any, starts: Sequence[int], d: Any, segments: Any, out: Optional[Any] = None,
                        columns: Optional[Tuple[int, int]] = None) -> Any:
    """dw[t] = sum over the rows o of the segments whose taps include t of a[s + starts[t]]^T d[o]
    (reading row s for row o), in this thread. a: (R, K), starts: (T,) int64, d: (M, N) (N a
    multiple of 16), segments: (S, 6) int64 -> dw: (T, K, N) float32, a new array or ``out``.
    ``columns`` (first, last), multiples of 16: only dw[:, :, first:last], the rest of ``out`` untouched
    (threads share out the output channels)."""
    k, n = a.shape[1], d.shape[1]
    first, last = columns or (0, n)
    # as many input channels as fit (then V): each row of a is read in one piece, a cache line's 16
    # channels at once (256 -> 256 at 8x8, one core: KB 16 x V 1 110-112 GFLOP/s, 4 x 4 101-104)
    kb = next(b for b in (16, 8, 4, 3, 2, 1) if k % b == 0 and b <= _budget())   # 3: an RGB image
    v = next(v for v in (4, 2, 1) if ((last - first) // 16) % v == 0 and kb * v <= _budget())
    dw = np.empty((len(starts), k, n), dtype=np.float32) if out is None else out
    dw[:, :, first:last] = 0
    _kernel("grad", kb, v)(dw, a, np.asarray(starts, dtype=np.int64), d, segments, first, last)
    return dw
