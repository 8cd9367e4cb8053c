"""A strict CuPy stand-in for machines without a GPU.

CuPy copies NumPy's API but its arrays live on the device: NumPy cannot read them implicitly
(``numpy.asarray(cupy_array)`` raises ``TypeError``) and every device -> host copy is explicit
(``.get()``, ``float(a)``, ``a.item()``, ...). Code that works on NumPy can therefore still be broken
on CuPy: a stray ``np.sum(x)`` or ``np.asarray(x)`` on a device array, or a host array mixed into
device arithmetic. This module finds those mistakes on a CPU: the tests run the package on it, lesson
15's check runs the learner's evaluation loop on it, and benchmarks/launches.py counts a step's kernel
launches with it.

Design: :class:`FakeCupyArray` *wraps* (does not subclass) a NumPy array. An ndarray subclass cannot
refuse ``numpy.asarray`` (NumPy recognises the subclass and never asks it), and it would fool
``isinstance(a, numpy.ndarray)``, which is never true of a CuPy array. The wrapper:

- defines ``__array__`` raising ``TypeError`` (exactly what CuPy does), so ``np.asarray(a)``,
  ``np.array(a)`` and anything that converts through them fail;
- defines ``__array_function__`` raising ``TypeError``, so ``np.sum(a)``, ``np.concatenate([a])``, ...
  fail (stricter than CuPy, which re-dispatches them; the package must write ``xp.sum``);
- defines ``__array_ufunc__`` that *allows* NumPy ufuncs on it (CuPy does too, ``np.exp(a)`` gives a
  device array), but refuses host ``numpy.ndarray`` operands, as CuPy does for ``a + host_array``;
- forwards a fixed list of ndarray methods/attributes (``reshape``, ``sum``, ``astype``, ``T``, ...),
  whose results are wrapped again, so results stay on the "device";
- counts every explicit device -> host transfer (``get()``, ``float()``, ``int()``, ``bool()``,
  ``item()``, ``tolist()``, ``repr()``, ``asnumpy``) in :data:`stats` of the module (``"transfers"``,
  and the values they carried, ``"values_to_host"``), and every host -> device copy (``"uploads"``);
- counts every operation that would launch a GPU kernel (``stats["launches"]``, by name in
  :data:`launches`): each call of an array function, ufunc, operator, in-place operator, computing
  method (sum, max, astype, copy, ...), assignment into an array, advanced indexing, and reshape or
  ravel that must copy. Views (slicing, transpose, a reshape that needs no copy, sliding windows) and
  ``empty`` (an allocation from CuPy's pool) launch nothing. One count per call: CuPy runs some calls
  (var, pad, einsum) as several kernels, so this is a lower bound.

Module-level attributes (:func:`__getattr__`) forward to NumPy: functions unwrap their arguments
(refusing host arrays except in ``asarray``/``array``, the host -> device copies) and wrap array
results; dtypes and other classes pass through; ``ndarray`` is :class:`FakeCupyArray`;
``random`` is a wrapped ``numpy.random``.

Usage (see the ``fake_cupy`` fixture in conftest.py)::

    import fake_cupy
    backend.use_module(fake_cupy, "fake-cupy")
    ...
    fake_cupy.reset_counters(); ...; assert fake_cupy.stats["transfers"] <= 1
"""
from __future__ import annotations

import operator
import traceback
from collections import Counter
from types import ModuleType
from typing import Any, Dict, List

import numpy as _np

__all__ = ["FakeCupyArray", "stats", "transfer_log", "launches", "reset_counters", "asnumpy", "ndarray"]

#: explicit device -> host transfers, and operations that launch a kernel, since :func:`reset_counters`
stats: Dict[str, int] = {"transfers": 0, "values_to_host": 0, "launches": 0, "uploads": 0}
#: one (kind, short stack) entry per transfer, to tell *where* a transfer happened
transfer_log: List[tuple] = []
#: the launches by operation name (e.g. "matmul", "__add__", "sum", "setitem")
launches: Counter = Counter()

_SCALARS = (bool, int, float, complex, _np.generic)
# functions that only allocate (from CuPy's memory pool) or make views or answer questions: no kernel
_NO_KERNEL = {"empty", "empty_like", "sliding_window_view", "as_strided", "broadcast_to", "result_type",
              "shape", "ndim", "may_share_memory", "shares_memory", "iinfo", "finfo", "dtype", "isscalar"}
# array methods that compute (the others are views or attributes)
_COMPUTING = {"astype", "copy", "sum", "mean", "max", "min", "argmax", "argmin", "any", "all", "clip", "fill",
              "std", "var", "prod", "cumsum", "nonzero", "take", "repeat", "dot", "round", "argsort", "sort",
              "flatten", "put", "trace", "conj"}


def reset_counters() -> None:
    stats["transfers"] = stats["values_to_host"] = stats["launches"] = stats["uploads"] = 0
    transfer_log.clear()
    launches.clear()


def _launch(name: str) -> None:
    stats["launches"] += 1
    launches[name] += 1


def _count(kind: str, values: int = 1) -> None:
    stats["transfers"] += 1
    stats["values_to_host"] += values
    stack = traceback.extract_stack(limit=8)[:-2]
    transfer_log.append((kind, [f"{f.filename}:{f.lineno} {f.name}" for f in stack]))


def _refuse_host(value: Any, where: str) -> None:
    if isinstance(value, _np.ndarray):
        raise TypeError(
            f"fake-cupy: a host numpy.ndarray {value.shape} {value.dtype} was given to {where}; "
            "CuPy refuses host arrays here: move it with backend.to_device first"
        )


def _unwrap(value: Any, where: str, allow_host: bool = False) -> Any:
    """FakeCupyArray -> its ndarray, recursively through lists and tuples; refuse host arrays."""
    if isinstance(value, FakeCupyArray):
        return value._a
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(v, where, allow_host) for v in value)
    if not allow_host:
        _refuse_host(value, where)
    return value


def _wrap(value: Any) -> Any:
    """ndarray -> FakeCupyArray (numpy scalars become 0-d device arrays, as CuPy returns them)."""
    if isinstance(value, FakeCupyArray):
        return value
    if isinstance(value, _np.ndarray):
        return FakeCupyArray(value)
    if isinstance(value, _np.generic):
        return FakeCupyArray(_np.asarray(value))
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


def _operand(other: Any, op: str) -> Any:
    if isinstance(other, FakeCupyArray):
        return other._a
    if isinstance(other, _SCALARS):
        return other
    if isinstance(other, _np.ndarray):
        _refuse_host(other, f"operator {op}")
    raise TypeError(f"fake-cupy: unsupported operand type {type(other).__name__} for {op}")


def _index(key: Any) -> Any:
    """Unwrap device arrays inside an index (host index arrays are accepted, as CuPy does)."""
    if isinstance(key, FakeCupyArray):
        return key._a
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    if isinstance(key, list):
        return [_index(k) for k in key]
    return key


# ndarray attributes a device array offers (results are wrapped); anything else is an AttributeError
_METHODS = {
    "reshape", "transpose", "swapaxes", "astype", "copy", "sum", "mean", "max", "min", "argmax", "argmin",
    "ravel", "flatten", "squeeze", "any", "all", "clip", "fill", "std", "var", "prod", "cumsum", "nonzero",
    "take", "repeat", "dot", "round", "conj", "view", "T", "real", "imag", "shape", "dtype", "size", "ndim",
    "strides", "nbytes", "itemsize", "flags", "argsort", "sort", "diagonal", "trace", "put",
}


class FakeCupyArray:
    """A "device" array: a NumPy array NumPy itself is not allowed to read."""

    __slots__ = ("_a",)
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, array: _np.ndarray) -> None:
        if not isinstance(array, _np.ndarray):
            raise TypeError("FakeCupyArray wraps a numpy.ndarray")
        object.__setattr__(self, "_a", array)

    # --- the refusals --------------------------------------------------------------------------
    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a "
            "NumPy array explicitly. (fake-cupy: the code called numpy on a device array; use xp.*)"
        )

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        name = getattr(func, "__module__", "numpy") + "." + getattr(func, "__name__", str(func))
        raise TypeError(
            f"fake-cupy: {name}() was called on a device array; use the array module "
            "(tinyunet.backend.xp) instead of numpy for device arrays"
        )

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        where = f"numpy.{ufunc.__name__}.{method}"
        args = _unwrap(inputs, where)
        if "out" in kwargs:
            kwargs["out"] = _unwrap(kwargs["out"], where)
        if "where" in kwargs:
            kwargs["where"] = _unwrap(kwargs["where"], where)
        _launch(ufunc.__name__)
        result = getattr(ufunc, method)(*args, **kwargs)
        return _wrap(result)

    # --- explicit transfers (counted) ------------------------------------------------------------
    def get(self) -> _np.ndarray:
        _count("get", self._a.size)
        return self._a.copy()

    def item(self, *args: Any) -> Any:
        _count("item")
        return self._a.item(*args)

    def tolist(self) -> Any:
        _count("tolist", self._a.size)
        return self._a.tolist()

    def __float__(self) -> float:
        _count("float")
        return float(self._a)

    def __int__(self) -> int:
        _count("int")
        return int(self._a)

    def __index__(self) -> int:
        _count("index")
        return operator.index(self._a)

    def __complex__(self) -> complex:
        _count("complex")
        return complex(self._a)

    def __bool__(self) -> bool:
        _count("bool")
        return bool(self._a)

    def __repr__(self) -> str:
        _count("repr", self._a.size)
        return "fake_cupy." + repr(self._a)

    def __str__(self) -> str:
        _count("str", self._a.size)
        return str(self._a)

    def __format__(self, spec: str) -> str:
        _count("format", self._a.size)
        return format(self._a, spec) if self._a.ndim == 0 else format(str(self._a), spec)

    # --- structure ------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name in _METHODS:
            value = getattr(self._a, name)
            if callable(value):
                def method(*args: Any, **kwargs: Any) -> Any:
                    args = _unwrap(args, f"ndarray.{name}")
                    kwargs = {k: _unwrap(v, f"ndarray.{name}") for k, v in kwargs.items()}
                    result = value(*args, **kwargs)
                    if name in _COMPUTING and not (name == "astype" and result is self._a):
                        _launch(name)
                    elif name in ("reshape", "ravel") and not _np.shares_memory(result, self._a):
                        _launch(name)   # a reshape that had to copy
                    return _wrap(result)
                return method
            return _wrap(value)
        raise AttributeError(f"fake-cupy: device arrays have no attribute {name!r} in this stand-in")

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "shape":
            self._a.shape = value
        else:
            raise AttributeError(f"fake-cupy: cannot set {name!r} on a device array")

    def __len__(self) -> int:
        return len(self._a)

    def __iter__(self):
        for i in range(len(self._a)):
            yield FakeCupyArray(self._a[i:i + 1].reshape(self._a.shape[1:]))

    def __getitem__(self, key: Any) -> "FakeCupyArray":
        result = self._a[_index(key)]
        if isinstance(result, _np.ndarray) and result.size and not _np.shares_memory(result, self._a):
            _launch("getitem")   # advanced indexing gathers into a new array
        return _wrap(result)

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(value, FakeCupyArray):
            value = value._a
        _launch("setitem")
        self._a[_index(key)] = value

    def __copy__(self) -> "FakeCupyArray":
        return FakeCupyArray(self._a.copy())

    def __deepcopy__(self, memo: Any) -> "FakeCupyArray":
        return FakeCupyArray(self._a.copy())

    def __reduce__(self):
        raise TypeError("fake-cupy: pickling a device array is an implicit transfer; use .get()")


def _binary(op: Any, name: str, reflected: bool = False):
    def method(self: FakeCupyArray, other: Any) -> Any:
        b = _operand(other, name)
        _launch(name)
        return _wrap(op(b, self._a) if reflected else op(self._a, b))
    method.__name__ = name
    return method


def _inplace(op: Any, name: str):
    def method(self: FakeCupyArray, other: Any) -> Any:
        _launch(name)
        op(self._a, _operand(other, name))  # numpy's in-place operators write into self._a
        return self
    method.__name__ = name
    return method


def _unary(op: Any, name: str):
    def method(self: FakeCupyArray) -> Any:
        _launch(name)
        return _wrap(op(self._a))
    method.__name__ = name
    return method


for _name, _op in [("add", operator.add), ("sub", operator.sub), ("mul", operator.mul),
                   ("truediv", operator.truediv), ("floordiv", operator.floordiv), ("mod", operator.mod),
                   ("pow", operator.pow), ("matmul", operator.matmul), ("and", operator.and_),
                   ("or", operator.or_), ("xor", operator.xor), ("lshift", operator.lshift),
                   ("rshift", operator.rshift)]:
    setattr(FakeCupyArray, f"__{_name}__", _binary(_op, f"__{_name}__"))
    setattr(FakeCupyArray, f"__r{_name}__", _binary(_op, f"__r{_name}__", reflected=True))
    setattr(FakeCupyArray, f"__i{_name}__", _inplace(getattr(operator, f"i{_name}"), f"__i{_name}__"))
for _name, _op in [("lt", operator.lt), ("le", operator.le), ("gt", operator.gt), ("ge", operator.ge),
                   ("eq", operator.eq), ("ne", operator.ne)]:
    setattr(FakeCupyArray, f"__{_name}__", _binary(_op, f"__{_name}__"))
for _name, _op in [("neg", operator.neg), ("pos", operator.pos), ("abs", operator.abs),
                   ("invert", operator.invert)]:
    setattr(FakeCupyArray, f"__{_name}__", _unary(_op, f"__{_name}__"))

ndarray = FakeCupyArray

# functions that copy host data to the device: host arrays are their whole point
_HOST_TO_DEVICE = {"asarray", "array", "asanyarray", "ascontiguousarray"}


class _Function:
    """A NumPy function (or ufunc) seen through the stand-in: unwrap arguments, wrap results."""

    def __init__(self, func: Any, qualname: str) -> None:
        self._func, self._qualname = func, qualname

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        short = self._qualname.rsplit(".", 1)[-1]
        if short in _HOST_TO_DEVICE and self._qualname.count(".") == 1:
            return _to_device(self._func, *args, **kwargs)
        where = f"xp.{self._qualname.split('.', 1)[1]}"
        args = _unwrap(args, where)
        kwargs = {k: _unwrap(v, where) for k, v in kwargs.items()}
        if short not in _NO_KERNEL:
            _launch(short)
        return _wrap(self._func(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:  # ufunc methods: reduce, at, outer, accumulate; attributes
        value = getattr(self._func, name)
        return _Function(value, f"{self._qualname}.{name}") if callable(value) else value

    def __repr__(self) -> str:
        return f"<fake-cupy {self._qualname}>"


def _to_device(func: Any, obj: Any, *args: Any, **kwargs: Any) -> FakeCupyArray:
    on_device = isinstance(obj, FakeCupyArray)
    if on_device:
        obj = obj._a  # like cupy.asarray(device_array): no copy unless a dtype change asks for one
    elif isinstance(obj, (list, tuple)):
        obj = _unwrap(obj, "xp.asarray", allow_host=True)
    result = _np.asarray(func(obj, *args, **kwargs))
    if not on_device and isinstance(obj, _np.ndarray) and _np.shares_memory(result, obj):
        result = result.copy()  # a host -> device copy never shares memory with the host array
    if on_device and not _np.shares_memory(result, obj):
        _launch("asarray")      # a device array converted: a copy kernel
    elif not on_device:
        stats["uploads"] = stats.get("uploads", 0) + 1
    return FakeCupyArray(result)


def _forward(module: ModuleType, prefix: str, name: str) -> Any:
    value = getattr(module, name)
    if isinstance(value, type) or not callable(value):
        if isinstance(value, ModuleType):
            return _SubModule(value, f"{prefix}.{name}")
        return value  # dtypes (float32, int64), classes, constants
    return _Function(value, f"{prefix}.{name}")


class _SubModule:
    def __init__(self, module: ModuleType, prefix: str) -> None:
        self._module, self._prefix = module, prefix

    def __getattr__(self, name: str) -> Any:
        return _forward(self._module, self._prefix, name)


random = _SubModule(_np.random, "numpy.random")


def asnumpy(a: Any) -> _np.ndarray:
    """CuPy's explicit device -> host copy."""
    if isinstance(a, FakeCupyArray):
        return a.get()
    return _np.asarray(a)


def __getattr__(name: str) -> Any:  # module-level forwarding (PEP 562)
    if name.startswith("__"):
        raise AttributeError(name)
    return _forward(_np, "numpy", name)
