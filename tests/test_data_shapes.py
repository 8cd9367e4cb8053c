import time

import numpy as np

from tinyunet.classes import NUM_CLASSES
from tinyunet.data.shapes import make_shapes


def test_shapes_arrays_and_all_classes():
    data = make_shapes(20, size=32, seed=1)
    assert len(data) == 20
    assert data.images.shape == (20, 32, 32, 3) and data.images.dtype == np.uint8
    assert data.labels.shape == (20, 32, 32) and data.labels.dtype == np.uint8
    assert data.skipped == [] and len(set(data.names)) == 20
    counts = np.bincount(data.labels.ravel(), minlength=NUM_CLASSES)
    assert len(counts) == NUM_CLASSES and (counts > 0).all()
    # every single image has a pet, an outline and background
    for c in range(NUM_CLASSES):
        assert (data.labels == c).any(axis=(1, 2)).all()


def test_shapes_deterministic_per_seed():
    a, b, c = make_shapes(8, 32, seed=3), make_shapes(8, 32, seed=3), make_shapes(8, 32, seed=4)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.labels, c.labels)


def test_outline_separates_pet_from_background():
    # Like a trimap: no pet pixel touches a background pixel (4-neighbourhood).
    lab = make_shapes(16, 48, seed=0).labels
    for a, b in [(lab[:, 1:], lab[:, :-1]), (lab[:, :, 1:], lab[:, :, :-1])]:
        assert not (((a == 0) & (b == 1)) | ((a == 1) & (b == 0))).any()


def test_shapes_fast():
    start = time.perf_counter()
    make_shapes(300, 64, seed=0)
    assert time.perf_counter() - start < 3.0


def test_class_ids_outside_the_classes_are_refused_where_the_data_enters():
    """On a GPU an out-of-range class id would index silently in the loss (CuPy wraps indices): the
    dataset refuses it on the host, naming the examples."""
    import numpy as np
    import pytest as _pytest
    from tinyunet.data import SegmentationData

    images = np.zeros((3, 4, 4, 3), np.uint8)
    labels = np.zeros((3, 4, 4), np.uint8)
    labels[1, 2, 2] = 3
    with _pytest.raises(ValueError, match=r"\[0, 3\).*b"):
        SegmentationData(images, labels, ["a", "b", "c"])
    labels[1, 2, 2] = 2
    assert len(SegmentationData(images, labels, ["a", "b", "c"])) == 3
