"""Data on the host (NumPy): Oxford-IIIT Pet loader and cache, synthetic shapes, transforms, download.

Data is the edge of the system: everything here returns NumPy arrays; the training loop moves one
batch at a time to the device with ``tinyunet.backend.to_device``.
"""
from tinyunet.data.dataset import SegmentationData, iterate_batches, split_train_val
from tinyunet.data.download import OFFICIAL_FILES, download_pets
from tinyunet.data.pets import (DataWarning, check_layout, default_cache_dir, default_data_dir, load_native_labels,
                                load_pets, read_split)
from tinyunet.data.shapes import make_shapes

__all__ = [
    "SegmentationData",
    "iterate_batches",
    "split_train_val",
    "download_pets",
    "OFFICIAL_FILES",
    "DataWarning",
    "check_layout",
    "default_cache_dir",
    "default_data_dir",
    "load_pets",
    "load_native_labels",
    "read_split",
    "make_shapes",
]
