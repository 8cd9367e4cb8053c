"""The CPU acceleration: the layers of tinyunet/nn computed faster on a CPU, each proven equal to them.

tinyunet/nn is the reference: what the lessons derive, what a GPU runs, and what ``TINYUNET_ACCEL=0``
(or ``--no-accel``) runs alone. On NumPy every layer that has a faster version here asks for it in
the first lines of its forward (``accelerated`` in nn/module.py), and :mod:`~tinyunet.accel.choose`
answers: the one place with every rule and threshold. Lesson 17, "Making it fast on a CPU", teaches
what is here:

    choose.py          which implementation for which layer and input (all thresholds)
    parallel.py        every core: row blocks on a thread pool, two jobs side by side
    blas.py            out += a @ b by BLAS itself (beta = 1), fast transposes (ctypes, NumPy's own BLAS)
    conv.py            the frame of every accelerated Conv2d, channels-last memory; im2col per image, im2row
    shifted.py         a stride-1 conv as nine shifted 1x1 products, no 9x copy
    direct.py          the same sums by register-blocked compiled kernels, no padded copies (Numba)
    direct_kernels.py  those kernels, generated from one template; simd.py: a 16-lane vector type for Numba
    winograd.py        Winograd's F(2x2, 3x3): 16 products per 2x2 tile instead of 36
    weight_layout.py   the weight as the products read it, in one fast copy; padding.py: zero frames
    pool.py, upconv.py, concat.py, relu.py, norm.py: the other layers, channels-last, on every core
    compiled_loops.py  BatchNorm's and ReLU's passes as compiled loops (Numba)
    optim.py           an optimizer's step over chunks of its flat buffers, on every core
    allocator.py       keep freed memory for reuse (a program's setting)

Numba is optional (``pip install -e '.[fast]'``): without it, the compiled loops and kernels decline
and the NumPy/BLAS implementations run. Every implementation is tested against the reference in
tests/test_accel_*.py, forward and backward, on inputs on both sides of every threshold.
"""
from tinyunet.accel.choose import describe

__all__ = ["describe"]
