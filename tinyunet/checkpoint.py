"""Checkpoints: model weights + optimizer state + metadata in one ``.npz``, without pickle.

File layout (flat keys of one NumPy ``.npz`` archive)::

    model/<parameter name>   one array per entry of model.state_dict()     e.g. model/enc1.0.weight
    optim/<key>              one array per entry of optimizer.state_dict()  e.g. optim/m.0
    meta                     0-d unicode array holding a JSON object:
                             {"format": "tinyunet-checkpoint", "version": 1,
                              "has_optimizer": true, ...caller's fields (epoch, config, arch, metrics)}

Why not pickle (``torch.save``-style)? Unpickling runs code chosen by whoever wrote the file, so a
downloaded checkpoint could do anything. Plain ``.npy`` entries + JSON are data only, and we load
with ``allow_pickle=False`` so a file that smuggles in object arrays is refused.

Writes are atomic: the archive goes to a temporary file in the same directory, is flushed to disk,
then renamed over the target in one step (``os.replace``). A crash or Ctrl-C mid-save leaves the
previous checkpoint untouched instead of a half-written file.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from tinyunet.backend import to_host
from tinyunet.errors import CheckpointError

__all__ = ["FORMAT", "VERSION", "save_checkpoint", "load_checkpoint", "restore"]

FORMAT = "tinyunet-checkpoint"
VERSION = 1

PathLike = Union[str, "os.PathLike[str]"]
State = Dict[str, np.ndarray]


def _json_default(value: Any) -> Any:
    """Let callers put NumPy scalars/arrays (np.float32 losses, shapes) in ``meta``."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"meta value of type {type(value).__name__} is not JSON-serializable")


def _host_arrays(prefix: str, state: Dict[str, Any]) -> State:
    """``{name: array}`` -> ``{prefix/name: host ndarray}``, refusing what np.savez would pickle."""
    out: State = {}
    for name, value in state.items():
        array = np.asarray(to_host(value))
        if array.dtype.hasobject:
            raise CheckpointError(f"cannot save {prefix}/{name}: object arrays would need pickle; use a numeric dtype")
        out[f"{prefix}/{name}"] = array
    return out


def _fsync_directory(directory: str) -> None:
    """Make the rename itself durable (POSIX); harmless no-op where directories can't be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(
    path: PathLike,
    model_state: Dict[str, Any],
    optim_state: Optional[Dict[str, Any]],
    meta: Dict[str, Any],
) -> None:
    """Write a checkpoint atomically to exactly ``path`` (no suffix is added; ``.npz`` is customary).

    Args:
        path: target file; missing parent folders are created. An existing file is replaced only
            once the new one is completely on disk.
        model_state: ``model.state_dict()`` — ``{name: array}`` (device arrays are copied to the host).
        optim_state: ``optimizer.state_dict()`` or None to save weights only.
        meta: JSON-serializable dict (epoch, config, arch, metrics, ...). ``format``, ``version`` and
            ``has_optimizer`` are set by this function.
    """
    # Everything that can fail on bad input happens before touching the disk.
    arrays = _host_arrays("model", model_state)
    arrays.update(_host_arrays("optim", optim_state or {}))
    full_meta = {**meta, "format": FORMAT, "version": VERSION, "has_optimizer": optim_state is not None}
    try:
        arrays["meta"] = np.array(json.dumps(full_meta, default=_json_default))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot save checkpoint metadata: {exc}") from exc

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # Same directory as the target, so os.replace is a rename within one filesystem (atomic).
    tmp = tempfile.NamedTemporaryFile(
        dir=directory, prefix=os.path.basename(path) + ".", suffix=".npz.tmp", delete=False
    )
    try:
        with tmp:
            np.savez(tmp, **arrays)  # a file object, so np.savez does not append ".npz" to the name
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp.name, 0o644)  # temp files are created 0600; a checkpoint is an ordinary output file
        os.replace(tmp.name, path)
    except BaseException:  # including KeyboardInterrupt: never leave a stray temp file behind
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp.name)
        raise
    _fsync_directory(directory)


def _read_meta(archive: Any, path: str) -> Dict[str, Any]:
    """Parse and check the ``meta`` entry of an open archive."""
    if "meta" not in archive.files:
        raise CheckpointError(f"{path} is not a tinyunet checkpoint (no 'meta' entry)")
    raw = archive["meta"]
    if raw.dtype.kind != "U" or raw.ndim != 0:
        raise CheckpointError(f"{path} is not a tinyunet checkpoint ('meta' is not a JSON string)")
    try:
        meta = json.loads(str(raw[()]))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} has damaged metadata (invalid JSON: {exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a tinyunet checkpoint (format tag is not {FORMAT!r})")
    version = meta.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {version!r}, this tinyunet reads up to {VERSION}; upgrade tinyunet"
        )
    return meta


def load_checkpoint(path: PathLike) -> Tuple[State, Optional[State], Dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Returns:
        ``(model_state, optim_state, meta)``: host arrays keyed by the original names (prefixes
        removed); ``optim_state`` is None if the checkpoint was saved without one.

    Raises:
        CheckpointError: file missing, not an ``.npz``, not a tinyunet checkpoint, damaged, or
        containing pickled (object) arrays.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    # np.load would try to read non-zip files as .npy or pickle; reject them up front instead.
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a tinyunet checkpoint (not an .npz archive)")
    model_state: State = {}
    optim_state: State = {}
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = _read_meta(archive, path)
            for key in archive.files:
                if key == "meta":
                    continue
                prefix, _, name = key.partition("/")
                if prefix == "model" and name:
                    model_state[name] = archive[key]
                elif prefix == "optim" and name:
                    optim_state[name] = archive[key]
                else:
                    raise CheckpointError(f"{path} has an unexpected entry {key!r}; is it a tinyunet checkpoint?")
    except CheckpointError:
        raise
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "pickle" in str(exc).lower():
            raise CheckpointError(
                f"{path} contains pickled object arrays; refused because unpickling can run arbitrary code"
            ) from exc
        raise CheckpointError(f"{path} is damaged: {exc}") from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(f"{path} is damaged or truncated: {exc}") from exc
    has_optimizer = meta.get("has_optimizer", bool(optim_state))
    return model_state, (optim_state if has_optimizer else None), meta


def restore(model: Any, optimizer: Any, path: PathLike) -> Dict[str, Any]:
    """Load ``path`` into ``model`` (and ``optimizer`` unless None); return the checkpoint's meta.

    Raises:
        CheckpointError: the file is unreadable, its weights do not fit the model (wrong
        architecture or size), or an optimizer was given but the checkpoint has no optimizer state.
    """
    model_state, optim_state, meta = load_checkpoint(path)
    try:
        model.load_state_dict(model_state)
    except ValueError as exc:
        arch = meta.get("arch")
        hint = f" (it was saved from arch {arch!r})" if arch else ""
        raise CheckpointError(f"{os.fspath(path)} does not match this model{hint}: {exc}") from exc
    if optimizer is not None:
        if optim_state is None:
            raise CheckpointError(
                f"{os.fspath(path)} has no optimizer state, so training cannot resume from it; "
                "load it for evaluation/prediction only"
            )
        try:
            optimizer.load_state_dict(optim_state)
        except ValueError as exc:
            raise CheckpointError(f"{os.fspath(path)} optimizer state does not match this optimizer: {exc}") from exc
    return meta
