"""sfs-decompose --engine ray on a local Ray (2 CPUs, started once for this module): the same
files and manifest rows as the local engine on a mixed folder, a worker actor killed in the
middle, one-line errors, and a local engine that never imports Ray."""
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pictures import face_like, make_mixed_folder
from sfs_fast import images
from sfs_fast.bench.folder import StandInDecomposer, make_pictures
from sfs_fast.cli import decompose as cli
from sfs_fast.cli.common import EXIT_ERROR, EXIT_OK, EXIT_PARTIAL
from sfs_fast.pipeline import MANIFEST, FolderOptions, decompose_folder
from sfs_fast.plan import resolve_plan


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module: 2 CPUs, no dashboard, no usage report, a small object
    store (the machine is shared)."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300 * 2**20,
             logging_level=logging.ERROR, log_to_driver=False)
    # the test's own stand-ins travel by value (workers cannot import this test module)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.shutdown()


@pytest.fixture
def keep_threads():
    """--threads 1 sets torch's thread count in this process: put it back afterwards."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _rows(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / MANIFEST).read_text(encoding="utf-8").splitlines()]
    assert len({r["input"] for r in rows}) == len(rows), "one manifest line per input"
    return {r["input"]: r for r in rows}


def _files(out: Path) -> dict:
    """relative path -> bytes of every output file (the manifest aside)."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def _temporaries(out: Path) -> list:
    return [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs if f.startswith(images.TEMP_PREFIX)]


def _without_timings(rows: dict) -> dict:
    return {key: {k: v for k, v in row.items() if k != "timings_ms"} for key, row in rows.items()}


# good pictures of tests/pictures.make_mixed_folder left out here (the local engine's tests
# cover every kind; these are many decodable variants of one thing)
KEEP_OUT = ("grey16.png", "rgb16.png", "grey.jpg", "cmyk.jpg", "exif rotated.jpg", "jpeg named png.png",
            "sub/deeper/deep.webp", "rgba.png")


def _run_cli(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, json.loads(captured.out.strip().splitlines()[-1]), captured.err


def test_mixed_folder_same_on_both_engines(local_ray, tmp_path, capsys, keep_threads):
    """One mixed folder (good and broken pictures) through the real command on both engines:
    byte-identical pictures, the same rows (statuses, reasons, crops, outputs), the same exit
    code; the face preparer (--faces auto) runs in the Ray tasks."""
    src = tmp_path / "in"
    good, bad = make_mixed_folder(src)
    for rel in KEEP_OUT:  # every broken kind, a few good ones: the real model costs ~0.3 s a picture
        (src / rel).unlink()
        good.pop(rel)
    # batch 1 and one thread: both engines call the model on the same batches with the same
    # threads (a convolution may round differently for another batch shape or thread count)
    common = [str(src), "-r", "--method", "0", "--precision", "fp32", "--threads", "1", "--batch-size", "1",
              "--faces", "auto", "--json"]
    local_out, ray_out = tmp_path / "local", tmp_path / "ray"
    local_code, local_summary, _ = _run_cli([common[0], str(local_out), *common[1:]], capsys)
    ray_argv = [common[0], str(ray_out), *common[1:], "--engine", "ray", "--actors", "1"]
    ray_code, ray_summary, ray_err = _run_cli(ray_argv, capsys)

    assert ray_code == local_code == EXIT_PARTIAL
    counts = ("ok", "skipped", "failed", "inputs", "remaining")
    assert {k: ray_summary[k] for k in counts} == {k: local_summary[k] for k in counts}
    assert ray_summary["ok"] > 0 and ray_summary["failed"] >= len(bad)
    assert (ray_summary["backend"], ray_summary["precision"]) == ("fused", "fp32")  # as the actor reports it
    local_rows, ray_rows = _rows(local_out), _rows(ray_out)
    assert set(ray_rows) == set(good) | set(bad)
    assert _without_timings(ray_rows) == _without_timings(local_rows)
    for rel, reason in bad.items():
        assert ray_rows[rel]["status"] == "failed" and reason in ray_rows[rel]["reason"]
        assert sum(rel in line for line in ray_err.splitlines() if line.startswith("sfs-decompose: failed")) == 1
    local_files, ray_files = _files(local_out), _files(ray_out)
    assert sorted(ray_files) == sorted(local_files) and any(k.endswith("_normal.png") for k in ray_files)
    assert [k for k in ray_files if ray_files[k] != local_files[k]] == []
    assert "Traceback" not in ray_err and _temporaries(ray_out) == []


@pytest.fixture
def killer(local_ray):
    """A named coordinator actor the stand-ins register with, and a thread that kills the
    first actor that registers (``ray.kill``: for good, no restart)."""
    ray = local_ray

    @ray.remote(num_cpus=0)
    class Coordinator:
        def __init__(self):
            self.actors = []

        def register(self, actor):
            self.actors.append(actor)

        def registered(self):
            return list(self.actors)

    name = f"sfs-test-kill-{uuid.uuid4().hex[:8]}"
    coordinator = Coordinator.options(name=name).remote()
    killed = []

    def kill_first():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            actors = ray.get(coordinator.registered.remote())
            if actors:
                ray.kill(actors[0])
                killed.append(actors[0])
            time.sleep(0.05)

    thread = threading.Thread(target=kill_first, daemon=True)
    thread.start()
    yield name, killed
    thread.join(timeout=1)
    ray.kill(coordinator)


class KillableStandIn(StandInDecomposer):
    """The bench's stand-in that, inside a Ray actor, registers the actor with the test's
    coordinator on its first batch and takes a little time per batch (so the kill lands in
    the middle of the run)."""

    def __init__(self, plan=None, coordinator=None):
        super().__init__(plan)
        self.coordinator, self.registered = coordinator, False
        import ray

        # the summary reports what the actors built (the driver builds one too, outside any actor)
        where = " in an actor" if ray.get_runtime_context().get_actor_id() is not None else ""
        self.backend = f"stand-in for {plan.backend}{where}"

    def decompose(self, x):
        import ray

        if not self.registered and ray.get_runtime_context().get_actor_id() is not None:
            self.registered = True
            actor = ray.get_runtime_context().current_actor
            ray.get(ray.get_actor(self.coordinator).register.remote(actor))
        time.sleep(0.2)
        return super().decompose(x)


def test_killed_actor_still_finishes_every_input(local_ray, killer, tmp_path):
    """``ray.kill`` (for good) on the pool's actor in the middle of its first batch: Ray Data
    fails that execution (whatever the pool size), the driver runs one over the inputs without
    a row, and every input ends whole and recorded once."""
    from sfs_fast.ray_engine import RayOptions, decompose_folder_ray

    name, killed = killer
    src, out = tmp_path / "in", tmp_path / "out"
    n = 8
    make_pictures(src, n)

    def factory(plan):
        return KillableStandIn(plan, coordinator=name)

    plan = resolve_plan(backend="eager")  # not the default: the actors build from this plan
    summary = decompose_folder_ray(src, out, factory, plan, FolderOptions(batch_size=2),
                                   ray_options=RayOptions(actors=1))
    assert killed, "no actor was killed"
    assert summary.plan["backend"] == "stand-in for eager in an actor"
    assert (summary.ok, summary.failed, summary.remaining, summary.exit_code) == (n, 0, 0, EXIT_OK)
    rows = _rows(out)
    assert len(rows) == n and all(r["status"] == "ok" for r in rows.values())
    assert _temporaries(out) == []
    # every file whole, and the same bytes as the local engine writes
    decompose_folder(src, tmp_path / "local", StandInDecomposer(), FolderOptions(batch_size=2))
    assert _files(out) == _files(tmp_path / "local")
    # a rerun skips every input from its row (no Ray work starts) and touches no file
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    again = decompose_folder_ray(src, out, factory, resolve_plan(), FolderOptions(batch_size=2),
                                 ray_options=RayOptions(actors=1))
    assert (again.ok, again.skipped, again.exit_code) == (0, n, EXIT_OK)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == mtimes


@pytest.mark.parametrize("argv, message", [
    (["--engine", "ray", "--actors", "0"], "--actors must be at least 1"),
    (["--engine", "ray", "--address", "127.0.0.1:9"], "cannot reach the Ray cluster at 127.0.0.1:9"),
    (["--engine", "ray", "--address", "nonsense"], "expected auto, HOST:PORT"),
    (["--engine", "ray", "--grid"], "--grid is an option of the local engine"),
    (["--engine", "ray", "--actor-gpus", "1"], "add --device cuda"),
    (["--actors", "2"], "options of --engine ray"),
])
def test_bad_ray_flags_are_one_line(tmp_path, capsys, argv, message):
    if "--address" in argv or "--actor-gpus" in argv:
        pytest.importorskip("ray")  # these are checked once Ray is known to be there
    (tmp_path / "in").mkdir()
    Image.fromarray(face_like(32, 32)).save(tmp_path / "in" / "a.png")
    code = cli.main([str(tmp_path / "in"), str(tmp_path / "out"), "--faces", "off", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_ERROR and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_missing_ray_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails as if it were not installed
    (tmp_path / "in").mkdir()
    Image.fromarray(face_like(32, 32)).save(tmp_path / "in" / "a.png")
    code = cli.main([str(tmp_path / "in"), str(tmp_path / "out"), "--faces", "off", "--engine", "ray"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_ERROR and len(err) == 1 and 'pip install "sfs_fast[ray]"' in err[0], err


def test_local_engine_imports_no_ray(tmp_path):
    """The default engine, run through the command's module, never loads Ray (checked in a
    fresh process: this one has Ray loaded)."""
    (tmp_path / "in").mkdir()
    Image.fromarray(face_like(32, 32)).save(tmp_path / "in" / "a.png")
    script = (
        "import sys\n"
        "from sfs_fast.cli.decompose import main\n"
        f"code = main([{str(tmp_path / 'in')!r}, {str(tmp_path / 'out')!r}, '--faces', 'off', '--threads', '1',"
        " '--precision', 'fp32'])\n"  # fp32: no auto check in the child process
        "loaded = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "print(code, loaded)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "0" and done.stdout.strip().endswith("[]"), done.stdout
    assert np.asarray(Image.open(tmp_path / "out" / "a_normal.png")).shape == (128, 128, 3)


@pytest.mark.slow
def test_ray_bench_runs(local_ray):
    """sfs-bench ray on a few pictures (speed is the bench's to report, not a test's)."""
    from sfs_fast.bench.folder_ray import format_table, run_ray_bench

    result = run_ray_bench(4, actors=(1,), kinds=("stand-in",), batch_size=2)
    assert [(r["engine"], r["decomposer"]) for r in result["results"]] == [("local", "stand-in"),
                                                                        ("ray x1", "stand-in")]
    assert all(r["startup_s"] >= 0 and r["wall_s"] > 0 for r in result["results"])
    assert "ray x1" in result["ray_overhead_ms_per_image"] and "Ray overhead" in format_table(result)


def _fails_in_actors(plan):
    """A factory whose Decomposer builds on the driver but not in the actors (no CUDA there)."""
    import ray

    if ray.get_runtime_context().get_actor_id() is not None:
        raise ValueError("device: CUDA was asked for but torch sees no CUDA device")
    return StandInDecomposer(plan)


@pytest.mark.slow
def test_actors_that_cannot_build_their_decomposer_fail_once_in_one_line(local_ray, tmp_path, capfd):
    from sfs_fast.ray_engine import RayEngineError, RayOptions, decompose_folder_ray

    make_pictures(tmp_path / "in", 3)
    t0 = time.perf_counter()
    with pytest.raises(RayEngineError) as info:
        decompose_folder_ray(tmp_path / "in", tmp_path / "out", _fails_in_actors, resolve_plan(), FolderOptions(),
                             ray_options=RayOptions(actors=1))
    message = str(info.value)
    assert "\n" not in message and "cannot build their Decomposer: ValueError: device: CUDA" in message
    assert "3 inputs left for a rerun" in message
    assert time.perf_counter() - t0 < 60  # not retried as a lost worker
    assert "Traceback" not in capfd.readouterr().out  # nothing printed by Ray on the driver either
