"""Predict masks for photos of any size with a trained checkpoint.

Each photo is read as a viewer shows it (data/images.py: EXIF orientation, 16-bit, transparency),
resized to the size the model was trained at, the model's class probabilities are resized back to
the photo's own size (bilinear, per class), and the most probable class wins: masks come out at full
resolution with smooth borders instead of blocky nearest-neighbour upsampling.

The probabilities are resized one band of rows at a time (:data:`BAND_ROWS`), and the overlay is
blended band by band into the photo itself, so a 24-megapixel photo needs its own bytes and the
mask's, not full-size float planes: peak memory 1.34 GB -> 366 MB, 10.9 -> 4.7 s (README, "Predictions").
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Iterable, List, Tuple

import numpy as np
from PIL import Image

from tinyunet.backend import to_device, to_host, xp
from tinyunet.data import DataWarning
from tinyunet.data.images import open_photo, read_photo
from tinyunet.data.transforms import resize_image, resize_probabilities, to_input
from tinyunet.errors import DataError, TinyUNetError
from tinyunet.train import TrainConfig, class_probabilities, load_model
from tinyunet.viz import plot_attention, save_mask_png, save_overlay_png

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
BAND_ROWS = 128  # output rows resized at a time: 3 classes x 128 rows x 6000 px x 4 bytes = 9 MB


def find_images(paths: Iterable[str | os.PathLike]) -> List[Path]:
    """Files as given, plus every image file directly inside given folders (sorted)."""
    found: List[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            found.append(p)
        else:
            raise DataError(f"no such image or folder: {p}")
    if not found:
        raise DataError(f"no images found in {', '.join(map(str, paths))}")
    return found


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 as a viewer shows the file (see tinyunet.data.images.read_photo); DataError
    if Pillow refuses or doubts it. An animation's first frame, with a warning that says so."""
    image, note = read_photo(path)
    if note:
        warnings.warn(f"{path}: {note}", DataWarning, stacklevel=2)
    return image


def predict_image(model: Any, image: np.ndarray | Image.Image, size: int, mirror: bool = False) -> np.ndarray:
    """(H, W, 3) uint8 photo (or an RGB Pillow image) -> (H, W) uint8 class ids, the probabilities
    resized band by band. ``mirror``: the mean of the predictions for the photo and its mirror image."""
    x = to_device(to_input(resize_image(image, size)[None]))
    probs = to_host(class_probabilities(model, x, mirror)[0])
    height, width = (image.height, image.width) if isinstance(image, Image.Image) else image.shape[:2]
    labels = np.empty((height, width), dtype=np.uint8)
    for top in range(0, height, BAND_ROWS):
        bottom = min(top + BAND_ROWS, height)
        labels[top:bottom] = resize_probabilities(probs, height, width, top, bottom).argmax(axis=0)
    return labels


def attention_images(model: Any, height: int, width: int) -> Tuple[List[np.ndarray], List[str]]:
    """The attention coefficients of the model's last forward (of one image), each resized to
    (height, width) float32, and a title per map naming the skip resolution it gated."""
    maps = [to_host(m[0]) for m in model.attention_maps()]  # (1, h, w) each, deepest level first
    return ([resize_probabilities(m, height, width)[0] for m in maps],
            [f"skip {m.shape[1]}x{m.shape[2]}" for m in maps])


def predict_files(checkpoint: str | os.PathLike, inputs: Iterable[str | os.PathLike], out_dir: str | os.PathLike,
                  progress: bool = True, attention: bool = False, strict: bool = False,
                  mirror: bool = False) -> List[Path]:
    """Write ``<name>_mask.png`` (palette PNG of class ids) and ``<name>_overlay.png`` per image, and with
    ``attention`` also ``<name>_attention.png`` (needs a model with attention gates: arch ``attunet``).

    Photos are read as a viewer shows them (tinyunet.data.images.read_photo). An image that cannot
    be read is skipped and named in one warning at the end (``strict``, or a single image: a
    DataError at the first); if none can be read, DataError. An animation's first frame is used and
    named in a warning. ``mirror``: each mask from the mean of the predictions for the photo and its
    mirror image. Returns the files written."""
    from tqdm import tqdm

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise TinyUNetError(f"--out {out} is a file: predictions are written into a folder, choose another --out")
    model, meta = load_model(checkpoint)
    config = TrainConfig.from_dict(meta.get("config", {}))
    if attention and not hasattr(model, "attention_maps"):
        raise TinyUNetError(f"--attention needs a model with attention gates, but {checkpoint} holds a "
                            f"{config.arch!r} model: use an 'attunet' checkpoint (tinyunet train --arch attunet)")
    size = config.size
    images = find_images(inputs)
    # outputs are named after the file stem: cat.jpg and cat.png would overwrite each other's masks
    seen: dict[str, Path] = {}
    clashes = [f"{seen[p.stem]} and {p}" for p in images if seen.setdefault(p.stem, p) != p]
    if clashes:
        raise DataError(f"images with the same name would write the same output files: {'; '.join(clashes[:3])}; "
                        "rename one or predict them into separate --out folders")
    out.mkdir(parents=True, exist_ok=True)
    written: List[Path] = []
    skipped: List[str] = []
    notes: List[str] = []
    for path in tqdm(images, desc="predict", disable=not progress):
        try:
            image, note = open_photo(path)  # a Pillow image: no array copy of a big photo
        except DataError as exc:
            if strict or len(images) == 1:  # one file: its own error says it best
                raise
            skipped.append(str(exc))
            continue
        if note:
            notes.append(f"{path}: {note}")
        labels = predict_image(model, image, size, mirror)
        save_mask_png(labels, out / f"{path.stem}_mask.png")
        written.append(out / f"{path.stem}_mask.png")
        if attention:
            maps, titles = attention_images(model, image.height, image.width)
            plot_attention(np.asarray(image), maps, out / f"{path.stem}_attention.png", titles=titles)
            written.append(out / f"{path.stem}_attention.png")
        # last: blended into the photo itself, which is not needed afterwards
        save_overlay_png(image, labels, out / f"{path.stem}_overlay.png", in_place=True)
        written.append(out / f"{path.stem}_overlay.png")
    if notes:
        warnings.warn("; ".join(notes), DataWarning, stacklevel=2)
    if skipped and not written:
        raise DataError(f"none of the {len(images)} images could be read: {'; '.join(skipped[:3])}")
    if skipped:
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        warnings.warn(f"skipped {len(skipped)} of {len(images)} images: {'; '.join(skipped[:3])}{more}",
                      DataWarning, stacklevel=2)
    return written
