"""Checkpoints: exact round trip, atomic replace, and refusal of anything that is not ours."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import tinyunet.checkpoint as checkpoint
from tinyunet.checkpoint import load_checkpoint, restore, save_checkpoint
from tinyunet.errors import CheckpointError


class FakeModel:
    """Just the state-dict API of a Module, with the same ValueError contract."""

    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return {k: v.copy() for k, v in self.state.items()}

    def load_state_dict(self, d):
        if set(d) != set(self.state) or any(d[k].shape != v.shape for k, v in self.state.items()):
            raise ValueError("parameter names or shapes differ")
        self.state = {k: np.array(v) for k, v in d.items()}


class FakeOptimizer(FakeModel):
    pass


def make_states(seed=0):
    rng = np.random.default_rng(seed)
    model = {
        "enc1.0.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        "enc1.0.bias": rng.normal(size=(4,)).astype(np.float32),
        "bn.running_mean": rng.normal(size=(4,)),  # float64 must stay float64
    }
    optim = {"step": np.array(7, dtype=np.int64), "m.0": rng.normal(size=(4, 3, 3, 3)).astype(np.float32)}
    return model, optim


def test_round_trip_is_exact(tmp_path):
    model, optim = make_states()
    meta = {"epoch": 3, "arch": "unet", "config": {"lr": 1e-3}, "metrics": {"miou": np.float32(0.5)}}
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, model, optim, meta)

    model2, optim2, meta2 = load_checkpoint(path)
    assert model2.keys() == model.keys() and optim2.keys() == optim.keys()
    for got, want in [(model2[k], model[k]) for k in model] + [(optim2[k], optim[k]) for k in optim]:
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    assert meta2["format"] == "tinyunet-checkpoint" and meta2["version"] == 1
    assert meta2["epoch"] == 3 and meta2["config"] == {"lr": 1e-3} and meta2["metrics"]["miou"] == 0.5
    assert os.listdir(tmp_path) == ["ckpt.npz"]  # exactly the name asked for, no temp file left


def test_file_is_plain_npz_loadable_without_pickle(tmp_path):
    model, optim = make_states()
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, model, None, {"epoch": 1})
    with np.load(path, allow_pickle=False) as z:
        assert set(z.files) == {"meta"} | {f"model/{k}" for k in model}
        meta = json.loads(str(z["meta"][()]))
    assert meta["has_optimizer"] is False
    _, optim_state, _ = load_checkpoint(path)
    assert optim_state is None


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    model, optim = make_states(0)
    save_checkpoint(path, model, optim, {"epoch": 1})
    before = path.read_bytes()

    def savez_dies_midway(file, **arrays):
        file.write(b"PK\x03\x04 half an archive")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.np, "savez", savez_dies_midway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, *make_states(1), {"epoch": 2})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.npz"]
    monkeypatch.undo()
    assert load_checkpoint(path)[2]["epoch"] == 1


def test_object_arrays_are_refused_on_save(tmp_path):
    with pytest.raises(CheckpointError, match="object"):
        save_checkpoint(tmp_path / "c.npz", {"w": np.array([{"a": 1}], dtype=object)}, None, {})
    assert not os.listdir(tmp_path)


def test_pickled_object_array_is_refused_on_load(tmp_path):
    path = tmp_path / "evil.npz"
    meta = np.array(json.dumps({"format": "tinyunet-checkpoint", "version": 1}))
    np.savez(path, meta=meta, **{"model/w": np.array([print], dtype=object)})  # savez pickles objects
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(path)


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(CheckpointError, match="not a tinyunet checkpoint"):
        load_checkpoint(path)


def test_npz_without_meta_or_with_wrong_tag(tmp_path):
    plain = tmp_path / "plain.npz"
    np.savez(plain, weights=np.ones(3))
    with pytest.raises(CheckpointError, match="no 'meta'"):
        load_checkpoint(plain)
    other = tmp_path / "other.npz"
    np.savez(other, meta=np.array(json.dumps({"format": "something-else", "version": 1})))
    with pytest.raises(CheckpointError, match="format tag"):
        load_checkpoint(other)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.npz")


def test_restore_loads_model_and_optimizer(tmp_path):
    model_state, optim_state = make_states(0)
    path = tmp_path / "c.npz"
    save_checkpoint(path, model_state, optim_state, {"epoch": 5})
    model, opt = FakeModel(make_states(1)[0]), FakeOptimizer(make_states(1)[1])
    meta = restore(model, opt, path)
    assert meta["epoch"] == 5
    np.testing.assert_array_equal(model.state["enc1.0.weight"], model_state["enc1.0.weight"])
    np.testing.assert_array_equal(opt.state["m.0"], optim_state["m.0"])


def test_restore_wraps_mismatch_with_file_name(tmp_path):
    path = tmp_path / "c.npz"
    save_checkpoint(path, *make_states(), {"arch": "unet"})
    wrong = FakeModel({"other.weight": np.zeros(2)})
    with pytest.raises(CheckpointError, match=r"c\.npz does not match this model.*unet"):
        restore(wrong, None, path)


def test_restore_without_saved_optimizer_state(tmp_path):
    path = tmp_path / "c.npz"
    model_state, optim_state = make_states()
    save_checkpoint(path, model_state, None, {})
    restore(FakeModel(model_state), None, path)  # weights only: fine
    with pytest.raises(CheckpointError, match="no optimizer state"):
        restore(FakeModel(model_state), FakeOptimizer(optim_state), path)
