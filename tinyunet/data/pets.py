"""Oxford-IIIT Pet in its official layout: check, read, decode, resize, cache.

    <root>/images/<Name>.jpg
    <root>/annotations/trimaps/<Name>.png      values 1 = pet, 2 = background, 3 = outline
    <root>/annotations/trainval.txt, test.txt  "Name CLASS-ID SPECIES BREED-ID" per line

Decoding ~3700 JPEGs takes seconds, so :func:`load_pets` saves the preprocessed uint8 arrays as one
``.npz`` per (split, size) in a cache folder outside the (possibly read-only) data folder. The cache
file name carries a fingerprint of the sources (split file contents; each file's name, byte size and
mtime), so editing, adding or replacing a file makes a fresh cache instead of serving stale arrays.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from tinyunet.cache import default_cache_dir
from tinyunet.classes import trimap_to_labels
from tinyunet.data.dataset import SegmentationData, iterate_batches, split_train_val
from tinyunet.data.images import UnreadableImage, read_photo
from tinyunet.data.transforms import resize_image, resize_mask
from tinyunet.errors import DataError

__all__ = [
    "SegmentationData",
    "DataWarning",
    "SPLITS",
    "default_data_dir",
    "default_cache_dir",
    "check_layout",
    "read_split",
    "load_pets",
    "load_native_labels",
    "NativeLabels",
    "split_train_val",
    "iterate_batches",
]

SPLITS = ("trainval", "test")
_CACHE_VERSION = 2  # bump when the preprocessing changes, so old caches are not reused (2: read_photo)
_FIX = "run `tinyunet download --root DIR` or pass --data DIR pointing at an Oxford-IIIT Pet folder"


class DataWarning(UserWarning):
    """Some examples were skipped (unreadable, missing or malformed); training goes on without them."""


class _BadExample(Exception):
    """One example cannot be used; the message is the reason shown to the user."""


def default_data_dir() -> Path:
    """``$TINYUNET_DATA`` if set, else ``~/.cache/tinyunet/oxford-iiit-pet`` (where `tinyunet download` puts it)."""
    env = os.environ.get("TINYUNET_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tinyunet" / "oxford-iiit-pet"


def _check_split_name(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


def check_layout(root: str | Path, split: str | None = None) -> None:
    """Raise DataError naming every missing part of the official layout under ``root``.

    Args:
        root: the dataset folder.
        split: check only this split's list file; ``None`` checks both trainval.txt and test.txt.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist; {_FIX}")
    splits = SPLITS if split is None else (split,)
    if split is not None:
        _check_split_name(split)
    wanted = [root / "images", root / "annotations" / "trimaps"]
    missing = [f"{p.relative_to(root)}/" for p in wanted if not p.is_dir()]
    missing += [f"annotations/{s}.txt" for s in splits if not (root / "annotations" / f"{s}.txt").is_file()]
    if missing:
        raise DataError(f"data folder {root} is missing {', '.join(missing)}; {_FIX}")


def read_split(root: str | Path, split: str) -> list[str]:
    """Example names of a split, from the first column of ``annotations/<split>.txt``.

    Blank lines and ``#`` comment lines are skipped; order is kept as in the file.
    """
    _check_split_name(split)
    path = Path(root) / "annotations" / f"{split}.txt"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read split file {path} ({exc.strerror or exc}); {_FIX}") from exc
    return [line.split()[0] for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _paths(root: Path, name: str) -> tuple[Path, Path]:
    return root / "images" / f"{name}.jpg", root / "annotations" / "trimaps" / f"{name}.png"


def _load_example(root: Path, name: str, size: int) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Decode, check and resize one example.

    Returns:
        image uint8 (size, size, 3) RGB, labels uint8 (size, size) class ids, and a note or None.
    Raises:
        _BadExample: with a short human reason.
    """
    image_path, trimap_path = _paths(root, name)
    if not image_path.is_file():
        raise _BadExample("image missing")
    if not trimap_path.is_file():
        raise _BadExample("trimap missing")
    try:
        # as a viewer shows it (data/images.py): the official set holds a few grayscale, RGBA, palette
        # and CMYK files, a user's photos EXIF orientations, 16-bit PNGs, transparency, animations
        image, note = read_photo(image_path)
    except UnreadableImage as exc:
        raise _BadExample(f"unreadable image ({exc.reason})") from None
    try:
        with Image.open(trimap_path) as tm:
            tm.load()
            # Read raw values (a palette trimap's indices ARE the values): never convert via colors.
            trimap = np.asarray(tm)
    except Exception as exc:  # Pillow's refusals come as OSError, SyntaxError, ValueError, DecompressionBombError...
        raise _BadExample(f"unreadable trimap ({exc})") from None
    if trimap.ndim != 2:
        raise _BadExample(f"trimap is {tm.mode} with {trimap.shape[2]} channels, expected one channel of the "
                          "values 1, 2, 3 (a grayscale or palette PNG, as the official trimaps)")
    if trimap.shape != image.shape[:2]:
        h, w = trimap.shape
        raise _BadExample(f"trimap size {w}x{h} differs from image size {image.shape[1]}x{image.shape[0]}")
    try:
        labels = trimap_to_labels(trimap)  # checked at full size: resizing could hide a bad value
    except ValueError as exc:
        raise _BadExample(str(exc)) from exc
    return resize_image(image, size), resize_mask(labels, size), note


def _fingerprint(root: Path, split: str, names: list[str], size: int) -> str:
    """A hash of everything the cached arrays depend on; stat() only, no file contents (fast)."""
    h = hashlib.sha256(f"v{_CACHE_VERSION}|{split}|{size}\n".encode())
    h.update((root / "annotations" / f"{split}.txt").read_bytes())
    for name in names:
        for path in _paths(root, name):
            try:
                st = path.stat()
                h.update(f"{path.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{path.name}|missing\n".encode())
    return h.hexdigest()


def _cache_prefix(root: Path, split: str, size: int, limit: int | None) -> str:
    # The root's hash keeps caches of different data folders apart in one cache folder.
    root_id = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]
    n = "all" if limit is None else f"limit{limit}"
    return f"pets-{split}-{size}px-{n}-{root_id}-"


def _read_cache(path: Path, fingerprint: str) -> SegmentationData | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["fingerprint"]) != fingerprint:
                return None
            skipped = list(zip(z["skipped_names"].tolist(), z["skipped_reasons"].tolist()))
            notes = list(zip(z["note_names"].tolist(), z["note_texts"].tolist()))
            return SegmentationData(z["images"], z["labels"], z["names"].tolist(), skipped, notes)
    except Exception as exc:  # a damaged cache is only a lost speed-up: rebuild it
        warnings.warn(f"ignoring unreadable cache {path} ({exc}); rebuilding it", DataWarning, stacklevel=3)
        return None


def _write_cache(path: Path, data: SegmentationData, fingerprint: str) -> None:
    """Write atomically (temp file + os.replace) so a crash never leaves a half-written cache."""
    skipped_names = [n for n, _ in data.skipped]
    skipped_reasons = [r for _, r in data.skipped]
    note_names, note_texts = [n for n, _ in data.notes], [t for _, t in data.notes]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                # Uncompressed: loading 200 MB of raw uint8 is faster than inflating it.
                np.savez(
                    f,
                    images=data.images,
                    labels=data.labels,
                    names=np.array(data.names, dtype=np.str_),
                    skipped_names=np.array(skipped_names, dtype=np.str_),
                    skipped_reasons=np.array(skipped_reasons, dtype=np.str_),
                    note_names=np.array(note_names, dtype=np.str_),
                    note_texts=np.array(note_texts, dtype=np.str_),
                    fingerprint=np.array(fingerprint),
                )
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; a cache is not secret
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:  # a read-only or full disk should not stop training
        warnings.warn(f"could not write cache {path} ({exc}); set $TINYUNET_CACHE to a writable folder",
                      DataWarning, stacklevel=3)
        return
    # Remove stale caches of the same (root, split, size, limit): they can never match again.
    prefix = path.name[: path.name.rindex("-") + 1]
    for old in path.parent.glob(f"{prefix}*.npz"):
        if old != path:
            old.unlink(missing_ok=True)


def _warn_skipped(root: Path, split: str, total: int, skipped: list[tuple[str, str]]) -> None:
    if not skipped:
        return
    shown = "; ".join(f"{n}: {r}" for n, r in skipped[:10])
    more = f"; and {len(skipped) - 10} more" if len(skipped) > 10 else ""
    warnings.warn(f"skipped {len(skipped)} of {total} examples of {split} in {root}: {shown}{more}",
                  DataWarning, stacklevel=3)


def _warn_notes(root: Path, split: str, notes: list[tuple[str, str]]) -> None:
    if not notes:
        return
    shown = "; ".join(f"{n}: {t}" for n, t in notes[:10])
    more = f"; and {len(notes) - 10} more" if len(notes) > 10 else ""
    warnings.warn(f"{len(notes)} examples of {split} in {root} read with a remark: {shown}{more}",
                  DataWarning, stacklevel=3)


def spread_subset(names: list, limit: int) -> list:
    """``limit`` of ``names`` (any list), evenly spaced: every (len/limit)-th, starting at the first."""
    n = len(names)
    return names if limit >= n else [names[i * n // limit] for i in range(limit)]


def load_pets(
    root: str | Path,
    split: str = "trainval",
    size: int = 128,
    cache_dir: str | Path | None = None,
    strict: bool = False,
    progress: bool = True,
    limit: int | None = None,
) -> SegmentationData:
    """Load a split of Oxford-IIIT Pet, resized to ``size x size`` (aspect ratio not kept).

    Photos are read as a viewer shows them (:func:`tinyunet.data.images.read_photo`). Bad examples
    (an image Pillow refuses or warns about, missing trimap, trimap size differing from the image,
    trimap not one channel, trimap values outside {1, 2, 3}) are skipped, listed in one
    :class:`DataWarning` and kept in ``.skipped``; animations (their first frame) in another, and in
    ``.notes``. Trimaps holding only background are valid and kept.

    Args:
        root: dataset folder in the official layout (may be read-only).
        split: ``"trainval"`` or ``"test"``.
        size: side S of the square output.
        cache_dir: where the preprocessed ``.npz`` lives; default :func:`default_cache_dir`.
            The cache is used only when its fingerprint matches the current sources.
        strict: raise DataError at the first bad example instead of skipping it.
        progress: show a tqdm bar while decoding.
        limit: use only ``limit`` names of the split, evenly spaced over it (quick runs and tests:
            the split files are sorted by breed, so the first N names would be a few breeds only).
    Returns:
        SegmentationData: images uint8 (N, S, S, 3), labels uint8 (N, S, S), names, skipped.
    """
    root = Path(root)
    if size < 1:
        raise DataError(f"size must be a positive number of pixels, got {size}")
    check_layout(root, split)
    names = read_split(root, split)
    if limit is not None:
        names = spread_subset(names, limit)
    if not names:
        raise DataError(f"split file {root / 'annotations' / f'{split}.txt'} lists no examples; {_FIX}")

    fingerprint = _fingerprint(root, split, names, size)
    cache_name = f"{_cache_prefix(root, split, size, limit)}{fingerprint[:16]}.npz"
    cache_path = Path(cache_dir or default_cache_dir()) / cache_name
    data = _read_cache(cache_path, fingerprint) if cache_path.is_file() else None
    if data is None:
        data = _decode_all(root, split, names, size, strict, progress)
        _write_cache(cache_path, data, fingerprint)
    if strict and data.skipped:  # a cache built with strict=False may hold skips
        name, reason = data.skipped[0]
        raise DataError(f"bad example {name} in {root}: {reason}; fix or remove it, or skip it (without --strict; strict=False)")
    _warn_skipped(root, split, len(names), data.skipped)
    _warn_notes(root, split, data.notes)
    if len(data) == 0:
        # files missing: an incomplete copy, which a download mends; files there but bad: only fixing them helps
        missing = all(reason in ("image missing", "trimap missing") for _, reason in data.skipped)
        fix = _FIX if missing else ("fix these files (their reasons are listed above), or pass --data DIR "
                                    "pointing at an intact Oxford-IIIT Pet folder")
        raise DataError(f"no usable examples among {len(names)} of {split} in {root}: "
                        f"e.g. {data.skipped[0][0]}: {data.skipped[0][1]}; {fix}")
    return data


def _decode_all(root: Path, split: str, names: list[str], size: int, strict: bool, progress: bool) -> SegmentationData:
    """Decode every example into preallocated arrays (no list of 3700 small arrays to concatenate)."""
    images = np.empty((len(names), size, size, 3), dtype=np.uint8)
    labels = np.empty((len(names), size, size), dtype=np.uint8)
    keep: list[int] = []
    skipped: list[tuple[str, str]] = []
    notes: list[tuple[str, str]] = []
    for i, name in enumerate(tqdm(names, desc=f"decoding {split} ({size}px)", unit="img", disable=not progress)):
        try:
            images[i], labels[i], note = _load_example(root, name, size)
            if note:
                notes.append((name, note))
        except _BadExample as exc:
            if strict:
                raise DataError(f"bad example {name} in {root}: {exc}; fix or remove it, "
                                "or skip it (without --strict; strict=False)") from None
            skipped.append((name, str(exc)))
            continue
        keep.append(i)
    if len(keep) < len(names):
        images, labels = images[keep], labels[keep]
    return SegmentationData(images, labels, [names[i] for i in keep], skipped, notes)


class NativeLabels(Sequence):
    """The class ids of each example's trimap at its photo's own size (full size), read from its PNG when
    asked for: what a prediction resized back to the photo's size is scored against. Not cached (small
    PNGs decode fast) and not held: a slice is another list of names, so each process of a shared
    evaluation reads only its own part, and one batch at a time (the test split's trimaps at full size
    are over a hundred MB).

    Raises (on reading):
        DataError: a trimap is missing or unreadable (the examples of a loaded split were checked).
    """

    def __init__(self, root: str | Path, names: Sequence[str]) -> None:
        self.root, self.names = Path(root), list(names)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return NativeLabels(self.root, self.names[index])
        path = _paths(self.root, self.names[index])[1]
        try:
            with Image.open(path) as tm:
                return trimap_to_labels(np.asarray(tm))
        except (OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"cannot read the trimap {path} ({exc}); the split changed since it was loaded?") from exc


def load_native_labels(root: str | Path, names: Sequence[str]) -> NativeLabels:
    """Each example's full-size class ids, read one by one as they are used (:class:`NativeLabels`)."""
    return NativeLabels(root, names)
