import numpy as np
import pytest

from tinyunet.classes import CLASS_NAMES, CLASSES, NUM_CLASSES, PALETTE, labels_to_rgb, trimap_to_labels


def test_table_is_consistent():
    assert CLASS_NAMES == ("pet", "background", "outline")
    assert NUM_CLASSES == 3
    assert [c.id for c in CLASSES] == [0, 1, 2]
    assert [c.trimap_value for c in CLASSES] == [1, 2, 3]
    assert PALETTE.shape == (3, 3) and PALETTE.dtype == np.uint8
    assert len({tuple(c) for c in PALETTE.tolist()}) == 3  # distinct colors
    with pytest.raises(Exception):
        CLASSES[0].name = "cat"  # frozen


def test_trimap_to_labels_maps_value_minus_one():
    trimap = np.array([[1, 2], [3, 2]], dtype=np.uint8)
    labels = trimap_to_labels(trimap)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, trimap - 1)


@pytest.mark.parametrize("bad", [0, 4, 7, 255])
def test_trimap_to_labels_rejects_other_values(bad):
    with pytest.raises(ValueError, match=str(bad)):
        trimap_to_labels(np.array([[1, bad]], dtype=np.uint8))


def test_labels_to_rgb():
    labels = np.array([[0, 1, 2]])
    rgb = labels_to_rgb(labels)
    assert rgb.shape == (1, 3, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0], PALETTE)
    with pytest.raises(ValueError):
        labels_to_rgb(np.array([3]))
