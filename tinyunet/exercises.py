"""The checks of the lessons' exercises: is the function you wrote right?

Each ``check_<name>(your_function, ...)`` runs your function on a few small float64 cases, compares
it with the package's reference layer (tinyunet/nn with the CPU acceleration off: the code the
lessons derive) and, for a gradient, with finite differences, then prints one verdict:

    conv2d_backward: PASS  worst relative error 3.2e-10 (4 cases; vs Conv2d.backward and finite differences)
    conv2d_backward: FAIL  dw, case stride 1, padding 1: relative error 0.62 vs Conv2d.backward
      hint: your dw is the first image's alone: the weight is shared by every image, sum over the batch
      the package's version stands in for yours from here on, so the rest of the lesson runs

A check returns the function the lesson should go on with: yours when it passed, else the reference
(same signature), so a notebook with an unfinished exercise still runs to its end. The hints come from
known mistakes: a check computes what each of them would give and says which one your result matches.
"""
from __future__ import annotations

import contextlib
import functools
import os
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from tinyunet import backend
from tinyunet.backend import to_device, to_host
from tinyunet.gradcheck import numerical_gradient, relative_error

TOLERANCE = 1e-6     # against finite differences (a right answer is at ~1e-9 or better), or in float32
EXACT = 1e-10        # float64 against float64: sums in another order differ by ~1e-15; float32 arithmetic
                     # inside (cast back at the end) by ~1e-7, a wrong answer by ~1e-1


class Mismatch(Exception):
    """A case where your function and the reference differ; ``hint`` says what to look at."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


@contextlib.contextmanager
def reference_layers() -> Iterator[None]:
    """The layers of tinyunet/nn alone (acceleration off) inside, as before afterwards."""
    before = backend.set_acceleration(False)
    try:
        yield
    finally:
        backend.set_acceleration(before)


def host(a: Any) -> np.ndarray:
    """A float64 host *copy* (a layer's gradient array is zeroed in place by the next zero_grad)."""
    return np.array(to_host(a), dtype=np.float64)


BY_HAND = "compare one small case by hand with the formula in the text (print both arrays)"


def compare(what: str, mine: Any, expected: Any, against: str,
            known: Sequence[Tuple[Any, str]] = (), case: str = "", tolerance: Optional[float] = None) -> float:
    """Relative error of ``mine`` against ``expected``; raise :class:`Mismatch` with a hint when it is
    too large (``tolerance``; by default EXACT when both are float64, else TOLERANCE). ``known``: (what a
    known mistake gives, the hint for it)."""
    where = f"{what}{', ' + case if case else ''}"
    expected_dtype = np.asarray(to_host(expected)).dtype
    exact = expected_dtype.kind in "biu"   # labels, masks, indices: right or wrong
    if mine is None:
        raise Mismatch(f"{where}: your function returned None", "return the array (a function that only assigns returns None)")
    mine, expected = np.asarray(to_host(mine)), host(expected)
    if tolerance is None:
        tolerance = EXACT if expected_dtype == np.float64 and mine.dtype == np.float64 else TOLERANCE
    if expected_dtype == np.float64 and mine.dtype in (np.float32, np.float16):
        raise Mismatch(f"{where}: your result is {mine.dtype}, the inputs were float64",
                       "keep the precision you are given (no astype(np.float32), no np.zeros(..., dtype=np.float32) "
                       "for a float64 input): float32 keeps 7 digits, and the gradient checks need float64's 16")
    matched = [hint for wrong, hint in known if wrong is not None and np.shape(wrong) == mine.shape   # a known
               and relative_error(mine, host(wrong)) <= tolerance]     # mistake gives yours, to the same tolerance
    if mine.shape != expected.shape:
        hint = f"your {what} has shape {mine.shape}, the right one {expected.shape}"
        if sorted(mine.shape) == sorted(expected.shape):
            hint += ": the right numbers of elements in the wrong axis order (a transpose, or a reshape in the wrong order?)"
        raise Mismatch(f"{where}: wrong shape", "; ".join(matched + [hint]))
    if not np.all(np.isfinite(mine)):   # NaN compares False with everything: it must never pass
        raise Mismatch(f"{where}: NaN or inf in your result", "; ".join(matched + [
            "an np.empty array with entries never written (start from np.zeros), a division by zero (1 - beta**t "
            "with t = 0?) or the square root of a negative number (a variance from sums divided by the wrong count, "
            "or without eps?): print the intermediate arrays of one small case"]))
    err = relative_error(mine, expected)
    if not err <= tolerance:
        if matched:
            hint = matched[0]
        elif tolerance == EXACT and err < 1e-5:
            hint = ("your numbers agree to about 7 digits, no more: float32 arithmetic somewhere inside (a float32 "
                    "array, an astype(np.float32)), cast back at the end? Compute in the dtype you are given")
        else:
            hint = ("the same numbers in another order: check the order of the axes (and of the rows of a reshape)"
                    if relative_error(np.sort(mine, axis=None), np.sort(expected, axis=None)) <= TOLERANCE else
                    BY_HAND)
        if exact:
            wrong = int(np.count_nonzero(mine != expected))
            raise Mismatch(f"{where}: {wrong:,} of {expected.size:,} values differ from {against}", hint)
        raise Mismatch(f"{where}: relative error {err:.2g} vs {against}", hint)
    return err


def expect_parts(result: Any, count: int, hint: str) -> None:
    """A :class:`Mismatch` unless ``result`` is ``count`` things (a tuple, or a list: both unpack alike)."""
    if not isinstance(result, (tuple, list)) or len(result) != count:
        got = (f"{len(result)} things" if isinstance(result, (tuple, list)) else f"a {type(result).__name__}")
        raise Mismatch(f"your function returned {got}, not {count}", hint)


def call_leaving_inputs(fn: Callable, *args: Any) -> Any:
    """``fn(*args)`` with copies of the array arguments (and of the arrays in lists and tuples: one per
    shard, a forward's cache); a :class:`Mismatch` if it changed one of them."""
    def copy(a: Any) -> Any:
        if isinstance(a, np.ndarray):
            return a.copy()
        if isinstance(a, (list, tuple)) and any(isinstance(x, (np.ndarray, list, tuple)) for x in a):
            return type(a)(copy(x) for x in a)
        return a

    def changed(a: Any, c: Any) -> bool:
        if isinstance(a, np.ndarray):
            return not np.array_equal(a, c, equal_nan=True)
        return c is not a and any(changed(x, y) for x, y in zip(a, c))

    copies = [copy(a) for a in args]
    result = fn(*copies)
    for i, (a, c) in enumerate(zip(args, copies)):
        if c is not a and changed(a, c):
            raise Mismatch(f"your function changed its argument {i + 1} in place",
                           "leave the inputs as they were: an array you are given may be used again (Add hands one "
                           "dout to two paths, a forward's cache serves the backward, x is kept for it); compute "
                           "into new arrays: d = d * m makes one, d *= m or d[...] = ... changes the caller's")
    return result


def verdict(name: str, mine: Callable, reference: Callable, run: Callable[[Callable], List[float]],
            against: str) -> Callable:
    """Run the cases on your function, print PASS or FAIL with the worst error and a hint; return your
    function when it passed, else ``reference``."""
    name = mine.__name__ if getattr(mine, "__name__", "<lambda>").isidentifier() else name   # as you named it
    last_call: List[Any] = []

    @functools.wraps(mine)
    def watched(*args: Any, **kwargs: Any) -> Any:   # your function, remembering what it was last given
        last_call[:] = [args]
        return mine(*args, **kwargs)

    try:
        errors = run(watched)
    except Mismatch as failure:
        message, hint = str(failure), failure.hint
    except NotImplementedError:
        message, hint = "not written yet (NotImplementedError)", "write the function's body, then run its cell and this one again"
    except Exception as exc:   # a crash in your code is a failed check, not a crashed lesson
        message = f"raised {type(exc).__name__}: {exc}" + (f"\n  {_where(exc)}" if _where(exc) else "") + \
                  (f"\n  called with {_describe(last_call[0])}" if last_call else "")
        hint = ("shapes that do not fit: print the shape of every intermediate array (a transpose missing or one "
                "too many? a size written into the code instead of read from .shape?)"
                if isinstance(exc, (ValueError, IndexError)) else
                "a None where an array was expected: a function that returns nothing, or a layer's backward called a "
                "second time after one forward (each frees what its forward stored: call it once per forward)"
                if isinstance(exc, TypeError) and "NoneType" in str(exc) else
                "read the error above; run your function on a tiny input")
    else:
        if not errors:
            message, hint = ("nothing was compared", "your function left nothing to compare (an emptied list of "
                             "parameters, no result?): leave the arguments as they are and return what is asked")
            print(f"{name}: FAIL  {message}\n  hint: {hint}\n"
                  f"  the package's version stands in for yours from here on, so the rest of the lesson runs")
            return reference
        print(f"{name}: PASS  worst relative error {max(errors, default=0.0):.1e} "
              f"({len(errors)} comparisons vs {against})")
        return mine
    print(f"{name}: FAIL  {message}\n  hint: {hint}\n"
          f"  the package's version stands in for yours from here on, so the rest of the lesson runs")
    return reference


def _describe(args: Sequence[Any]) -> str:
    """The arguments of a call, arrays by shape and dtype: (array (2, 3, 7, 6) float64, 3, 3, 1, 1)."""
    def one(a: Any) -> str:
        if hasattr(a, "shape") and hasattr(a, "dtype"):
            return f"array {tuple(a.shape)} {a.dtype}"
        if isinstance(a, (list, tuple)) and a:
            inner = ", ".join(one(x) for x in a[:3]) + (f", ... {len(a)} in all" if len(a) > 3 else "")
            return f"[{inner}]" if isinstance(a, list) else f"({inner})"
        if hasattr(a, "__next__"):
            return "an iterator"
        return type(a).__name__ if callable(a) or hasattr(a, "__dict__") else repr(a)
    return f"({', '.join(one(a) for a in args)})"


def _where(exc: BaseException) -> str:
    """The line of the learner's code where ``exc`` was raised: the last frame outside this module and
    the libraries (NumPy, CuPy, the package)."""
    import traceback
    package = os.path.dirname(os.path.abspath(__file__))      # tinyunet/
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not os.path.abspath(f.filename).startswith(package) and "site-packages" not in f.filename
              and "/lib/python" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f"in {f.name}, line {f.lineno}: {f.line}" if f.line else f"in {f.name}, line {f.lineno}"


def _rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def finite_differences(f: Callable[[], float], array: np.ndarray) -> np.ndarray:
    """dL/d(array) by central differences (float64, h = 1e-6), ``array`` nudged in place."""
    with backend_numpy():
        return host(numerical_gradient(f, array))


@contextlib.contextmanager
def backend_numpy() -> Iterator[None]:
    """The lessons' functions take NumPy arrays: the checks run on NumPy whatever was active."""
    before = backend.name()
    if before != "numpy":
        backend.use("numpy")
    try:
        yield
    finally:
        if before != "numpy":
            backend.use(before)


# --- convolution (lessons on the forward and the backward pass) ----------------------------------------

CONV_CASES = [(3, 1, 1), (3, 2, 1), (2, 2, 0), (1, 1, 0), (5, 1, 2), ((2, 3), 1, 1), ((3, 1), 2, 0),
              (3, 3, 1)]     # kernel, stride, padding
CONV_SHAPES = [(2, 3, 7, 6), (3, 2, 5, 8)]   # the lesson's x, then other sizes: a size written into the code fails
CONV_CASES_AND_SHAPES = [(case, CONV_SHAPES[0]) for case in CONV_CASES] + \
                        [(case, CONV_SHAPES[1]) for case in CONV_CASES[:2] + CONV_CASES[-2:]]


def _hw(k: Any) -> Tuple[int, int]:
    """A case's kernel as (kh, kw): an int is a square kernel."""
    return (k, k) if isinstance(k, int) else k


def _conv_layer(w: np.ndarray, b: Optional[np.ndarray], stride: int, padding: int) -> Any:
    from tinyunet.nn import Conv2d

    layer = Conv2d(w.shape[1], w.shape[0], w.shape[2:], stride=stride, padding=padding, bias=b is not None).double()
    layer.weight.data[...] = to_device(w)
    if b is not None:
        layer.bias.data[...] = to_device(b)
    return layer


def reference_im2col(x: Any, kh: int, kw: int, stride: int = 1, padding: int = 0) -> Any:
    from tinyunet.nn.conv import im2col
    return im2col(x, kh, kw, stride, padding)


def reference_col2im(cols: Any, x_shape: Tuple[int, ...], kh: int, kw: int, stride: int = 1, padding: int = 0) -> Any:
    from tinyunet.nn.conv import col2im
    return col2im(cols, x_shape, kh, kw, stride, padding)


def reference_conv2d_forward(x: Any, w: Any, b: Any, stride: int = 1, padding: int = 0) -> Any:
    with reference_layers():
        return _conv_layer(host(w), host(b), stride, padding).forward(to_device(x))


def reference_conv2d_backward(x: Any, w: Any, dout: Any, stride: int = 1, padding: int = 0) -> Tuple[Any, Any, Any]:
    with reference_layers():
        layer = _conv_layer(host(w), np.zeros(w.shape[0]), stride, padding)
        layer.forward(to_device(x))
        dx = layer.backward(to_device(dout))
        return dx, layer.weight.grad, layer.bias.grad


def check_im2col(im2col: Callable) -> Callable:
    """``im2col(x, kh, kw, stride, padding) -> (N, C*kh*kw, Hout*Wout)``, row c*kh*kw + i*kw + j."""
    def run(fn: Callable) -> List[float]:
        rng, errors = _rng(), []
        for (k, s, p), shape in CONV_CASES_AND_SHAPES:
            x = rng.standard_normal(shape)
            kh, kw = _hw(k)
            case = f"kernel {kh}x{kw}, stride {s}, padding {p}, x {shape}"
            expected = host(reference_im2col(x, kh, kw, s, p))
            ho, wo = (shape[2] + 2 * p - kh) // s + 1, (shape[3] + 2 * p - kw) // s + 1
            unstrided = host(reference_im2col(x, kh, kw, 1, p)).reshape(shape[0], -1, x.shape[2] + 2 * p - kh + 1,
                                                                        x.shape[3] + 2 * p - kw + 1)
            known = [(reference_im2col(x, kh, kw, 1, p), "right for stride 1 only: each slice steps by the stride (i:i + stride*Hout:stride)"),
                     (unstrided[:, :, :ho, :wo].reshape(expected.shape) if s > 1 else None,
                      "your slices take Hout consecutive rows: they must step by the stride (i:i + stride*Hout:stride)"),
                     (reference_im2col(x, kh, kw, s, 0) if p else None, "the padding is missing: pad x by `padding` zeros on each side of H and W first")]
            errors.append(compare("cols", call_leaving_inputs(fn, x, kh, kw, s, p), expected, "tinyunet.nn.conv.im2col",
                                  known, case))
        x32 = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
        cols32 = np.asarray(to_host(fn(x32, 3, 3, 1, 1)))
        if cols32.dtype != np.float32:
            raise Mismatch(f"cols of a float32 x are {cols32.dtype}", "keep the dtype you are given "
                           "(np.zeros(..., dtype=x.dtype)): training runs in float32, and a float64 copy doubles "
                           "the memory and the time")
        return errors
    return verdict("im2col", im2col, reference_im2col, run, "tinyunet.nn.conv.im2col")


def check_conv2d_forward(conv2d: Callable) -> Callable:
    """``conv2d(x, w, b, stride, padding) -> (N, Cout, Hout, Wout)``."""
    from tinyunet.nn import naive

    def run(fn: Callable) -> List[float]:
        rng, errors = _rng(), []
        for (k, s, p), shape in CONV_CASES_AND_SHAPES:
            cout = 4 if shape[1] == 3 else 5
            x, w, b = rng.standard_normal(shape), rng.standard_normal((cout, shape[1], *_hw(k))), rng.standard_normal(cout)
            expected = reference_conv2d_forward(x, w, b, s, p)
            known = [(host(expected) - b.reshape(1, -1, 1, 1), "the bias is missing: add b[o] to every position of output channel o"),
                     (reference_conv2d_forward(x, w[:, :, ::-1, ::-1].copy(), b, s, p), "the kernel is flipped: deep learning's convolution does not flip it")]
            case = f"kernel {k}, stride {s}, padding {p}, x {shape}, {cout} output channels"
            errors.append(compare("out", call_leaving_inputs(fn, x, w, b, s, p), expected, "Conv2d.forward", known, case))
            errors.append(compare("out", fn(x, w, b, s, p), naive.conv2d(x, w, b, s, p), "naive.conv2d (loops)", (), case))
        return errors
    return verdict("conv2d_forward", conv2d, reference_conv2d_forward, run, "Conv2d.forward and the loops")


def check_col2im(col2im: Callable) -> Callable:
    """``col2im(cols, x_shape, kh, kw, stride, padding) -> (N, C, H, W)``: im2col's adjoint."""
    def run(fn: Callable) -> List[float]:
        rng, errors = _rng(), []
        for (k, s, p), shape in CONV_CASES_AND_SHAPES:
            kh, kw = _hw(k)
            cols = rng.standard_normal(reference_im2col(np.zeros(shape), kh, kw, s, p).shape)
            if (k, s, p) == CONV_CASES[0] and shape == CONV_SHAPES[1]:   # one float32 case: the image stays float32
                cols = cols.astype(np.float32)
            x = rng.standard_normal(shape)
            expected = reference_col2im(cols, shape, kh, kw, s, p)
            case = f"kernel {kh}x{kw}, stride {s}, padding {p}, x {shape}, {cols.dtype} cols"
            image = call_leaving_inputs(fn, cols, shape, kh, kw, s, p)
            if image is not None and np.asarray(to_host(image)).dtype != cols.dtype:
                raise Mismatch(f"image, {case}: dtype {np.asarray(to_host(image)).dtype} for {cols.dtype} cols",
                               "keep the dtype you are given (np.zeros(..., dtype=cols.dtype)): a float32 buffer "
                               "rounds a float64 gradient check's numbers to 7 digits, and a float64 one doubles "
                               "the memory and the time of float32 training")
            errors.append(compare("image", image, expected, "tinyunet.nn.conv.col2im",
                                  [(_col2im_assigning(cols, shape, (kh, kw), s, p),
                                    "where patches overlap the values must add up (+=), not overwrite each other (=)")], case))
            # the adjoint identity <im2col(x), cols> = <x, col2im(cols)>, independent of the package's col2im
            lhs, rhs = float((host(reference_im2col(x, kh, kw, s, p)) * cols).sum()), float((x * host(image)).sum())
            errors.append(compare("<x, col2im(cols)>", np.array(rhs), np.array(lhs), "<im2col(x), cols>", (), case,
                                  tolerance=None if cols.dtype == np.float64 else TOLERANCE))
        return errors
    return verdict("col2im", col2im, reference_col2im, run, "tinyunet.nn.conv.col2im and the adjoint identity")


def _col2im_assigning(cols: np.ndarray, shape: Tuple[int, ...], k: Any, s: int, p: int) -> np.ndarray:
    """col2im with ``=`` instead of ``+=``: the classic mistake."""
    n, c, h, w = shape
    kh, kw = _hw(k)
    ho, wo = (h + 2 * p - kh) // s + 1, (w + 2 * p - kw) // s + 1
    c6 = cols.reshape(n, c, kh, kw, ho, wo)
    out = np.zeros((n, c, h + 2 * p, w + 2 * p))
    for i in range(kh):
        for j in range(kw):
            out[:, :, i:i + s * ho:s, j:j + s * wo:s] = c6[:, :, i, j]
    return out[:, :, p:p + h, p:p + w]


def _gradient_cases(forward: Callable, inputs: Dict[str, np.ndarray],
                    expected: Dict[str, Any], mine: Dict[str, Any], against: str,
                    known: Dict[str, List[Tuple[Any, str]]], case: str) -> List[float]:
    """Compare each of your gradients with the reference layer's and with finite differences of
    ``forward()`` (a scalar L = sum(out * g)) with respect to ``inputs[name]``."""
    errors = []
    for name, value in mine.items():
        errors.append(compare(name, value, expected[name], against, known.get(name, ()), case))
        if name in inputs:
            errors.append(compare(name, value, finite_differences(forward, inputs[name]), "finite differences",
                                  known.get(name, ()), case, tolerance=TOLERANCE))
    return errors


def check_conv2d_backward(conv2d_backward: Callable) -> Callable:
    """``conv2d_backward(x, w, dout, stride, padding) -> (dx, dw, db)``."""
    def run(fn: Callable) -> List[float]:
        rng, errors = _rng(), []
        for k, s, p, (n, c, h, wd), cout in [(3, 1, 1, (2, 3, 5, 4), 4), (3, 2, 1, (2, 3, 5, 4), 4),
                                             (2, 2, 0, (2, 3, 5, 4), 4), ((2, 3), 1, 1, (2, 3, 5, 4), 4),
                                             (3, 1, 1, (3, 2, 4, 5), 5), (3, 3, 1, (2, 3, 5, 4), 4)]:   # other sizes, stride 3
            x, w = rng.standard_normal((n, c, h, wd)), rng.standard_normal((cout, c, *_hw(k)))
            b = np.zeros(cout)
            g = rng.standard_normal(host(reference_conv2d_forward(x, w, b, s, p)).shape)
            dx, dw, db = reference_conv2d_backward(x, w, g, s, p)
            result = call_leaving_inputs(fn, x, w, g, s, p)
            expect_parts(result, 3, "return dx, dw, db")
            g0 = g[:1]
            _, dw0, db0 = reference_conv2d_backward(x[:1], w, g0, s, p)
            known = {"dw": [(dw0, "your dw is the first image's alone: the weight is shared by every image, sum over the batch"),
                            (host(dw) / n, "your dw is divided by the batch size: sum over the batch, do not average")],
                     "db": [(db0, "your db is the first image's alone: sum dout over the batch too (axes 0, 2, 3)"),
                            (host(db) / n, "your db is averaged over the batch: sum dout over axes 0, 2, 3"),
                            (g.mean(axis=(0, 2, 3)), "your db is a mean: sum dout over axes 0, 2, 3")],
                     "dx": [(_col2im_assigning(np.einsum("ok,nop->nkp", w.reshape(cout, -1), g.reshape(n, cout, -1)), x.shape, k, s, p),
                             "col2im must add (+=) where patches overlap")]}
            forward = lambda: float((host(reference_conv2d_forward(x, w, b, s, p)) * g).sum())
            errors += _gradient_cases(forward, {"dx": x, "dw": w}, {"dx": dx, "dw": dw, "db": db},
                                      dict(zip(("dx", "dw", "db"), result)), "Conv2d.backward", known,
                                      f"kernel {_hw(k)[0]}x{_hw(k)[1]}, stride {s}, padding {p}, x {x.shape}, {cout} output channels")
        return errors
    return verdict("conv2d_backward", conv2d_backward, reference_conv2d_backward, run,
                   "Conv2d.backward and finite differences")


# --- max-pooling --------------------------------------------------------------------------------------

def reference_maxpool2x2_forward(x: Any) -> Tuple[Any, Any]:
    """(out, argmax): argmax = which of the 4 window positions (row-major) won, as in the lesson."""
    n, c, h, w = x.shape
    windows = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
    return windows.max(axis=-1), windows.argmax(axis=-1)


def reference_maxpool2x2_backward(dout: Any, argmax: Any) -> Any:
    n, c, ho, wo = dout.shape
    d = (argmax[..., None] == np.arange(4)) * dout[..., None]
    return d.reshape(n, c, ho, wo, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, 2 * ho, 2 * wo)


def _distinct(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Values 0.01 apart, shuffled: no ties, so no kinks for finite differences."""
    return rng.permutation(int(np.prod(shape))).reshape(shape) * 0.01


def _maxpool_layer_backward(x: np.ndarray, g: np.ndarray) -> Tuple[Any, Any]:
    from tinyunet.nn import MaxPool2d

    with reference_layers():
        pool = MaxPool2d(2)
        out = pool.forward(to_device(x))
        return out, pool.backward(to_device(g))


def check_maxpool_forward(maxpool2x2_forward: Callable) -> Callable:
    """``maxpool2x2_forward(x) -> (out, argmax)``; out is compared with MaxPool2d(2)."""
    def run(fn: Callable) -> List[float]:
        rng, errors = _rng(), []
        for shape in [(2, 3, 4, 6), (1, 2, 8, 8)]:
            x = _distinct(rng, *shape)
            x = x - x.mean()      # half of the values negative, and every window of the last image below -20:
            x[-1] -= x.max() + 20   # a max that starts from 0 (or from any "small enough" number) shows
            result = call_leaving_inputs(fn, x)
            expect_parts(result, 2, "return the pooled array and the argmax (which position won)")
            expected, _ = _maxpool_layer_backward(x, np.zeros((shape[0], shape[1], shape[2] // 2, shape[3] // 2)))
            errors.append(compare("out", result[0], expected, "MaxPool2d(2).forward",
                                  [(x.reshape(*shape[:2], shape[2] // 2, 2, shape[3] // 2, 2).mean(axis=(3, 5)),
                                    "that is the mean of each window: take the max"),
                                   (x[:, :, ::2, ::2], "that is each window's top-left value: take the max over the window")],
                                  f"input {shape}"))
            ones, argmax = np.ones(expected.shape), np.asarray(result[1])
            if argmax.shape != expected.shape:
                raise Mismatch(f"argmax, input {shape}: shape {argmax.shape}, the right one {expected.shape}",
                               "one integer per output value: which of the window's 4 values won (0..3, row by row); "
                               "a mask of every maximum would give the gradient to all tied maxima")
            if np.asarray(result[1]).dtype.kind not in "iu":
                raise Mismatch(f"argmax, input {shape}: dtype {np.asarray(result[1]).dtype}",
                               "the argmax numbers positions: an integer array (np.argmax gives one; np.where(..., k, "
                               "argmax) keeps the dtype argmax started with: start from np.zeros(..., dtype=int))")
            try:
                errors.append(compare("dx routed by your argmax", reference_maxpool2x2_backward(ones, argmax),
                                      _maxpool_layer_backward(x, ones)[1], "MaxPool2d(2).backward", [], f"input {shape}"))
            except Mismatch as failure:
                raise Mismatch(str(failure), "your out is right but your argmax points at other positions: take it over "
                               "the window's 4 values, numbered 0..3 row by row (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right)")
        # ties (ReLU outputs are full of zeros): the first maximum wins, as argmax and PyTorch do
        # and windows whose first maximum row by row is not the first column by column
        tie = np.array([[[2, 2], [1, 0]], [[0, 0], [0, 0]], [[0, 2], [2, 1]], [[1, 2], [0, 2]]], dtype=np.float64)
        result = fn(tie[:, None])       # 4 images of one 2x2 window each
        errors.append(compare("argmax of a tied window", np.asarray(result[1]).reshape(-1), np.array([0, 0, 1, 1]),
                              "the first maximum, row by row",
                              [(np.array([1, 3, 2, 3]), "on a tie your argmax takes the last maximum: take the first "
                                                        "(np.argmax does)"),
                               (np.array([0, 0, 2, 1]), "on a tie your argmax takes the first maximum column by column: "
                                                        "number the window's values row by row (0 top-left, 1 "
                                                        "top-right, 2 bottom-left, 3 bottom-right)")],
                              "windows [[2, 2], [1, 0]], zeros, [[0, 2], [2, 1]], [[1, 2], [0, 2]]"))
        return errors
    return verdict("maxpool2x2_forward", maxpool2x2_forward, reference_maxpool2x2_forward, run, "MaxPool2d(2)")


def check_maxpool_backward(maxpool2x2_backward: Callable, maxpool2x2_forward: Callable) -> Callable:
    """``maxpool2x2_backward(dout, argmax) -> dx``, with the argmax your forward returned."""
    def run(fn: Callable) -> List[float]:
        rng, errors = _rng(), []
        for shape in [(2, 3, 4, 6), (1, 2, 8, 8)]:
            x = _distinct(rng, *shape)
            g = rng.standard_normal((shape[0], shape[1], shape[2] // 2, shape[3] // 2))
            _, expected = _maxpool_layer_backward(x, g)
            spread = np.repeat(np.repeat(g, 2, axis=2), 2, axis=3)
            known = {"dx": [(spread, "every input got its window's gradient: only the winner (the argmax) gets it"),
                            (spread / 4, "that is average pooling's gradient: only the winner gets dout, unscaled")]}
            forward = lambda: float((host(reference_maxpool2x2_forward(x)[0]) * g).sum())
            argmax = maxpool2x2_forward(x)[1]
            maxpool2x2_forward(-x)        # another layer's forward in between: the backward uses the argmax it is given
            errors += _gradient_cases(forward, {"dx": x}, {"dx": expected},
                                      {"dx": call_leaving_inputs(fn, g, argmax)}, "MaxPool2d(2).backward", known,
                                      f"input {shape}")
        x = np.maximum(np.round(rng.standard_normal((2, 3, 4, 6))), 0)      # ReLU-like: many tied zeros
        g = rng.standard_normal((2, 3, 2, 3))
        _, expected = _maxpool_layer_backward(x, g)
        win = x.reshape(2, 3, 2, 2, 3, 2).transpose(0, 1, 2, 4, 3, 5).reshape(2, 3, 2, 3, 4)
        mask = win == win.max(-1, keepdims=True)
        all_tied = (mask * g[..., None]).reshape(2, 3, 2, 3, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(x.shape)
        split = (mask * g[..., None] / mask.sum(-1, keepdims=True)).reshape(2, 3, 2, 3, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(x.shape)
        errors.append(compare("dx", call_leaving_inputs(fn, g, maxpool2x2_forward(x)[1]), expected, "MaxPool2d(2).backward",
                              [(all_tied, "on a tie every maximum got the gradient: only the first one (the argmax) gets it"),
                               (split, "on a tie the gradient is split between the maxima: the first one (the argmax) gets all of it")],
                              "input with tied maxima (ReLU zeros)"))
        return errors
    return verdict("maxpool2x2_backward", maxpool2x2_backward, reference_maxpool2x2_backward, run,
                   "MaxPool2d(2).backward and finite differences")


# --- transposed convolution -----------------------------------------------------------------------------

UPCONV_CASES = [((2, 2), 2, 0), ((3, 3), 2, 1), ((3, 3), 1, 0), ((4, 4), 3, 1), ((2, 3), 2, 0),
                ((2, 2), 3, 0)]  # kernel, stride, padding (the last: gaps between the stamps)


def _upconv_layer(w: np.ndarray, b: np.ndarray, stride: int, padding: int) -> Any:
    from tinyunet.nn import ConvTranspose2d

    layer = ConvTranspose2d(w.shape[0], w.shape[1], w.shape[2:], stride=stride, padding=padding).double()
    layer.weight.data[...] = to_device(w)
    layer.bias.data[...] = to_device(b)
    return layer


def reference_conv_transpose_forward(x: Any, w: Any, b: Any, stride: int = 1, padding: int = 0) -> Any:
    with reference_layers():
        return _upconv_layer(host(w), host(b), stride, padding).forward(to_device(x))


def reference_conv_transpose_backward(x: Any, w: Any, dout: Any, stride: int = 1, padding: int = 0) -> Tuple[Any, Any, Any]:
    with reference_layers():
        layer = _upconv_layer(host(w), np.zeros(w.shape[1]), stride, padding)
        layer.forward(to_device(x))
        dx = layer.backward(to_device(dout))
        return dx, layer.weight.grad, layer.bias.grad


def check_conv_transpose_forward(conv_transpose: Callable) -> Callable:
    """``conv_transpose(x, w, b, stride, padding)``, w: (Cin, Cout, kh, kw)."""
    from tinyunet.nn import naive

    def run(fn: Callable) -> List[float]:
        rng, errors = _rng(), []
        for k, s, p in UPCONV_CASES:
            x, w, b = rng.standard_normal((2, 4, 3, 5)), rng.standard_normal((4, 3, *k)), rng.standard_normal(3)
            expected = reference_conv_transpose_forward(x, w, b, s, p)
            case = f"kernel {k}, stride {s}, padding {p}"
            known = [(host(expected) - b.reshape(1, -1, 1, 1), "the bias is missing"),
                     (reference_conv_transpose_forward(x, w[:, :, ::-1, ::-1], b, s, p),
                      "the kernel is flipped: a transposed convolution stamps w as it is (w[..., ::-1, ::-1] is wrong)")]
            errors.append(compare("out", call_leaving_inputs(fn, x, w, b, s, p), expected, "ConvTranspose2d.forward", known, case))
            errors.append(compare("out", fn(x, w, b, s, p), naive.conv_transpose2d(x, w, b, s, p),
                                  "naive.conv_transpose2d (loops)", (), case))
        return errors
    return verdict("conv_transpose_forward", conv_transpose, reference_conv_transpose_forward, run,
                   "ConvTranspose2d.forward and the loops")


def check_conv_transpose_backward(conv_transpose_backward: Callable) -> Callable:
    """``conv_transpose_backward(x, w, dout, stride, padding) -> (dx, dw, db)``."""
    def run(fn: Callable) -> List[float]:
        rng, errors = _rng(), []
        for (k, s, p), n in zip(UPCONV_CASES, [2, 2, 2, 3, 2, 2]):   # every case, and a batch of 3
            x, w = rng.standard_normal((n, 3, 3, 4)), rng.standard_normal((3, 2, *k))
            b = np.zeros(2)
            g = rng.standard_normal(host(reference_conv_transpose_forward(x, w, b, s, p)).shape)
            dx, dw, db = reference_conv_transpose_backward(x, w, g, s, p)
            result = call_leaving_inputs(fn, x, w, g, s, p)
            expect_parts(result, 3, "return dx, dw, db")
            _, dw0, db0 = reference_conv_transpose_backward(x[:1], w, g[:1], s, p)
            averaged = "you averaged over the batch: the loss adds every image's term, so sum instead"
            known = {"dw": [(dw0, "your dw is the first image's alone: sum over the batch"), (host(dw) / n, averaged),
                            (host(dw)[:, :, ::-1, ::-1], "your dw is flipped in space: the stamp's offset (i, j) pairs "
                                                         "x with dout at y*stride + i - padding, no flip")],
                     "db": [(db0, "your db is the first image's alone: sum over the batch too"), (host(db) / n, averaged)]}
            forward = lambda: float((host(reference_conv_transpose_forward(x, w, b, s, p)) * g).sum())
            errors += _gradient_cases(forward, {"dx": x, "dw": w}, {"dx": dx, "dw": dw, "db": db},
                                      dict(zip(("dx", "dw", "db"), result)), "ConvTranspose2d.backward", known,
                                      f"kernel {k}, stride {s}, padding {p}")
        return errors
    return verdict("conv_transpose_backward", conv_transpose_backward, reference_conv_transpose_backward, run,
                   "ConvTranspose2d.backward and finite differences")


# --- concat and the skip's fork -------------------------------------------------------------------------

def reference_concat_backward(dout: Any, ca: int) -> Tuple[Any, Any]:
    from tinyunet.nn import Concat

    cat = Concat(axis=1)
    cat.sizes = (ca, dout.shape[1] - ca)
    return cat.backward(dout)


def check_concat_backward(concat_backward: Callable) -> Callable:
    """``concat_backward(dout, ca) -> (da, db)`` for ``out = concat([a, b], axis=1)``, a with ca channels."""
    def run(fn: Callable) -> List[float]:
        rng, errors = _rng(), []
        for ca, cb in [(2, 3), (4, 1), (1, 5), (3, 7)]:
            a, b = rng.standard_normal((2, ca, 3, 4)), rng.standard_normal((2, cb, 3, 4))
            g = rng.standard_normal((2, ca + cb, 3, 4))
            result = call_leaving_inputs(fn, g, ca)
            expect_parts(result, 2, "return da, db")
            da, db = reference_concat_backward(g, ca)
            forward = lambda: float((np.concatenate([a, b], axis=1) * g).sum())
            known = {"da": [(g[:, cb:], "the two halves are swapped: a came first, so it gets the first ca channels")]}
            errors += _gradient_cases(forward, {"da": a, "db": b}, {"da": da, "db": db},
                                      dict(zip(("da", "db"), result)), "Concat.backward", known, f"{ca} + {cb} channels")
        return errors
    return verdict("concat_backward", concat_backward, reference_concat_backward, run,
                   "Concat.backward and finite differences")


def check_skip_backward(backward: Callable, forward: Callable, layers: Sequence[Any]) -> Callable:
    """The mini U-Net of the skip-connection lesson: ``backward(dout) -> dx`` after ``forward(x)``,
    with ``layers = (conv1, pool, conv2, up, cat, conv3)``; checks dx and every weight's gradient."""
    conv1, pool, conv2, up, cat, conv3 = layers

    def reference(dout: Any, use_skip_gradient: bool = True) -> Any:
        dd, ds_skip = cat.backward(conv3.backward(dout))
        ds_down = pool.backward(conv2.backward(up.backward(dd)))
        return conv1.backward(ds_down + ds_skip if use_skip_gradient else ds_down)

    def swapped(dout: Any) -> Any:   # cat.backward's two gradients taken in the wrong order
        ds_skip, dd = cat.backward(conv3.backward(dout))
        ds_down = pool.backward(conv2.backward(up.backward(dd)))
        return conv1.backward(ds_down + ds_skip)

    learnable = {"conv1.weight": conv1.weight, "conv2.weight": conv2.weight, "up.weight": up.weight,
                 "conv3.weight": conv3.weight}

    def gradients(fn: Callable, x: np.ndarray, g: np.ndarray) -> Dict[str, np.ndarray]:
        """dx, and what fn's backward added to each weight's gradient (the weights come with gradients of an
        earlier batch: backward adds into .grad, as gradient accumulation needs)."""
        stale = {name: np.full(p.grad.shape, 0.5) for name, p in learnable.items()}
        for name, p in learnable.items():
            p.grad[...] = to_device(stale[name].astype(p.grad.dtype))
        forward(x)
        dx = fn(g)
        return {"dx": dx, **{name: host(p.grad) - stale[name] for name, p in learnable.items()}}

    def run(fn: Callable) -> List[float]:
        rng = _rng()
        x, g = rng.standard_normal((2, conv1.in_channels, 6, 6)), rng.standard_normal((2, conv3.out_channels, 6, 6))
        with reference_layers():
            expected = gradients(reference, x, g)
            forgot = gradients(lambda d: reference(d, use_skip_gradient=False), x, g)
            crossed = gradients(swapped, x, g) if conv3.in_channels == 2 * conv1.out_channels else {}
            mine = gradients(fn, x, g)
            mine_forgetting = gradients(lambda d: fn(d, use_skip_gradient=False), x, g)
            f = lambda: float((host(forward(x)) * g).sum())
            numeric = {"dx": finite_differences(f, x), "conv1.weight": finite_differences(f, conv1.weight.data)}
        hint = "the skip feeds two places (the pool and the concat): add both gradients before conv1.backward (the fork)"
        order = "cat.backward returns the gradients in the order cat.forward took its inputs: (dd, ds) for cat.forward(d, s)"
        errors = []
        zeroed = ("your backward cleared the gradients the weights came with: a backward adds into .grad "
                  "(gradients accumulate, lesson 02); clearing them is the training loop's zero_grad, before the step")
        for name in ["conv3.weight", "up.weight", "conv2.weight", "conv1.weight", "dx"]:
            known = [(forgot[name], hint), (crossed.get(name), order),
                     (expected[name] - 0.5 if name != "dx" else None, zeroed)]
            errors.append(compare(name, mine[name], expected[name], "the reference wiring", known))
            if name in numeric:
                errors.append(compare(name, mine[name], numeric[name], "finite differences", known, tolerance=TOLERANCE))
        # the lesson shows the bug with use_skip_gradient=False: that must leave out the concat's gradient of s
        errors.append(compare("dx", mine_forgetting["dx"], forgot["dx"], "the reference wiring without the skip's gradient",
                              [(expected["dx"], "with use_skip_gradient=False, leave out the concat's gradient of s "
                                                "(the lesson uses it to show what forgetting it does)")],
                              "use_skip_gradient=False"))
        return errors
    return verdict("backward (mini U-Net)", backward, reference, run, "the reference wiring and finite differences")


# --- ReLU, BatchNorm, softmax cross-entropy ---------------------------------------------------------------

def reference_relu_backward(dout: Any, mask: Any) -> Any:
    return dout * mask


def check_relu_backward(relu_backward: Callable, relu_forward: Callable) -> Callable:
    """``relu_backward(dout, mask) -> dx``, with the mask your ``relu_forward(x) -> (out, mask)`` kept."""
    from tinyunet.nn import ReLU

    def run(fn: Callable) -> List[float]:
        rng = _rng()
        # away from the kink by more than the finite differences' step, some very close to it
        x = rng.uniform(0.1, 1.0, (2, 3, 4, 5)) * rng.choice([-1.0, 1.0], (2, 3, 4, 5))
        x[:, :, 1] *= 0.01
        g = rng.standard_normal(x.shape)
        with reference_layers():
            relu = ReLU()
            relu.forward(to_device(x))
            expected = relu.backward(to_device(g))
        known = {"dx": [(g * (x < 0), "the mask is reversed: the gradient passes where x > 0"),
                        (np.maximum(g, 0), "that is relu(dout): the mask comes from the *input*, not from dout")]}
        forward = lambda: float((np.maximum(x, 0) * g).sum())
        mask = relu_forward(x)[1]
        relu_forward(-x)                  # another layer's forward in between: the backward uses the mask it is given
        errors = _gradient_cases(forward, {"dx": x}, {"dx": expected},
                                 {"dx": call_leaving_inputs(fn, g, mask)}, "ReLU.backward", known, "")
        x0 = x.copy()
        x0[:, :, 0] = 0.0        # exactly at the kink: no derivative there, the text's choice is 0
        with reference_layers():
            relu = ReLU()
            relu.forward(to_device(x0))
            expected0 = relu.backward(to_device(g))
        errors.append(compare("dx", call_leaving_inputs(fn, g, relu_forward(x0)[1]), expected0, "ReLU.backward",
                              [(g * (x0 >= 0), "at x = 0 exactly the gradient is 0 (the text's choice, and PyTorch's): "
                                               "the mask is x > 0, not x >= 0")], "inputs exactly 0"))
        return errors
    return verdict("relu_backward", relu_backward, reference_relu_backward, run, "ReLU.backward and finite differences")


def _bn_reference(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, g: np.ndarray,
                  eps: float = 1e-5) -> Tuple[Any, Any, Any, Any]:
    from tinyunet.nn import BatchNorm2d

    with reference_layers():
        bn = BatchNorm2d(x.shape[1], eps=eps).double()
        bn.weight.data[...], bn.bias.data[...] = to_device(gamma), to_device(beta)
        out = bn.forward(to_device(x))
        dx = bn.backward(to_device(g))
        return out, dx, bn.weight.grad, bn.bias.grad


def _bn_slips(x: np.ndarray, gamma: np.ndarray, g: np.ndarray) -> List[Tuple[Any, str]]:
    """dx with one of the derivation's terms left out, each with its hint."""
    axes, c = (0, 2, 3), lambda v: v.reshape(1, -1, 1, 1)
    m = x.size // x.shape[1]
    xc = x - c(x.mean(axis=axes))
    s = 1 / np.sqrt((xc ** 2).mean(axis=axes) + 1e-5)
    dxhat = c(gamma) * g
    dvar_term = c(-0.5 * s ** 3 * (dxhat * xc).sum(axis=axes)) * 2 * xc / m
    dmu_term = c(-s * dxhat.sum(axis=axes)) / m
    direct = dxhat * c(s)
    return [(direct, "that is eval mode's dx: in train mode the mean and the variance depend on x too (their two terms are missing)"),
            (direct + dmu_term, "the variance's term (step 2, dσ²) is missing from dx"),
            (direct + dvar_term, "the mean's term (step 3, dμ) is missing from dx")]


def reference_bn_backward(dy: Any, cache: Any) -> Tuple[Any, Any, Any]:
    """BatchNorm's backward from the lesson's cache (x, mu, var, s, xhat, gamma): the one-line formula, with
    the cache's s (so its eps) and xhat."""
    x, _, _, s, xhat, gamma = cache
    m = x.size // x.shape[1]
    c = lambda v: v.reshape(1, -1, 1, 1)
    dbeta, dgamma = dy.sum(axis=(0, 2, 3)), (dy * xhat).sum(axis=(0, 2, 3))
    return c(gamma * s / m) * (m * dy - c(dbeta) - xhat * c(dgamma)), dgamma, dbeta


def reference_bn_forward(x: Any, gamma: Any, beta: Any, eps: float = 1e-5) -> Tuple[Any, Any]:
    """BatchNorm's forward in train mode with the lesson's cache (x, mu, var, s, xhat, gamma)."""
    c = lambda v: v.reshape(1, -1, 1, 1)
    mu = x.mean(axis=(0, 2, 3))
    var = ((x - c(mu)) ** 2).mean(axis=(0, 2, 3))
    s = 1 / np.sqrt(var + eps)
    xhat = (x - c(mu)) * c(s)
    return c(gamma) * xhat + c(beta), (x, mu, var, s, xhat, gamma)


def check_bn_backward(bn_backward: Callable, bn_forward: Callable) -> Callable:
    """``bn_backward(dy, cache) -> (dx, dgamma, dbeta)`` with the cache of your ``bn_forward(x, gamma, beta)``."""
    def run(fn: Callable) -> List[float]:
        rng, errors = _rng(), []
        # the second input's variance (~0.0025) is small enough that a missing eps shows (by ~0.2%)
        # the third input with another eps: a backward that recomputes s with 1e-5 instead of the cache's fails
        for shape, scale, eps in [((4, 3, 3, 2), 3.0, 1e-5), ((2, 2, 5, 5), 0.05, 1e-5), ((3, 2, 2, 3), 0.01, 1e-3)]:
            x = rng.standard_normal(shape) * scale + 1
            gamma, beta, g = rng.standard_normal(shape[1]), rng.standard_normal(shape[1]), rng.standard_normal(shape)
            _, dx, dgamma, dbeta = _bn_reference(x, gamma, beta, g, eps)
            known = {"dx": _bn_slips(x, gamma, g) + [(_bn_reference(x, gamma, beta, g, eps=0.0)[1],
                                                      "eps is missing: s = 1/sqrt(var + eps), take it from the cache")],
                     "dgamma": [(dbeta, "dgamma and dbeta are swapped: return dx, dgamma, dbeta")],
                     "dbeta": [(dgamma, "dgamma and dbeta are swapped: return dx, dgamma, dbeta")]}
            forward = lambda: float((host(_bn_reference(x, gamma, beta, np.zeros(shape), eps)[0]) * g).sum())
            scored = lambda result: _gradient_cases(forward, {"dx": x, "dgamma": gamma, "dbeta": beta},
                                                    {"dx": dx, "dgamma": dgamma, "dbeta": dbeta},
                                                    dict(zip(("dx", "dgamma", "dbeta"), result)),
                                                    "BatchNorm2d.backward", known, f"input {shape}, eps {eps:g}")
            cache = bn_forward(x, gamma, beta, eps)[1]
            bn_forward(x * 2 + 1, gamma, beta, eps)     # another layer's forward in between: its own cache
            result = call_leaving_inputs(fn, g, cache)
            expect_parts(result, 3, "return dx, dgamma, dbeta")
            try:
                errors += scored(result)
            except Mismatch as failure:
                if bn_forward is reference_bn_forward:
                    raise
                try:   # is it the forward's cache?
                    scored(fn(g.copy(), reference_bn_forward(x, gamma, beta, eps)[1]))
                except Exception:
                    raise failure
                raise Mismatch(f"input {shape}: your backward is right with the cache of the text's forward and wrong "
                               "with your bn_forward's",
                               "look at your bn_forward: var is the mean of (x - mu)**2 over N, H, W (no -1), s = "
                               "1 / sqrt(var + eps), xhat = (x - mu) * s, and the cache is (x, mu, var, s, xhat, "
                               "gamma)") from failure
        return errors
    return verdict("bn_backward", bn_backward, reference_bn_backward, run, "BatchNorm2d.backward and finite differences")


def reference_softmax_ce_backward(probs: Any, target: Any) -> Any:
    onehot = np.arange(probs.shape[1]).reshape(1, -1, 1, 1) == target[:, None]
    return (probs - onehot) / target.size


def check_softmax_ce_backward(softmax_ce_backward: Callable, softmax_ce_forward: Callable) -> Callable:
    """``softmax_ce_backward(probs, target) -> dlogits`` with the probabilities of your
    ``softmax_ce_forward(logits, target) -> (loss, probs)``."""
    from tinyunet.losses import CrossEntropyLoss

    def run(fn: Callable) -> List[float]:
        rng, errors = _rng(), []
        for shape in [(2, 3, 4, 5), (1, 4, 3, 3)]:
            logits = rng.standard_normal(shape)
            target = rng.integers(0, shape[1], (shape[0],) + shape[2:])
            ce = CrossEntropyLoss()
            ce.forward(to_device(logits), to_device(target))
            expected = host(ce.backward())
            pixels = target.size
            known = {"dlogits": [(expected * pixels, "not averaged: the loss is the mean over the N*H*W pixels, divide by their number"),
                                 (-expected, "the sign is flipped: the gradient is p - onehot(y)"),
                                 (expected * pixels / shape[0], "divided by the N images: the mean is over the N*H*W pixels"),
                                 (expected / shape[1], "divided by every logit (N*C*H*W): the mean is over the N*H*W pixels, "
                                                       "each with its C classes")]}
            forward = lambda: float(CrossEntropyLoss().forward(to_device(logits), to_device(target)))
            probs = softmax_ce_forward(logits, target)[1]
            softmax_ce_forward(-logits, target)      # another forward in between (a validation batch, say)
            errors += _gradient_cases(forward, {"dlogits": logits}, {"dlogits": expected},
                                      {"dlogits": call_leaving_inputs(fn, probs, target)},
                                      "CrossEntropyLoss.backward", known, f"logits {shape}")
        # your forward too: its loss, and logits large enough that exp overflows unless the max is subtracted
        for scale in (1.0, 1000.0):
            logits = rng.standard_normal((2, 3, 4, 5)) * scale
            target = rng.integers(0, 3, (2, 4, 5))
            loss, probs = softmax_ce_forward(logits, target)
            loss = float(np.asarray(to_host(loss)))
            case = f"your softmax_ce_forward, logits of size {scale:g}"
            if not np.all(np.isfinite(np.asarray(to_host(probs)))) or not np.isfinite(loss):
                raise Mismatch(f"{case}: NaN or inf", "exp(1000) overflows, and a probability that underflows to 0 "
                               "has log(0) = -inf: subtract each pixel's largest logit first (softmax is unchanged by a "
                               "shift) and take the log as log_softmax = z - max - log(sum(exp(z - max))), not log(p)")
            expected_loss = float(CrossEntropyLoss().forward(to_device(logits), to_device(target)))
            errors.append(compare("loss", np.array(loss), np.array(expected_loss), "CrossEntropyLoss.forward",
                                  [(np.array(expected_loss * target.size), "that is the sum over the pixels: the loss "
                                                                          "is their mean")], case))
        return errors
    return verdict("softmax_ce_backward", softmax_ce_backward, reference_softmax_ce_backward, run,
                   "CrossEntropyLoss.backward and finite differences")


# --- the whole U-Net --------------------------------------------------------------------------------------

def reference_unet_backward(model: Any, dlogits: Any) -> Any:
    return model.backward(dlogits)


def check_unet_backward(unet_backward: Callable) -> Callable:
    """``unet_backward(model, dlogits) -> dx`` on a small float64 U-Net (base 2, depth 2, 8x8)."""
    from tinyunet.losses import CrossEntropyLoss
    from tinyunet.models import UNet

    def gradients(fn: Callable, model: Any, x: Any, target: Any) -> Dict[str, np.ndarray]:
        loss = CrossEntropyLoss()
        model.zero_grad()
        loss.forward(model.forward(x), target)
        dx = call_leaving_inputs(fn, model, loss.backward())
        return {"dx": dx, **{name: host(p.grad) for name, p in model.named_parameters()}}

    def forgot_fork(model: Any, d: Any) -> Any:
        for layer in model.input_layers():
            layer.input_grad = True
        d = model.head.backward(d)
        for i in reversed(range(model.depth)):
            d, _ = model.decode_backward(i, d)
        d = model.bottleneck.backward(d)
        for block, pool in zip(reversed(model.down), reversed(model.pool)):
            d = block.backward(pool.backward(d))
        return d

    def run(fn: Callable) -> List[float]:
        rng, errors = _rng(), []
        hint = "every encoder output fed its pool and a concat: add the skip's gradient to the pool's before the block (the fork)"
        for depth, size in [(2, 8), (3, 8)]:     # and another depth than the one written into a loop
            with reference_layers():
                backend.seed(3)
                model = UNet(3, 3, base_channels=2, depth=depth).double()
                x, target = rng.standard_normal((2, 3, size, size)), rng.integers(0, 3, (2, size, size))
                expected = gradients(reference_unet_backward, model, x, target)
                forgot = gradients(forgot_fork, model, x, target)
                mine = gradients(fn, model, x, target)
                loss = CrossEntropyLoss()
                numeric = finite_differences(lambda: float(loss.forward(model.forward(x), target)), x)
            case = f"depth {depth}"
            try:
                for name in [n for n in expected if n != "dx"][::-1] + ["dx"]:   # backward's order: head first
                    errors.append(compare(name, mine[name], expected[name], "UNet.backward", [(forgot[name], hint)], case))
                errors.append(compare("dx", mine["dx"], numeric, "finite differences", [(forgot["dx"], hint)], case,
                                      tolerance=TOLERANCE))
            except Mismatch as failure:
                if failure.hint == BY_HAND:   # the first wrong gradient, in the model's order, says where to look
                    failure.hint = ("the gradient named above is the first wrong one in backward's order (head, "
                                    "decoder, bottleneck, encoder): everything before it is right, so the slip is in "
                                    "that layer's backward call or in the dout you handed it; compare that step of your "
                                    "backward with the forward's, in reverse")
                raise
        return errors
    return verdict("unet_backward", unet_backward, reference_unet_backward, run, "UNet.backward and finite differences")


# --- the data (the Oxford-IIIT Pet lesson) -------------------------------------------------------------------

def reference_trimap_to_labels(trimap: Any) -> np.ndarray:
    from tinyunet.classes import trimap_to_labels

    return trimap_to_labels(trimap)


def check_trimap_to_labels(trimap_to_labels: Callable) -> Callable:
    """``trimap_to_labels(trimap) -> uint8 class ids``: 1, 2, 3 -> 0, 1, 2 (tinyunet.classes); any other
    value raises ValueError."""
    def run(fn: Callable) -> List[float]:
        rng = _rng()
        trimap = rng.integers(1, 4, (5, 7)).astype(np.uint8)
        expected = reference_trimap_to_labels(trimap)
        known = [(trimap.astype(np.int64), "those are the trimap values: the class id is value - 1 (an index into the logits)"),
                 (np.choose(trimap - 1, [1, 0, 2]), "pet and background are swapped: trimap 1 is the pet (class 0)")]
        labels = call_leaving_inputs(fn, trimap)
        errors = [compare("labels", labels, expected, "tinyunet.classes.trimap_to_labels", known, "a 5x7 trimap")]
        if np.asarray(labels).dtype != np.uint8:
            raise Mismatch(f"labels have dtype {np.asarray(labels).dtype}", "return uint8 class ids (.astype(np.uint8)): the "
                                                                 "cached label arrays hold one byte per pixel")
        for bad in (0, 4, 255):
            broken = trimap.copy()
            broken[2, 3] = bad
            try:
                fn(broken)
            except ValueError as exc:
                if str(bad) not in str(exc):
                    raise Mismatch(f"a trimap holding a {bad}: ValueError({str(exc)!r}) does not name the value",
                                   "say what was found (f\"... found {bad_values}\"): a user with a broken file "
                                   "learns what is in it") from exc
                continue
            raise Mismatch(f"a trimap holding a {bad}: no ValueError",
                           "a value outside {1, 2, 3} is a broken file: raise ValueError (value - 1 would turn "
                           f"{bad} into a class that does not exist)")
        return errors
    return verdict("trimap_to_labels", trimap_to_labels, reference_trimap_to_labels, run,
                   "tinyunet.classes.trimap_to_labels")


def reference_resize_nearest(mask: Any, height: int, width: int) -> np.ndarray:
    """PIL's nearest-neighbour resize, as tinyunet.data.transforms.resize_mask does it (uint8 masks)."""
    from PIL import Image

    return np.asarray(Image.fromarray(np.asarray(mask, dtype=np.uint8)).resize((width, height), Image.NEAREST))


RESIZE_CASES = [((37, 29), (16, 11)), ((5, 7), (13, 17)), ((7, 9), (7, 9)), ((11, 3), (1, 2)), ((3, 5), (6, 10)),
                ((8, 6), (4, 3)), ((10, 9), (5, 3))]
"""(H, W) -> (height, width). An output pixel's centre, at (i + 1/2) H / height, falls exactly on the border
between two input pixels only in the shrinks by a whole factor (8 -> 4, 10 -> 5): there the scale is exact
in floating point and Pillow, like floor, takes the lower-right pixel. Elsewhere the input sides are odd,
so that no centre falls on a border (where, with an inexact scale, Pillow's rounding can go either way)."""


def check_resize_nearest(resize_nearest: Callable) -> Callable:
    """``resize_nearest(mask, height, width) -> (height, width)``: every output pixel takes the input
    pixel under its centre; against PIL's NEAREST on shrinking (also by exactly 2 and 3), growing, unchanged
    and 1-pixel sizes."""
    def by_index(mask: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return mask[np.clip(rows, 0, mask.shape[0] - 1)[:, None], np.clip(cols, 0, mask.shape[1] - 1)[None, :]]

    def run(fn: Callable) -> List[float]:
        rng, errors = _rng(), []
        for (H, W), (h, w) in RESIZE_CASES:
            mask = rng.choice(np.array([0, 3, 7], dtype=np.uint8), (H, W))   # ids whose averages are no ids
            i, j = np.arange(h), np.arange(w)
            # the tie slip first: at a shrink by 2 it gives what the corner rule gives
            known = [(by_index(mask, np.ceil((i + 0.5) * H / h).astype(int) - 1, np.ceil((j + 0.5) * W / w).astype(int) - 1),
                      "a centre exactly on the border between two input pixels (a shrink by 2: 8 -> 4) belongs to the "
                      "lower-right one, floor((i + 1/2) * H / height); ceil(x) - 1 or round(x - 1/2) take the upper-left"),
                     (by_index(mask, i * H // h, j * W // w),
                      "that is the input pixel under the output pixel's top-left corner (i * H // height): the mask "
                      "moves by half a pixel; take the one under its centre, (i + 1/2) * H / height"),
                     (by_index(mask, np.round((i + 0.5) * H / h).astype(int), np.round((j + 0.5) * W / w).astype(int)),
                      "round() picks the nearer pixel *border*: the pixel that holds the centre is floor((i + 1/2) * H / height)")]
            result = call_leaving_inputs(fn, mask, h, w)
            case = f"{H}x{W} -> {h}x{w}"
            if result is not None and not isinstance(result, np.ndarray):
                raise Mismatch(f"{case}: your function returned a {type(result).__name__}", "return a NumPy array")
            invented = np.setdiff1d(np.unique(np.asarray(result)), np.unique(mask)) if result is not None else []
            if len(invented):
                raise Mismatch(f"{case}: your mask holds {invented[:3]}, values the input does not hold",
                               "a class id must be copied from one input pixel, never averaged or interpolated")
            errors.append(compare("mask", result, reference_resize_nearest(mask, h, w), "PIL's NEAREST", known, case))
            if np.asarray(result).dtype != mask.dtype:
                raise Mismatch(f"{case}: your mask has dtype {np.asarray(result).dtype}, the input {mask.dtype}",
                               "copy the class ids, do not compute with them: index the mask with integer arrays")
        return errors
    return verdict("resize_nearest", resize_nearest, reference_resize_nearest, run, "PIL's NEAREST")


# --- the GPU lesson ------------------------------------------------------------------------------------------

def reference_pixel_accuracy(model: Any, batches: Any) -> float:
    """The fraction of pixels labelled right over all (x, y) host batches: each batch copied to the device
    once, the counts kept there, one number back to the host at the end."""
    model.eval()
    correct, total = 0, 0
    for x, y in batches:
        x, y = to_device(x), to_device(y)
        correct = correct + (model.forward(x).argmax(axis=1) == y).sum()
        total += y.size
    return float(correct) / total


@contextlib.contextmanager
def on_the_fake_gpu() -> Iterator[Any]:
    """The strict CuPy stand-in (tinyunet/fake_cupy.py) as the array module inside, counters zeroed; the
    backend that was active afterwards. Build models inside, so that their parameters are device arrays."""
    from tinyunet import fake_cupy

    before = backend.name()
    backend.use_module(fake_cupy, "fake-cupy")
    fake_cupy.reset_counters()
    try:
        yield fake_cupy
    finally:
        backend.use(before if before in ("numpy", "cupy") else "numpy")


def check_pixel_accuracy(pixel_accuracy: Callable) -> Callable:
    """``pixel_accuracy(model, batches) -> float`` over host (x, y) batches, run on the strict CuPy stand-in:
    the right fraction, each batch uploaded once and run through the model once, one number back to the host."""
    from tinyunet.models import UNet

    def model_with_opinions(rng: np.random.Generator) -> Any:
        """A small U-Net whose eval-mode predictions use every class (a fresh one predicts one class almost
        everywhere, and then the labels alone would give the right fraction)."""
        backend.seed(5)
        model = UNet(3, 3, base_channels=2, depth=2)
        for _ in range(10):          # BatchNorm's running statistics, as after some training
            model.forward(to_device(rng.standard_normal((4, 3, 32, 32)).astype(np.float32)))
        model.eval()                 # each class's mean logit to 0: no class wins everywhere
        logits = model.forward(to_device(rng.standard_normal((4, 3, 32, 32)).astype(np.float32)))
        model.head.bias.data[...] -= logits.mean(axis=(0, 2, 3))
        model.train()
        return model

    def run(fn: Callable) -> List[float]:
        rng = _rng()
        sizes = [4, 4, 1]     # a small last batch: a mean of the batches' accuracies gives its image 3x its weight
        with backend_numpy(), reference_layers():
            model = model_with_opinions(rng)
            weights = model.state_dict()
            images = [rng.standard_normal((n, 3, 32, 32)).astype(np.float32) for n in sizes]
            model.eval()             # labels that agree with the model's eval predictions on about 70% of the pixels
            batches = [(x, np.where(rng.random((n, 32, 32)) < 0.3, rng.integers(0, 3, (n, 32, 32)),
                                    model.forward(x).argmax(axis=1))) for x, n in zip(images, sizes)]
            model.load_state_dict(weights)
            model.train()
            labels = [model.forward(x).argmax(axis=1) for x, _ in batches]   # train mode: the batch's statistics
            pixels = sum(y.size for _, y in batches)
            in_train_mode = sum(int((p == y).sum()) for p, (_, y) in zip(labels, batches)) / pixels
            model.load_state_dict(weights)
            model.eval()
            predicted = [model.forward(x).argmax(axis=1) for x, _ in batches]
            hits = [p == y for p, (_, y) in zip(predicted, batches)]
            expected = sum(int(h.sum()) for h in hits) / pixels
            per_batch_mean = float(np.mean([h.mean() for h in hits]))
            assert all(len(np.unique(p)) == 3 for p in predicted), "the check's model should predict every class"
        with on_the_fake_gpu() as device:
            model = UNet(3, 3, base_channels=2, depth=2)
            model.load_state_dict(weights)   # the same network, its arrays on the stand-in's device
            model.train()                 # as a training loop leaves it
            forwards = []
            forward = model.forward
            model.forward = lambda x: forwards.append(1) or forward(x)
            device.reset_counters()
            given = [(x.copy(), y.copy()) for x, y in batches]
            try:
                result = fn(model, iter(given))      # a one-pass loader, as in training
            except TypeError as exc:
                if "host numpy.ndarray" in str(exc) or "unsupported operand" in str(exc):
                    raise Mismatch(f"raised TypeError: {exc}", "a host array met a device array: copy each batch "
                                   "with to_device(x), to_device(y) before the forward and the comparison") from exc
                if "on a device array" in str(exc):
                    raise Mismatch(f"raised TypeError: {exc}", "numpy cannot read a device array: use the array's "
                                   "methods ((pred == y).sum()) or backend.xp, and float() once at the end") from exc
                raise
            stats = dict(device.stats)
        if any(not np.array_equal(a, b) for (a, b), (c, d) in zip(batches, given) for a, b in ((a, c), (b, d))):
            raise Mismatch("your function changed the batches it was given", "leave them as they were: a loader may "
                           "hand the same arrays again; compute into new arrays")
        if not isinstance(result, float):
            raise Mismatch(f"your function returned a {type(result).__name__}",
                           "return a Python float: float(correct) / total, the one copy back to the host")
        if stats["transfers"] > 1:
            raise Mismatch(f"{stats['transfers']} device -> host transfers for {len(sizes)} batches",
                           "float(), .item(), int(), to_host, a print or an `if` on a device value inside the loop "
                           "waits for the GPU at every batch: keep the count on the device (correct = correct + "
                           "(pred == y).sum()) and convert once, at the end; y.size is known on the host")
        if stats["values_to_host"] > 1:
            raise Mismatch(f"{stats['values_to_host']} values copied to the host",
                           "one number is enough: count the right pixels on the device and bring back the count, "
                           "not the predictions")
        if len(forwards) != len(sizes):
            raise Mismatch(f"{len(forwards)} forward passes for {len(sizes)} batches",
                           "one forward per batch: each costs the whole network")
        if stats["uploads"] > 2 * len(sizes):
            raise Mismatch(f"{stats['uploads']} host -> device copies for {len(sizes)} batches of (x, y)",
                           "copy each batch once (x and y), then use the device arrays")
        try:
            return [compare("accuracy", np.array(result), np.array(expected), "the pixels counted on the host",
                            [(np.array(in_train_mode), "the model came in train mode: BatchNorm used each batch's own "
                                                       "statistics; call model.eval() first"),
                             (np.array(per_batch_mean), "the mean of the batches' accuracies gives the lone image of "
                                                        "the last batch the weight of four: add up the right pixels "
                                                        "and divide once")],
                            f"batches of {sizes} images")]
        except Mismatch as failure:
            if failure.hint == BY_HAND:
                failure.hint = ("the fraction of pixels whose most probable class (argmax over axis 1, the classes) "
                                "equals the label, over every pixel of every batch: a float division at the end")
            raise
    return verdict("pixel_accuracy", pixel_accuracy, reference_pixel_accuracy, run, "the pixels counted on the host")


def reference_timed(fn: Callable, sync: Callable, warmup: int = 2, repeat: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


class SimulatedDevice:
    """A stand-in for a GPU's queue, on the real clock: ``run()`` queues ``durations[k]`` seconds of work (the
    k-th call's) and returns at once; ``sync()`` sleeps until the queue is empty. The first call also costs
    ``first`` seconds at once (compiling kernels, growing the memory pool): what a warm-up absorbs."""

    def __init__(self, durations: Sequence[float], first: float = 0.0) -> None:
        self.durations, self.first, self.calls, self.busy_until = list(durations), first, 0, 0.0

    def run(self) -> None:
        if self.calls == 0 and self.first:
            time.sleep(self.first)
        now = time.perf_counter()
        self.busy_until = max(self.busy_until, now) + self.durations[min(self.calls, len(self.durations) - 1)]
        self.calls += 1

    def sync(self) -> None:
        time.sleep(max(0.0, self.busy_until - time.perf_counter()))


def check_timed(timed: Callable) -> Callable:
    """``timed(fn, sync, warmup=2, repeat=5) -> seconds``: on a simulated asynchronous device whose calls
    return at once and whose work ends only at ``sync()``; the median of the synchronised runs."""
    unit = 0.04          # seconds of work per call: well above the clock's and the sleep's noise

    def run(fn: Callable) -> List[float]:
        errors = []
        cases = [  # (what it tells apart, the queue's durations, the first call's cost, warmup, repeat, hint)
            ("the work, not the launch", [unit] * 8, 0.0, 1, 3,
             "the time of the launch only: the work runs on after fn() returns; sync() before reading the clock "
             "(a wall clock: time.perf_counter)"),
            ("earlier work left in the queue", [3 * unit, 3 * unit, unit], 0.0, 2, 1,
             "the warm-up's work was billed to the run: sync() before starting the clock too (or were the warm-up "
             "calls timed?)"),
            ("the first call's set-up", [unit] * 6, 10 * unit, 2, 3,
             "the first call's compilation was timed: call fn() warmup times before measuring"),
            ("one slow run among five", [unit, unit, unit, 5 * unit, unit, unit, unit], 0.0, 2, 5,
             "one slow run moved your number: take the median of the runs (np.median), not the mean or the max"),
        ]
        for what, durations, first, warmup, repeat, hint in cases:
            device = SimulatedDevice(durations, first)
            seconds = fn(device.run, device.sync, warmup=warmup, repeat=repeat)
            if not isinstance(seconds, (float, int, np.floating)):
                raise Mismatch(f"your function returned {type(seconds).__name__}", "return one number: seconds")
            if device.calls != warmup + repeat:
                raise Mismatch(f"fn was called {device.calls} times for warmup={warmup}, repeat={repeat}",
                               "call fn() warmup times, then once per timed run")
            seconds = float(seconds)
            total = sum(durations[min(k, len(durations) - 1)] for k in range(warmup, warmup + repeat))
            measured = f"{what}: {seconds * 1e3:.4g} ms measured for {unit * 1e3:.0f} ms of work"
            for wrong, why in [(seconds < 0, "a negative time: end - start, not start - end"),
                               (1e8 * unit < seconds < 1e10 * unit, "nanoseconds: divide by 1e9 (perf_counter_ns)"),
                               (500 * unit < seconds < 2000 * unit, "return seconds, not ms"),
                               (repeat > 1 and abs(seconds - total) < 0.3 * unit,
                                "the total of the runs: return one run's time, their median")]:
                if wrong:
                    raise Mismatch(measured, why)
            err = abs(seconds - unit) / unit
            if not err <= 0.5:     # NaN too. A right answer is within a few ms of the work; each mistake is off by 100 % or more
                raise Mismatch(measured, hint if np.isfinite(seconds) else
                               "not a number: the median of an empty list? append each run's time")
            errors.append(err)
        return errors
    return verdict("timed", timed, reference_timed, run, "the work queued on a simulated GPU")


# --- the fast CPU lesson ------------------------------------------------------------------------------------

def reference_conv2d_shifted(x: Any, w: Any, b: Any, padding: int) -> Any:
    return reference_conv2d_forward(x, w, b, 1, padding)


def check_conv2d_shifted(conv2d_shifted: Callable) -> Callable:
    """``conv2d_shifted(x, w, b, padding)``: a stride-1 convolution as kh*kw shifted 1x1 products."""
    def run(fn: Callable) -> List[float]:
        rng, errors = _rng(), []
        for (kh, kw), p in [((3, 3), 1), ((3, 3), 0), ((1, 1), 0), ((5, 5), 2), ((2, 3), 1)]:
            x, w, b = rng.standard_normal((2, 3, 7, 6)), rng.standard_normal((4, 3, kh, kw)), rng.standard_normal(4)
            expected = reference_conv2d_shifted(x, w, b, p)
            known = [(host(expected) - b.reshape(1, -1, 1, 1), "the bias is missing: start from b, then add the terms"),
                     (reference_conv2d_forward(x, w[:, :, ::-1, ::-1].copy(), b, 1, p),
                      "the kernel is flipped: offset (i, j) reads the input shifted by (i, j) with w[:, :, i, j]")]
            errors.append(compare("out", call_leaving_inputs(lambda *a: fn(*a, p), x, w, b), expected, "Conv2d.forward", known,
                                  f"kernel {kh}x{kw}, padding {p}, a 7x6 image"))
        return errors
    return verdict("conv2d_shifted", conv2d_shifted, reference_conv2d_shifted, run, "Conv2d.forward")


def reference_conv3x3_flat_rows(x: Any, w: Any, b: Any) -> Any:
    return reference_conv2d_forward(x, w, b, 1, 1)


def _flat_rows_variant(x: np.ndarray, w: np.ndarray, b: np.ndarray, slip: str) -> np.ndarray:
    """The flattened-rows 3x3 convolution (padding 1) with one classic mistake."""
    n, c, h, wd = x.shape
    cout = w.shape[0]
    hp, wp = h + 2, wd + 2
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    flat = (padded.reshape(-1, c) if slip == "nchw" else padded.transpose(0, 2, 3, 1).reshape(-1, c))
    step = wd if slip == "width" else wp
    rows = flat.shape[0] - 2 * wp - 2
    if slip == "short":
        rows -= 1
    out = sum(flat[i * step + j:i * step + j + rows] @ (w[:, :, i, j] if slip == "untransposed" else w[:, :, i, j].T)
              for i in range(3) for j in range(3))
    full = np.concatenate([out, np.zeros((flat.shape[0] - rows, cout))]).reshape(n, hp, wp, cout)
    kept = full[:, 1:h + 1, 1:wd + 1] if slip == "centre" else full[:, :h, :wd]
    return kept.transpose(0, 3, 1, 2) + b.reshape(1, cout, 1, 1)


def check_conv3x3_flat_rows(conv3x3_flat_rows: Callable) -> Callable:
    """``conv3x3_flat_rows(x, w, b)``: a 3x3 convolution, stride 1, padding 1, as nine products of
    contiguous row slices of the padded image flattened channels-last; against Conv2d on batches of
    several images (windows that run across an image's edge into the next), non-square images, 1 pixel."""
    hints = {"width": "moving down one image row is Wp = W + 2 rows of flat: the *padded* width",
             "centre": "row q of the result is the window whose top-left corner is padded pixel q: out[n, y, x] is "
                       "at (n, y, x) of the (N, Hp, Wp) grid, so keep [:, :H, :W]",
             "nchw": "flatten channels-last, transpose(0, 2, 3, 1) before the reshape, so that one row of flat is one "
                     "pixel's C channels",
             "short": "L is one short: the last output pixel, the bottom-right one of the last image, is row "
                      "L - 1 = N*Hp*Wp - 2*Wp - 3",
             "untransposed": "flat's rows are pixels of C numbers: multiply them by w[:, :, i, j].T, (C, Cout)"}

    def run(fn: Callable) -> List[float]:
        rng, errors = _rng(), []
        # C == Cout first: a missing .T gives wrong numbers there (a hint that names it), not a crash
        for n, c, h, wd, cout in [(2, 3, 4, 5, 3), (2, 3, 7, 6, 4), (3, 1, 5, 9, 2), (1, 2, 1, 1, 3), (2, 4, 8, 8, 5)]:
            x, w, b = rng.standard_normal((n, c, h, wd)), rng.standard_normal((cout, c, 3, 3)), rng.standard_normal(cout)
            expected = reference_conv3x3_flat_rows(x, w, b)
            known = [(_flat_rows_variant(x, w, b, slip), hint) for slip, hint in hints.items()
                     if slip != "untransposed" or c == cout]
            known += [(reference_conv2d_forward(x, w.transpose(0, 1, 3, 2).copy(), b, 1, 1),
                       "w[:, :, i, j] is the weight at row offset i and column offset j: the shift is i * Wp + j"),
                      (reference_conv2d_forward(x, w[:, :, ::-1, ::-1].copy(), b, 1, 1),
                       "the kernel is flipped: offset (i, j) reads row i * Wp + j further down with w[:, :, i, j]"),
                      (host(expected) - b.reshape(1, -1, 1, 1), "the bias is missing: add b to every output pixel")]
            out = call_leaving_inputs(fn, x, w, b)
            errors.append(compare("out", out, expected, "Conv2d.forward", known,
                                  f"{n} images of {c}x{h}x{wd}, {cout} output channels"))
        return errors
    return verdict("conv3x3_flat_rows", conv3x3_flat_rows, reference_conv3x3_flat_rows, run, "Conv2d.forward")


# --- the attention gate (the variants lesson) ---------------------------------------------------------------

def reference_residual_backward(block: Any, dout: Any) -> Any:
    """ResidualBlock's own backward on ``block`` (a learner's block whose backward calls this function too)."""
    from tinyunet.models.resunet import ResidualBlock
    return ResidualBlock.backward(block, dout)


def _residual_slip(slip: str) -> Callable:
    """A residual block's backward with one classic mistake, from the block's own parts."""
    def backward(block: Any, dout: Any) -> Any:
        ds = dout if slip == "relu" else block.relu.backward(dout)
        d_branch, d_shortcut = block.add.backward(ds)
        if slip == "relu_branch":            # the ReLU taken as the branch's last layer: the shortcut skips it
            d_shortcut = dout
        if block.shortcut is not None:
            d_shortcut = block.shortcut.backward(d_shortcut)
        dx = block.branch.backward(d_branch)
        return dx if slip == "fork" else (dx + d_shortcut) / 2 if slip == "fork_mean" else dx + d_shortcut
    return backward


def check_residual_backward(residual_backward: Callable) -> Callable:
    """``residual_backward(block, dout) -> dx`` for a ResidualBlock after its forward, y = relu(branch(x) +
    shortcut(x)): dx and every parameter's gradient against ResidualBlock.backward, dx against finite
    differences; a block with a projection shortcut (2 -> 3 channels) and an identity one (3 -> 3)."""
    from tinyunet.models.resunet import ResidualBlock

    hints = {"relu": "the ReLU after the sum is part of the block: start with ds = block.relu.backward(dout)",
             "relu_branch": "the ReLU comes after the sum, so both paths get ds = relu.backward(dout), "
                            "the shortcut too",
             "fork": "x feeds both paths: dx is the branch's gradient plus the shortcut's (the fork adds)",
             "fork_mean": "at a fork the gradients add, they are not averaged: each path's change of x "
                          "changes y on its own"}

    def whole_backward(dout: Any) -> Any:
        raise Mismatch("your function called block.backward", "use the parts' backward (block.relu, block.add, "
                       "block.shortcut, block.branch): MyResidualBlock.backward calls residual_backward itself")

    def gradients(fn: Callable, block: Any, x: np.ndarray, dout: np.ndarray) -> Dict[str, Any]:
        block.zero_grad()
        block.forward(x)
        block.backward = whole_backward             # the answer must not be the block's own backward
        try:
            dx = call_leaving_inputs(fn, block, dout)
        finally:
            del block.backward
        if dx is not None and getattr(dx, "dtype", None) != np.float64:
            raise Mismatch(f"dx has dtype {getattr(dx, 'dtype', type(dx).__name__)}", "the block computes in "
                           "float64: keep it (a float32 copy loses the precision a gradient check needs)")
        return {"dx": dx, **{name: host(p.grad) for name, p in block.named_parameters()}}

    def run(fn: Callable) -> List[float]:
        rng, errors = _rng(), []
        for cin, cout in [(2, 3), (3, 3)]:
            with reference_layers():
                backend.seed(5)
                block = ResidualBlock(cin, cout).double()        # BatchNorm in train mode, as in training
                x = rng.standard_normal((2, cin, 5, 4))
                dout = rng.standard_normal((2, cout, 5, 4))
                expected = gradients(reference_residual_backward, block, x, dout)
                slips = {slip: gradients(_residual_slip(slip), block, x, dout) for slip in hints}
                mine = gradients(fn, block, x, dout)
                numeric = finite_differences(lambda: float((host(block.forward(x)) * dout).sum()), x)
            case = f"{cin} -> {cout} channels ({'projection' if cin != cout else 'identity'} shortcut)"
            for name in expected:
                known = [(slips[slip][name], hints[slip]) for slip in hints]
                errors.append(compare(name, mine[name], expected[name], "ResidualBlock.backward", known, case))
            errors.append(compare("dx", mine["dx"], numeric, "finite differences",
                                  [(slips[slip]["dx"], hints[slip]) for slip in hints], case, tolerance=TOLERANCE))
        return errors
    return verdict("residual_backward", residual_backward, reference_residual_backward, run,
                   "ResidualBlock.backward and finite differences")


def _gate_case(rng: np.random.Generator, n: int, c: int, cg: int, ci: int, h: int, w: int) -> Dict[str, Any]:
    """A gate's inputs, weights and forward pieces, in NumPy: theta = W_x x (2x2, stride 2), s = theta +
    W_g g + b_g, q = W_psi relu(s) + b_psi, sig = sigmoid(q), alpha = Ah @ sig @ Aw.T (bilinear x2)."""
    from tinyunet.nn import Upsample

    x, g = rng.standard_normal((n, c, h, w)), rng.standard_normal((n, cg, h // 2, w // 2))
    Wx = rng.standard_normal((ci, c, 2, 2)) * 0.5
    Wg, bg = rng.standard_normal((ci, cg)) * 0.5, rng.standard_normal(ci) * 0.1
    Wpsi, bpsi = rng.standard_normal((1, ci)), rng.standard_normal(1) * 0.1
    with reference_layers():   # the bilinear matrices: column j is the upsampled unit vector e_j
        up = lambda m: host(Upsample(2, mode="bilinear").forward(to_device(np.eye(m)[:, None, :, None])))[:, 0, :, 0].T
        Ah, Aw = up(h // 2), up(w // 2)
    k = dict(x=x, g=g, Wx=Wx, Wg=Wg, bg=bg, Wpsi=Wpsi, bpsi=bpsi, Ah=Ah, Aw=Aw)
    return {**k, **_gate_forward(x, g, k)}


def _gate_forward(x: np.ndarray, g: np.ndarray, k: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """s, sig and alpha of the gate with the weights of ``k``; the gate's output is x * alpha."""
    n, c, h, w = x.shape
    theta = np.einsum("nciajb,kcab->nkij", x.reshape(n, c, h // 2, 2, w // 2, 2), k["Wx"])
    s = theta + np.einsum("nchw,kc->nkhw", g, k["Wg"]) + k["bg"][None, :, None, None]
    q = np.einsum("nchw,kc->nkhw", np.maximum(s, 0), k["Wpsi"]) + k["bpsi"][None, :, None, None]
    sig = 1 / (1 + np.exp(-q))
    return dict(s=s, sig=sig, alpha=k["Ah"] @ sig @ k["Aw"].T)


def _gate_backward_variant(dout: np.ndarray, k: Dict[str, Any], slip: str = "") -> Tuple[Any, Any]:
    """The gate's backward in NumPy, right or with one classic slip (for the hints)."""
    dalpha = (dout * k["x"]).mean(axis=1, keepdims=True) if slip == "mean" else (dout * k["x"]).sum(axis=1, keepdims=True)
    dsig = k["Ah"].T @ dalpha @ k["Aw"]
    dq = dsig * (k["sig"] if slip == "sigmoid" else k["sig"] * (1 - k["sig"]))
    ds = np.einsum("nkhw,kc->nchw", dq, k["Wpsi"]) * (1.0 if slip == "relu" else (k["s"] > 0))
    dg = np.einsum("nkhw,kc->nchw", ds, k["Wg"])
    n, c, h, w = k["x"].shape
    dx_wx = np.einsum("nkij,kcab->nciajb", ds, k["Wx"]).reshape(n, c, h, w)
    return (dx_wx if slip == "fork" else dout * k["alpha"] if slip == "product" else dout * k["alpha"] + dx_wx), dg


def reference_gate_backward(dout: Any, x: Any, s: Any, sig: Any, alpha: Any, Wx: Any, Wg: Any, Wpsi: Any,
                            Ah: Any, Aw: Any) -> Tuple[Any, Any]:
    return _gate_backward_variant(host(dout), dict(x=host(x), s=host(s), sig=host(sig), alpha=host(alpha), Wx=host(Wx),
                                                   Wg=host(Wg), Wpsi=host(Wpsi), Ah=host(Ah), Aw=host(Aw)))


def check_gate_backward(gate_backward: Callable) -> Callable:
    """``gate_backward(dout, x, s, sig, alpha, Wx, Wg, Wpsi, Ah, Aw) -> (dx, dg)``: the attention gate's
    backward, against tinyunet's AttentionGate with the same weights and finite differences."""
    from tinyunet.models.attention_unet import AttentionGate

    hints = {"sigmoid": "the sigmoid's derivative is sig * (1 - sig), not sig",
             "mean": "alpha multiplied every channel of x: dalpha is summed over the channels, not averaged",
             "relu": "the ReLU's mask (s > 0) is missing: psi read relu(s)",
             "fork": "x forks: it is multiplied by alpha *and* fed W_x, so dx = dout * alpha + W_x's backward of ds",
             "product": "x forks: besides dout * alpha (the product's path), x fed W_x, which fed alpha: add W_x's "
                        "backward of ds (the gate's own path)"}

    def run(fn: Callable) -> List[float]:
        rng, errors = _rng(), []
        for n, c, cg, ci, h, w in [(2, 4, 8, 2, 4, 6), (1, 3, 5, 3, 6, 2)]:
            k = _gate_case(rng, n, c, cg, ci, h, w)
            with reference_layers():
                gate = AttentionGate(skip_channels=c, gate_channels=cg, inter_channels=ci).double()
                gate.W_x.weight.data[...] = to_device(k["Wx"])
                gate.W_g.weight.data[...], gate.W_g.bias.data[...] = to_device(k["Wg"][:, :, None, None]), to_device(k["bg"])
                gate.psi.weight.data[...] = to_device(k["Wpsi"][:, :, None, None])
                gate.psi.bias.data[...] = to_device(k["bpsi"])
                out = gate.forward(to_device(k["x"]), to_device(k["g"]))
                dout = rng.standard_normal(out.shape)
                expected = dict(zip(("dx", "dg"), map(host, gate.backward(to_device(dout)))))
            result = call_leaving_inputs(fn, dout, *(k[name] for name in ("x", "s", "sig", "alpha", "Wx", "Wg", "Wpsi", "Ah", "Aw")))
            expect_parts(result, 2, "return dx, dg")
            slips = {slip: _gate_backward_variant(dout, k, slip) for slip in hints}
            known = {name: [(slips[slip][i], hints[slip]) for slip in hints] for i, name in enumerate(("dx", "dg"))}
            forward = lambda: float((k["x"] * _gate_forward(k["x"], k["g"], k)["alpha"] * dout).sum())
            errors += _gradient_cases(forward, {"dx": k["x"], "dg": k["g"]}, expected, dict(zip(("dx", "dg"), result)),
                                      "AttentionGate.backward", known, f"skip {(n, c, h, w)}, gate {cg} channels")
        return errors
    return verdict("gate_backward", gate_backward, reference_gate_backward, run,
                   "AttentionGate.backward and finite differences")


# --- the framework ------------------------------------------------------------------------------------------

def reference_linear_backward(x: Any, w: Any, dout: Any) -> Tuple[Any, Any, Any]:
    """y = x @ w.T + b for x (N, in), w (out, in): a 1x1 convolution on (N, in, 1, 1)."""
    dx, dw, db = reference_conv2d_backward(host(x)[:, :, None, None], host(w)[:, :, None, None],
                                           host(dout)[:, :, None, None])
    return host(dx)[:, :, 0, 0], host(dw)[:, :, 0, 0], host(db)


def check_linear_backward(linear_backward: Callable) -> Callable:
    """``linear_backward(x, w, dout) -> (dx, dw, db)`` for ``y = x @ w.T + b``."""
    def run(fn: Callable) -> List[float]:
        rng, errors = _rng(), []
        for n, cin, cout in [(5, 3, 4), (1, 2, 2), (7, 4, 3)]:
            x, w, b = rng.standard_normal((n, cin)), rng.standard_normal((cout, cin)), rng.standard_normal(cout)
            g = rng.standard_normal((n, cout))
            result = call_leaving_inputs(fn, x, w, g)
            expect_parts(result, 3, "return dx, dw, db")
            dx, dw, db = reference_linear_backward(x, w, g)
            known = {"dw": [(x.T @ g, "dw has w's shape (out, in): dout.T @ x, not x.T @ dout")],
                     "db": [(g[0], "sum dout over the batch (axis 0)"), (g.sum(axis=1), "sum over the batch, axis 0, not axis 1"),
                            (g.mean(axis=0) if n > 1 else None, "your db is averaged over the batch: sum it (the loss already carries any 1/N)")]}
            known["dw"].append((g.T @ x / n if n > 1 else None, "your dw is divided by the batch size: sum over the batch, do not average"))
            forward = lambda: float(((x @ w.T + b) * g).sum())
            errors += _gradient_cases(forward, {"dx": x, "dw": w, "db": b}, {"dx": dx, "dw": dw, "db": db},
                                      dict(zip(("dx", "dw", "db"), result)), "a 1x1 Conv2d.backward", known,
                                      f"x {x.shape}, w {w.shape}")
        return errors
    return verdict("linear_backward", linear_backward, reference_linear_backward, run,
                   "a 1x1 Conv2d's backward and finite differences")


# --- optimizers -----------------------------------------------------------------------------------------------

def reference_sgd_step(params: Sequence[Any], lr: float) -> None:
    for p in params:
        p.data -= lr * p.grad


def reference_momentum_step(params: Sequence[Any], velocities: Sequence[Any], lr: float, momentum: float = 0.9) -> None:
    for p, v in zip(params, velocities):
        v *= momentum
        v += p.grad
        p.data -= lr * v


def reference_adam_step(params: Sequence[Any], ms: Sequence[Any], vs: Sequence[Any], t: int, lr: float = 1e-3,
                        betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
    b1, b2 = betas
    for p, m, v in zip(params, ms, vs):
        m[...] = b1 * m + (1 - b1) * p.grad
        v[...] = b2 * v + (1 - b2) * p.grad ** 2
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        p.data -= lr * m_hat / (np.sqrt(v_hat) + eps)


OPTIMIZER_SETTINGS = [dict(lr=0.1, momentum=0.9, betas=(0.9, 0.999), eps=1e-8),
                      dict(lr=0.3, momentum=0.95, betas=(0.8, 0.99), eps=1e-3)]
"""The check runs each step with both: an answer that ignores an argument (a learning rate or a momentum
written into the code, PyTorch's default betas) gives the first right and the second wrong."""


def _optimizer_run(kind: str, fn: Optional[Callable], steps: int = 3,
                   settings: Dict[str, Any] = OPTIMIZER_SETTINGS[0]) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """(parameters, optimizer state) after ``steps`` steps with fixed, step-dependent gradients: with your
    step function, or (fn=None) with tinyunet.optim's optimizer for the weights and the reference step for
    the state (velocities; m and v). A Mismatch if your step changed ``p.grad``."""
    from tinyunet.nn import Parameter
    from tinyunet.optim import SGD, Adam

    rng = _rng()
    # a matrix, a vector, a 3-d and a 0-d parameter: a step written for the shapes of one case fails another
    params = [Parameter(rng.standard_normal(shape)) for shape in [(3, 4), (5,), (2, 3, 2), ()]]
    grads = [[rng.standard_normal(p.shape) for p in params] for _ in range(steps)]
    for g in grads:   # a zero and a tiny gradient: where Adam's eps decides the step
        g[1][:2] = 0.0, 1e-9
    lr, momentum, betas, eps = settings["lr"], settings["momentum"], settings["betas"], settings["eps"]
    reference = fn is None
    if reference:
        optimizer = {"sgd": lambda: SGD(params, lr=lr), "momentum": lambda: SGD(params, lr=lr, momentum=momentum),
                     "adam": lambda: Adam(params, lr=lr, betas=betas, eps=eps)}[kind]()
        shadow = [Parameter(p.data.copy()) for p in params]   # for the state, by the steps written out above
    state = [[np.zeros(p.shape) for p in params] for _ in range(2)]
    for t in range(1, steps + 1):
        for p, g in zip(params, grads[t - 1]):
            p.grad[...] = g
        if reference:
            optimizer.step()
            for q, g in zip(shadow, grads[t - 1]):
                q.grad[...] = g
            if kind == "momentum":
                reference_momentum_step(shadow, state[0], lr, momentum)
            elif kind == "adam":
                reference_adam_step(shadow, state[0], state[1], t, lr, betas, eps)
        elif kind == "sgd":        # new lists of the same arrays each call, as a training loop may pass
            fn(list(params), lr)
        elif kind == "momentum":
            fn(list(params), list(state[0]), lr, momentum)
        else:
            fn(list(params), list(state[0]), list(state[1]), t, lr, betas, eps)
        if not reference and not all(np.array_equal(host(p.grad), g) for p, g in zip(params, grads[t - 1])):
            raise Mismatch(f"step {t}: your step changed p.grad",
                           "read the gradient, leave it as it is: it belongs to the backward that computed it "
                           "(zero_grad clears it before the next one); p.grad *= lr or g **= 2 on p.grad change it "
                           "-- compute into new arrays (lr * p.grad makes one)")
    used = {"sgd": [], "momentum": state[:1], "adam": state}[kind]
    return [host(p.data).copy() for p in params], [host(a).copy() for s in used for a in s]


def _optimizer_resumed(kind: str, fn: Callable, settings: Dict[str, Any] = OPTIMIZER_SETTINGS[0]) -> Tuple[Any, Any]:
    """(parameters, state) of a run that ``fn`` takes over at step t = 5 from 4 steps of the text's
    formulas: the state it is handed is not zero, the same list objects come at every call, and the last
    step has a zero gradient for the first parameter (its momentum still moves it). Raises a Mismatch if
    ``fn`` changed the lists."""
    from tinyunet.nn import Parameter

    rng = _rng()
    shapes = [(3, 4), (5,), (2, 3, 2), ()]
    start = [rng.standard_normal(shape) for shape in shapes]
    grads = [[rng.standard_normal(shape) for shape in shapes] for _ in range(6)]
    grads[5][0][...] = 0.0
    lr, momentum, betas, eps = settings["lr"], settings["momentum"], settings["betas"], settings["eps"]
    params = [Parameter(a.copy()) for a in start]
    state = [[np.zeros(shape) for shape in shapes] for _ in range(2)]
    lists = [list(params), list(state[0]), list(state[1])]
    given = [list(a) for a in lists]
    steps = {"sgd": lambda f, t: f(lists[0], lr), "momentum": lambda f, t: f(lists[0], lists[1], lr, momentum),
             "adam": lambda f, t: f(lists[0], lists[1], lists[2], t, lr, betas, eps)}[kind]
    references = {"sgd": reference_sgd_step, "momentum": reference_momentum_step, "adam": reference_adam_step}
    for t in range(1, 7):
        for p, g in zip(params, grads[t - 1]):
            p.grad[...] = g
        steps(references[kind] if t < 5 else fn, t)
    if any(len(a) != len(b) or any(x is not y for x, y in zip(a, b)) for a, b in zip(lists, given)):
        raise Mismatch("your step changed the lists it was given (popped, cleared or replaced an entry)",
                       "read the lists, leave them as they are: the caller passes the same lists at every step")
    used = {"sgd": [], "momentum": state[:1], "adam": state}[kind]
    return [host(p.data).copy() for p in params], [host(a).copy() for s in used for a in s]


def _check_optimizer(name: str, kind: str, fn: Callable, reference: Callable, known_bugs: Dict[str, Callable],
                     known_state_bugs: Dict[str, Callable] = {}) -> Callable:
    def run(mine: Callable) -> List[float]:
        errors = []
        for number, settings in enumerate(OPTIMIZER_SETTINGS):
            given = ", ".join(f"{k} {v}" for k, v in settings.items()
                              if k in {"sgd": ("lr",), "momentum": ("lr", "momentum"), "adam": ("lr", "betas", "eps")}[kind])
            for steps in (1, 3):
                expected, expected_state = _optimizer_run(kind, None, steps, settings)
                result, state = _optimizer_run(kind, mine, steps, settings)
                known = [(_optimizer_run(kind, bug, steps, settings)[0], hint) for hint, bug in known_bugs.items()]
                known.append((_optimizer_run(kind, lambda *args: None, steps, settings)[0],
                              "the weights did not move: change p.data in place (p.data -= ...); a new list, or "
                              "`p = ...`, only rebinds a name"))
                state_known = [(_optimizer_run(kind, bug, steps, settings)[1], hint)
                               for hint, bug in known_state_bugs.items()]
                case = f"{steps} step(s), {given}"
                try:
                    for i, (a, b) in enumerate(zip(result, expected)):
                        errors.append(compare(f"parameter {i}", a, b, "tinyunet.optim",
                                              [(k[i], hint) for k, hint in known], case))
                    for i, (a, b) in enumerate(zip(state, expected_state)):
                        errors.append(compare(f"{'velocity' if kind == 'momentum' else 'm and v'} {i}", a, b,
                                              "the formula of the text", [(k[i], hint) for k, hint in state_known], case))
                except Mismatch as failure:
                    if number:   # right with the first settings, wrong with these: an argument left unused
                        failure.hint = (f"right with the first settings, wrong with {given}: use every argument "
                                        "you are given, not a number written into the code")
                    raise
        expected, expected_state = _optimizer_resumed(kind, reference)
        result, state = _optimizer_resumed(kind, mine)
        case = "a run taken over at step t = 5, a zero gradient at its last step"
        try:
            for i, (a, b) in enumerate(zip(result + state, expected + expected_state)):
                errors.append(compare("parameter" if i < len(result) else "state", a, b, "the text's formulas", [],
                                      case))
        except Mismatch as failure:
            if failure.hint == BY_HAND:
                failure.hint = ("right from a fresh start, wrong from step 5 with the state of 4 earlier steps: use "
                                "the t and the state you are given (no counter or state of your own), and update "
                                "every parameter, also one whose gradient is zero (its momentum still moves it)")
            raise
        if kind == "adam":   # independent of the package: Adam's first step is lr * g / |g| = lr * sign(g) (eps 0)
            from tinyunet.nn import Parameter

            rng = _rng()
            p = Parameter(rng.standard_normal(6))
            p.grad[...] = g = rng.uniform(0.5, 2.0, 6) * rng.choice([-1.0, 1.0], 6)
            before = p.data.copy()
            mine([p], [np.zeros(6)], [np.zeros(6)], 1, 0.1, (0.9, 0.999), 0.0)
            errors.append(compare("first step", before - host(p.data), 0.1 * np.sign(g), "lr * sign(g)", [], "1 step"))
        return errors
    return verdict(name, fn, reference, run, "tinyunet.optim")


def check_sgd_step(sgd_step: Callable) -> Callable:
    """``sgd_step(params, lr)``: ``p.data -= lr * p.grad`` for every parameter, in place."""
    return _check_optimizer("sgd_step", "sgd", sgd_step, reference_sgd_step,
                            {"the step goes uphill: subtract lr * grad": lambda ps, lr: [p.data.__iadd__(lr * p.grad) for p in ps]})


def check_momentum_step(momentum_step: Callable) -> Callable:
    """``momentum_step(params, velocities, lr, momentum)``: v = momentum*v + g; p -= lr*v (in place)."""
    def no_memory(ps: Any, vs: Any, lr: float, mom: float) -> None:
        for p, v in zip(ps, vs):
            v[...] = mom * v + p.grad
            p.data -= lr * p.grad
    def velocity_with_lr(ps: Any, vs: Any, lr: float, mom: float) -> None:
        for p, v in zip(ps, vs):
            v *= mom
            v += lr * p.grad
            p.data -= v
    def rebinding(ps: Any, vs: Any, lr: float, mom: float) -> None:
        for i, p in enumerate(ps):
            vs[i] = mom * vs[i] + p.grad
            p.data -= lr * vs[i]
    return _check_optimizer("momentum_step", "momentum", momentum_step, reference_momentum_step,
                            {"your steps are plain gradient steps: step with the velocity (p.data -= lr * v), and "
                             "update v in place (v *= momentum; v += p.grad): `v = ...` or `velocities[i] = ...` "
                             "makes a new array that the next call never sees": no_memory},
                            {"your velocity holds lr * g: that is Sutskever's form (v = momentum * v + lr * g; "
                             "p -= v), which moves the weights the same only while lr stays constant; the text's "
                             "(and PyTorch's) keeps v = momentum * v + g and steps by lr * v, so that a schedule "
                             "changing lr changes the next step at once": velocity_with_lr,
                             "your velocities are still zero after the step: update them in place (v *= momentum; "
                             "v += p.grad): `v = ...` or `velocities[i] = ...` makes a new array that the caller, "
                             "who passes them again at the next step, never sees": rebinding})


def check_adam_step(adam_step: Callable) -> Callable:
    """``adam_step(params, ms, vs, t, lr, betas, eps)`` with t = 1 at the first step (in place)."""
    def no_correction(ps: Any, ms: Any, vs: Any, t: int, lr: float, betas: Any = (0.9, 0.999), eps: float = 1e-8) -> None:
        for p, m, v in zip(ps, ms, vs):
            m[...] = 0.9 * m + 0.1 * p.grad
            v[...] = 0.999 * v + 0.001 * p.grad ** 2
            p.data -= lr * m / (np.sqrt(v) + eps)
    def eps_inside(ps: Any, ms: Any, vs: Any, t: int, lr: float, betas: Any = (0.9, 0.999), eps: float = 1e-8) -> None:
        for p, m, v in zip(ps, ms, vs):
            m[...] = 0.9 * m + 0.1 * p.grad
            v[...] = 0.999 * v + 0.001 * p.grad ** 2
            p.data -= lr * (m / (1 - 0.9 ** t)) / np.sqrt(v / (1 - 0.999 ** t) + eps)
    def kingma(ps: Any, ms: Any, vs: Any, t: int, lr: float, betas: Any = (0.9, 0.999), eps: float = 1e-8) -> None:
        for p, m, v in zip(ps, ms, vs):
            m[...] = betas[0] * m + (1 - betas[0]) * p.grad
            v[...] = betas[1] * v + (1 - betas[1]) * p.grad ** 2
            p.data -= lr * (1 - betas[1] ** t) ** 0.5 / (1 - betas[0] ** t) * m / (np.sqrt(v) + eps)
    def no_eps(ps: Any, ms: Any, vs: Any, t: int, lr: float, betas: Any = (0.9, 0.999), eps: float = 1e-8) -> None:
        with np.errstate(divide="ignore", invalid="ignore"):   # the zero gradient's 0/0: the slip's NaN
            reference_adam_step(ps, ms, vs, t, lr, betas, 0.0)
    return _check_optimizer("adam_step", "adam", adam_step, reference_adam_step,
                            {"the bias correction is missing: divide m by 1 - b1**t and v by 1 - b2**t": no_correction,
                             "eps goes outside the square root: sqrt(v_hat) + eps": eps_inside,
                             "you divide without eps: by sqrt(v_hat) + eps (a zero gradient would give 0/0)": no_eps,
                             "that is the Adam paper's efficient form, lr * sqrt(1 - b2**t) / (1 - b1**t) * m / "
                             "(sqrt(v) + eps): its eps sits where the text's would be eps * sqrt(1 - b2**t), a "
                             "different step where gradients are tiny; write the text's m_hat / (sqrt(v_hat) + eps)":
                             kingma})


# --- several processes: the ring allreduce, synchronized BatchNorm -------------------------------------------

def reference_ring_allreduce(arrays: List[Any]) -> List[Any]:
    """Every one of the N equal 1-D ``arrays`` becomes their sum, in place, by a ring: N-1 steps of
    reduce-scatter, then N-1 of all-gather; at each step process r sends one chunk to r+1."""
    n = len(arrays)
    chunks = [np.array_split(a, n) for a in arrays]          # views into the arrays
    for step in range(n - 1):                                 # reduce-scatter
        sent = [chunks[r][(r - step) % n].copy() for r in range(n)]
        for r in range(n):
            chunks[(r + 1) % n][(r - step) % n] += sent[r]
    for step in range(n - 1):                                 # all-gather: pass the finished chunks on
        sent = [chunks[r][(r + 1 - step) % n].copy() for r in range(n)]
        for r in range(n):
            chunks[(r + 1) % n][(r + 1 - step) % n][...] = sent[r]
    return arrays


def _ring_mistake(arrays: List[np.ndarray], kind: str) -> List[np.ndarray]:
    """The ring allreduce with one classic mistake (on copies): what a learner's result would be."""
    arrays = [a.copy() for a in arrays]
    n = len(arrays)
    chunks = [np.array_split(a, n) for a in arrays]
    for step in range(n - 1):
        sent = [chunks[r][(r - step) % n].copy() for r in range(n)]
        for r in range(n):
            chunks[(r + 1) % n][(r - step) % n] += sent[r]
    if kind == "no all-gather":
        return arrays
    for step in range(n - 1):
        first = 0 if kind == "all-gather from the wrong chunk" else 1
        sent = [chunks[r][(r + first - step) % n].copy() for r in range(n)]
        for r in range(n):
            target = chunks[(r + 1) % n][(r + first - step) % n]
            if kind == "all-gather adds":
                target += sent[r]
            else:
                target[...] = sent[r]
    return arrays


RING_HINTS = {
    "no all-gather": "each process holds the whole sum in one chunk only: that is the reduce-scatter alone. Either "
                     "the all-gather is missing (N-1 more steps that pass the finished chunks around the ring), or "
                     "its copies never reached the arrays: chunks[r][c] = sent replaces an entry of your list; "
                     "write into the view, chunks[r][c][...] = sent",
    "all-gather adds": "in the all-gather the chunks arrive finished: copy them in (=), do not add them (+=)",
    "all-gather from the wrong chunk": "after the reduce-scatter process r holds the finished chunk (r + 1) mod N: "
                                       "the all-gather starts by sending that one",
}


class ProcessMemory(np.ndarray):
    """One process's 1-D array in the ring check, as a NumPy array that counts the values written into it (by
    ``[...] =``, ``+=``, any ufunc's ``out=``, ``np.copyto``): what a process receives over its link. Only
    writes into the array itself count, through any view of it; a copy (``.copy()``, what is sent) is not
    it. Each written position is also marked, so that a write the count cannot see (``np.asarray(a)[...]``,
    ``np.put``, ``.flat``) shows as a changed value that was never marked. It counts what each process
    receives, not who sent it."""

    def __array_finalize__(self, obj: Any) -> None:
        self.counter = getattr(obj, "counter", None)

    def _record(self, target: np.ndarray, key: Any = Ellipsis) -> None:
        """Count and mark the positions ``target[key]`` of every process memory that ``target`` views."""
        for k, memory in enumerate(self.counter["memories"]):
            if np.shares_memory(target, memory):
                item = memory.itemsize
                offset = (target.__array_interface__["data"][0] - memory.__array_interface__["data"][0]) // item
                positions = np.lib.stride_tricks.as_strided(   # the memory's indices, seen as target sees them
                    self.counter["positions"][k][offset:], target.shape,
                    [stride // item * 8 for stride in target.strides])
                marked = np.atleast_1d(positions[key]).ravel()
                self.counter["written"][k] += marked.size
                self.counter["marked"][k][marked] = True

    def __setitem__(self, key: Any, value: Any) -> None:
        plain = self.view(np.ndarray)
        target = plain[key]
        same = (isinstance(value, np.ndarray) and isinstance(target, np.ndarray) and value.shape == target.shape
                and value.__array_interface__["data"][0] == target.__array_interface__["data"][0])
        plain[key] = value.view(np.ndarray) if isinstance(value, ProcessMemory) else value
        if self.counter is not None and not same:   # same: the write-back of a[i] += x, already counted
            self._record(plain, key)

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, out: Any = None, **kwargs: Any) -> Any:
        plain = [x.view(np.ndarray) if isinstance(x, ProcessMemory) else x for x in inputs]
        if out is None:
            return getattr(ufunc, method)(*plain, **kwargs)
        getattr(ufunc, method)(*plain, out=tuple(o.view(np.ndarray) if isinstance(o, ProcessMemory) else o
                                                 for o in out), **kwargs)
        for o in out:
            if isinstance(o, ProcessMemory) and o.counter is not None:
                o._record(o.view(np.ndarray))
        return out[0] if len(out) == 1 else out

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        if func is np.copyto:
            plain = lambda a: a.view(np.ndarray) if isinstance(a, ProcessMemory) else a
            dst = args[0] if args else kwargs["dst"]
            np.copyto(plain(dst), *map(plain, args[1:]), **{k: plain(v) for k, v in kwargs.items() if k != "dst"})
            if isinstance(dst, ProcessMemory) and dst.counter is not None:
                dst._record(dst.view(np.ndarray))
            return None
        return super().__array_function__(func, types, args, kwargs)


def received_by_ring(fn: Callable, arrays: Sequence[np.ndarray]) -> List[int]:
    """How many values ``fn`` wrote into each process's array (on copies); a Mismatch if some value changed
    by a write that could not be counted."""
    memories = [np.array(a, dtype=np.float64) for a in arrays]
    counter = {"memories": memories, "written": [0] * len(arrays),
               "positions": [np.arange(len(m), dtype=np.int64) for m in memories],
               "marked": [np.zeros(len(m), dtype=bool) for m in memories]}
    wrapped = []
    for m in memories:
        w = m.view(ProcessMemory)
        w.counter = counter
        wrapped.append(w)
    fn(wrapped)
    for k, (before, after) in enumerate(zip(arrays, memories)):
        if np.any((after != before) & ~counter["marked"][k]):
            raise Mismatch(f"process {k}'s array changed by writes the check cannot follow",
                           "write into the chunks' views with chunk[...] = ... or chunk += ...: np.asarray(a)[...], "
                           "np.put, np.add.at and .flat write past the count of what each process receives")
    return counter["written"]


def check_ring_allreduce(ring_allreduce: Callable) -> Callable:
    """``ring_allreduce(arrays)``: the N equal 1-D arrays (one per process) each become their sum, in place."""
    def run(fn: Callable) -> List[float]:
        rng, errors = _rng(), []
        for n, length in [(2, 6), (3, 9), (4, 10), (5, 23), (4, 3)]:
            arrays = [rng.standard_normal(length) for _ in range(n)]
            total = np.sum(arrays, axis=0)
            known = [(m, RING_HINTS[kind]) for kind in RING_HINTS for m in [_ring_mistake(arrays, kind)]]
            mine = [a.copy() for a in arrays]
            returned = fn(mine)
            if all(np.array_equal(m, a) for m, a in zip(mine, arrays)) and isinstance(returned, (list, tuple)) \
                    and len(returned) == n and all(np.allclose(host(v), total) for v in returned):
                raise Mismatch(f"{n} processes: the sums were returned but the arrays left as they were",
                               "each process's array must become the sum in place (a[...] = ..., or += into its views)")
            if all(np.allclose(m, total) for m in mine) and not all(np.array_equal(mine[0], m) for m in mine):
                raise Mismatch(f"{n} processes: the sums differ between the processes in the last bits",
                               "each chunk is added up once, along the ring, then copied: every process must hold "
                               "the same bits, or their weights drift apart")
            for r in range(n):
                errors.append(compare(f"process {r}'s array", mine[r], total, "the plain sum",
                                      [(m[r], hint) for m, hint in known],
                                      f"{n} processes, {length} values (after the call: in place)"))
        for n, length in [(2, 6), (3, 9), (4, 12)]:   # the right sums: now, were they made by a ring?
            ring = 2 * (n - 1) * length // n
            received = received_by_ring(fn, [rng.standard_normal(length) for _ in range(n)])
            if received != [ring] * n:
                raise Mismatch(f"{n} processes, {length} values: {received} values were written into the processes' "
                               f"arrays; a ring writes {ring} into each (2(N-1) chunks of {length // n})",
                               "the sums are right, the traffic is not a ring's: at each of the N-1 steps of each phase "
                               "every process receives one chunk. The plain sum written back writes all "
                               f"{length} values into each, everything gathered on process 0 writes (N-1) x "
                               f"{length} there, and N steps per phase write 2N chunks")
        return errors
    return verdict("ring_allreduce", ring_allreduce, reference_ring_allreduce, run, "the plain sum")


def _bn_shards(xs: Sequence[np.ndarray], gamma: np.ndarray, eps: float) -> Tuple[Any, Any, Any, int]:
    """The whole batch's statistics, from the shards: (mean, var, inv_std, count)."""
    whole = np.concatenate(xs)
    mean, var = whole.mean(axis=(0, 2, 3)), whole.var(axis=(0, 2, 3))
    return mean, var, 1 / np.sqrt(var + eps), whole.size // whole.shape[1]


def reference_sync_bn_forward(xs: Sequence[Any], gamma: Any, beta: Any, eps: float = 1e-5) -> Tuple[List[Any], Any]:
    """Per-shard inputs ``xs`` (each (n_k, C, H, W)) -> (per-shard outputs, cache = (xhats, s, gamma, M)),
    with the statistics of all the shards together: counts, sums and sums of squares added up."""
    m = sum(x.size // x.shape[1] for x in xs)
    s1 = sum(x.sum(axis=(0, 2, 3)) for x in xs)
    s2 = sum((x * x).sum(axis=(0, 2, 3)) for x in xs)
    mean = s1 / m
    s = 1 / np.sqrt(s2 / m - mean * mean + eps)
    xhats = [(x - mean.reshape(1, -1, 1, 1)) * s.reshape(1, -1, 1, 1) for x in xs]
    return [gamma.reshape(1, -1, 1, 1) * xh + beta.reshape(1, -1, 1, 1) for xh in xhats], (xhats, s, gamma, m)


def reference_sync_bn_backward(dys: Sequence[Any], cache: Any) -> List[Tuple[Any, Any, Any]]:
    """-> per shard (dx_k, dgamma_k, dbeta_k): dx with the sums of every shard, dgamma/dbeta the shard's share."""
    xhats, s, gamma, m = cache
    dbetas = [dy.sum(axis=(0, 2, 3)) for dy in dys]
    dgammas = [(dy * xh).sum(axis=(0, 2, 3)) for dy, xh in zip(dys, xhats)]
    dbeta, dgamma = sum(dbetas), sum(dgammas)                     # the two allreduces of the backward
    scale = (gamma * s / m).reshape(1, -1, 1, 1)
    return [(scale * (m * dy - dbeta.reshape(1, -1, 1, 1) - xh * dgamma.reshape(1, -1, 1, 1)), dg, db)
            for dy, xh, dg, db in zip(dys, xhats, dgammas, dbetas)]


# images per shard, (C, H, W) of an image (C != W: a count of values taken along the wrong axis fails), eps
SYNC_BN_CASES = [((3, 2), (3, 4, 3), 1e-5), ((1, 2, 2), (4, 5, 6), 1e-5), ((2, 2, 1, 3), (3, 4, 2), 0.1)]


def _sync_bn_case(rng: np.random.Generator, counts: Sequence[int],
                  shape: Tuple[int, int, int]) -> Tuple[List[np.ndarray], np.ndarray, np.ndarray]:
    # each shard its own offset: the shards' statistics differ, as those of small random batches do
    # and channel 2 with a variance near eps (~2e-5), so that a missing eps shows
    c = shape[0]
    scale = np.where(np.arange(c) == 2, 0.002, 1.0).reshape(1, c, 1, 1)
    xs = [(rng.standard_normal((n, *shape)) * 2 + rng.standard_normal((1, c, 1, 1))) * scale for n in counts]
    return xs, rng.standard_normal(c), rng.standard_normal(c)


def check_sync_bn_forward(sync_bn_forward: Callable) -> Callable:
    """``sync_bn_forward(xs, gamma, beta, eps) -> (outs, cache)``: the outputs, shard by shard, of BatchNorm2d
    on the concatenated batch."""
    def run(fn: Callable) -> List[float]:
        rng, errors = _rng(), []
        for counts, shape, eps in SYNC_BN_CASES:
            xs, gamma, beta = _sync_bn_case(rng, counts, shape)
            expected, _, _, _ = _bn_reference(np.concatenate(xs), gamma, beta, np.zeros_like(np.concatenate(xs)), eps)
            own = np.concatenate([host(_bn_reference(x, gamma, beta, np.zeros_like(x), eps)[0]) for x in xs])
            mean, _, _, _ = _bn_shards(xs, gamma, eps)
            avg_var = sum(x.var(axis=(0, 2, 3)) * x.shape[0] for x in xs) / sum(counts)   # within-shard only
            no_spread = np.concatenate([(x - mean.reshape(1, -1, 1, 1)) / np.sqrt(avg_var + eps).reshape(1, -1, 1, 1)
                                        * gamma.reshape(1, -1, 1, 1) + beta.reshape(1, -1, 1, 1) for x in xs])
            result = call_leaving_inputs(fn, xs, gamma, beta, eps)
            expect_parts(result, 2, "return the list of outputs and the cache")
            outs = result[0]
            if len(outs) != len(xs):
                raise Mismatch(f"{len(outs)} outputs for {len(xs)} shards", "return one output per shard, in order")
            known = [(own, "each shard is normalised with its own statistics: add the counts, sums and sums of "
                           "squares of every shard first, then divide"),
                     (no_spread, "the variance of the whole batch is not the average of the shards' variances (the "
                                 "shards' means differ too): add the sums of squares, var = sum(x^2) / M - mean^2")]
            errors.append(compare("out", np.concatenate([host(o) for o in outs]), expected,
                                  "BatchNorm2d on the concatenated batch", known,
                                  f"shards of {counts} images of {shape}, eps {eps:g}"))
        return errors
    return verdict("sync_bn_forward", sync_bn_forward, reference_sync_bn_forward, run,
                   "BatchNorm2d on the concatenated batch")


def check_sync_bn_backward(sync_bn_backward: Callable, sync_bn_forward: Callable) -> Callable:
    """``sync_bn_backward(dys, cache) -> [(dx_k, dgamma_k, dbeta_k) per shard]`` with the cache of your
    ``sync_bn_forward``: the dx of BatchNorm2d on the concatenated batch, and each shard's share of dgamma, dbeta."""
    def run(fn: Callable) -> List[float]:
        rng, errors = _rng(), []
        for counts, shape, eps in SYNC_BN_CASES:
            xs, gamma, beta = _sync_bn_case(rng, counts, shape)
            dys = [rng.standard_normal(x.shape) for x in xs]
            _, dx, dgamma, dbeta = _bn_reference(np.concatenate(xs), gamma, beta, np.concatenate(dys), eps)
            _, _, inv_std, _ = _bn_shards(xs, gamma, eps)
            xhats = reference_sync_bn_forward(xs, gamma, beta, eps)[1][0]
            shares_g = [(dy * xh).sum(axis=(0, 2, 3)) for dy, xh in zip(dys, xhats)]
            shares_b = [dy.sum(axis=(0, 2, 3)) for dy in dys]
            m = sum(x.size // x.shape[1] for x in xs)
            per = lambda v: v.reshape(1, -1, 1, 1)
            local = [np.concatenate([per(gamma * inv_std / c) * (c * dy - per(sb) - xh * per(sg))
                                     for dy, xh, sg, sb, c in zip(dys, xhats, shares_g, shares_b, sizes)])
                     for sizes in ([m] * len(xs), [x.size // x.shape[1] for x in xs])]   # the shard's sums, M or m_k
            own_m = np.concatenate([host(_bn_reference(x, gamma, beta, dy, eps)[1]) for x, dy in zip(xs, dys)])
            case = f"shards of {counts} images of {shape}, eps {eps:g}"
            hint_local = "your dx uses the shard's own sums of dy and dy * xhat: every image moved the mean and the " \
                         "variance, so both sums must be those of the whole batch (added up over the shards)"
            whole = ("your dgamma/dbeta is the whole batch's on every shard: the gradient allreduce adds the shards' "
                     "values up afterwards and would count it N times; keep the shard's own share")

            def scored(result: Any) -> List[float]:
                if not isinstance(result, (list, tuple)) or len(result) != len(xs) or \
                        any(not isinstance(r, (tuple, list)) or len(r) != 3 for r in result):
                    raise Mismatch("return one (dx, dgamma, dbeta) per shard",
                                   "return a list: [(dx_k, dgamma_k, dbeta_k) for each shard]")
                found = [compare("dx", np.concatenate([host(r[0]) for r in result]), dx,
                                 "BatchNorm2d.backward on the concatenated batch",
                                 [(local[0], hint_local), (local[1], hint_local), (own_m, hint_local)], case)]
                for k, r in enumerate(result):
                    found.append(compare("dgamma", r[1], shares_g[k], "the shard's share of dgamma",
                                         [(dgamma, whole)], f"{case}, shard {k}"))
                    found.append(compare("dbeta", r[2], shares_b[k], "the shard's share of dbeta",
                                         [(dbeta, whole)], f"{case}, shard {k}"))
                found.append(compare("sum of the shards' dgamma", sum(host(r[1]) for r in result), dgamma,
                                     "BatchNorm2d's dgamma on the concatenated batch", (), case))
                return found

            own_cache = sync_bn_forward([x.copy() for x in xs], gamma, beta, eps)[1]
            sync_bn_forward([x * 2 + 1 for x in xs], gamma, beta, eps)   # another layer's forward in between
            result = call_leaving_inputs(fn, dys, own_cache)
            try:
                errors += scored(result)
            except Mismatch as failure:
                if sync_bn_forward is not reference_sync_bn_forward:   # is it the forward's cache?
                    try:
                        scored(fn([dy.copy() for dy in dys], reference_sync_bn_forward(xs, gamma, beta, eps)[1]))
                    except Exception:
                        raise failure
                    raise Mismatch(f"{case}: your backward is right with the cache of the text's forward and wrong "
                                   "with your forward's",
                                   "look at what your sync_bn_forward keeps: the cache is (xhats, s, gamma, M) with "
                                   "s = 1 / sqrt(var + eps), the inverse of the standard deviation, and M the number "
                                   "of values per channel over all the shards") from failure
                raise
        return errors
    return verdict("sync_bn_backward", sync_bn_backward, reference_sync_bn_backward, run,
                   "BatchNorm2d.backward on the concatenated batch")


# --- training and evaluating (lesson 13) ---------------------------------------------------------------

def reference_train_steps(model: Any, optimizer: Any, loss_fn: Any, batches: Sequence[Tuple[Any, Any]]) -> List[float]:
    """One training step per (x, y) batch: clear the gradients, forward, loss, backward, optimizer step."""
    return _train_mistake("")(model, optimizer, loss_fn, batches)


def _train_mistake(kind: str) -> Callable:
    """The training steps, right (kind "") or with one classic slip: "eval", "no zero_grad", "zero_grad last",
    "no step"."""
    def steps(model: Any, optimizer: Any, loss_fn: Any, batches: Sequence[Tuple[Any, Any]]) -> List[float]:
        if kind != "eval":
            model.train()
        losses = []
        for x, y in batches:
            if kind not in ("no zero_grad", "zero_grad last"):
                optimizer.zero_grad()
            loss = loss_fn.forward(model.forward(x), y)
            model.backward(loss_fn.backward(), input_grad=False)
            if kind != "no step":
                optimizer.step()
            if kind == "zero_grad last":
                optimizer.zero_grad()
            losses.append(float(loss))
        return losses
    return steps


def _train_run(fn: Callable) -> Tuple[List[float], np.ndarray]:
    """A tiny U-Net, fresh from the same seed and left in eval mode (as after a validation pass),
    trained by ``fn`` on 3 different batches; its losses and all its weights afterwards."""
    from tinyunet.data import iterate_batches, make_shapes
    from tinyunet.losses import CrossEntropyLoss
    from tinyunet.models import UNet
    from tinyunet.optim import Adam
    with backend_numpy(), reference_layers():
        data = make_shapes(12, 16, seed=3)
        batches = [(x, y) for x, y, _ in iterate_batches(data, 4, shuffle=False, rng=None)]
        backend.seed(0)
        model = UNet(3, 3, base_channels=4, depth=2)
        model.eval()
        rng = np.random.default_rng(1)
        for p in model.parameters():   # stale gradients, as a previous step leaves them: a step must clear them first
            p.grad[...] = to_device(rng.standard_normal(p.grad.shape).astype(p.grad.dtype))
        # the batches as the lesson's loader hands them: one pass, no len()
        losses = fn(model, Adam(model.parameters(), lr=1e-2), CrossEntropyLoss(), iter(batches))
        weights = np.concatenate([host(p.data).ravel() for p in model.parameters()] +   # and BatchNorm's statistics
                                 [host(b).ravel() for _, b in model.named_buffers()])
    return losses, weights


def check_train_steps(train_steps: Callable) -> Callable:
    """``train_steps(model, optimizer, loss_fn, batches) -> list of losses``, one step per batch."""
    def run(fn: Callable) -> List[float]:
        expected_losses, expected_weights = _train_run(reference_train_steps)
        losses, weights = _train_run(fn)
        if not isinstance(losses, (list, tuple, np.ndarray)) or len(losses) != len(expected_losses):
            raise Mismatch(f"your function returned {len(losses) if hasattr(losses, '__len__') else 'no'} losses "
                           f"for {len(expected_losses)} batches", "return a list of float(loss), one per step (the "
                           "batches may come from a one-pass loader, as in the lesson: no len(), loop over them once)")
        if not all(isinstance(loss, float) for loss in losses):
            raise Mismatch(f"your losses are {type(losses[0]).__name__}, not float",
                           "append float(loss): a Python number (on a GPU the loss is a device array, and a list of "
                           "them keeps every step's memory and syncs later, where it is hard to find)")
        known = {kind: _train_run(_train_mistake(kind)) for kind in ("no zero_grad", "zero_grad last", "no step", "eval")}
        hints = {"no zero_grad": "gradients accumulate: clear them (optimizer.zero_grad()) at the start of every step, "
                                 "before the backward (the model may come with gradients of an earlier step)",
                 "zero_grad last": "clear the gradients at the start of each step, before its backward: cleared after "
                                   "the step, the first step still adds the gradients the model came with",
                 "no step": "the weights never moved with this batch's gradient: the order is zero_grad, forward, "
                            "loss, backward, then optimizer.step() (a zero_grad after backward, or a step before it, "
                            "throws the gradient away; an optimizer made on copies of the parameters moves the copies)",
                 "eval": "the model comes in eval mode (as after a validation pass): call model.train() before training"}
        try:
            return [compare("losses", np.array(losses, dtype=np.float64), np.array(expected_losses), "the reference loop",
                            [(np.array(known[k][0]), hints[k]) for k in known], "3 batches of 4 images",
                            tolerance=TOLERANCE),          # a float32 model: float32's 7 digits
                    compare("weights and BatchNorm statistics after training", weights, expected_weights,
                            "the reference loop", [(known[k][1], hints[k]) for k in known], "3 batches of 4 images",
                            tolerance=TOLERANCE)]
        except Mismatch as failure:
            if failure.hint == BY_HAND:
                failure.hint = ("compare your loop with the text's, step by step: model.train() once, then for each "
                                "batch zero_grad, one forward, the loss, backward, optimizer.step(), float(loss); the "
                                "optimizer you are given, used as it is (a second forward also moves BatchNorm's "
                                "running statistics)")
            raise
    return verdict("train_steps", train_steps, reference_train_steps, run, "the reference loop")


def reference_iou_per_class(cm: Any) -> np.ndarray:
    """IoU of each class from a confusion matrix cm[true, predicted]; NaN for a class absent from both."""
    from tinyunet.metrics import iou_per_class
    return iou_per_class(cm)


def check_iou_per_class(iou_fn: Callable) -> Callable:
    """``iou_per_class(cm) -> (C,)``: TP / (TP + FP + FN) per class, NaN where 0/0."""
    def run(fn: Callable) -> List[float]:
        cm = np.array([[50, 3, 7, 0], [11, 80, 2, 0], [5, 9, 20, 0], [0, 0, 0, 0]], dtype=np.int64)   # class 3: absent
        tp = np.diag(cm).astype(np.float64)
        mine = np.asarray(to_host(call_leaving_inputs(fn, cm)), dtype=np.float64)
        expected = reference_iou_per_class(cm)
        if mine.shape != expected.shape:
            raise Mismatch(f"iou: wrong shape {mine.shape}", f"one IoU per class: shape {expected.shape}")
        if not np.isnan(mine[3]):
            raise Mismatch(f"iou of a class absent from truth and prediction: {mine[3]:g}",
                           "0/0 is no score: return NaN there (and leave it out of the mean), not 0 or 1")
        with np.errstate(invalid="ignore", divide="ignore"):
            slips = [(tp / (cm.sum(0) + cm.sum(1)), "the union counts TP once: TP + FP + FN = row sum + column sum - TP"),
                     (tp / cm.sum(1), "that is the recall (TP / row sum): the union also holds the false positives"),
                     (tp / cm.sum(0), "that is the precision (TP / column sum): the union also holds the false negatives")]
        errors = [compare("iou", mine[:3], expected[:3], "tinyunet.metrics.iou_per_class",
                          [(w[:3], h) for w, h in slips], "4 classes, the last absent")]
        # classes scored 0, not NaN: in the truth but never predicted (1), predicted but not in the truth (2),
        # both but never on the same pixel (3); each has a union, only TP is 0
        cm = np.array([[30, 0, 4, 2], [6, 0, 1, 0], [0, 0, 0, 0], [3, 0, 0, 0]], dtype=np.int64)
        mine = np.asarray(to_host(call_leaving_inputs(fn, cm)), dtype=np.float64)
        expected = reference_iou_per_class(cm)
        for k, what in [(1, "in the truth but never predicted"), (2, "predicted but not in the truth"),
                        (3, "in both, never on the same pixel")]:
            if mine.shape == expected.shape and not mine[k] == 0:
                raise Mismatch(f"iou of a class {what}: {mine[k]:g}",
                               "its union holds pixels (its FN or FP) and TP = 0: IoU 0, a real score, not NaN; NaN "
                               "only where the union itself is 0")
        errors.append(compare("iou", mine, expected, "tinyunet.metrics.iou_per_class", [], "classes of IoU 0"))
        # 3 classes (the trimaps'), with sums beyond int16's reach (a validation set has millions of pixels)
        cm = np.array([[90_000, 2_100, 950], [1_800, 120_000, 1_200], [600, 1_400, 41_000]], dtype=np.int64)
        mine = np.asarray(to_host(call_leaving_inputs(fn, cm)), dtype=np.float64)
        errors.append(compare("iou", mine, reference_iou_per_class(cm), "tinyunet.metrics.iou_per_class", [],
                              "3 classes, counts above 32767", tolerance=TOLERANCE))   # float32 IoUs are fine
        return errors
    return verdict("iou_per_class", iou_fn, reference_iou_per_class, run, "tinyunet.metrics.iou_per_class")
