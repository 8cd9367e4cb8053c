"""UNet: shapes, size errors, parameter names and count, state round trips, modes, end-to-end
gradients through the loss, dtypes, and a small overfitting run."""
import numpy as np
import pytest

from tinyunet import backend
from tinyunet.gradcheck import check_model_with_loss
from tinyunet.losses import CrossEntropyLoss
from tinyunet.models import UNet
from tinyunet.nn import BatchNorm2d, Conv2d, ConvTranspose2d, MaxPool2d, ReLU
from tinyunet.optim import Adam

pytestmark = pytest.mark.usefixtures("numpy_backend")


def model(seed=0, **kwargs):
    backend.seed(seed)
    return UNet(**kwargs)


@pytest.mark.parametrize("depth,base,size,batchnorm", [
    (1, 4, (6, 10), True), (2, 4, (16, 16), True), (3, 2, (8, 24), False), (4, 2, (16, 32), True),
])
def test_output_shape(depth, base, size, batchnorm):
    net = model(in_channels=3, num_classes=5, base_channels=base, depth=depth, batchnorm=batchnorm)
    x = np.random.default_rng(0).standard_normal((2, 3) + size).astype(np.float32)
    assert net.forward(x).shape == (2, 5) + size
    assert net.backward(np.ones((2, 5) + size, dtype=np.float32)).shape == x.shape


def test_other_input_channels():
    net = model(in_channels=1, num_classes=2, base_channels=2, depth=2)
    assert net.forward(np.zeros((1, 1, 8, 8), dtype=np.float32)).shape == (1, 2, 8, 8)


@pytest.mark.parametrize("depth,h,w", [(2, 18, 16), (2, 16, 20 + 2), (3, 12, 8), (1, 7, 8)])
def test_non_divisible_size_raises_with_the_rule_and_suggestions(depth, h, w):
    net = model(base_channels=2, depth=depth)
    with pytest.raises(ValueError) as info:
        net.forward(np.zeros((1, 3, h, w), dtype=np.float32))
    message = str(info.value)
    factor = 2 ** depth
    assert f"divisible by 2**{depth}" in message and str(factor) in message
    assert f"{h}x{w}" in message
    bad = h if h % factor else w
    lower = bad // factor * factor  # the nearest valid sizes below and above
    assert f"{lower} or {lower + factor}" in message, message


def test_parameter_names_are_dotted_pytorch_style():
    # depth 1 with batchnorm: every name written out by hand from the architecture
    net = model(in_channels=3, num_classes=2, base_channels=2, depth=1, batchnorm=True)
    double = ["0.weight", "1.weight", "1.bias", "3.weight", "4.weight", "4.bias"]  # conv, BN, ReLU, conv, BN, ReLU
    expected = ([f"down.0.{n}" for n in double] + [f"bottleneck.{n}" for n in double]
                + ["up.0.weight", "up.0.bias"] + [f"up_conv.0.{n}" for n in double] + ["head.weight", "head.bias"])
    names = [n for n, _ in net.named_parameters()]
    assert sorted(names) == sorted(expected) and len(names) == len(set(names))
    shapes = dict((n, p.shape) for n, p in net.named_parameters())
    assert shapes["down.0.0.weight"] == (2, 3, 3, 3)
    assert shapes["bottleneck.3.weight"] == (4, 4, 3, 3)
    assert shapes["up.0.weight"] == (4, 2, 2, 2)  # ConvTranspose2d layout (in, out, kh, kw)
    assert shapes["up_conv.0.0.weight"] == (2, 4, 3, 3)  # 2 + 2 channels after the concat
    assert shapes["head.weight"] == (2, 2, 1, 1) and shapes["head.bias"] == (2,)
    buffers = [n for n, _ in net.named_buffers()]
    assert "down.0.1.running_mean" in buffers and "up_conv.0.4.running_var" in buffers


def test_parameter_names_without_batchnorm_and_deeper():
    net = model(base_channels=2, depth=2, batchnorm=False)
    names = {n for n, _ in net.named_parameters()}
    for name in ["down.0.0.weight", "down.0.0.bias", "down.1.2.weight", "bottleneck.2.bias",
                 "up.0.weight", "up.1.bias", "up_conv.1.2.weight", "head.bias"]:
        assert name in names
    assert not any("running" in n for n in net.state_dict())


def _double_conv(cin, cout, bn):
    # two 3x3 convs; with BN: no conv bias, BN has gamma and beta; without: conv biases
    return 9 * cin * cout + 9 * cout * cout + (4 * cout if bn else 2 * cout)


def test_parameter_count_base16_depth4_by_hand():
    # widths 16, 32, 64, 128, 256. Encoder 3->16->32->64->128, bottleneck 128->256,
    # decoder per level: ConvTranspose(2w->w, 2x2, bias) = 4*2w*w + w, then DoubleConv(2w -> w); head 1x1 16->3.
    # down:       2800 + 13952 + 55552 + 221696      = 294000
    # bottleneck: 9*128*256 + 9*256*256 + 4*256      = 885760
    # up:         131200 + 32832 + 8224 + 2064       = 174320
    # up_conv:    442880 + 110848 + 27776 + 6976     = 588480
    # head:       16*3 + 3                           = 51          total 1942611
    assert _double_conv(3, 16, True) == 2800 and _double_conv(128, 256, True) == 885760
    net = model(in_channels=3, num_classes=3, base_channels=16, depth=4, batchnorm=True)
    assert net.num_parameters() == 1_942_611
    assert sum(int(np.prod(p.shape)) for p in net.parameters()) == 1_942_611
    # without batchnorm each of the 9 double convs trades 4*cout (BN) for 2*cout (conv biases):
    # sum of their cout = 16+32+64+128 + 256 + 128+64+32+16 = 736, so 1942611 - 2*736
    net = model(in_channels=3, num_classes=3, base_channels=16, depth=4, batchnorm=False)
    assert net.num_parameters() == 1_942_611 - 2 * 736


def test_state_dict_values_are_host_numpy_copies():
    net = model(base_channels=2, depth=2)
    state = net.state_dict()
    assert len(state) == len(list(net.named_parameters())) + len(list(net.named_buffers()))
    assert all(type(v) is np.ndarray for v in state.values())
    state["head.bias"][...] = 42.0  # a copy: the model is not changed
    assert not (net.head.bias.data == 42.0).any()


def _trained_a_bit(net, seed=1):
    rng = np.random.default_rng(seed)
    loss, opt = CrossEntropyLoss(), Adam(net.parameters(), lr=1e-2)
    for _ in range(2):  # moves the weights and the BN running statistics off their initial values
        x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
        y = rng.integers(0, 3, (2, 8, 8))
        opt.zero_grad()
        loss.forward(net.forward(x), y)
        net.backward(loss.backward())
        opt.step()
    return net


def test_load_state_dict_round_trip_gives_identical_outputs():
    a = _trained_a_bit(model(seed=0, base_channels=2, depth=2))
    b = model(seed=5, base_channels=2, depth=2)
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
    a.eval(), b.eval()
    assert not np.array_equal(a.forward(x), b.forward(x))
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a.forward(x), b.forward(x))  # eval: running stats came along too
    a.train(), b.train()
    np.testing.assert_array_equal(a.forward(x), b.forward(x))
    for name, value in b.state_dict().items():
        assert value.dtype == a.state_dict()[name].dtype
    # loaded arrays are copies, not aliases of the state passed in
    state = a.state_dict()
    b.load_state_dict(state)
    state["down.0.0.weight"][...] = 0.0
    assert b.down[0][0].weight.data.any()


def test_load_state_dict_rejects_mismatches():
    net = model(base_channels=2, depth=2)
    good = net.state_dict()
    with pytest.raises(ValueError, match="shape"):
        net.load_state_dict(model(base_channels=4, depth=2).state_dict())
    missing = dict(good)
    del missing["head.bias"]
    with pytest.raises(ValueError, match="head.bias"):
        net.load_state_dict(missing)
    extra = dict(good, **{"head.extra": np.zeros(1, dtype=np.float32)})
    with pytest.raises(ValueError, match="head.extra"):
        net.load_state_dict(extra)
    with pytest.raises(ValueError):  # a different architecture: other names
        net.load_state_dict(model(base_channels=2, depth=1).state_dict())
    with pytest.raises(ValueError):
        net.load_state_dict(model(base_channels=2, depth=2, batchnorm=False).state_dict())
    net.load_state_dict(good)  # and the failed loads did not break it


def test_train_and_eval_propagate():
    net = model(base_channels=2, depth=2)
    modules = list(net.modules())
    assert sum(isinstance(m, BatchNorm2d) for m in modules) == 10
    assert all(m.training for m in modules)
    assert net.eval() is net
    assert not any(m.training for m in modules)
    net.train()
    assert all(m.training for m in modules)
    net.train(False)
    assert not any(m.training for m in modules)


def test_eval_mode_output_does_not_depend_on_batch():
    net = _trained_a_bit(model(base_channels=2, depth=2)).eval()
    x = np.random.default_rng(3).standard_normal((3, 3, 8, 8))
    net.double()
    together = net.forward(x)
    np.testing.assert_allclose(net.forward(x[1:2]), together[1:2], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_preserved_end_to_end(dtype):
    net = model(base_channels=2, depth=2).to(dtype)
    x = np.random.default_rng(4).standard_normal((2, 3, 8, 8)).astype(dtype)
    y = np.random.default_rng(4).integers(0, 3, (2, 8, 8))
    loss = CrossEntropyLoss(weight=np.array([1.0, 2.0, 0.5]))
    logits = net.forward(x)
    value = loss.forward(logits, y)
    dx = net.backward(loss.backward())
    assert logits.dtype == dtype and value.dtype == dtype and dx.dtype == dtype
    for name, p in net.named_parameters():
        assert p.data.dtype == dtype and p.grad.dtype == dtype, name
    for name, b in net.named_buffers():
        assert b.dtype == dtype, name


def kink_margin(net, x):
    """Distance of this forward from every non-differentiable point of the network: the smallest
    |input| of any ReLU (its kink is at 0) and the smallest gap between the two largest values of a
    max-pool window whose maximum is positive (a tie there switches which input gets the gradient;
    windows whose maximum is 0 only hold ReLU-clipped values with zero gradient anyway)."""
    found = []

    def watch(module, measure):
        original = module.forward

        def forward(z):
            found.append(measure(z))
            return original(z)
        module.forward = forward  # instance attribute: shadows the class method for this forward

    def relu_margin(z):
        return float(np.abs(z).min())

    def pool_margin(z):
        n, c, h, w = z.shape
        windows = z[:, :, :h // 2 * 2, :w // 2 * 2].reshape(n, c, h // 2, 2, w // 2, 2)
        windows = np.sort(windows.transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4), axis=-1)
        gaps = (windows[..., -1] - windows[..., -2])[windows[..., -1] > 0]
        return float(gaps.min()) if gaps.size else np.inf

    watched = [m for m in net.modules() if isinstance(m, (ReLU, MaxPool2d))]
    assert all(m.kernel_size == 2 and m.stride == 2 for m in watched if isinstance(m, MaxPool2d))
    for m in watched:
        watch(m, relu_margin if isinstance(m, ReLU) else pool_margin)
    try:
        net.forward(x)
    finally:
        for m in watched:
            del m.forward
    return min(found)


# A finite difference with step h moves every pre-activation by at most ~10*h = 1e-5 here, so a
# forward whose kink margin is >= 1e-4 has no ReLU input crossing 0 and no pool window changing its
# maximum during the check: the function is smooth on the whole stencil. With random inputs the
# margin of a network of this size is often ~1e-5 (and the check then fails by ~1e-3 on one entry:
# a kink, not a wrong backward), so the test picks the first seed whose margin is large enough.
MARGIN = 1e-4


def _smooth_instance(make_net, make_input):
    for seed in range(50):
        net, x = make_net(seed), make_input(seed)
        if kink_margin(net, x) >= MARGIN:
            return seed, net, x
    raise AssertionError("no seed in 0..49 gives a forward away from ReLU kinks and pool ties")


def test_whole_unet_gradients_with_batchnorm():
    # depth 2, base 4, 16x16, batch 2, BN in train mode, float64, through CrossEntropyLoss;
    # inputs (weights + images) chosen away from ReLU kinks and max-pool ties, see MARGIN above
    seed, net, x = _smooth_instance(
        lambda s: model(seed=s, in_channels=3, num_classes=3, base_channels=4, depth=2, batchnorm=True).double(),
        lambda s: np.random.default_rng(s).standard_normal((2, 3, 16, 16)))
    assert all(m.training for m in net.modules())
    y = np.random.default_rng(seed + 100).integers(0, 3, (2, 16, 16))
    errors = check_model_with_loss(net, CrossEntropyLoss(), x, y)
    assert set(errors) == {"input"} | {n for n, _ in net.named_parameters()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-5, (seed, worst, errors[worst])


def _he_scaled_unet_without_bn(seed):
    net = model(seed=seed, in_channels=3, num_classes=3, base_channels=2, depth=2, batchnorm=False).double()
    # PyTorch's default init (bound 1/sqrt(fan_in)) shrinks the signal ~2.4x per conv + ReLU; without
    # BN the deepest gradients of this small net end up ~1e-7, where finite-difference noise (~1e-10)
    # alone gives relative errors ~1e-3. Scaling the weights to He's variance 2/fan_in keeps every
    # gradient O(1e-2 .. 1), so the check measures the backward, not the noise.
    for m in net.modules():
        if isinstance(m, (Conv2d, ConvTranspose2d)):
            m.weight.data *= np.sqrt(6.0)
    return net


def test_whole_unet_gradients_without_batchnorm():
    # smaller (base 2, 8x8) to keep the suite fast; class weights and an ignored label exercise the
    # loss options end to end; inputs away from kinks and ties as above
    seed, net, x = _smooth_instance(_he_scaled_unet_without_bn,
                                    lambda s: np.random.default_rng(s).standard_normal((2, 3, 8, 8)))
    y = np.random.default_rng(seed + 100).integers(0, 4, (2, 8, 8))  # label 3 is "void"
    loss = CrossEntropyLoss(weight=np.array([1.0, 2.0, 0.5]), ignore_index=3)
    errors = check_model_with_loss(net, loss, x, y)
    assert set(errors) == {"input"} | {n for n, _ in net.named_parameters()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-5, (seed, worst, errors[worst])


def _toy_segmentation(n=4, size=32, seed=0):
    """A disk (class 1) and a square (class 2) on background (class 0); the image shows them in
    channels 0 and 1 plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    masks = np.zeros((n, size, size), np.int64)
    images = np.zeros((n, 3, size, size), np.float32)
    for i in range(n):
        cy, cx, r = rng.integers(10, 22), rng.integers(10, 22), rng.integers(5, 9)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
        y0, x0 = rng.integers(0, size - 8, 2)
        square = (yy >= y0) & (yy < y0 + 8) & (xx >= x0) & (xx < x0 + 8) & ~disk
        masks[i][disk], masks[i][square] = 1, 2
        images[i, 0], images[i, 1], images[i, 2] = disk, square, 0.5
        images[i] += rng.normal(0, 0.1, (3, size, size)).astype(np.float32)
    return images, masks


def test_small_unet_overfits_a_few_images():
    images, masks = _toy_segmentation()
    assert set(np.unique(masks)) == {0, 1, 2}
    net = model(seed=0, in_channels=3, num_classes=3, base_channels=8, depth=2, batchnorm=True)
    loss, opt = CrossEntropyLoss(), Adam(net.parameters(), lr=1e-2)
    first = None
    for _ in range(100):
        opt.zero_grad()
        value = float(loss.forward(net.forward(images), masks))
        first = value if first is None else first
        net.backward(loss.backward())
        opt.step()
    assert first > 0.5  # it started from chance level (log 3 ~ 1.1) ...
    assert value < 0.05, value  # ... and learned the four images
    net.eval()
    pred = net.forward(images).argmax(axis=1)
    assert (pred == masks).mean() > 0.99
