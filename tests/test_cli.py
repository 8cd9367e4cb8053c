"""The `tinyunet` command line: version, gradcheck, run-folder safety, data errors, bad examples,
download against a loopback mirror, and the CuPy backend request on a machine without CuPy.

User errors must end with exit status 2 and ONE line on stderr (no traceback).
"""
from __future__ import annotations

import csv
import functools
import hashlib
import importlib.util
import io
import json
import shutil
import subprocess
import sys
import tarfile
import threading
import warnings
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tinyunet
from tinyunet.cli import main
from tinyunet.data import download

TINY_SHAPES = ["--dataset", "shapes", "--size", "32", "--num-shapes", "48", "--base-channels", "4", "--depth", "2",
               "--batch-size", "8", "--quiet"]
TINY_PETS = ["--dataset", "pets", "--size", "32", "--base-channels", "4", "--depth", "2", "--batch-size", "4",
             "--epochs", "1", "--quiet"]


def assert_one_line_error(err: str, *needles: str) -> None:
    assert "Traceback" not in err
    # progress bars (tqdm, on stderr) may come before the error; anything else may not
    lines = [line for line in err.strip().splitlines() if "%|" not in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("tinyunet ") and "error:" in lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- version and gradcheck -------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def gradcheck_child(tmp_path_factory):
    """The real `tinyunet gradcheck` (about 30 s) runs in a child process from the start of this module,
    alongside the other tests; test_gradcheck_real_run, the last test here, collects its output."""
    import os

    folder = tmp_path_factory.mktemp("gradcheck")
    env = {**os.environ, "TINYUNET_BACKEND": "numpy", "TINYUNET_CACHE": str(folder / "cache")}
    with open(folder / "out.txt", "w") as out, open(folder / "err.txt", "w") as err:
        child = subprocess.Popen([sys.executable, "-m", "tinyunet.cli", "gradcheck"], env=env, stdout=out,
                                 stderr=err)
    yield child, folder
    if child.poll() is None:
        child.kill()
    child.wait()


def test_version_console_script(cli_env):
    script = Path(sys.executable).with_name("tinyunet")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "tinyunet.cli"]
    result = subprocess.run([*command, "--version"], env=cli_env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.strip() == f"tinyunet {tinyunet.__version__}"


def test_gradcheck_failure_exits_non_zero(run_cli, monkeypatch):
    import tinyunet.gradcheck

    monkeypatch.setattr(tinyunet.gradcheck, "run_all", lambda seed=0, full=False: [
        ("Conv2d(3,4)", "weight", 3.2e-1, False), ("ReLU", "input0", 1e-11, True)])
    status, out, _ = run_cli("gradcheck")
    assert status != 0
    assert "FAIL" in out and "3.20e-01" in out
    assert out.strip().splitlines()[-1] == "1 passed, 1 failed"


# --- the run folder --------------------------------------------------------------------------------


def test_existing_run_folder_needs_resume_or_force(run_cli, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("my notes")
    (run / "sub").mkdir()
    (run / "sub" / "x.bin").write_bytes(b"\x00\x01")
    before = snapshot(run)

    status, out, err = run_cli("train", *TINY_SHAPES, "--epochs", "1", "--out", run)
    assert status == 2 and out == ""
    assert_one_line_error(err, str(run), "--resume", "--force")
    assert snapshot(run) == before

    # --force with data that fails to load must not have deleted the old run either
    status, _, err = run_cli("train", *TINY_PETS, "--data", tmp_path / "nope", "--out", run, "--force")
    assert status == 2
    assert snapshot(run) == before

    status, _, err = run_cli("train", *TINY_SHAPES, "--epochs", "1", "--out", run, "--force")
    assert status == 0, err
    assert not (run / "notes.txt").exists() and not (run / "sub").exists()
    assert (run / "last.npz").is_file()


def test_errors_print_one_line_in_a_real_process(run_cli_subprocess, tmp_path):
    result = run_cli_subprocess("train", *TINY_PETS, "--data", tmp_path / "nonexistent", "--out", tmp_path / "run")
    assert result.returncode == 2
    assert_one_line_error(result.stderr, str(tmp_path / "nonexistent"), "does not exist", "tinyunet download")
    assert not (tmp_path / "run").exists()  # a failed start leaves no half-made run folder behind


def test_unwritable_out_is_a_one_line_error(run_cli, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    status, _, err = run_cli("train", *TINY_SHAPES, "--epochs", "1", "--out", blocker / "run")
    assert status == 2
    assert_one_line_error(err, str(blocker / "run"))


def test_warning_format_is_restored_after_main(run_cli, monkeypatch):
    """main() shortens warnings to one line for the user, but must not leave that change behind."""
    import warnings

    import tinyunet.gradcheck

    monkeypatch.setattr(tinyunet.gradcheck, "run_all", lambda seed=0, full=False: [("ReLU", "input0", 0.0, True)])
    before = warnings.formatwarning
    assert run_cli("gradcheck")[0] == 0
    assert warnings.formatwarning is before


def test_evaluate_json_is_strict_json_when_a_class_is_absent(run_cli, monkeypatch):
    import json

    import tinyunet.evaluate

    nan = float("nan")
    fake = {"pixel_accuracy": 1.0, "miou": 1.0, "mdice": 1.0, "iou": {"pet": 1.0, "background": 1.0, "outline": nan},
            "dice": {"pet": 1.0, "background": 1.0, "outline": nan}, "confusion": [[5, 0, 0], [0, 7, 0], [0, 0, 0]],
            "loss": 0.1, "num_images": 2, "checkpoint": "x.npz", "data": "held-out synthetic shapes", "split": None}
    monkeypatch.setattr(tinyunet.evaluate, "evaluate_checkpoint", lambda *args, **kwargs: fake)
    status, out, _ = run_cli("evaluate", "--checkpoint", "x.npz", "--json")
    assert status == 0

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    result = json.loads(out, parse_constant=refuse)
    assert result["iou"]["outline"] is None and result["dice"]["outline"] is None
    assert result["iou"]["pet"] == 1.0 and result["num_images"] == 2


# --- data folder errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("damage, missing", [
    ("nonexistent", "does not exist"),
    ("no trimaps", "annotations/trimaps/"),
    ("no annotations", "annotations/trimaps/, annotations/trainval.txt"),
    ("no split file", "annotations/trainval.txt"),
    ("no images", "images/"),
])
def test_missing_or_incomplete_data_folder(run_cli, make_pets_root, tmp_path, damage, missing):
    root = tmp_path / "pets"
    if damage != "nonexistent":
        make_pets_root(root=root)
        target = {"no trimaps": root / "annotations" / "trimaps", "no annotations": root / "annotations",
                  "no split file": root / "annotations" / "trainval.txt", "no images": root / "images"}[damage]
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    status, out, err = run_cli("train", *TINY_PETS, "--data", root, "--out", tmp_path / "run")
    assert status == 2
    assert_one_line_error(err, str(root), missing, "tinyunet download")
    assert not (tmp_path / "run").exists()


def test_data_defaults_to_env_variable(run_cli, make_pets_root, tmp_path, monkeypatch):
    root = make_pets_root(n_trainval=10, n_test=2)
    monkeypatch.setenv("TINYUNET_DATA", str(root))
    status, out, err = run_cli("train", *TINY_PETS, "--out", tmp_path / "run")
    assert status == 0, err
    assert "data: 9 training and 1 validation images at 32x32" in out

    elsewhere = tmp_path / "moved-away"
    monkeypatch.setenv("TINYUNET_DATA", str(elsewhere))
    status, _, err = run_cli("train", *TINY_PETS, "--out", tmp_path / "run2")
    assert status == 2
    assert_one_line_error(err, str(elsewhere), "tinyunet download")


# --- bad examples ----------------------------------------------------------------------------------


@pytest.fixture
def pets_with_bad_examples(make_pets_root, write_example, write_split_file, tmp_path):
    """8 good examples, 4 odd-but-valid image modes and 4 bad examples, all listed in trainval."""
    root = make_pets_root(n_trainval=8, n_test=2)
    good = [f"Cat_{i}" for i in range(8)]
    odd = {"gray_0": "L", "rgba_0": "RGBA", "palette_0": "P", "cmyk_0": "CMYK"}
    for i, (name, mode) in enumerate(odd.items()):
        write_example(root, name, seed=100 + i)
        path = root / "images" / f"{name}.jpg"
        with Image.open(path) as im:
            converted = im.convert(mode)
        # RGBA and palette can't be JPEG: the official set has such PNG files named .jpg, so do the same
        converted.save(path, format="JPEG" if mode in ("L", "CMYK") else "PNG")
        with Image.open(path) as im:
            assert im.mode == mode
    bad = ["truncated_0", "notrimap_0", "mismatch_0", "value7_0"]
    for i, name in enumerate(bad):
        write_example(root, name, seed=200 + i)
    jpg = root / "images" / "truncated_0.jpg"
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])
    (root / "annotations" / "trimaps" / "notrimap_0.png").unlink()
    Image.fromarray(np.full((20, 20), 2, np.uint8)).save(root / "annotations" / "trimaps" / "mismatch_0.png")
    trimap_path = root / "annotations" / "trimaps" / "value7_0.png"
    trimap = np.array(Image.open(trimap_path))
    trimap[3, 4] = 7
    Image.fromarray(trimap).save(trimap_path)
    write_split_file(root, "trainval", good + list(odd) + bad)
    return root, list(odd), bad


def test_bad_examples_are_skipped_with_a_warning(run_cli_subprocess, pets_with_bad_examples, tmp_path):
    root, odd, bad = pets_with_bad_examples
    result = run_cli_subprocess("train", *TINY_PETS, "--data", root, "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1, result.stderr
    assert "skipped 4 of 16" in warning[0]
    for name in bad:
        assert name in warning[0]
    for name in odd:  # grayscale, RGBA, palette and CMYK photos are used, not skipped
        assert name not in warning[0]
    for reason in ("unreadable image", "trimap missing", "differs from image size", "[7]"):
        assert reason in warning[0]
    assert "data: 11 training and 1 validation images" in result.stdout


@pytest.mark.filterwarnings("ignore:skipped 4 of 16")
@pytest.mark.parametrize("cached", [False, True])
def test_strict_makes_bad_examples_an_error(run_cli, pets_with_bad_examples, tmp_path, cached):
    root, _, bad = pets_with_bad_examples
    if cached:  # a cache built without --strict holds the skips: --strict must still refuse
        status, _, err = run_cli("train", *TINY_PETS, "--data", root, "--out", tmp_path / "lenient")
        assert status == 0, err
    status, _, err = run_cli("train", *TINY_PETS, "--data", root, "--out", tmp_path / "run", "--strict")
    assert status == 2
    assert_one_line_error(err, "bad example", str(root))
    assert any(name in err for name in bad)


# --- download --------------------------------------------------------------------------------------


@pytest.fixture
def mirror(make_pets_root, tmp_path):
    """A loopback HTTP server with images.tar.gz / annotations.tar.gz of a tiny pets folder.

    Yields (base URL, files table with the archives' md5).
    """
    src = make_pets_root(root=tmp_path / "src", n_trainval=10, n_test=2)
    served = tmp_path / "served"
    served.mkdir()
    files = []
    for top in ("images", "annotations"):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            tar.add(src / top, arcname=top)
        (served / f"{top}.tar.gz").write_bytes(buf.getvalue())
        files.append((f"{top}.tar.gz", hashlib.md5(buf.getvalue()).hexdigest()))

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", tuple(files)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_download_then_train(run_cli, mirror, tmp_path, monkeypatch):
    url, files = mirror
    monkeypatch.setattr(download, "OFFICIAL_FILES", files)
    root = tmp_path / "data"
    status, out, err = run_cli("download", "--root", root, "--mirror", url)
    assert status == 0, err
    assert f"ready in {root}" in out
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["annotations", "images"]
    status, out, err = run_cli("train", *TINY_PETS, "--data", root, "--out", tmp_path / "run")
    assert status == 0, err
    assert "data: 9 training and 1 validation images" in out


def test_download_md5_mismatch(run_cli, mirror, tmp_path):
    url, _ = mirror  # the real table's md5s cannot match the tiny archives
    root = tmp_path / "data"
    status, _, err = run_cli("download", "--root", root, "--mirror", url)
    assert status == 2
    assert_one_line_error(err, "md5", download.OFFICIAL_FILES[0][1])
    assert not (root / "images").exists()


def test_download_unreachable_mirror(run_cli, tmp_path):
    status, _, err = run_cli("download", "--root", tmp_path / "data", "--mirror", "http://127.0.0.1:9")
    assert status == 2
    assert_one_line_error(err, "download of http://127.0.0.1:9/images.tar.gz failed")


# --- backend ---------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
@pytest.mark.parametrize("command", [["train", *TINY_SHAPES, "--epochs", "1", "--out", "RUN"], ["gradcheck"]])
def test_backend_cupy_without_cupy(run_cli, tmp_path, command):
    command = [str(tmp_path / "run") if a == "RUN" else a for a in command]
    status, out, err = run_cli(*command, "--backend", "cupy")
    assert status == 2
    assert_one_line_error(err, "CuPy does not import", "--backend numpy")
    assert not (tmp_path / "run").exists()
    from tinyunet import backend

    assert backend.name() == "numpy"


# --- last: the real gradcheck, started in the background by gradcheck_child -----------------------


def test_gradcheck_real_run(gradcheck_child):
    """The real suite: every layer, the loss and a small U-Net pass; a table with a result column."""
    child, folder = gradcheck_child
    assert child.wait(timeout=300) == 0, (folder / "err.txt").read_text()
    out = (folder / "out.txt").read_text()
    lines = out.strip().splitlines()
    header = lines[0].lower()
    assert all(word in header for word in ("module", "tensor", "error", "result"))
    rows = lines[1:-1]
    assert len(rows) > 20
    assert all(row.split()[-1] == "pass" for row in rows)
    for name in ("Conv2d", "MaxPool2d", "ConvTranspose2d", "BatchNorm2d", "ReLU", "CrossEntropyLoss", "UNet"):
        assert any(row.startswith(name) for row in rows), name
    assert lines[-1] == f"{len(rows)} passed, 0 failed"


def test_relative_data_path_is_stored_absolute(run_cli, make_pets_root, tmp_path, monkeypatch):
    """A run trained with a relative --data must still find its data from another directory: resume
    and evaluate read the path back from config.json."""
    root = make_pets_root(n_trainval=10, n_test=2)
    monkeypatch.chdir(root.parent)
    out = tmp_path / "runs" / "rel"
    code, _, err = run_cli("train", "--data", root.name, "--out", str(out), *TINY_PETS)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["data"] == str(root.resolve())
    monkeypatch.chdir(tmp_path)                      # elsewhere: the relative name no longer resolves
    code, out_text, err = run_cli("evaluate", "--checkpoint", str(out / "best.npz"), "--split", "test", "--json")
    assert code == 0, err
    assert json.loads(out_text)["num_images"] == 2


@pytest.mark.parametrize("args, needle", [
    (["summary", "--size", "50"], "not divisible by 2**depth = 16"),
    (["summary", "--depth", "0"], "--depth must be at least 1"),
    (["summary", "--size", "0"], "--size must be at least 1"),
    (["evaluate", "--checkpoint", "missing.npz", "--limit", "0"], "--limit must be at least 1"),
    (["evaluate", "--checkpoint", "missing.npz", "--limit", "-3"], "--limit must be at least 1"),
])
def test_bad_summary_and_evaluate_values_are_one_line_errors(run_cli, args, needle):
    code, _, err = run_cli(*args)
    assert code == 2
    assert_one_line_error(err, needle)


def test_resume_says_what_it_resumes(run_cli, tmp_path):
    """--resume on a folder without a checkpoint (a typo in --out, or killed before epoch 1 ended)
    says that it starts a new run; on a real run, that the run's saved configuration is used."""
    out = tmp_path / "runs" / "typo"
    code, text, err = run_cli("train", *TINY_SHAPES, "--epochs", "1", "--out", str(out), "--resume")
    assert code == 0, err
    assert f"nothing to resume in {out}" in text
    with pytest.warns(UserWarning, match="ignored: lr 5.0"):
        code, text, err = run_cli("train", *TINY_SHAPES, "--epochs", "2", "--out", str(out), "--resume", "--lr", "5")
    assert code == 0, err
    assert "after epoch 1 with its saved configuration" in text


def test_resume_warns_about_the_options_it_ignores(run_cli, tmp_path):
    """A resumed run keeps its saved configuration: options given with --resume that differ from it
    are named in one warning; options not given, or given with the saved value, are not."""
    out = tmp_path / "run"
    assert run_cli("train", *TINY_SHAPES, "--epochs", "2", "--out", str(out))[0] == 0
    with pytest.warns(UserWarning) as record:  # in-process, pytest catches what the CLI prints as "warning: ..."
        code, text, err = run_cli("train", "--out", str(out), "--resume", "--lr", "5", "--no-batchnorm",
                                  "--size", "32", "--epochs", "1")
    assert code == 0, err
    assert len(record) == 1, [str(w.message) for w in record]
    message = str(record[0].message)
    for needle in ("lr 5.0 (the run's: 0.001)", "batchnorm False (the run's: True)", "epochs 1 (the run's: 2)"):
        assert needle in message
    assert "size" not in message  # given, but equal to the saved value
    assert json.loads((out / "config.json").read_text())["lr"] == 0.001
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing given: nothing to warn about
        code, text, err = run_cli("train", "--out", str(out), "--resume")
    assert code == 0, err


def test_resume_with_more_epochs_says_where_the_cosine_schedule_continues(run_cli, tmp_path):
    """A finished cosine run has decayed its learning rate to 0; extending it from 2 to 4 epochs
    continues at lr * (1 + cos(pi * 2/4)) / 2 = lr / 2, and the log says so."""
    out = tmp_path / "run"
    assert run_cli("train", *TINY_SHAPES, "--epochs", "2", "--lr", "0.01", "--out", str(out))[0] == 0
    code, text, err = run_cli("train", "--out", str(out), "--resume", "--epochs", "4")
    assert code == 0, err
    assert "from 2 to 4 epochs" in text and "continues at 0.005 (it was 0 after epoch 2)" in text
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    # the learning rate after each epoch, to 6 significant digits: 0.01 * (1 + cos(pi * e/4)) / 2 from epoch 3
    assert [r["lr"] for r in rows] == ["0.005", "0.0", "0.00146447", "0.0"]


def test_resume_reads_moved_data_from_the_new_data_folder(run_cli, make_pets_root, tmp_path):
    """--data is the one setting besides --epochs that --resume takes: the data folder may move."""
    root = make_pets_root(n_trainval=10, n_test=2)
    out = tmp_path / "run"
    assert run_cli("train", "--data", str(root), "--out", str(out), *TINY_PETS)[0] == 0
    moved = root.rename(tmp_path / "moved")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code, text, err = run_cli("train", "--data", str(moved), "--out", str(out), "--resume", "--epochs", "2")
    assert code == 0, err
    assert f"reading the data from {moved}" in text
    assert json.loads((out / "config.json").read_text())["data"] == str(moved)


def test_train_help_names_every_default(run_cli, capsys):
    """Every train option that takes a value says its default in --help."""
    from tinyunet.cli import _parser

    train = _parser()._subparsers._group_actions[0].choices["train"]
    for action in train._actions:
        if action.option_strings and action.nargs is None and action.dest not in ("out", "help"):
            assert "default" in (action.help or ""), action.option_strings


# --- output for people and for logs (issue 24, item 6) ---------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a pseudo-terminal (pty) stands for the terminal")
def test_progress_bars_only_on_a_terminal(cli_env, tmp_path):
    """Into a log file (stderr not a terminal) `train` writes no progress bars, only its lines; on a
    terminal the bars are there; --quiet turns them off there too."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    args = [sys.executable, "-m", "tinyunet.cli", "train", *TINY_SHAPES[:-1], "--epochs", "1"]
    cli_env = {**cli_env, "TINYUNET_KERNELS": "numpy"}  # no compiling of Numba's kernels in each child
    with open(tmp_path / "log.txt", "w") as log:
        result = subprocess.run([*args, "--out", str(tmp_path / "logged")], env=cli_env, stdout=log, stderr=log,
                                timeout=120)
    assert result.returncode == 0
    text = (tmp_path / "log.txt").read_text()
    assert "epoch 1/1: train loss" in text and "done: best validation mIoU" in text
    assert "\r" not in text and "%|" not in text and "it/s" not in text

    def on_a_terminal(*extra):
        leader, follower = pty.openpty()
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns wide
        child = subprocess.Popen([*args, *extra], env=cli_env, stdout=subprocess.DEVNULL, stderr=follower)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed with the child
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(leader)
        assert child.wait(timeout=120) == 0
        return b"".join(chunks).decode(errors="replace")

    bars = on_a_terminal("--out", str(tmp_path / "terminal"))
    assert "epoch 1/1:" in bars and "%|" in bars
    assert "%|" not in on_a_terminal("--out", str(tmp_path / "quiet"), "--quiet")


def test_evaluate_and_predict_take_quiet(run_cli, tmp_path, make_pets_root):
    root = make_pets_root(n_trainval=6, n_test=2)
    assert run_cli("train", *TINY_PETS, "--data", root, "--out", tmp_path / "run")[0] == 0
    status, out, err = run_cli("evaluate", "--checkpoint", tmp_path / "run", "--quiet")
    assert status == 0 and "pixel accuracy" in out and err == ""
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(photo)
    status, out, err = run_cli("predict", "--checkpoint", tmp_path / "run", photo, "--out", tmp_path / "o", "--quiet")
    assert status == 0 and err == ""


def test_evaluate_report_names_checkpoint_data_and_split(run_cli, tmp_path, make_pets_root):
    root = make_pets_root(n_trainval=6, n_test=2)
    run = tmp_path / "run"
    assert run_cli("train", *TINY_PETS, "--data", root, "--out", run)[0] == 0
    status, out, _ = run_cli("evaluate", "--checkpoint", run, "--split", "trainval")
    assert status == 0
    assert f"checkpoint: {run / 'best.npz'}" in out and f"data: {root}, split trainval" in out
    status, out, _ = run_cli("evaluate", "--checkpoint", run / "last.npz", "--json")
    result = json.loads(out)
    assert (result["checkpoint"], result["data"], result["split"]) == (str(run / "last.npz"), str(root), "test")
    assert run_cli("train", *TINY_SHAPES, "--epochs", "1", "--out", tmp_path / "shapes")[0] == 0
    status, out, _ = run_cli("evaluate", "--checkpoint", tmp_path / "shapes")
    assert status == 0 and "data: held-out synthetic shapes\n" in out


def test_resume_log_and_metrics_agree_on_the_learning_rate(run_cli, tmp_path):
    """A 1-epoch cosine run ends at learning rate 0 (metrics.csv says so); extended to 3 epochs, it
    continues at lr * (1 + cos(pi / 3)) / 2, and the log says both, as metrics.csv does."""
    out = tmp_path / "run"
    assert run_cli("train", *TINY_SHAPES, "--epochs", "1", "--lr", "0.01", "--out", str(out))[0] == 0
    code, text, err = run_cli("train", "--out", str(out), "--resume", "--epochs", "3")
    assert code == 0, err
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert float(rows[0]["lr"]) == 0.0
    continues = 0.5 * 0.01 * (1 + np.cos(np.pi / 3))
    assert f"continues at {continues:.6g} (it was {float(rows[0]['lr']):.6g} after epoch 1)" in text
