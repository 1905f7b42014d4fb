"""sfs_fast.pipeline as a library: distinct output names for clashing inputs, the prepare and
finish hooks (0..N crops per picture, as face detection will use them), resume from
manifest rows, and SIGTERM/SIGINT stopping a real sfs-decompose run cleanly."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pictures import face_like
from sfs_fast import images, pipeline
from sfs_fast.bench.folder import StandInDecomposer, measure_one
from sfs_fast.pipeline import Crop, FolderOptions, Item, Picture, decompose_folder


class CountingStandIn(StandInDecomposer):
    """The bench's model-free stand-in (albedo = input), counting the images it sees."""

    def __init__(self):
        super().__init__()
        self.seen = 0

    def decompose(self, x):
        self.seen += len(x)
        return super().decompose(x)


def _rows(out: Path) -> dict:
    lines = (out / pipeline.MANIFEST).read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert len({r["input"] for r in rows}) == len(rows), "one manifest line per input"
    return {r["input"]: r for r in rows}


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im).astype(np.int16)


def test_assign_stems_gives_clashing_inputs_their_extension():
    items = pipeline.assign_stems([Item(Path(p), Path(p)) for p in
                                   ("a.jpg", "a.png", "b.png", "sub/a.png", "c.png", "c.PNG", "c_png.jpg")])
    stems = {i.key: (i.stem, i.error) for i in items}
    assert stems["a.jpg"] == ("a_jpg", None) and stems["a.png"] == ("a_png", None)
    assert stems["b.png"] == ("b", None) and stems["sub/a.png"] == ("sub/a", None)  # other folder: no clash
    assert stems["c.PNG"] == ("c_PNG", None)
    # c.png's extended stem is another input's plain stem: one of them is refused, with the reason
    assert stems["c_png.jpg"] == ("c_png", None)
    assert stems["c.png"][1] and "clashes" in stems["c.png"][1]


def test_clashing_names_are_both_processed(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(face_like(64, 64, 1)).save(src / "a.jpg", quality=95)
    Image.fromarray(face_like(64, 64, 2)).save(src / "a.png")
    Image.fromarray(face_like(64, 64, 3)).save(src / "b.png")
    summary = decompose_folder(src, tmp_path / "out", StandInDecomposer(), FolderOptions(batch_size=2))
    assert (summary.ok, summary.failed, summary.exit_code) == (3, 0, 0)
    rows = _rows(tmp_path / "out")
    assert "a_jpg_albedo.png" in rows["a.jpg"]["outputs"] and "a_png_albedo.png" in rows["a.png"]["outputs"]
    assert "b_albedo.png" in rows["b.png"]["outputs"]
    # each name holds its own input (the stand-in's albedo is the input picture)
    for name, stem in (("a.jpg", "a_jpg"), ("a.png", "a_png")):
        expected = images.unit_to_rgb(images.load_image(src / name)[0]).astype(np.int16)
        assert np.abs(_png(tmp_path / "out" / f"{stem}_albedo.png") - expected).max() <= 1
    assert np.abs(_png(tmp_path / "out" / "a_jpg_albedo.png") - _png(tmp_path / "out" / "a_png_albedo.png")).max() > 20


def faces_like_prepare(item, options):
    """A face-detector stand-in: 'none*' has no face, 'two*' two, the others one."""
    picture = pipeline.prepare_picture(item, options)
    if not picture.crops:
        return picture
    name = item.path.stem
    if name.startswith("none"):
        return Picture(item, meta=picture.meta, error="no face found")
    if name.startswith("two"):
        whole = picture.crops[0].image
        picture.crops = [Crop(whole, f"{item.stem}_face{k}", meta={"box": [k, 0, 10 + k, 10]})
                         for k in range(2)]
        picture.crops[1].image = np.ascontiguousarray(whole[:, ::-1])  # a different second face
    return picture


def test_prepare_and_finish_hooks_then_resume(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for k, name in enumerate(("one", "two", "none", "two_b")):
        Image.fromarray(face_like(48, 64, k)).save(src / f"{name}.png")
    finished = []

    def paste(picture, outputs_per_crop):
        """Writes one file per picture; checks each crop's outputs are that crop's."""
        for crop, outs in zip(picture.crops, outputs_per_crop):
            np.testing.assert_array_equal(outs["albedo"], crop.image)
        path = out / f"{picture.item.stem}_paste.png"
        images.save_png(path, images.unit_to_rgb(outputs_per_crop[0]["recon"]))
        finished.append(picture.item.key)
        return {"outputs": [path], "faces": len(picture.crops)}

    dec = CountingStandIn()

    def run(**options):
        return decompose_folder(src, out, dec, FolderOptions(batch_size=3, **options),
                                prepare=faces_like_prepare, finish=paste)

    summary = run()
    assert (summary.ok, summary.failed, summary.exit_code) == (3, 1, pipeline.EXIT_PARTIAL)
    assert dec.seen == 5 and sorted(finished) == ["one.png", "two.png", "two_b.png"]
    rows = _rows(out)
    assert rows["none.png"]["status"] == "failed" and rows["none.png"]["reason"] == "no face found"
    two = rows["two.png"]
    assert two["status"] == "ok" and two["faces"] == 2
    assert [c["stem"] for c in two["crops"]] == ["two_face0", "two_face1"] and two["crops"][1]["box"] == [1, 0, 11, 10]
    assert {"two_face0_normal.png", "two_face1_light.txt", "two_paste.png"} <= set(two["outputs"])
    assert all((out / p).is_file() for r in rows.values() for p in r["outputs"])

    # rerun: finished inputs skipped from their manifest rows, the faceless one retried
    dec.seen = 0
    summary = run()
    assert (summary.ok, summary.skipped, summary.failed) == (0, 3, 1) and dec.seen == 0
    assert _rows(out)["two.png"]["crops"][0]["stem"] == "two_face0"
    # an output listed by a row is gone: that input is redone
    (out / "two_face1_albedo.png").unlink()
    summary = run()
    assert (summary.ok, summary.skipped) == (1, 2) and dec.seen == 2
    assert (out / "two_face1_albedo.png").is_file()
    dec.seen = 0
    assert run(overwrite=True).ok == 3 and dec.seen == 5


def test_failing_hooks_fail_their_input_only(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a", "bad"):
        Image.fromarray(face_like(32, 32)).save(src / f"{name}.png")

    def prepare(item, options):
        if item.path.stem == "bad":
            raise RuntimeError("detector crashed")
        return pipeline.prepare_picture(item, options)

    summary = decompose_folder(src, tmp_path / "out", StandInDecomposer(), prepare=prepare,
                               finish=lambda picture, outs: {"outputs": [], "note": "pasted"})
    rows = _rows(tmp_path / "out")
    assert (summary.ok, summary.failed) == (1, 1)
    assert rows["a.png"]["note"] == "pasted"
    assert "detector crashed" in rows["bad.png"]["reason"]


def test_pipeline_imports_only_the_core():
    """Imports point one way: the pipeline never reaches into the commands, export, bench,
    training or ONNX Runtime (the onnx backend loads its runner lazily in the Decomposer)."""
    import ast

    tree = ast.parse(Path(pipeline.__file__).read_text(encoding="utf-8"))
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert "sfs_fast.images" in names  # the walk sees the imports
    upward = ("sfs_fast.cli", "sfs_fast.export", "sfs_fast.bench", "sfs_fast.training", "onnxruntime")
    assert not [n for n in names if n.startswith(upward)], names


def test_memory_bench_runs_the_real_pipeline():
    result = measure_one(6, batch_size=4, workers=1)
    assert (result["pictures"], result["ok"], result["failed"]) == (6, 6, 0)
    assert result["peak_rss_mib"] >= result["peak_rss_before_run_mib"]


def _temporaries(out: Path) -> list:
    return [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs if f.startswith(images.TEMP_PREFIX)]


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_signal_stops_after_the_batch(tmp_path, signum):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    n = 8
    for k in range(n):
        Image.fromarray(face_like(128, 128, k)).save(src / f"f{k:02d}.png")
    cmd = [sys.executable, "-m", "sfs_fast.cli.decompose", str(src), str(out), "--method", "0",
           "--batch-size", "2", "--workers", "1", "--threads", "1", "--json",
           "--precision", "fp32"]  # bundled demo weights; fp32: no auto check before the first batch
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(out.glob("*_recon.png")):
        time.sleep(0.02)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["interrupted"] == signal.Signals(signum).name and summary["exit_code"] == 128 + signum
    assert f"interrupted by {signal.Signals(signum).name}" in stderr and "Traceback" not in stderr
    assert 0 < summary["remaining"] < n and summary["ok"] + summary["remaining"] == n
    assert _temporaries(out) == []
    rows = _rows(out)  # whole lines only, one per finished input
    assert len(rows) == summary["ok"] and all(r["status"] == "ok" for r in rows.values())
    for row in rows.values():  # what the rows list is whole
        for rel in row["outputs"]:
            if rel.endswith(".png"):
                with Image.open(out / rel) as im:
                    im.load()
            else:
                assert len((out / rel).read_text().split()) == 27

    # the rerun does exactly the rest (the stand-in has method 0's outputs: same files, cheaper)
    rerun = decompose_folder(src, out, StandInDecomposer())
    assert (rerun.skipped, rerun.ok, rerun.exit_code) == (summary["ok"], summary["remaining"], 0)
