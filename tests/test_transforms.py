"""Augmentation: the warp against Pillow's affine transform and a per-pixel loop, masks moving with
their photos, color jitter against Pillow's ImageEnhance, flips drawing what they always drew,
determinism, and the batches of iterate_batches."""
import math

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from tinyunet.data.dataset import SegmentationData, iterate_batches
from tinyunet.data.transforms import Augmentation, augment, hflip, jitter_colors, to_input, warp

FULL = Augmentation(scale=0.6, rotate=15, brightness=0.2, contrast=0.2, saturation=0.2)


def smooth_photos(n=3, size=32, seed=0):
    """Photos without sharp edges (so bilinear reads are easy to compare) and blocky masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    photos = np.empty((n, size, size, 3), dtype=np.uint8)
    for k in range(n):
        fx, fy = rng.uniform(0.1, 0.3, 2)
        photos[k, ..., 0] = 127 + 100 * np.sin(fx * xx + k)
        photos[k, ..., 1] = 127 + 100 * np.cos(fy * yy - k)
        photos[k, ..., 2] = (xx * 3 + yy * 2 + 40 * k) % 200 + 20
    masks = ((xx // 5 + yy // 7 + np.arange(n)[:, None, None]) % 3).astype(np.uint8)
    return photos, masks


def pillow_warp(photo, mask, flip, side, angle, cx, cy):
    """The same window by Pillow: Image.transform(AFFINE) maps output (x, y) to input (a x + b y + c, d x + e y + f),
    both in continuous coordinates with pixel centres at +0.5."""
    s = photo.shape[0]
    c, sn = math.cos(angle), math.sin(angle)
    fx = -1.0 if flip else 1.0
    # input = center*S + side * R @ (fx*(x/S - 0.5), y/S - 0.5) * S
    a, b = side * c * fx, -side * sn
    d, e = side * sn * fx, side * c
    c0 = cx * s - side * s * (c * fx * 0.5 - sn * 0.5)
    f0 = cy * s - side * s * (sn * fx * 0.5 + c * 0.5)
    coeffs = (a, b, c0, d, e, f0)
    p = Image.fromarray(photo).transform((s, s), Image.AFFINE, coeffs, Image.BILINEAR)
    m = Image.fromarray(mask).transform((s, s), Image.AFFINE, coeffs, Image.NEAREST)
    return np.asarray(p), np.asarray(m)


def test_identity_window_gives_every_pixel_back_and_flip_equals_hflip():
    photos, masks = smooth_photos(4, 24)
    n = len(photos)
    ones, zeros, half = np.ones(n), np.zeros(n), np.full(n, 0.5)
    p, m = warp(photos, masks, np.zeros(n, bool), ones, zeros, half, half)
    np.testing.assert_array_equal(p, photos)
    np.testing.assert_array_equal(m, masks)
    p, m = warp(photos, masks, np.ones(n, bool), ones, zeros, half, half)
    fp, fm = hflip(photos, masks)
    np.testing.assert_array_equal(p, fp)
    np.testing.assert_array_equal(m, fm)


@pytest.mark.parametrize("flip,side,degrees,cx,cy", [(False, 0.7, 10.0, 0.45, 0.55), (True, 0.8, -12.0, 0.5, 0.5),
                                                     (True, 0.6, 0.0, 0.35, 0.65), (False, 0.9, 3.0, 0.5, 0.48)])
def test_warp_matches_pillow_affine_transform_inside_the_image(flip, side, degrees, cx, cy):
    photos, masks = smooth_photos(1, 32, seed=int(side * 10))
    angle = math.radians(degrees)
    p, m = warp(photos, masks, np.array([flip]), np.array([side]), np.array([angle]), np.array([cx]), np.array([cy]))
    ref_p, ref_m = pillow_warp(photos[0], masks[0], flip, side, angle, cx, cy)
    # every window here stays inside the image (no mirroring): Pillow rounds its bilinear mix to uint8
    assert np.abs(np.rint(p[0]) - ref_p).max() <= 1
    assert (m[0] == ref_m).mean() >= 0.99  # nearest neighbour: ties exactly between two pixels may differ


def test_warp_matches_a_per_pixel_loop_with_mirrored_edges():
    photos, masks = smooth_photos(2, 12, seed=3)
    flip, side = np.array([True, False]), np.array([1.0, 0.75])
    angle, cx, cy = np.radians([20.0, -30.0]), np.array([0.5, 0.4]), np.array([0.5, 0.6])
    p, m = warp(photos, masks, flip, side, angle, cx, cy)
    size = 12

    def mirror(t):  # one reflection about the first and last pixel centres
        t = abs(t)
        return 2 * (size - 1) - t if t > size - 1 else t

    for k in range(2):
        for i in range(size):
            for j in range(size):
                u = ((j + 0.5) / size - 0.5) * (-1 if flip[k] else 1)
                v = (i + 0.5) / size - 0.5
                x = mirror((cx[k] + side[k] * (math.cos(angle[k]) * u - math.sin(angle[k]) * v)) * size - 0.5)
                y = mirror((cy[k] + side[k] * (math.sin(angle[k]) * u + math.cos(angle[k]) * v)) * size - 0.5)
                assert m[k, i, j] == masks[k, int(round(y)), int(round(x))]
                x0, y0 = min(int(math.floor(x)), size - 2), min(int(math.floor(y)), size - 2)
                ax, ay = x - x0, y - y0
                img = photos[k].astype(np.float64)
                expected = ((1 - ay) * ((1 - ax) * img[y0, x0] + ax * img[y0, x0 + 1])
                            + ay * ((1 - ax) * img[y0 + 1, x0] + ax * img[y0 + 1, x0 + 1]))
                np.testing.assert_allclose(p[k, i, j], expected, atol=1e-3)
    assert (flip & (angle != 0)).any()  # the corners of a 20 degree turn of the whole image need mirroring


def test_masks_move_with_their_photos():
    """Photos painted in their mask's class colors: after any random window, a pixel showing exactly
    a class color (not a bilinear mix at a border) carries that class in the mask."""
    rng = np.random.default_rng(7)
    size = 64
    yy, xx = np.mgrid[0:size, 0:size]
    masks = np.stack([((xx // (6 + k) + yy // (9 + k)) % 3) for k in range(16)]).astype(np.uint8)
    colors = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]], dtype=np.uint8)
    photos = colors[masks]
    p, m = augment(photos, masks, rng, Augmentation(scale=0.5, rotate=30))
    pure = (p[:, :, :, None, :] == colors[None, None, None]).all(axis=-1)  # (N, H, W, 3 classes)
    shown = pure.any(axis=-1)
    assert shown.mean() > 0.6
    np.testing.assert_array_equal(pure.argmax(axis=-1)[shown], m[shown])
    assert not (m == masks).all(axis=(1, 2)).any()  # every example was really moved


def test_color_jitter_matches_pillow_image_enhance():
    photos, _ = smooth_photos(3, 16, seed=5)
    photos = (photos.astype(np.int32) * 3 // 5 + 50).astype(np.uint8)  # 50 .. 203: no factor here clips
    b, c, s = np.array([0.85, 1.1, 1.0]), np.array([1.15, 0.9, 1.2]), np.array([0.8, 1.0, 1.2])
    out = jitter_colors(photos, b, c, s)
    for k in range(3):
        img = Image.fromarray(photos[k])
        for enhance, factor in ((ImageEnhance.Brightness, b[k]), (ImageEnhance.Contrast, c[k]),
                                (ImageEnhance.Color, s[k])):
            img = enhance(img).enhance(factor)
        # Pillow rounds to uint8 after each step and to an integer mean gray for contrast
        assert np.abs(out[k] - np.asarray(img)).max() <= 3
    np.testing.assert_array_equal(jitter_colors(photos, None, None, None), photos)
    bright = jitter_colors(np.full((1, 2, 2, 3), 200, np.uint8), np.array([1.5]), None, None)
    assert (bright == 255).all()  # clipped to the 0..255 scale


def test_flips_alone_draw_what_they_always_drew():
    photos, masks = smooth_photos(8, 16)
    p, m = augment(photos, masks, np.random.default_rng(3))  # default settings: flips only
    flip = np.random.default_rng(3).random(8) < 0.5  # the code before the other transforms existed
    assert 0 < flip.sum() < 8
    np.testing.assert_array_equal(p, np.where(flip[:, None, None, None], photos[:, :, ::-1], photos))
    np.testing.assert_array_equal(m, np.where(flip[:, None, None], masks[:, :, ::-1], masks))
    p2, m2 = augment(photos, masks, np.random.default_rng(3), Augmentation(flip=False))
    np.testing.assert_array_equal(p2, photos)
    np.testing.assert_array_equal(m2, masks)


def test_each_transform_changes_photos_and_the_same_rng_state_repeats_them():
    photos, masks = smooth_photos(6, 32)
    for settings in (Augmentation(flip=False, scale=0.6), Augmentation(flip=False, rotate=15),
                     Augmentation(flip=False, brightness=0.3), Augmentation(flip=False, contrast=0.3),
                     Augmentation(flip=False, saturation=0.3), FULL):
        a = augment(photos, masks, np.random.default_rng([4, 2]), settings)
        b = augment(photos, masks, np.random.default_rng([4, 2]), settings)
        c = augment(photos, masks, np.random.default_rng([4, 3]), settings)
        assert a[0].dtype == np.uint8 and a[0].shape == photos.shape and a[1].dtype == masks.dtype
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        assert (a[0] != photos).any(axis=(1, 2, 3)).all(), settings  # every example changed
        assert (a[0] != c[0]).any()
        geometric = settings.scale < 1 or settings.rotate > 0
        assert (a[1] != masks).any() == geometric  # color jitter leaves the masks alone


def test_crop_scale_stays_within_the_asked_share_of_the_area():
    """A photo whose pixels hold their own coordinates: the window read shows its side."""
    size = 64
    yy, xx = np.mgrid[0:size, 0:size]
    photo = np.stack([xx * 4, yy * 4, np.zeros_like(xx)], axis=-1).astype(np.uint8)[None].repeat(200, axis=0)
    masks = np.zeros((200, size, size), np.uint8)
    p, _ = augment(photo, masks, np.random.default_rng(0), Augmentation(flip=False, scale=0.6))
    width = (p[:, 0, -1, 0].astype(float) - p[:, 0, 0, 0]) / 4 / (size - 1)  # share of the side seen
    area = width ** 2
    assert area.min() >= 0.6 - 0.03 and area.max() <= 1.0 + 1e-9
    assert area.min() < 0.65 and area.max() > 0.95  # the whole range is used


@pytest.mark.parametrize("kwargs,message", [({"scale": 0.0}, "scale"), ({"scale": 1.2}, "scale"),
                                            ({"rotate": -1}, "rotate"), ({"brightness": 1.0}, "brightness"),
                                            ({"contrast": -0.1}, "contrast"), ({"saturation": 2}, "saturation")])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Augmentation(**kwargs)


def test_iterate_batches_with_augmentation_matches_augment_on_the_same_rng():
    photos, masks = smooth_photos(10, 16)
    data = SegmentationData(photos, masks, [f"x{i}" for i in range(10)])
    batches = list(iterate_batches(data, 4, shuffle=True, rng=np.random.default_rng(9), augment=FULL))
    rng = np.random.default_rng(9)
    order = rng.permutation(10)
    for start, (x, y, names) in zip(range(0, 10, 4), batches):
        idx = order[start:start + 4]
        p, m = augment(photos[idx], masks[idx], rng, FULL)
        np.testing.assert_array_equal(x, to_input(p))
        np.testing.assert_array_equal(y, m.astype(np.int64))
        assert names == [f"x{i}" for i in idx]


def test_the_crop_windows_centre_is_drawn_x_first():
    """A photo whose red channel holds the column and green the row: the middle row of each cropped image
    shows where its window's centre was, and it matches the draws made here in the documented order (the
    side, sqrt(uniform(scale, 1)), then the centres, x then y). Swapped centres put the window elsewhere."""
    size, n = 64, 50
    rows, cols = np.mgrid[0:size, 0:size]
    photo = np.stack([cols * 4, rows * 4, np.zeros_like(cols)], -1).astype(np.uint8)[None].repeat(n, 0)
    out, _ = augment(photo, np.zeros((n, size, size), np.uint8), np.random.default_rng(1),
                     Augmentation(flip=False, scale=0.5))
    rng = np.random.default_rng(1)
    side = np.sqrt(rng.uniform(0.5, 1.0, n))
    cx, cy = rng.uniform(side / 2, 1 - side / 2, (2, n))
    seen_x = (out[:, size // 2, :, 0].astype(float).mean(axis=1) / 4 + 0.5) / size   # mean source column
    seen_y = (out[:, :, size // 2, 1].astype(float).mean(axis=1) / 4 + 0.5) / size   # mean source row
    np.testing.assert_allclose(seen_x, cx, atol=0.02)
    np.testing.assert_allclose(seen_y, cy, atol=0.02)


def test_to_input_is_imagenet_normalised_nchw():
    """uint8 NHWC -> float32 NCHW, (x / 255 - mean) / std with ImageNet's published statistics, by hand."""
    images = np.array([[[[0, 128, 255], [10, 20, 30]]]], dtype=np.uint8)        # (1, 1, 2, 3)
    x = to_input(images)
    assert x.shape == (1, 3, 1, 2) and x.dtype == np.float32
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    for c in range(3):
        for j in range(2):
            assert x[0, c, 0, j] == pytest.approx((images[0, 0, j, c] / 255 - mean[c]) / std[c], rel=1e-5)
