"""ResUNet and Attention U-Net: blocks against loop references, shapes, parameter names, attention maps,
end-to-end gradients through the loss, a small overfitting run, the CuPy stand-in, and the workflows
(train --arch, evaluate, predict --attention, benchmarks/compare_variants.py)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tinyunet.nn import naive as ref
from tinyunet.nn import naive as ref_var
from test_unet import _smooth_instance, _toy_segmentation
from tinyunet import backend
from tinyunet.gradcheck import check_model_with_loss, check_module
from tinyunet.losses import CrossEntropyLoss
from tinyunet.models import ARCHITECTURES, AttentionUNet, ResUNet, UNet, create_model
from tinyunet.models.attention_unet import AttentionGate
from tinyunet.models.resunet import ResidualBlock
from tinyunet.optim import Adam

VARIANTS = [ResUNet, AttentionUNet]


def build(cls, seed=0, **kwargs):
    backend.seed(seed)
    return cls(**kwargs)


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def set_random_bn_affine(module, seed):
    """Non-trivial BN scale and shift (they start at 1 and 0), so a reference comparison tests them."""
    rng = np.random.default_rng(seed)
    for name, p in module.named_parameters():
        if p.data.ndim == 1:
            p.data = rng.uniform(0.5, 1.5, p.shape) if name.endswith("weight") else rng.standard_normal(p.shape)


# --- the blocks ------------------------------------------------------------------------------------


@pytest.mark.usefixtures("numpy_backend")
@pytest.mark.parametrize("cin,cout,batchnorm", [(2, 3, True), (3, 3, True), (2, 3, False), (3, 3, False)])
def test_residual_block_matches_reference(cin, cout, batchnorm):
    block = build(ResidualBlock, in_channels=cin, out_channels=cout, batchnorm=batchnorm).double()
    set_random_bn_affine(block, seed=1)
    assert (block.shortcut is None) == (cin == cout)  # identity exactly when the channels stay the same
    x = randn(2, cin, 5, 4)
    p = {name: v.data for name, v in block.named_parameters()}

    def conv_bn(z, conv, bn, padding):
        out = ref.conv2d(z, p[f"{conv}.weight"], p.get(f"{conv}.bias"), padding=padding)
        return ref.batchnorm2d_train(out, p[f"{bn}.weight"], p[f"{bn}.bias"])[0] if batchnorm else out

    bn1, conv2, bn2 = ("branch.1", "branch.3", "branch.4") if batchnorm else (None, "branch.2", None)
    branch = conv_bn(ref.relu(conv_bn(x, "branch.0", bn1, 1)), conv2, bn2, 1)
    shortcut = x if cin == cout else conv_bn(x, "shortcut.0", "shortcut.1", 0)
    np.testing.assert_allclose(block.forward(x), ref.relu(branch + shortcut), rtol=1e-10, atol=1e-12)


@pytest.mark.usefixtures("numpy_backend")
@pytest.mark.parametrize("cin,cout,batchnorm", [(2, 3, True), (3, 3, True), (2, 3, False), (3, 3, False)])
def test_residual_block_gradients_match_finite_differences(cin, cout, batchnorm):
    block = build(ResidualBlock, seed=2, in_channels=cin, out_channels=cout, batchnorm=batchnorm).double()
    set_random_bn_affine(block, seed=3)
    errors = check_module(block, randn(2, cin, 4, 4, seed=4))
    assert set(errors) == {"input0"} | {n for n, _ in block.named_parameters()}
    assert max(errors.values()) <= 1e-6, errors


def gate_reference(gate, x, g):
    """The attention gate's formula with the loop references."""
    w = {name: p.data for name, p in gate.named_parameters()}
    theta = ref.conv2d(x, w["W_x.weight"], None, stride=2)
    phi = ref.conv2d(g, w["W_g.weight"], w["W_g.bias"])
    coarse = ref_var.sigmoid(ref.conv2d(ref.relu(theta + phi), w["psi.weight"], w["psi.bias"]))
    alpha = ref_var.upsample(coarse, 2, "bilinear")
    return ref_var.multiply(x, alpha), alpha


@pytest.mark.usefixtures("numpy_backend")
def test_attention_gate_matches_reference():
    gate = build(AttentionGate, skip_channels=3, gate_channels=4, inter_channels=2).double()
    x, g = randn(2, 3, 6, 8), randn(2, 4, 3, 4, seed=1)
    out = gate.forward(x, g)
    expected, alpha = gate_reference(gate, x, g)
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)
    assert gate.alpha.shape == (2, 1, 6, 8)
    np.testing.assert_allclose(gate.alpha, alpha, rtol=1e-10, atol=1e-12)
    assert 0 < gate.alpha.min() and gate.alpha.max() < 1


@pytest.mark.usefixtures("numpy_backend")
def test_attention_gate_gradients_match_finite_differences():
    gate = build(AttentionGate, seed=1, skip_channels=3, gate_channels=4, inter_channels=2).double()
    errors = check_module(gate, randn(2, 3, 6, 4, seed=2), randn(2, 4, 3, 2, seed=3))
    assert set(errors) == {"input0", "input1"} | {n for n, _ in gate.named_parameters()}
    assert max(errors.values()) <= 1e-6, errors


# --- the models ------------------------------------------------------------------------------------


@pytest.mark.usefixtures("numpy_backend")
@pytest.mark.parametrize("cls", VARIANTS)
@pytest.mark.parametrize("depth,base,size,batchnorm", [(1, 4, (6, 10), True), (2, 4, (16, 16), True),
                                                       (3, 2, (8, 24), False)])
def test_output_shape(cls, depth, base, size, batchnorm):
    net = build(cls, in_channels=3, num_classes=5, base_channels=base, depth=depth, batchnorm=batchnorm)
    x = randn(2, 3, *size).astype(np.float32)
    out = net.forward(x)
    assert out.shape == (2, 5) + size and out.dtype == np.float32
    dx = net.backward(np.ones(out.shape, dtype=np.float32))
    assert dx.shape == x.shape and dx.dtype == np.float32


@pytest.mark.usefixtures("numpy_backend")
@pytest.mark.parametrize("cls", VARIANTS)
def test_input_size_rule_is_the_unets(cls):
    with pytest.raises(ValueError, match="divisible by 2\\*\\*2"):
        build(cls, base_channels=2, depth=2).forward(np.zeros((1, 3, 10, 8), np.float32))


def test_registry_and_factory():
    assert {"unet": UNet, "resunet": ResUNet, "attunet": AttentionUNet}.items() <= ARCHITECTURES.items()
    for arch, cls in [("resunet", ResUNet), ("attunet", AttentionUNet)]:
        net = create_model(arch, in_channels=3, num_classes=3, base_channels=2, depth=2, batchnorm=False)
        assert type(net) is cls and net.depth == 2


@pytest.mark.usefixtures("numpy_backend")
def test_parameter_names():
    res = {n: p.shape for n, p in build(ResUNet, base_channels=2, depth=1).named_parameters()}
    assert res["down.0.branch.0.weight"] == (2, 3, 3, 3) and res["down.0.shortcut.0.weight"] == (2, 3, 1, 1)
    assert res["up_conv.0.shortcut.1.bias"] == (2,) and res["head.weight"] == (3, 2, 1, 1)
    att = {n: p.shape for n, p in build(AttentionUNet, base_channels=2, depth=2).named_parameters()}
    unet = {n: p.shape for n, p in build(UNet, base_channels=2, depth=2).named_parameters()}
    assert unet.items() <= att.items()  # the U-Net's own names are unchanged: only the gates are new
    assert sorted(set(att) - set(unet)) == sorted(
        f"gates.{i}.{n}" for i in range(2) for n in ("W_x.weight", "W_g.weight", "W_g.bias", "psi.weight", "psi.bias"))
    # gate 0 is the deepest: skip of level 1 (4 channels) gated by the bottleneck (8 channels)
    assert att["gates.0.W_x.weight"] == (2, 4, 2, 2) and att["gates.0.W_g.weight"] == (2, 8, 1, 1)
    assert att["gates.1.W_x.weight"] == (1, 2, 2, 2) and att["gates.1.psi.weight"] == (1, 1, 1, 1)


@pytest.mark.usefixtures("numpy_backend")
def test_attention_maps():
    net = build(AttentionUNet, base_channels=2, depth=3)
    with pytest.raises(RuntimeError, match="forward"):
        net.attention_maps()
    net.forward(randn(2, 3, 32, 16).astype(np.float32))
    maps = net.attention_maps()
    assert [m.shape for m in maps] == [(2, 1, 8, 4), (2, 1, 16, 8), (2, 1, 32, 16)]  # deepest first
    assert all(m.dtype == np.float32 and 0 < m.min() and m.max() < 1 for m in maps)
    assert all(m is gate.alpha for m, gate in zip(maps, net.gates))


@pytest.mark.usefixtures("numpy_backend")
def test_open_gates_give_the_unet():
    # with psi = 0 and a large bias every coefficient is 1.0: the gates pass the skips unchanged and
    # the Attention U-Net with the U-Net's weights IS that U-Net, forward and backward
    unet = build(UNet, seed=3, base_channels=2, depth=2).double()
    att = build(AttentionUNet, seed=4, base_channels=2, depth=2).double()
    state = att.state_dict()
    state.update(unet.state_dict())
    att.load_state_dict(state)
    for gate in att.gates:
        gate.psi.weight.data[...] = 0.0
        gate.psi.bias.data[...] = 40.0  # sigmoid(40) rounds to 1.0 in float64
    x, y = randn(2, 3, 8, 8), np.random.default_rng(0).integers(0, 3, (2, 8, 8))
    results = []
    for net in (unet, att):
        loss = CrossEntropyLoss()
        net.zero_grad()
        logits = net.forward(x)
        loss.forward(logits, y)
        results.append((logits, net.backward(loss.backward()), dict(net.named_parameters())))
    (logits_u, dx_u, params_u), (logits_a, dx_a, params_a) = results
    assert all(np.all(m == 1.0) for m in att.attention_maps())
    np.testing.assert_allclose(logits_a, logits_u, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dx_a, dx_u, rtol=1e-10, atol=1e-14)
    for name, p in params_u.items():
        np.testing.assert_allclose(params_a[name].grad, p.grad, rtol=1e-10, atol=1e-14, err_msg=name)


@pytest.mark.usefixtures("numpy_backend")
@pytest.mark.parametrize("cls", VARIANTS)
def test_whole_model_gradients_with_batchnorm(cls):
    # depth 2, base 4, 16x16, batch 2, BN in train mode, float64, through CrossEntropyLoss; every
    # parameter and the input, at 30 random entries of each tensor (all entries of the smaller ones):
    # checking all ~9,000 entries takes ~35 s per model, and the blocks are checked whole above.
    # Inputs away from ReLU kinks and max-pool ties (see test_unet.py).
    seed, net, x = _smooth_instance(
        lambda s: build(cls, seed=s, in_channels=3, num_classes=3, base_channels=4, depth=2).double(),
        lambda s: randn(2, 3, 16, 16, seed=s))
    assert all(m.training for m in net.modules())
    y = np.random.default_rng(seed + 100).integers(0, 3, (2, 16, 16))
    errors = check_model_with_loss(net, CrossEntropyLoss(), x, y, max_entries=30, seed=seed)
    assert set(errors) == {"input"} | {n for n, _ in net.named_parameters()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-5, (seed, worst, errors[worst])


@pytest.mark.usefixtures("numpy_backend")
@pytest.mark.parametrize("cls", VARIANTS)
def test_small_model_overfits_a_few_images(cls):
    images, masks = _toy_segmentation()
    images, masks = images[:, :, ::2, ::2].copy(), masks[:, ::2, ::2].copy()  # 16x16 keeps the test short
    net = build(cls, seed=0, in_channels=3, num_classes=3, base_channels=8, depth=2, batchnorm=True)
    loss, opt = CrossEntropyLoss(), Adam(net.parameters(), lr=1e-2)
    values = []
    for _ in range(80):
        opt.zero_grad()
        values.append(float(loss.forward(net.forward(images), masks)))
        net.backward(loss.backward())
        opt.step()
    assert values[0] > 0.5 and values[-1] < 0.05, values[::10]
    net.eval()
    assert (net.forward(images).argmax(axis=1) == masks).mean() > 0.99


@pytest.mark.parametrize("cls", VARIANTS)
def test_models_run_on_the_cupy_stand_in(fake_cupy, cls):
    from tinyunet.backend import to_device

    net = build(cls, base_channels=2, depth=2)
    x = to_device(randn(2, 3, 8, 8).astype(np.float32))
    y = to_device(np.random.default_rng(0).integers(0, 3, (2, 8, 8)))
    loss = CrossEntropyLoss()
    fake_cupy.reset_counters()
    loss.forward(net.forward(x), y)
    dx = net.backward(loss.backward())
    assert fake_cupy.stats["transfers"] == 0, fake_cupy.transfer_log
    assert isinstance(dx, fake_cupy.ndarray)
    if cls is AttentionUNet:
        assert all(isinstance(m, fake_cupy.ndarray) for m in net.attention_maps())


# --- workflows: train --arch, evaluate, predict --attention, the comparison script -----------------

TINY = ["--dataset", "shapes", "--size", "32", "--num-shapes", "32", "--base-channels", "4", "--depth", "2",
        "--batch-size", "8", "--epochs", "1", "--quiet"]


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(path)
    return path


def test_train_evaluate_predict_attunet(run_cli, tmp_path, photo):
    status, out, _ = run_cli("train", "--arch", "attunet", "--out", tmp_path / "run", *TINY)
    assert status == 0 and "model attunet" in out
    status, out, _ = run_cli("evaluate", "--checkpoint", tmp_path / "run" / "best.npz", "--json")
    assert status == 0 and '"miou"' in out
    status, out, err = run_cli("predict", "--checkpoint", tmp_path / "run" / "best.npz", "--out", tmp_path / "pred",
                               "--attention", photo)
    assert status == 0, err
    assert "wrote 3 files" in out
    with Image.open(tmp_path / "pred" / "photo_mask.png") as mask:
        assert mask.size == (52, 40)
    with Image.open(tmp_path / "pred" / "photo_attention.png") as figure:
        assert figure.mode in ("RGB", "RGBA") and figure.size[0] > 3 * figure.size[1] // 2  # a row of panels


def test_resunet_checkpoint_rebuilds_its_arch(run_cli, tmp_path, photo):
    from tinyunet.train import load_model

    status, out, _ = run_cli("train", "--arch", "resunet", "--out", tmp_path / "run", *TINY)
    assert status == 0 and "model resunet" in out
    model, meta = load_model(tmp_path / "run" / "last.npz")
    assert type(model) is ResUNet and meta["config"]["arch"] == "resunet"
    # --attention on a model without gates: one clear line, exit 2, nothing written
    status, _, err = run_cli("predict", "--checkpoint", tmp_path / "run" / "last.npz", "--out", tmp_path / "pred",
                             "--attention", photo)
    assert status == 2 and "Traceback" not in err
    assert "attention gates" in err and "'resunet'" in err and "attunet" in err
    assert not (tmp_path / "pred").exists()


def test_unknown_arch_is_refused_by_the_parser(run_cli, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        run_cli("train", "--arch", "transunet", "--out", tmp_path / "run", *TINY)
    assert info.value.code == 2
    assert "resunet" in capsys.readouterr().err


def test_attention_figure(tmp_path):
    from tinyunet.viz import plot_attention

    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    maps = [np.random.default_rng(i).uniform(0, 1, (20, 30)) for i in range(3)]
    plot_attention(image, maps, tmp_path / "a.png", titles=["a", "b", "c"])
    with Image.open(tmp_path / "a.png") as img:
        assert img.size[0] > 3 * img.size[1]
    with pytest.raises(ValueError, match="size"):
        plot_attention(image, [np.zeros((10, 30))], tmp_path / "b.png")


def test_compare_variants_script(make_pets_root, cli_env, tmp_path, capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_variants.py"
    spec = importlib.util.spec_from_file_location("compare_variants", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    root = make_pets_root(n_trainval=8, n_test=3)
    status = script.main(["--data", str(root), "--size", "16", "--epochs", "1", "--batch-size", "4",
                          "--base-channels", "2", "--depth", "2", "--test-limit", "2", "--out", str(tmp_path / "cmp"),
                          "--quiet"])
    out = capsys.readouterr().out
    assert status == 0
    lines = out.strip().splitlines()
    assert lines[0].startswith("| arch | parameters | s/epoch | test mIoU | pixel accuracy | IoU pet")
    assert [line.split("|")[1].strip() for line in lines[2:5]] == ["unet", "resunet", "attunet"]
    assert "2 test images" in lines[-1]
    assert (tmp_path / "cmp" / "results.md").read_text() == out
    for arch in ("unet", "resunet", "attunet"):
        assert (tmp_path / "cmp" / arch / "best.npz").is_file()


@pytest.mark.parametrize("arch", ["unet", "resunet", "attunet"])
def test_backward_without_input_grad_gives_the_same_parameter_gradients(arch):
    """Training skips the image's gradient (UNet.backward(..., input_grad=False)): None comes back, and
    every parameter gradient is bit for bit what the full backward gives."""
    from tinyunet.models import create_model
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 16, 16))
    dout = rng.standard_normal((2, 3, 16, 16))
    grads = []
    for input_grad in (True, False):
        backend.seed(0)
        model = create_model(arch, in_channels=3, num_classes=3, base_channels=4, depth=2).double()
        model.forward(x)
        dx = model.backward(dout, input_grad=input_grad)
        assert (dx is None) == (not input_grad)
        grads.append({name: p.grad.copy() for name, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        np.testing.assert_array_equal(grads[0][name], grads[1][name], err_msg=name)
    assert all(layer.input_grad is False for layer in model.input_layers())
