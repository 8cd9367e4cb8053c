"""download_pets against a loopback HTTP server serving tiny archives in the official layout."""
import hashlib
import io
import re
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tinyunet.data import download
from tinyunet.data.download import download_pets, is_complete
from tinyunet.data.pets import load_pets
from tinyunet.errors import DataError


class Server:
    """Serves ``files`` (name -> bytes); honours ``Range: bytes=N-`` unless ``ignore_range``."""

    def __init__(self, files):
        self.files = files
        self.ignore_range = False
        self.requests = []  # (path, Range header or None)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                server.requests.append((name, rng))
                if name not in server.files:
                    self.send_error(404)
                    return
                body = server.files[name]
                match = re.fullmatch(r"bytes=(\d+)-", rng or "")
                if match and not server.ignore_range:
                    start = int(match.group(1))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                    body = body[start:]
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # keep pytest output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/pets"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def tar_gz(src: Path, top: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / top, arcname=top)
    return buf.getvalue()


@pytest.fixture
def archives(make_pets_root, tmp_path):
    """(bytes per archive name, files table with their md5) built from a tiny official-layout folder."""
    src = make_pets_root(root=tmp_path / "src")
    blobs = {"images.tar.gz": tar_gz(src, "images"), "annotations.tar.gz": tar_gz(src, "annotations")}
    files = tuple((name, hashlib.md5(blob).hexdigest()) for name, blob in blobs.items())
    return blobs, files


@pytest.fixture
def server(archives):
    s = Server(archives[0])
    yield s
    s.close()


def assert_clean(root: Path):
    names = [p.name for p in root.iterdir() if not p.name.startswith(".complete-")]
    leftovers = [n for n in names if n.endswith((".part", ".tar.gz")) or n.startswith(".extract-")]
    assert leftovers == []


def test_full_download_gives_loadable_folder(server, archives, tmp_path):
    root = tmp_path / "data"
    assert download_pets(root, mirror=server.url, progress=False, files=archives[1]) == root
    assert is_complete(root, archives[1])
    assert_clean(root)
    data = load_pets(root, "trainval", 16, cache_dir=tmp_path / "cache", progress=False)
    assert len(data) == 6
    assert [r for _, r in server.requests] == [None, None]
    # a rerun finds everything complete and asks the server nothing
    download_pets(root, mirror=server.url, progress=False, files=archives[1])
    assert len(server.requests) == 2


@pytest.mark.parametrize("ignore_range", [False, True])
def test_resume_from_part_file(server, archives, tmp_path, ignore_range):
    server.ignore_range = ignore_range
    root = tmp_path / "data"
    root.mkdir()
    blob = archives[0]["images.tar.gz"]
    (root / "images.tar.gz.part").write_bytes(blob[:100])
    download_pets(root, mirror=server.url, progress=False, files=archives[1])
    assert ("images.tar.gz", "bytes=100-") in server.requests
    assert is_complete(root, archives[1])
    assert_clean(root)
    assert len(load_pets(root, "test", 16, cache_dir=tmp_path / "cache", progress=False)) == 3


def test_part_file_already_whole(server, archives, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    blob = archives[0]["images.tar.gz"]
    (root / "images.tar.gz.part").write_bytes(blob)  # the server answers 416: nothing left to send
    download_pets(root, mirror=server.url, progress=False, files=archives[1])
    assert ("images.tar.gz", f"bytes={len(blob)}-") in server.requests
    assert is_complete(root, archives[1])


def test_md5_mismatch_raises_and_leaves_nothing_complete(server, archives, tmp_path):
    root = tmp_path / "data"
    files = (("images.tar.gz", "0" * 32),) + archives[1][1:]
    with pytest.raises(DataError, match=r"images.tar.gz.*md5 [0-9a-f]{32}, expected 0{32}"):
        download_pets(root, mirror=server.url, progress=False, files=files)
    assert not is_complete(root, files)
    assert sorted(p.name for p in root.iterdir()) == []


@pytest.mark.parametrize("step", ["_extract", "_move_into_place"])
def test_interrupted_extraction_then_rerun(server, archives, tmp_path, monkeypatch, step):
    root = tmp_path / "data"
    real = getattr(download, step)

    def interrupted(*args):
        real(*args)  # do the work (files written), then die before the marker
        raise KeyboardInterrupt

    monkeypatch.setattr(download, step, interrupted)
    with pytest.raises(KeyboardInterrupt):
        download_pets(root, mirror=server.url, progress=False, files=archives[1])
    assert not any(p.name.startswith(".complete-") for p in root.iterdir())
    assert not any(p.name.startswith(".extract-") for p in root.iterdir())  # temp folder cleaned
    assert (root / "images.tar.gz").is_file()  # verified archive kept: no second download

    monkeypatch.setattr(download, step, real)
    download_pets(root, mirror=server.url, progress=False, files=archives[1])
    assert is_complete(root, archives[1])
    assert_clean(root)
    assert [name for name, _ in server.requests].count("images.tar.gz") == 1
    assert len(load_pets(root, "trainval", 16, cache_dir=tmp_path / "cache", progress=False)) == 6


@pytest.mark.parametrize("stdlib_filter", [True, False])
def test_path_traversal_is_refused(tmp_path, monkeypatch, stdlib_filter):
    if not stdlib_filter:  # exercise our own member check, used on Pythons without tarfile.data_filter
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    blob = buf.getvalue()
    s = Server({"evil.tar.gz": blob})
    try:
        root = tmp_path / "data"
        with pytest.raises(DataError, match="unsafe"):
            download_pets(root, mirror=s.url, progress=False, files=(("evil.tar.gz", hashlib.md5(blob).hexdigest()),))
    finally:
        s.close()
    assert not (tmp_path / "evil.txt").exists()
    assert not is_complete(root, (("evil.tar.gz", ""),))


def test_network_error_is_a_data_error(tmp_path):
    s = Server({})
    try:
        with pytest.raises(DataError, match="HTTP 404"):
            download_pets(tmp_path / "d", mirror=s.url, progress=False, files=(("nope.tar.gz", "0" * 32),))
    finally:
        s.close()
