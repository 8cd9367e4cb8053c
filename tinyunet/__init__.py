"""tinyunet: a from-scratch U-Net for semantic segmentation, in NumPy with a CuPy GPU backend."""

__version__ = "0.1.0"
