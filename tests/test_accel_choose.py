"""The chooser (tinyunet/accel/choose.py) and the seam to it: which implementation runs where, that
backward runs what forward chose, and that the switch leaves the reference alone."""
import subprocess
import sys

import numpy as np
import pytest

from conftest import compiled_code
from tinyunet import backend
from tinyunet.accel import choose as chooser
from tinyunet.accel import compiled_loops
from tinyunet.nn import BatchNorm2d, Concat, Conv2d, ConvTranspose2d, MaxPool2d, ReLU, Sigmoid, Upsample

pytestmark = pytest.mark.usefixtures("numpy_backend")


def picked(layer, shape, dtype=np.float32):
    x = np.zeros((shape[0], shape[2], shape[3], shape[1]), dtype=dtype).transpose(0, 3, 1, 2)
    chosen = chooser.choose(layer, x)
    return None if chosen is None else chosen.name


def test_with_blas_winograd_takes_only_the_shapes_where_it_was_measured_faster():
    """3x3, stride 1, padding 1, even output sides, >= 64 channels in and out, >= 512 tiles (batch x
    Hout/2 x Wout/2); shifted products for larger images, im2row for strides and outputs of at most
    16x16 pixels, im2col for an image's few channels."""
    with compiled_code(False):
        wide = Conv2d(64, 128, 3, padding=1)
        assert picked(wide, (8, 64, 16, 16)) == picked(wide, (2, 64, 32, 32)) == "winograd"
        assert picked(wide, (1, 64, 16, 16)) == "im2row"                 # 64 tiles, and 16x16 pixels
        assert picked(wide, (8, 64, 32, 33)) == "shifted"                # odd width: tiles would not cover it
        assert picked(Conv2d(32, 64, 3, padding=1), (8, 32, 32, 32)) == "shifted"
        assert picked(Conv2d(64, 32, 3, padding=1), (8, 64, 64, 64)) == "shifted"
        assert picked(Conv2d(64, 64, 3, padding=1, stride=2), (8, 64, 32, 32)) == "im2row"
        assert picked(Conv2d(64, 64, 3, padding=0), (8, 64, 34, 34)) == "shifted"
        assert picked(Conv2d(64, 64, 5, padding=2), (8, 64, 32, 32)) == "shifted"
        assert picked(Conv2d(16, 16, 3, padding=1), (8, 16, 16, 16)) == "im2row"   # 256 pixels
        assert picked(Conv2d(16, 16, 3, padding=1), (8, 16, 17, 16)) == "shifted"  # 272
        assert picked(Conv2d(3, 16, 3, padding=1), (8, 3, 128, 128)) == "im2col"
        assert picked(Conv2d(5, 16, 3, padding=1), (8, 5, 128, 128)) == "shifted"


@pytest.mark.skipif(not compiled_loops.available(), reason="Numba is not installed")
def test_with_the_direct_kernels_winograd_needs_256_input_channels():
    """With the direct kernels the shifted sums beat Winograd up to 128 channels on a side and im2row
    for every layer big enough to share between threads (2**24 multiply-adds); channels that are no
    multiple of 16 keep the BLAS rules; float64 never runs the kernels."""
    with compiled_code(True):
        assert picked(Conv2d(64, 128, 3, padding=1), (8, 64, 16, 16)) == "direct"
        assert picked(Conv2d(128, 128, 3, padding=1), (8, 128, 16, 16)) == "direct"
        assert picked(Conv2d(256, 128, 3, padding=1), (8, 256, 16, 16)) == "winograd"
        assert picked(Conv2d(256, 64, 3, padding=1), (8, 256, 16, 16)) == "direct"
        assert picked(Conv2d(256, 256, 3, padding=1), (8, 256, 8, 8)) == "direct"     # 512 outputs
        assert picked(Conv2d(256, 256, 3, padding=1), (1, 256, 8, 8)) == "direct"     # 37.7M multiply-adds
        assert picked(Conv2d(128, 128, 3, padding=1), (1, 128, 8, 8)) == "im2row"     # 9.4M: too small to share
        assert picked(Conv2d(3, 16, 3, padding=1), (1, 3, 128, 128)) == "direct"      # an image: the kernels too
        assert picked(Conv2d(3, 16, 3, padding=1, stride=2), (8, 3, 64, 64)) == "im2col"
        assert picked(Conv2d(72, 72, 3, padding=1), (8, 72, 32, 32)) == "winograd"   # 72 = 4.5 x 16: BLAS rules
        assert picked(Conv2d(64, 64, 3, padding=1, stride=2), (8, 64, 32, 32)) == "im2row"
        assert picked(Conv2d(16, 16, 3, padding=1), (8, 16, 64, 64), np.float64) == "shifted"


@pytest.mark.parametrize("direct", [False, True])
def test_the_plans_follow_the_thresholds_on_both_sides(direct):
    """The weight gradient splits into partial sums from SPLIT_WEIGHT_GRAD_ROWS rows on; the BLAS
    weight gradient joins rows for 8-16 input channels; the kernels share out output channels where
    the weights outweigh the rows."""
    if direct and not compiled_loops.available():
        pytest.skip("Numba is not installed")
    with compiled_code(direct):
        layer = Conv2d(16, 16, 3, padding=1)

        def plan(n, size, cin=16):
            layer.in_channels = cin
            x = np.zeros((n, size, size, cin), np.float32).transpose(0, 3, 1, 2)
            return chooser.direct_conv(layer, x) if direct else chooser.shifted_conv(layer, x)
        rows = chooser.SPLIT_WEIGHT_GRAD_ROWS                  # 16384 = 1 x 128 x 128
        assert rows == 1 * 128 * 128
        if direct:      # rows of the output: N*H*W
            assert plan(1, 128).split_weight_grad and not plan(1, 127).split_weight_grad
            assert plan(1, 12).share_channels == (False, False)         # 144 rows, 9 x 16 weight columns
            assert plan(1, 11).share_channels == (True, True)           # 121 rows: fewer
        else:           # rows of the padded input whose window fits: N*(H+2)*(W+2) - 2*(W+2) - 2
            assert plan(1, 128).split_weight_grad and not plan(1, 127).split_weight_grad   # 16638, 16381
            assert plan(1, 64, cin=8).join_rows and plan(1, 64, cin=16).join_rows
            assert not plan(1, 64, cin=7).join_rows and not plan(1, 64, cin=17).join_rows
    if direct:
        with compiled_code(True):
            deep = Conv2d(256, 256, 3, padding=1)
            x = np.zeros((1, 8, 8, 256), np.float32).transpose(0, 3, 1, 2)
            assert chooser.direct_conv(deep, x).share_channels == (True, True)     # 64 rows, 9 x 256 weights
            x = np.zeros((8, 64, 64, 256), np.float32).transpose(0, 3, 1, 2)
            assert chooser.direct_conv(deep, x).share_channels == (False, False)


def test_the_other_layers_and_what_has_no_acceleration():
    x = np.zeros((2, 4, 6, 6), np.float32)
    last = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    assert chooser.choose(MaxPool2d(2), x).name == "separable"
    assert chooser.choose(ConvTranspose2d(4, 2, 2, stride=2), x).name == "rows"
    assert chooser.choose(ReLU(), last).name == ("compiled" if compiled_loops.available() else "blocks")
    assert chooser.choose(BatchNorm2d(4), last).name == ("compiled" if compiled_loops.available() else "rows")
    concat = Concat(1)
    concat.sizes = (4, 4)
    assert chooser.choose(concat, x, x).name == "channels-last"
    assert chooser.choose(Concat(0), x, x) is None
    assert chooser.choose(Sigmoid(), x) is None and chooser.choose(Upsample(2), x) is None


def test_backward_runs_what_forward_chose():
    """The layer keeps forward's implementation: switching the acceleration off between forward and
    backward changes nothing, and the next forward asks again."""
    rng = np.random.default_rng(0)
    conv = Conv2d(16, 16, 3, padding=1)
    x = rng.standard_normal((2, 16, 8, 8)).astype(np.float32)
    conv.forward(x)
    chosen = conv.fast
    assert chosen is not None
    before = backend.set_acceleration(False)
    try:
        dx = conv.backward(np.ones((2, 16, 8, 8), np.float32))
        assert conv.fast is chosen and dx.shape == x.shape
        conv.forward(x)
        assert conv.fast is None and conv.cache is not None       # the reference this time
    finally:
        backend.set_acceleration(before)


def test_nothing_of_the_acceleration_runs_on_a_device(fake_cupy):
    from tinyunet.models import UNet
    assert not backend.accelerate()
    model = UNet(base_channels=4, depth=2)
    model.forward(backend.to_device(np.zeros((2, 3, 16, 16), np.float32)))
    assert all(getattr(m, "fast", None) is None for m in model.modules())


def test_with_tinyunet_accel_0_nothing_from_the_acceleration_package_is_imported():
    """A training step, evaluation and the CLI's summary with TINYUNET_ACCEL=0: tinyunet.accel is never
    imported (so nothing of it can run), and every layer ran its reference code."""
    code = ("import sys, numpy as np\n"
            "from tinyunet.models import UNet\nfrom tinyunet.losses import CrossEntropyLoss\n"
            "from tinyunet.optim import Adam\nfrom tinyunet.cli import main\n"
            "model = UNet(base_channels=4, depth=2); opt = Adam(model.parameters()); loss = CrossEntropyLoss()\n"
            "x = np.random.rand(2, 3, 16, 16).astype(np.float32); y = np.zeros((2, 16, 16), int)\n"
            "loss.forward(model.forward(x), y); model.backward(loss.backward()); opt.step()\n"
            "assert all(getattr(m, 'fast', None) is None for m in model.modules()) and opt.fast is None\n"
            "main(['summary', '--size', '16', '--depth', '2', '--base-channels', '4', '--batch-size', '2'])\n"
            "print('imported:', sorted(m for m in sys.modules if m.startswith('tinyunet.accel')))\n")
    env = {**__import__("os").environ, "TINYUNET_ACCEL": "0", "TINYUNET_BACKEND": "numpy"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "imported: []" in proc.stdout
    rows = [line.split()[-1] for line in proc.stdout.splitlines() if line.startswith(("down.", "pool.", "head"))]
    assert rows and set(rows) == {"reference"}
    env["TINYUNET_ACCEL"] = "1"   # and the default imports it
    proc = subprocess.run([sys.executable, "-c", code.replace("and opt.fast is None", "or True").replace(
        "assert all(getattr(m, 'fast', None) is None", "assert not all(getattr(m, 'fast', None) is None")],
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "'tinyunet.accel.choose'" in proc.stdout
