"""Viz: mask PNGs keep class ids, overlays blend correctly, plots write real images."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tinyunet.classes import CLASS_NAMES, PALETTE
from tinyunet.viz import colorize, overlay, plot_curves, plot_predictions, save_mask_png, save_overlay_png


@pytest.fixture
def labels():
    return np.random.default_rng(0).integers(0, len(CLASS_NAMES), size=(12, 17))


@pytest.fixture
def image():
    return np.random.default_rng(1).integers(0, 256, size=(12, 17, 3), dtype=np.uint8)


def test_colorize(labels):
    rgb = colorize(labels)
    assert rgb.shape == (12, 17, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[3, 4], PALETTE[labels[3, 4]])
    with pytest.raises(ValueError):
        colorize(np.array([[0, len(CLASS_NAMES)]]))


def test_mask_png_stores_ids_and_palette(tmp_path, labels):
    path = tmp_path / "mask.png"
    save_mask_png(labels, path)
    with Image.open(path) as img:
        assert img.mode == "P"
        np.testing.assert_array_equal(np.array(img), labels)
        rgb = np.array(img.convert("RGB"))
    np.testing.assert_array_equal(rgb, colorize(labels))


def test_overlay(tmp_path, image, labels):
    out = overlay(image, labels, alpha=0.3)
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(overlay(image, labels, alpha=0.0), image)
    np.testing.assert_array_equal(overlay(image, labels, alpha=1.0), colorize(labels))
    expected = np.rint(0.7 * image[0, 0].astype(float) + 0.3 * PALETTE[labels[0, 0]])
    np.testing.assert_allclose(out[0, 0], expected, atol=1)
    with pytest.raises(ValueError):
        overlay(image, labels[:5], alpha=0.5)
    save_overlay_png(image, labels, tmp_path / "o.png")
    with Image.open(tmp_path / "o.png") as img:
        assert img.mode == "RGB" and img.size == (17, 12)


def _check_png(path, min_bytes=5_000):
    assert path.stat().st_size > min_bytes
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.verify()
        return img.size


def test_plot_curves(tmp_path):
    rows = [
        {"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_miou": 0.4 + 0.05 * e, "val_pixel_accuracy": 0.6 + 0.03 * e}
        for e in range(1, 6)
    ]
    rows.append({"epoch": "6", "train_loss": "0.15", "val_loss": "", "val_miou": "", "val_pixel_accuracy": ""})  # csv strings
    path = tmp_path / "curves.png"
    plot_curves(rows, path)
    width, height = _check_png(path)
    assert width > height  # two panels side by side


def test_plot_curves_ticks_whole_epochs(tmp_path, monkeypatch):
    """Two epochs: matplotlib's default ticks would be 1.0, 1.2, ..., 2.0; epochs are whole numbers."""
    from matplotlib.figure import Figure

    ticks = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: ticks.extend(
        [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]] for ax in fig.axes))
    plot_curves([{"epoch": e, "train_loss": 1.0, "val_loss": 1.0, "val_miou": 0.5, "val_pixel_accuracy": 0.5}
                 for e in (1, 2)], tmp_path / "curves.png")
    assert len(ticks) == 2 and all(t == [1.0, 2.0] for t in ticks), ticks


def test_plot_predictions(tmp_path):
    rng = np.random.default_rng(2)
    n, h, w = 3, 16, 20
    images = rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)
    true = rng.integers(0, 3, size=(n, h, w))
    pred = rng.integers(0, 3, size=(n, h, w))
    path = tmp_path / "preds.png"
    plot_predictions(images, true, pred, path, names=["a.jpg", "b.jpg", "c.jpg"])
    width, height = _check_png(path)
    assert height > width  # three rows of three panels plus a legend
    one = tmp_path / "one.png"
    plot_predictions(images[:1], true[:1], pred[:1], one)  # a single row must work too
    _check_png(one)
