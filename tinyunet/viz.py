"""Pictures: colored masks, overlays, training curves and prediction grids.

All functions take host or device arrays (they are copied to the host first) and write PNG files.
Figures are drawn with ``matplotlib.figure.Figure`` directly rather than ``pyplot``: that renders with
the Agg (file-only) backend, needs no screen, and keeps no global figure state that could leak
memory over a long training run.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
from PIL import Image

from tinyunet.backend import to_host
from tinyunet.classes import CLASS_NAMES, PALETTE, labels_to_rgb

__all__ = ["colorize", "save_mask_png", "overlay", "save_overlay_png", "plot_curves", "plot_predictions",
           "plot_attention", "save_augmentation_grid"]

PathLike = Union[str, "os.PathLike[str]"]


def _labels(labels: Any) -> np.ndarray:
    """Host int array of class ids, checked against the class table (a bad id would index garbage)."""
    labels = np.asarray(to_host(labels))
    if labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(PALETTE)):
        raise ValueError(f"labels must be in [0, {len(PALETTE)}), got range [{labels.min()}, {labels.max()}]")
    return labels


def _image(image: Any) -> np.ndarray:
    image = np.asarray(to_host(image))
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    return image


def colorize(labels: Any) -> np.ndarray:
    """Class ids ``(H, W)`` int -> RGB ``(H, W, 3)`` uint8 using the class table's PALETTE."""
    return labels_to_rgb(_labels(labels))


def save_mask_png(labels: Any, path: PathLike) -> None:
    """Save ids ``(H, W)`` as a palette PNG: pixel values ARE the class ids, the palette colors them.

    A program reading the file (``np.array(Image.open(path))``) gets the ids back unchanged, while an
    image viewer shows the class colors — one file serves both.
    """
    labels = _labels(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {labels.shape}")
    image = Image.fromarray(labels.astype(np.uint8))  # mode "L"
    image.putpalette(np.asarray(PALETTE, dtype=np.uint8).ravel().tolist())  # "L" + palette -> mode "P"
    image.save(os.fspath(path))


def overlay(image: Any, labels: Any, alpha: float = 0.5) -> np.ndarray:
    """Blend class colors over a photo: ``(1 - alpha) * image + alpha * colorize(labels)``.

    Args:
        image: ``(H, W, 3)`` uint8.
        labels: ``(H, W)`` int class ids.
        alpha: 0 returns the image unchanged, 1 the colored mask.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    image = _image(image)
    colors = colorize(labels)
    if colors.shape != image.shape:
        raise ValueError(f"labels {colors.shape[:2]} and image {image.shape[:2]} differ in size")
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colors.astype(np.float32)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


_OVERLAY_ROWS = 256  # rows blended at a time by save_overlay_png: float32 temporaries of a band only


def save_overlay_png(image: Any, labels: Any, path: PathLike, alpha: float = 0.5, in_place: bool = False) -> None:
    """Save :func:`overlay` of ``image`` ``(H, W, 3)`` uint8 (or an RGB Pillow image) and ``labels``
    ``(H, W)`` as an RGB PNG.

    Blended one band of rows at a time into the picture to be saved, so a 24-megapixel photo needs
    no full-size float copies; ``in_place`` (a Pillow image the caller no longer needs): into
    ``image`` itself, so not even a second picture. zlib's fastest level, as photos hardly compress
    further at the default (24 MP: about 6 s at level 6, 1 s at level 1, the file 6% larger)."""
    labels = _labels(labels)
    pil = isinstance(image, Image.Image)
    size = (image.height, image.width) if pil else _image(image).shape[:2]
    if labels.shape != size:
        raise ValueError(f"labels {labels.shape} and image {size} differ in size")
    height, width = size
    picture = image if pil and in_place else Image.new("RGB", (width, height))
    for top in range(0, height, _OVERLAY_ROWS):
        bottom = min(top + _OVERLAY_ROWS, height)
        rows = np.asarray(image.crop((0, top, width, bottom))) if pil else image[top:bottom]
        picture.paste(Image.fromarray(overlay(rows, labels[top:bottom], alpha)), (0, top))
    picture.save(os.fspath(path), compress_level=1)


def _legend_handles() -> List[Any]:
    from matplotlib.patches import Patch

    return [Patch(facecolor=np.asarray(c) / 255.0, edgecolor="black", label=n) for n, c in zip(CLASS_NAMES, PALETTE)]


def _column(rows: Sequence[Dict[str, Any]], key: str) -> np.ndarray:
    """One metric per row as float; missing or empty cells (csv strings) become NaN (gaps in the line)."""
    values = []
    for row in rows:
        value = row.get(key, "")
        values.append(float(value) if value not in ("", None) else math.nan)
    return np.asarray(values, dtype=np.float64)


def plot_curves(rows: Sequence[Dict[str, Any]], path: PathLike) -> None:
    """Training curves as a two-panel PNG: losses per epoch, and validation mIoU / pixel accuracy.

    Args:
        rows: one dict per epoch with keys ``epoch, train_loss, val_loss, val_miou,
            val_pixel_accuracy`` — e.g. ``list(csv.DictReader(open("metrics.csv")))``; values may be
            numbers or strings, and missing values are skipped.
        path: output PNG.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not rows:
        raise ValueError("no rows to plot: metrics.csv is empty")
    epoch = _column(rows, "epoch")
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, score_ax = fig.subplots(1, 2)
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        loss_ax.plot(epoch, _column(rows, key), marker="o", label=label)
    loss_ax.set(title="Loss", xlabel="epoch", ylabel="loss")
    loss_ax.legend()
    for key, label in (("val_miou", "mIoU"), ("val_pixel_accuracy", "pixel accuracy")):
        score_ax.plot(epoch, _column(rows, key), marker="o", label=label)
    score_ax.set(title="Validation scores", xlabel="epoch", ylabel="score", ylim=(0.0, 1.0))
    score_ax.legend()
    for ax in (loss_ax, score_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers: no tick at 1.5
    fig.savefig(os.fspath(path), dpi=100)


def plot_predictions(
    images: Any,
    true_labels: Any,
    pred_labels: Any,
    path: PathLike,
    names: Optional[Sequence[str]] = None,
) -> None:
    """A grid with one row per sample: image | true mask | predicted mask, plus a class legend.

    Args:
        images: ``(N, H, W, 3)`` uint8.
        true_labels: ``(N, H, W)`` int class ids.
        pred_labels: ``(N, H, W)`` int class ids.
        path: output PNG.
        names: optional ``N`` row titles (e.g. image file names).
    """
    from matplotlib.figure import Figure

    images = np.asarray(to_host(images))
    true_labels = _labels(true_labels)
    pred_labels = _labels(pred_labels)
    n = len(images)
    if not (images.ndim == 4 and true_labels.shape == pred_labels.shape == images.shape[:3]):
        raise ValueError(
            f"expected images (N, H, W, 3) and labels (N, H, W), got {images.shape}, "
            f"{true_labels.shape}, {pred_labels.shape}"
        )
    if names is not None and len(names) != n:
        raise ValueError(f"{len(names)} names given for {n} images")

    fig = Figure(figsize=(9, 3 * n + 0.6), layout="constrained")
    axes = fig.subplots(n, 3, squeeze=False)
    for i in range(n):
        panels = (_image(images[i]), colorize(true_labels[i]), colorize(pred_labels[i]))
        for ax, panel, title in zip(axes[i], panels, ("image", "true mask", "predicted mask")):
            ax.imshow(panel, interpolation="nearest")  # nearest: masks keep crisp class borders
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title)
        if names is not None:
            axes[i][0].set_ylabel(str(names[i]))
    fig.legend(handles=_legend_handles(), loc="outside lower center", ncol=len(CLASS_NAMES))
    fig.savefig(os.fspath(path), dpi=100)


def plot_attention(image: Any, maps: Sequence[Any], path: PathLike, titles: Optional[Sequence[str]] = None,
                   alpha: float = 0.55) -> None:
    """The photo, then one panel per attention map drawn as a heat map over it, with a shared color bar.

    Args:
        image: ``(H, W, 3)`` uint8.
        maps: attention coefficients in [0, 1], each ``(H, W)`` (resized to the photo beforehand),
            e.g. one per attention gate of an Attention U-Net.
        path: output PNG.
        titles: optional one panel title per map.
        alpha: opacity of the heat map over the photo.
    """
    from matplotlib.figure import Figure

    image = _image(image)
    maps = [np.asarray(to_host(m), dtype=np.float32) for m in maps]
    if not maps:
        raise ValueError("no attention maps to plot")
    if any(m.shape != image.shape[:2] for m in maps):
        raise ValueError(f"every map must have the image's size {image.shape[:2]}, got {[m.shape for m in maps]}")
    if titles is not None and len(titles) != len(maps):
        raise ValueError(f"{len(titles)} titles given for {len(maps)} maps")
    titles = titles if titles is not None else [f"attention {i + 1}" for i in range(len(maps))]

    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    gray = image.mean(axis=2)  # the photo in gray under the heat map, so its own colors do not mix in
    # a fixed 0..1 color range: panels (and photos) can be compared by color
    heat = ScalarMappable(Normalize(0.0, 1.0), "jet")
    fig = Figure(figsize=(3 * (len(maps) + 1) + 0.8, 3.4), layout="constrained")
    axes = fig.subplots(1, len(maps) + 1, squeeze=False)[0]
    axes[0].imshow(image)
    axes[0].set_title("image")
    for ax, m, title in zip(axes[1:], maps, titles):
        ax.imshow(gray, cmap="gray", vmin=0, vmax=255)
        ax.imshow(m, cmap=heat.cmap, norm=heat.norm, alpha=alpha)
        ax.set_title(title)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(heat, ax=list(axes), shrink=0.85, label="attention coefficient")
    fig.savefig(os.fspath(path), dpi=100)


def save_augmentation_grid(pairs: Sequence[Any], path: PathLike, gap: int = 4) -> None:
    """One PNG of augmented pairs: a column per variant (e.g. the original, then random draws), a
    row per image, each cell the photo with its colored mask below it.

    Args:
        pairs: ``[(images uint8 (N, S, S, 3), masks (N, S, S)), ...]``, one per column, same N and S.
    """
    columns = [[np.concatenate([_image(img), colorize(mask)], axis=0) for img, mask in zip(images, masks)]
               for images, masks in pairs]
    cell_h, cell_w = columns[0][0].shape[:2]
    rows = len(columns[0])
    canvas = np.full((rows * (cell_h + gap) - gap, len(columns) * (cell_w + gap) - gap, 3), 255, dtype=np.uint8)
    for c, column in enumerate(columns):
        for r, cell in enumerate(column):
            canvas[r * (cell_h + gap):r * (cell_h + gap) + cell_h, c * (cell_w + gap):c * (cell_w + gap) + cell_w] = cell
    Image.fromarray(canvas).save(os.fspath(path))
