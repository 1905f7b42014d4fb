"""Named weights: download from a local HTTP server, fingerprint check, conversion, cache,
lock, offline mode and one-line failures. Everything offline: the server runs on 127.0.0.1
in a thread and serves a synthetic SfSNet.caffemodel.h5 made by the Caffe fixture; the
mirror variable points the registry at it, the way a company mirror would."""
import ast
import dataclasses
import http.server
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import caffe_reference as cr
from sfs_fast import download, weights
from sfs_fast.cli import convert as convert_cli
from sfs_fast.cli import weights as weights_cli

FILE = "SfSNet.caffemodel.h5"
ROOT = Path(__file__).resolve().parents[1]


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the http.server API
        srv = self.server
        srv.requests.append(self.path)
        data = srv.files.get(self.path.rsplit("/", 1)[-1])
        if srv.mode == "404" or data is None:
            self.send_error(404)
            return
        if srv.mode == "stall":
            time.sleep(2.0)  # longer than the test's socket timeout
        if srv.mode == "slow":
            time.sleep(1.5)  # both processes of the lock test are in flight at once
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if srv.mode == "cut":  # half the promised bytes, then the socket closes
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def caffe_file(tmp_path_factory):
    layers = cr.deploy_layers()
    blobs = cr.random_blobs(layers, seed=5)
    return cr.write_caffe_h5(tmp_path_factory.mktemp("served") / FILE, blobs, layers)


@pytest.fixture
def server(caffe_file):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.requests, srv.mode = {FILE: caffe_file.read_bytes()}, [], "ok"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}/weights"
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch, server, caffe_file):
    """An empty cache, the mirror at the test server, and the registry's fingerprint set to
    the served file's blob id (the real entry keeps the official one)."""
    home = tmp_path / "home"
    monkeypatch.setenv(download.HOME_ENV, str(home))
    monkeypatch.setenv(download.MIRROR_ENV, server.base)
    monkeypatch.delenv(download.OFFLINE_ENV, raising=False)
    monkeypatch.setattr(download, "RETRY_PAUSE_S", 0.0)
    entry = dataclasses.replace(weights.REGISTRY["sfsnet"], blob_id=download.git_blob_id(caffe_file))
    monkeypatch.setitem(weights.REGISTRY, "sfsnet", entry)
    return home


def _cli(capsys, *argv):
    code = weights_cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(code, err):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sfs-weights: error:"), err
    return lines[0]


def _cache_files(home):
    """Everything in the weights folder (locks live elsewhere)."""
    folder = home / "weights"
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def test_official_entry_is_pinned():
    e = weights.REGISTRY["sfsnet"]
    assert e.blob_id == "5dea2585898c6d1a754da737c58b4a62d9efd101" and e.method == 0
    assert e.urls[0].startswith("https://github.com/senguptaumd/SfSNet/raw/158d18bc20c53faae607ce9b0874c673c5b6ac63/")
    assert "Mannix1994/SfSNet-Python/raw/c41115e3d9a562e68d64ec2f7e9b6dcdb3e556c7" in e.urls[1]
    assert "University of Maryland" in e.licence
    assert {"sfsnet", "demo-0", "demo-3"} <= set(weights.REGISTRY)


def test_download_convert_cache_hit_equals_sfs_convert(cache, server, caffe_file, tmp_path, capsys):
    assert weights.default_weights(0).name == "method0_demo.safetensors"  # not cached yet
    assert "sfs-weights download sfsnet" in weights.default_weights_note(0)
    code, out, err = _cli(capsys, "download", "sfsnet")
    assert code == 0, err
    cached = Path(out.strip())
    assert cached == weights.cache_path("sfsnet") and cached.is_file()
    assert "licence" in err and "University of Maryland" in err  # printed on first fetch
    assert server.requests == [f"/weights/{FILE}"]
    assert _cache_files(cache) == ["sfsnet.safetensors"]
    model = weights.load("sfsnet")  # cache hit: no second request
    assert len(server.requests) == 1
    assert model.weights_source["name"] == "sfsnet" and model.weights_source["demo"] is False
    meta = weights.read_metadata(cached)
    assert meta["source_blob_id"] == download.git_blob_id(caffe_file)
    assert meta["source_sha256"] == weights.file_sha256(caffe_file)
    assert "University of Maryland" in meta["licence"] and meta["source_format"] == "caffe-h5"
    # Same model as sfs-convert of the same file.
    assert convert_cli.main([str(caffe_file), "-o", str(tmp_path / "c.safetensors")]) == 0
    converted = weights.load(tmp_path / "c.safetensors")
    a, b = model.state_dict(), converted.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        oa, ob = model(x), converted(x)
    assert all(torch.equal(oa[k], ob[k]) for k in oa)
    # Cached official weights are method 0's default now, with no demo note.
    assert weights.default_weights(0) == cached and weights.default_weights_note(0) is None
    assert len(server.requests) == 1


def test_damaged_cache_entry_is_found_and_refetched(cache, server, capsys):
    path = weights.fetch("sfsnet")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # one tensor byte; the header stays readable
    path.write_bytes(bytes(data))
    assert weights.verify("sfsnet")[0] == "damaged"
    code, out, err = _cli(capsys, "verify", "sfsnet", "--no-fetch")
    assert code == 1 and "damaged" in out
    code, out, err = _cli(capsys, "verify", "sfsnet")
    assert code == 0, err
    assert "sfsnet: ok" in out and len(server.requests) == 2
    assert weights.verify("sfsnet")[0] == "ok"


def test_wrong_fingerprint_is_refused_and_nothing_kept(cache, server, capsys):
    server.files[FILE] = server.files[FILE] + b"tampered"
    code, _, err = _cli(capsys, "download", "sfsnet")
    line = _one_error_line(code, err)
    assert "refused: git blob id" in line and "sfs-convert" in line
    assert len(server.requests) == 2  # one retry: a cut transfer also shows as another id
    assert _cache_files(cache) == []
    with pytest.raises(weights.CheckpointError, match="refused"):
        weights.load("sfsnet")
    assert _cache_files(cache) == []


def test_cut_transfer_leaves_no_partial_file(cache, server, capsys):
    server.mode = "cut"
    code, _, err = _cli(capsys, "download", "sfsnet")
    line = _one_error_line(code, err)
    assert f"{server.base}/{FILE}" in line
    assert len(server.requests) == 2  # one retry
    assert _cache_files(cache) == []


def test_404_names_the_url(cache, server, capsys):
    server.mode = "404"
    code, _, err = _cli(capsys, "download", "sfsnet")
    line = _one_error_line(code, err)
    assert f"{server.base}/{FILE}: HTTP 404" in line and "manual route" in line
    assert len(server.requests) == 1  # a 404 is not retried
    assert _cache_files(cache) == []


def test_stalled_server_times_out(cache, server, capsys, monkeypatch):
    monkeypatch.setattr(download, "TIMEOUT_S", 0.3)
    server.mode = "stall"
    code, _, err = _cli(capsys, "download", "sfsnet")
    assert "timed out" in _one_error_line(code, err)
    assert len(server.requests) == 2 and _cache_files(cache) == []


def test_offline_makes_no_request(cache, server, capsys, monkeypatch):
    monkeypatch.setenv(download.OFFLINE_ENV, "1")
    code, _, err = _cli(capsys, "download", "sfsnet")
    line = _one_error_line(code, err)
    assert "SFS_FAST_OFFLINE=1" in line and "sfs-convert SfSNet.caffemodel.h5 -o sfsnet.safetensors" in line
    with pytest.raises(weights.WeightsDownloadError):
        weights.load_any("sfsnet")
    assert server.requests == [] and _cache_files(cache) == []


_FETCH = """
import dataclasses, sys
from sfs_fast import weights
e = weights.REGISTRY["sfsnet"]
weights.register(dataclasses.replace(e, blob_id=sys.argv[1]), replace=True)
print(weights.fetch("sfsnet", progress=False))
"""


def test_two_processes_one_cache_entry(cache, server, caffe_file):
    server.mode = "slow"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    blob = download.git_blob_id(caffe_file)
    procs = [subprocess.Popen([sys.executable, "-c", _FETCH, blob], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert {out.strip() for out, _ in results} == {str(weights.cache_path("sfsnet"))}
    assert len(server.requests) == 1  # the second waited on the lock, then hit the cache
    assert _cache_files(cache) == ["sfsnet.safetensors"]
    assert weights.verify("sfsnet")[0] == "ok"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_blob_id_equals_git_hash_object(tmp_path):
    files = {"empty": b"", "text": b"hello\n", "binary": os.urandom(70_000) + b"\0\xff"}
    for name, data in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        git = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True, check=True)
        assert download.git_blob_id(path) == git.stdout.strip(), name
    assert download.git_blob_id(tmp_path / "empty") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"


def test_names_paths_and_one_line_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(download.HOME_ENV, str(tmp_path / "home"))
    code, out, _ = _cli(capsys, "list")
    assert code == 0 and "sfsnet" in out and "demo-3" in out and "not cached" in out
    model = weights.load("demo-3")
    assert model.method == 3 and model.weights_source["demo"] is True
    code, out, _ = _cli(capsys, "path", "demo-0")
    assert code == 0 and Path(out.strip()) == weights.default_weights(0)
    code, _, err = _cli(capsys, "path", "sfsnet")
    assert "sfs-weights download sfsnet" in _one_error_line(code, err)
    with pytest.raises(weights.CheckpointError) as info:
        weights.load_any("no-such-weights")
    assert str(info.value) == "no-such-weights: no such checkpoint or registered weights name (see sfs-weights list)"
    code, _, err = _cli(capsys, "download", "no-such-weights")
    assert "no such checkpoint or registered weights name" in _one_error_line(code, err)


def test_cache_dir_rules(tmp_path, monkeypatch):
    monkeypatch.delenv(download.HOME_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert download.cache_dir() == tmp_path / "xdg" / "sfs_fast"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert download.cache_dir() == tmp_path / "h" / ".cache" / "sfs_fast"
    monkeypatch.setenv(download.HOME_ENV, str(tmp_path / "own"))
    assert download.cache_dir() == tmp_path / "own"


def _sfs_imports(module: str) -> set:
    tree = ast.parse((ROOT / "sfs_fast" / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sfs_fast"):
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("sfs_fast")}
    return names


def test_imports_point_one_way():
    """weights -> importers -> errors, weights -> download -> errors: no module below
    weights imports it (not even lazily inside a function)."""
    for module in ("importers", "download", "errors"):
        assert not any(n.startswith("sfs_fast.weights") for n in _sfs_imports(module)), module
    assert {"sfs_fast.importers", "sfs_fast.download"} <= _sfs_imports("weights")


def test_commands_take_registered_names(tmp_path, monkeypatch, capsys):
    """--weights NAME reaches weights.load_any in the commands; an unknown name is one line."""
    from PIL import Image

    from sfs_fast.export.cli import main as export_main
    from sfs_fast.cli.decompose import main as decompose_main
    from sfs_fast.training.trainer import load_source_model

    monkeypatch.setenv(download.HOME_ENV, str(tmp_path / "home"))
    pics = tmp_path / "pics"
    pics.mkdir()
    Image.new("RGB", (40, 40), (180, 120, 90)).save(pics / "a.png")
    assert decompose_main([str(pics), str(tmp_path / "out"), "--weights", "demo-3", "--backend", "eager"]) == 0
    assert (tmp_path / "out" / "a_residue.png").is_file()  # method 3 ran: the name chose it
    capsys.readouterr()
    for main, argv in ((decompose_main, [str(pics), str(tmp_path / "o2")]), (export_main, ["--method", "0"])):
        assert main(argv + ["--weights", "nosuch"]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "nosuch: no such checkpoint or registered weights name" in err[0], err
    assert load_source_model("demo-0", 3).weights_source["name"] == "demo-0"
