"""The weight's layouts (tinyunet/nn/weight_layout.py) against their definitions by index."""
import numpy as np
import pytest

from tinyunet.accel.weight_layout import flipped_kernel_stack, kernel_stack, stack_to_weight

pytestmark = pytest.mark.usefixtures("numpy_backend")


@pytest.mark.parametrize("cout, cin, kh, kw", [(4, 3, 3, 3), (16, 32, 3, 3), (5, 7, 1, 1), (2, 3, 2, 5)])
def test_stacks_hold_the_weight_of_each_kernel_offset(cout, cin, kh, kw):
    rng = np.random.default_rng(cout * cin + kh)
    weight = rng.standard_normal((cout, cin, kh, kw)).astype(np.float32)
    stack, flipped = kernel_stack(weight), flipped_kernel_stack(weight)
    assert stack.shape == (kh * kw, cin, cout) and flipped.shape == (kh * kw, cout, cin)
    assert stack.strides[2] == stack.itemsize and flipped.flags.c_contiguous   # rows contiguous: what products read
    for i in range(kh):
        for j in range(kw):
            np.testing.assert_array_equal(stack[i * kw + j], weight[:, :, i, j].T)
            np.testing.assert_array_equal(flipped[i * kw + j], weight[:, :, i, j])


@pytest.mark.parametrize("view", [True, False])
def test_stack_to_weight_undoes_kernel_stack(view):
    """From kernel_stack's own view (one transposition) and from a contiguous (T, Cin, Cout) array
    (the weight gradients of BLAS's products), back to (Cout, Cin, kh*kw)."""
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((6, 5, 3, 3))
    stack = kernel_stack(weight)
    if not view:
        stack = np.ascontiguousarray(stack)
    back = stack_to_weight(stack)
    assert back.flags.c_contiguous
    np.testing.assert_array_equal(back.reshape(weight.shape), weight)
    dw = rng.standard_normal((9, 5, 6))        # any stack: element [t, c, o] lands at [o, c, t]
    np.testing.assert_array_equal(stack_to_weight(dw), dw.transpose(2, 1, 0))
