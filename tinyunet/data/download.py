"""Download and unpack the official Oxford-IIIT Pet archives, safely and resumably.

For each archive:

1. download to ``<root>/<name>.part``; a ``.part`` left by an interrupted run is resumed with an
   HTTP ``Range`` request (a server that ignores Range answers 200 and we start again from zero);
2. check the md5 (a mismatch deletes the file and raises DataError), then rename to ``<root>/<name>``;
3. extract into a temporary folder inside ``root`` (same filesystem, so moves are renames), refusing
   members that would land outside it, move its top-level folders into place, and only then write
   the marker ``<root>/.complete-<name>`` and delete the archive.

An interrupted run therefore never leaves a marker, and the next run picks up where it stopped.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from tinyunet.errors import DataError

__all__ = ["BASE_URL", "OFFICIAL_FILES", "download_pets", "is_complete"]

BASE_URL = "https://www.robots.ox.ac.uk/~vgg/data/pets/data"
#: (archive name, md5) of the official release.
OFFICIAL_FILES: tuple[tuple[str, str], ...] = (
    ("images.tar.gz", "5c4f3ee8e5d25df40f4fd59a7f44e54c"),
    ("annotations.tar.gz", "95a8c909bbe2e81eed6a22bccdf3f68f"),
)
_CHUNK = 1 << 20  # 1 MiB reads: few syscalls, smooth progress bar


def _marker(root: Path, name: str) -> Path:
    return root / f".complete-{name}"


def is_complete(root: str | Path, files: tuple[tuple[str, str], ...] = OFFICIAL_FILES) -> bool:
    """True if every archive in ``files`` has been downloaded, verified and extracted into ``root``."""
    return all(_marker(Path(root), name).is_file() for name, _ in files)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _fetch(url: str, part: Path, progress: bool) -> None:
    """Download ``url`` into ``part``, resuming from its current length when the server allows."""
    start = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "tinyunet-download/0.1"}
    if start:
        headers["Range"] = f"bytes={start}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:  # nothing left past our length: the .part is whole (md5 decides)
            return
        raise DataError(f"download of {url} failed: HTTP {exc.code} {exc.reason}; "
                        "rerun later to resume, or pass --mirror URL") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise DataError(f"download of {url} failed ({exc}); check the network and rerun to resume, "
                        "or pass --mirror URL") from exc
    with response:
        if start and response.status != 206:
            start = 0  # the server ignored Range and sends the whole file: start over
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        mode = "ab" if start else "wb"
        try:
            with open(part, mode) as f, tqdm(total=total, initial=start, unit="B", unit_scale=True,
                                             desc=part.name.removesuffix(".part"), disable=not progress) as bar:
                for block in iter(lambda: response.read(_CHUNK), b""):
                    f.write(block)
                    bar.update(len(block))
        except OSError as exc:  # connection reset mid-way: keep the .part so a rerun resumes
            raise DataError(f"download of {url} was interrupted ({exc}); rerun to resume") from exc


def _check_members(tar: tarfile.TarFile) -> None:
    """Refuse absolute paths, ``..`` and links/devices (for Pythons without tarfile's data filter)."""
    for m in tar.getmembers():
        parts = Path(m.name).parts
        if Path(m.name).is_absolute() or ".." in parts or not (m.isfile() or m.isdir()):
            raise DataError(f"archive {tar.name} has an unsafe member {m.name!r}; refusing to extract it")


def _extract(archive: Path, dest: Path) -> None:
    """Extract ``archive`` (tar.gz) into the folder ``dest``; nothing is written outside it."""
    with tarfile.open(archive, "r:gz") as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12: the stdlib does the checks
            try:
                tar.extractall(dest, filter="data")
            except tarfile.FilterError as exc:
                raise DataError(f"archive {archive} has an unsafe member ({exc}); refusing to extract it") from exc
        else:
            _check_members(tar)
            tar.extractall(dest)


def _move_into_place(extracted: Path, root: Path) -> None:
    """Move each top-level entry of ``extracted`` to ``root``, replacing a leftover from an earlier try."""
    for entry in sorted(extracted.iterdir()):
        target = root / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(entry, target)


def _install(archive: Path, root: Path, name: str) -> None:
    for stale in root.glob(f".extract-{name}-*"):  # left by an interrupted earlier run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".extract-{name}-"))
    try:
        _extract(archive, tmp)
        _move_into_place(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _marker(root, name).write_text("complete\n")  # last: only a finished install has a marker


def download_pets(
    root: str | Path,
    mirror: str | None = None,
    progress: bool = True,
    files: tuple[tuple[str, str], ...] = OFFICIAL_FILES,
) -> Path:
    """Download, verify and extract Oxford-IIIT Pet into ``root`` (official layout); return ``root``.

    Args:
        root: target folder, created if needed (e.g. :func:`tinyunet.data.pets.default_data_dir`).
        mirror: base URL replacing :data:`BASE_URL`; archives are fetched from ``<mirror>/<name>``.
        progress: show tqdm bars.
        files: (archive name, md5) pairs; tests pass their own small archives.
    Raises:
        DataError: network failure (rerun resumes), md5 mismatch, unsafe archive.
    """
    root = Path(root).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create data folder {root} ({exc.strerror}); "
                        "pass --root DIR to a writable place") from exc
    base = (mirror or BASE_URL).rstrip("/")
    for name, expected in files:
        if _marker(root, name).is_file():
            continue
        archive, part = root / name, root / f"{name}.part"
        if archive.is_file() and _md5(archive) != expected:
            archive.unlink()  # an old, wrong or damaged copy: fetch again
        if not archive.is_file():
            url = f"{base}/{name}"
            _fetch(url, part, progress)
            actual = _md5(part)
            if actual != expected:
                part.unlink()
                raise DataError(f"{name} from {url} has md5 {actual}, expected {expected}; "
                                "the file was deleted, rerun to download it again (or check --mirror)")
            os.replace(part, archive)
        _install(archive, root, name)
        archive.unlink()  # extracted and marked: the archive is only wasted space now
    return root
