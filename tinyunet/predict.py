"""Predict masks for photos of any size with a trained checkpoint.

Each photo is resized to the size the model was trained at, the model's class probabilities are
resized back to the photo's own size (bilinear, per class), and the most probable class wins: masks
come out at full resolution with smooth borders instead of blocky nearest-neighbour upsampling.
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
from tinyunet.data.transforms import resize_image, resize_probabilities, to_input
from tinyunet.errors import DataError, TinyUNetError
from tinyunet.train import TrainConfig, load_model
from tinyunet.viz import plot_attention, save_mask_png, save_overlay_png

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


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
    """(H, W, 3) uint8, whatever the file's mode (grayscale, RGBA, palette, CMYK)."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc


def predict_image(model: Any, image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 photo -> (H, W) uint8 class ids."""
    x = to_device(to_input(resize_image(image, size)[None]))
    logits = model.forward(x)[0]
    e = xp.exp(logits - logits.max(axis=0, keepdims=True))
    probs = to_host(e / e.sum(axis=0, keepdims=True))
    return resize_probabilities(probs, image.shape[0], image.shape[1]).argmax(axis=0).astype(np.uint8)


def attention_images(model: Any, height: int, width: int) -> Tuple[List[np.ndarray], List[str]]:
    """The attention coefficients of the model's last forward (of one image), each resized to
    (height, width) float32, and a title per map naming the skip resolution it gated."""
    maps = [to_host(m[0]) for m in model.attention_maps()]  # (1, h, w) each, deepest level first
    return ([resize_probabilities(m, height, width)[0] for m in maps],
            [f"skip {m.shape[1]}x{m.shape[2]}" for m in maps])


def predict_files(checkpoint: str | os.PathLike, inputs: Iterable[str | os.PathLike], out_dir: str | os.PathLike,
                  progress: bool = True, attention: bool = False, strict: bool = False) -> List[Path]:
    """Write ``<name>_mask.png`` (palette PNG of class ids) and ``<name>_overlay.png`` per image, and with
    ``attention`` also ``<name>_attention.png`` (needs a model with attention gates: arch ``attunet``).

    An image that cannot be read is skipped and named in one warning at the end (``strict``: a
    DataError at the first); if none can be read, DataError. Returns the files written."""
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
    for path in tqdm(images, desc="predict", disable=not progress):
        try:
            image = read_rgb(path)
        except DataError as exc:
            if strict:
                raise
            skipped.append(str(exc))
            continue
        labels = predict_image(model, image, size)
        save_mask_png(labels, out / f"{path.stem}_mask.png")
        save_overlay_png(image, labels, out / f"{path.stem}_overlay.png")
        written += [out / f"{path.stem}_mask.png", out / f"{path.stem}_overlay.png"]
        if attention:
            maps, titles = attention_images(model, image.shape[0], image.shape[1])
            plot_attention(image, maps, out / f"{path.stem}_attention.png", titles=titles)
            written.append(out / f"{path.stem}_attention.png")
    if skipped and not written:
        raise DataError(f"none of the {len(images)} images could be read: {'; '.join(skipped[:3])}")
    if skipped:
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        warnings.warn(f"skipped {len(skipped)} of {len(images)} images: {'; '.join(skipped[:3])}{more}",
                      DataWarning, stacklevel=2)
    return written
