"""The reference layers alone train, evaluate and predict (TINYUNET_ACCEL=0, --no-accel), and give the
same model as the accelerated code: the same maths, summed in another order."""
import json

import numpy as np
import pytest

from tinyunet import backend
from tinyunet.losses import CrossEntropyLoss
from tinyunet.models import create_model
from tinyunet.optim import Adam

pytestmark = pytest.mark.usefixtures("numpy_backend")
TINY = ["--dataset", "shapes", "--size", "32", "--num-shapes", "48", "--base-channels", "4", "--depth", "2",
        "--batch-size", "8", "--epochs", "1", "--quiet"]


def train_steps(accelerate: bool, dtype, arch: str = "unet", steps: int = 4):
    """A few Adam steps of a small model on fixed random data -> (losses, parameters)."""
    before = backend.set_acceleration(accelerate)
    try:
        backend.seed(0)
        model = create_model(arch, in_channels=3, num_classes=3, base_channels=16, depth=2).to(dtype)
        optimizer, loss_fn = Adam(model.parameters(), lr=1e-3), CrossEntropyLoss()
        rng = np.random.default_rng(1)
        x = rng.random((4, 3, 32, 32)).astype(dtype)
        y = rng.integers(0, 3, (4, 32, 32))
        losses = []
        for _ in range(steps):
            optimizer.zero_grad()
            losses.append(float(loss_fn.forward(model.forward(x), y)))
            model.backward(loss_fn.backward(), input_grad=False)
            optimizer.step()
            assert any(getattr(m, "fast", None) for m in model.modules()) == accelerate
        return losses, {k: v.astype(np.float64) for k, v in model.state_dict().items()}
    finally:
        backend.set_acceleration(before)


@pytest.mark.parametrize("arch", ["unet", "attunet"])
def test_training_without_the_acceleration_gives_the_same_model_in_float64(arch):
    """float64 (where most accelerated implementations run too): the same losses and weights to ~1e-9."""
    ref_losses, ref = train_steps(False, np.float64, arch)
    fast_losses, fast = train_steps(True, np.float64, arch)
    np.testing.assert_allclose(fast_losses, ref_losses, rtol=1e-10)
    for k in ref:
        np.testing.assert_allclose(fast[k], ref[k], rtol=1e-8, atol=1e-10, err_msg=k)


def test_training_without_the_acceleration_gives_the_same_model_in_float32():
    """float32, as training runs (the direct kernels and compiled loops where Numba is installed).
    One step: the same weights to float32 rounding. Several: the same losses, and weights within
    what Adam's steps allow. (Beyond the first step a float32 run is not the same to the last bits as
    any other float32 run that sums in another order: a ReLU input within rounding of 0 passes its
    gradient in one run and not in the other, BatchNorm's backward spreads that over its layer, and
    Adam's steps, ~lr * sign(g) at first, carry it into every weight. The float64 test above shows
    the maths is the same.)"""
    _, one_ref = train_steps(False, np.float32, steps=1)
    _, one_fast = train_steps(True, np.float32, steps=1)
    for k in one_ref:   # Adam's first step is lr * g / (|g| + eps): a gradient near eps moves its weight by less
        off = np.abs(one_fast[k] - one_ref[k]) > 1e-6 + 1e-5 * np.abs(one_ref[k])
        assert off.mean() < 1e-3 and np.abs(one_fast[k] - one_ref[k]).max() <= 2e-3, k
    ref_losses, ref = train_steps(False, np.float32)
    fast_losses, fast = train_steps(True, np.float32)
    np.testing.assert_allclose(fast_losses, ref_losses, rtol=1e-4)
    for k in ref:
        assert np.abs(fast[k] - ref[k]).max() <= 4 * 2e-3, k      # at most 4 steps of 2 * lr apart


def test_cli_trains_evaluates_and_predicts_with_the_reference_alone(run_cli, tmp_path, capsys):
    out = tmp_path / "run"
    status, stdout, err = run_cli("train", *TINY, "--out", out, "--no-accel")
    assert status == 0, err
    log = (out / "train.log").read_text() if (out / "train.log").exists() else stdout + err
    assert "reference layers" in log
    status, stdout, err = run_cli("evaluate", "--checkpoint", out / "best.npz", "--json", "--no-accel")
    assert status == 0, err
    reference = json.loads(stdout)
    status, stdout, err = run_cli("evaluate", "--checkpoint", out / "best.npz", "--json")
    accelerated = json.loads(stdout)
    assert reference["miou"] == pytest.approx(accelerated["miou"], abs=1e-3)
    from PIL import Image
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(photo)
    status, stdout, err = run_cli("predict", "--checkpoint", out, str(photo), "--out", tmp_path / "pred", "--no-accel")
    assert status == 0, err
    assert (tmp_path / "pred" / "photo_mask.png").exists()


def test_gradcheck_without_the_acceleration_passes(run_cli, monkeypatch):
    """`tinyunet gradcheck --no-accel` runs the reference layers (the suite itself: test_gradcheck.py)."""
    import tinyunet.gradcheck
    seen = []
    monkeypatch.setattr(tinyunet.gradcheck, "run_all", lambda seed=0, full=False: seen.append(backend.accelerate())
                        or [("Conv2d", "input0", 1e-9, True)])
    status, stdout, _ = run_cli("gradcheck", "--no-accel")
    assert status == 0 and seen == [False] and "1 passed" in stdout
