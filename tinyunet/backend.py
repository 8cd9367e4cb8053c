"""The one seam between tinyunet and the hardware: the array module ``xp``.

Every layer, loss, optimizer and model writes ``xp.zeros(...)``, ``xp.matmul(...)`` and so on, where
``xp`` is NumPy on a CPU or CuPy on an NVIDIA GPU. CuPy copies NumPy's API, so the same code runs on
both; only the edges (loading data, logging a scalar, saving a checkpoint) move arrays between the
host (NumPy) and the device with :func:`to_device` and :func:`to_host`.

Choice of backend, in order:

1. ``use("numpy")`` / ``use("cupy")`` called by a program (the CLI's ``--backend``);
2. the environment variable ``TINYUNET_BACKEND=numpy|cupy``;
3. CuPy if it imports and a CUDA device is present, else NumPy.

Asking for CuPy where it cannot work is an error that says why, never a silent fallback.

The CPU acceleration (tinyunet/accel) runs beside the layers on NumPy. :func:`accelerate` says whether
it may: not on CuPy, and not where ``TINYUNET_ACCEL=0`` or ``set_acceleration(False)`` asked for the
reference layers alone (tinyunet/nn, the code the lessons derive).
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["xp", "use", "use_module", "name", "to_device", "to_host", "seed", "host_rng", "BackendError",
           "accelerate", "set_acceleration"]


class BackendError(RuntimeError):
    """The requested backend cannot be used on this machine."""


def _load_cupy() -> ModuleType:
    try:
        import cupy  # type: ignore
    except Exception as exc:  # ImportError, or a broken CUDA install raising at import
        raise BackendError(
            f"backend 'cupy' was requested but CuPy does not import ({exc.__class__.__name__}: {exc}); "
            "install it with `pip install -e .[gpu]` on a machine with CUDA 12, or use --backend numpy"
        ) from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        raise BackendError(f"backend 'cupy' was requested but no CUDA device is usable: {exc}") from exc
    if count < 1:
        raise BackendError("backend 'cupy' was requested but no CUDA device was found")
    return cupy


class _ArrayModule:
    """A stand-in for the active array module: ``xp.zeros`` is ``numpy.zeros`` or ``cupy.zeros``.

    Code imports this one object (``from tinyunet.backend import xp``) and every attribute lookup is
    forwarded to whichever module is active, so switching backends needs no re-import. The active
    module's public names are copied onto this object (:func:`use_module`), so ``xp.empty`` is a
    plain attribute lookup; ``__getattr__`` forwarding each lookup cost ~0.6 us, ~4500 times per
    training step, each with the GIL held. (So a module attribute replaced after ``use_module`` is not
    seen until ``use_module`` runs again; names the module creates lazily still go through
    ``__getattr__``.)
    """

    def __init__(self) -> None:
        self._module: ModuleType | None = None
        self._name = ""

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            _select_default()
        return getattr(self._module, attr)

    def __repr__(self) -> str:
        return f"<tinyunet array module: {self._name or 'not chosen yet'}>"


xp: Any = _ArrayModule()


def use_module(module: ModuleType, label: str | None = None) -> None:
    """Make ``module`` the array module (tests use this to install a strict CuPy stand-in)."""
    state = vars(xp)
    for attr in [attr for attr in state if not attr.startswith("_")]:
        del state[attr]                  # the previous module's names
    state.update((attr, value) for attr, value in vars(module).items() if not attr.startswith("_"))
    object.__setattr__(xp, "_module", module)
    object.__setattr__(xp, "_name", label or module.__name__)


def use(backend: str) -> None:
    """Select ``'numpy'`` or ``'cupy'``; raises :class:`BackendError` if CuPy cannot work here."""
    if backend == "numpy":
        use_module(np, "numpy")
    elif backend == "cupy":
        use_module(_load_cupy(), "cupy")
    else:
        raise BackendError(f"unknown backend {backend!r}: choose 'numpy' or 'cupy'")


def _select_default() -> None:
    forced = os.environ.get("TINYUNET_BACKEND", "").strip().lower()
    if forced:
        use(forced)
        return
    try:
        use("cupy")
    except BackendError:
        use("numpy")


def name() -> str:
    """The active backend's name: ``'numpy'`` or ``'cupy'`` (or a test stand-in's label)."""
    if xp._module is None:
        _select_default()
    return xp._name


def to_device(array: Any, dtype: Any = None) -> Any:
    """Copy a host (NumPy) array to the active backend, optionally casting it."""
    out = xp.asarray(array)
    return out if dtype is None else out.astype(dtype, copy=False)


def to_host(array: Any) -> np.ndarray:
    """Copy an array of the active backend to a NumPy array (``.get()`` on CuPy)."""
    if isinstance(array, np.ndarray):
        return array
    if hasattr(array, "get"):
        return array.get()
    return np.asarray(array)


_host_rng = np.random.default_rng(0)


def seed(value: int) -> None:
    """Seed the generator that initialises weights (and the backend's own, for dropout-like uses)."""
    global _host_rng
    _host_rng = np.random.default_rng(value)
    xp.random.seed(value)


def host_rng() -> np.random.Generator:
    """The host generator used for weight initialisation.

    Weights are drawn on the host and copied to the device once, so the same seed gives the same
    initial model on NumPy and on CuPy.
    """
    return _host_rng


_acceleration = os.environ.get("TINYUNET_ACCEL", "").strip().lower() not in ("0", "false", "no", "off")


def set_acceleration(enabled: bool) -> bool:
    """Let the CPU acceleration (tinyunet/accel) run where it can (True, the default), or run the
    reference layers alone (False; as ``TINYUNET_ACCEL=0``, or ``--no-accel`` on the command line).
    Returns the previous setting."""
    global _acceleration
    previous, _acceleration = _acceleration, bool(enabled)
    return previous


def accelerate_switch() -> bool:
    """The switch alone (True unless the acceleration was switched off), whatever the backend."""
    return _acceleration


def accelerate() -> bool:
    """Whether the layers may hand their work to the CPU acceleration: switched on, and on NumPy."""
    return _acceleration and name() == "numpy"
