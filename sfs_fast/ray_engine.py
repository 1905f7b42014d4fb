"""``sfs-decompose --engine ray``: the folder pipeline on a Ray cluster (Ray Data), with the
local engine's guarantees.

    from sfs_fast.decomposer import load_model
    from sfs_fast.pipeline import FolderOptions
    from sfs_fast.plan import resolve_plan
    from sfs_fast.ray_engine import RayOptions, decompose_folder_ray

    model, notes = load_model(method=3)
    summary = decompose_folder_ray("photos/", "out/", model, resolve_plan(precision="bf16"),
                                   FolderOptions(batch_size=16), ray_options=RayOptions(actors=4))

How a run goes (the stages are :mod:`sfs_fast.pipeline`'s, not a second pipeline):

1. The driver lists the inputs with :func:`sfs_fast.pipeline.start_run` (the output names
   depend on the whole set of inputs, so they are assigned in one place: the same names,
   masks and folder mirror as the local engine), and writes the ``skipped`` rows of a rerun.
2. ``ray.data.from_items`` splits the rest into blocks; Ray tasks decode them with the
   ``prepare`` hook (:func:`sfs_fast.pipeline.prepare_picture`, or the face preparer).
3. A pool of actors (``map_batches`` with an actor pool), each holding one ``Decomposer``
   built from the model and the :class:`~sfs_fast.plan.RunPlan` the driver resolved, runs
   :class:`sfs_fast.pipeline.PictureStages` on each batch: inference in batches of
   ``options.batch_size`` crops, the atomic writes of the outputs, the ``finish`` hook, the
   manifest rows.
4. The rows stream back to the driver, which is the manifest's only writer (the same
   :class:`~sfs_fast.pipeline.RunRecord` as the local engine: whole lines as inputs finish,
   compacted in input order at the end): no per-worker parts to merge, and a killed driver
   leaves whole lines like a killed local run.

IN, OUT (and an ``--onnx`` file) must be at the same paths on every node (a shared file
system); the model itself travels through Ray, so named weights are fetched once, on the
driver. Faults: Ray Data restarts a crashed actor and retries its batch; when the execution
fails anyway (an actor killed for good, a node lost), the driver runs a new one over the
inputs that have no row yet, up to ``RayOptions.attempts`` times. Outputs are only ever
renamed into place whole, so a lost worker leaves at most temporaries, which the end of a
finished run (or the next run) removes. SIGINT/SIGTERM stop the driver: the rows received
so far are kept, the summary says ``interrupted`` and the rerun does the rest.

Nothing here imports Ray until a run starts: the local engine never loads it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pickle
import socket
import time
from pathlib import Path
from typing import Callable

import numpy as np

from sfs_fast.pipeline import (
    FolderOptions, Item, PictureStages, PipelineError, RunRecord, StopSignals, Summary, decomposer_plan, first_line,
    prepare_picture, prepare_safely, start_run,
)
from sfs_fast.plan import RunPlan

RAY_EXTRA_HINT = 'the Ray engine needs Ray: pip install "sfs_fast[ray]"'
# the exceptions that mean "a worker, its process or its node went away", not "the code is
# wrong": worth a new execution over what is left (ray.exceptions names)
LOST_WORKER_ERRORS = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError",
                      "NodeDiedError", "LocalRayletDiedError", "ObjectLostError", "OwnerDiedError",
                      "ObjectReconstructionFailedError", "OutOfMemoryError")
REACH_TIMEOUT_S = 5.0
DECODE_MEMORY_BYTES = 512 * 2**20


class RayEngineError(PipelineError):
    """The Ray engine cannot run, or lost its run; the message is one line."""


class ActorStartError(RuntimeError):
    """Raised in an actor whose Decomposer could not be built (see :class:`DecomposeActor`)."""


@dataclasses.dataclass(frozen=True)
class RayOptions:
    """Where and how wide a Ray run goes.

    address: None or "" uses the Ray already initialised in this process, else starts a
        local one; ``auto`` joins the cluster started on this machine (``ray start --head``);
        ``HOST:PORT`` a cluster's head; ``ray://HOST:PORT`` through Ray Client.
    actors: Decomposers in the pool; None: as many as the cluster holds (GPUs over
        ``actor_gpus``, or the CPUs left after ``decode_cpus`` over ``actor_cpus``).
    actor_cpus: CPUs per actor (Ray sets the actor's thread count from it).
    actor_gpus: GPUs per actor (fractions share a GPU); None: 1 with a CUDA plan, else 0.
    decode_cpus: CPUs per decoding task.
    attempts: executions per run (a failed one is followed by one over what is left).
    object_store_mib: the object store of a local Ray started here (None: Ray's default).
    debug: Ray's own log lines on stderr (otherwise only errors reach the caller).
    """

    address: str | None = None
    actors: int | None = None
    actor_cpus: float = 1.0
    actor_gpus: float | None = None
    decode_cpus: float = 0.5
    attempts: int = 3
    object_store_mib: int | None = None
    debug: bool = False

    def checked(self, plan: RunPlan) -> RayOptions:
        """These options with ``actor_gpus`` filled in; :class:`RayEngineError` for bad values."""
        if self.actors is not None and (not isinstance(self.actors, int) or self.actors < 1):
            raise RayEngineError(f"actors: expected a whole number of at least 1, got {self.actors!r}")
        if not self.actor_cpus > 0 or not self.decode_cpus > 0:
            raise RayEngineError("actor CPUs and decode CPUs must be more than 0")
        cuda = plan.device.startswith("cuda")
        gpus = (1.0 if cuda else 0.0) if self.actor_gpus is None else float(self.actor_gpus)
        if gpus < 0:
            raise RayEngineError(f"actor GPUs must be >= 0, got {self.actor_gpus!r}")
        if gpus > 0 and not cuda:
            raise RayEngineError("actor GPUs need a CUDA plan: add --device cuda")
        if cuda and gpus == 0:
            raise RayEngineError("--device cuda on Ray needs GPUs per actor (--actor-gpus > 0): Ray hides "
                                 "the GPUs from actors that did not ask for one")
        if int(self.attempts) < 1:
            raise RayEngineError("attempts must be at least 1")
        return dataclasses.replace(self, actor_gpus=gpus, attempts=int(self.attempts),
                                   address=(self.address or "").strip())


# --------------------------------------------------------------------------------------
# Connecting


def import_ray():
    """``ray`` and ``ray.data``, or a :class:`RayEngineError` with the install line."""
    try:
        import ray
        import ray.data  # noqa: F401 - the engine's API
    except ImportError:
        raise RayEngineError(RAY_EXTRA_HINT) from None
    return ray


def check_reachable(address: str, timeout: float = REACH_TIMEOUT_S) -> None:
    """A one-line error when ``HOST:PORT`` (or ``ray://HOST:PORT``) takes no TCP connection:
    Ray itself would retry for a long time before saying so."""
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise RayEngineError(f"address {address!r}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise RayEngineError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc})") from None


def _quiet_ray(ray, debug: bool) -> None:
    """Keep Ray Data's progress and log lines off the command's stderr (errors still raise)."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = debug
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = debug
    logging.getLogger("ray.data").setLevel(logging.INFO if debug else logging.CRITICAL)


def connect(options: RayOptions) -> bool:
    """Make sure Ray is initialised as ``options.address`` asks; True when this call started
    it (the run then shuts it down)."""
    ray = import_ray()
    address = options.address
    if ray.is_initialized():
        if address:
            raise RayEngineError("Ray is already initialised in this process: give no address to use it")
        _quiet_ray(ray, options.debug)
        return False
    if address and address != "auto":
        check_reachable(address)
    if not options.debug:  # the core's C++ log lines (notes about actor restarts) go straight to stderr
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    settings = {"logging_level": logging.INFO if options.debug else logging.ERROR, "log_to_driver": options.debug}
    if not address:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a private local Ray reports nothing
        settings.update(include_dashboard=False)
        if options.object_store_mib:
            settings["object_store_memory"] = int(options.object_store_mib) * 2**20
    try:
        ray.init(address=address or None, **settings)
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError, ...
        raise RayEngineError(f"cannot start Ray{' at ' + address if address else ''}: {first_line(exc)}") from None
    _quiet_ray(ray, options.debug)
    return True


def pool_size(ray, options: RayOptions, started_here: bool) -> int:
    """The number of actors: ``options.actors``, or as many as the cluster holds. A Ray
    started here cannot grow, so a pool it cannot hold is refused (a cluster may autoscale)."""
    resources = ray.cluster_resources()
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    if options.actor_gpus:
        fits = math.floor(gpus / options.actor_gpus + 1e-9)
        what = f"{gpus:g} GPUs for actors of {options.actor_gpus:g} GPU"
    else:
        fits = math.floor((cpus - options.decode_cpus) / options.actor_cpus + 1e-9)
        what = (f"{cpus:g} CPUs for actors of {options.actor_cpus:g} CPU "
                f"(and {options.decode_cpus:g} CPU for decoding)")
    actors = options.actors if options.actors is not None else max(fits, 1)
    if started_here and actors > fits:
        raise RayEngineError(f"the local Ray has {what}: it holds {max(fits, 0)} actors, not {actors}")
    return actors


# --------------------------------------------------------------------------------------
# What runs in Ray (tasks and actors): plain functions and classes, serialised by Ray


def _pack(obj) -> bytes:
    """Items and pictures travel between stages as pickled bytes (one binary column): a
    picture holds arrays of any shape and a face picture its photo, which Ray Data's
    columnar blocks would otherwise have to guess types for."""
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def decode_batch(batch: dict, *, prepare: Callable, options: FolderOptions) -> dict:
    """Stage 2 in a Ray task: ``batch["item"]`` packed :class:`~sfs_fast.pipeline.Item` ->
    ``{"picture": packed Picture}``, one per item (a bad input becomes a Picture with its
    reason, never an exception)."""
    pictures = [_pack(prepare_safely(prepare, options, pickle.loads(blob))) for blob in batch["item"]]
    return {"picture": np.array(pictures, dtype=object)}


def build_decomposer(source, plan: RunPlan):
    """The Decomposer of ``source``: a built model (``torch.nn.Module``), an ``.onnx`` path,
    or a callable ``make(plan) -> decomposer`` (a custom or stand-in decomposer)."""
    import torch

    from sfs_fast.decomposer import Decomposer

    if isinstance(source, torch.nn.Module):
        return Decomposer(source, plan=plan)
    if isinstance(source, (str, os.PathLike)):
        return Decomposer(onnx=os.fspath(source), plan=plan)
    if callable(source):
        return source(plan)
    raise TypeError(f"model: expected a model, an .onnx path or a factory, got {type(source).__name__}")


class DecomposeActor:
    """Stages 3-6 in a Ray actor: one Decomposer for the actor's life, and
    :class:`~sfs_fast.pipeline.PictureStages` encoding inline (the pool is the parallelism).
    Each call takes ``batch["picture"]`` (packed pictures) and returns their manifest rows
    as JSON text (``row``) and what the actor runs (``plan``, JSON: auto may choose per actor)."""

    def __init__(self, source, plan: RunPlan, out_dir: str, options: FolderOptions, finish: Callable | None):
        # A Decomposer that cannot be built here (no CUDA on this node, ...) is reported on the
        # first batch, not raised now: Ray prints a constructor's traceback on the driver's
        # stdout and keeps restarting the actor, while a batch's error just ends the execution.
        self.error = None
        try:
            self.decomposer = build_decomposer(source, plan)
        except Exception as exc:  # noqa: BLE001 - reported by __call__
            self.error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
            return
        self.rows: list = []
        self.stages = PictureStages(Path(out_dir), self.decomposer, options, emit=self.rows.append, finish=finish)
        self.plan = json.dumps(decomposer_plan(self.decomposer))

    def __call__(self, batch: dict) -> dict:
        if self.error is not None:
            raise ActorStartError(f"the actors cannot build their Decomposer: {self.error}")
        for blob in batch["picture"]:
            self.stages.add(pickle.loads(blob))
        self.stages.flush()
        rows = list(self.rows)
        self.rows.clear()
        return {"row": np.array([json.dumps(r, ensure_ascii=False) for r in rows], dtype=object),
                "plan": np.array([self.plan] * len(rows), dtype=object)}


# --------------------------------------------------------------------------------------
# The driver


def model_facts(source, plan: RunPlan) -> tuple[list, dict]:
    """``(output names, plan dict)`` of ``source`` as the driver knows them before any actor
    runs (the resume check needs the names; the actors report what they ran)."""
    import torch

    from sfs_fast.models import output_names

    if isinstance(source, torch.nn.Module):
        return list(output_names(source.method)), {"method": source.method, "backend": plan.backend,
                                                   "precision": plan.precision}
    if isinstance(source, (str, os.PathLike)):
        from sfs_fast.export import OnnxRunner

        runner = OnnxRunner(os.fspath(source), device="cpu", threads=1)  # metadata and a check, on the driver
        return list(runner.output_names), {"method": runner.method, "backend": "onnx",
                                           "precision": runner.metadata.get("precision", "fp32")}
    dec = build_decomposer(source, plan)
    return list(dec.output_names), decomposer_plan(dec)


@dataclasses.dataclass
class _Job:
    """One run's fixed parts, as :func:`_dataset` needs them."""

    source: object
    plan: RunPlan
    out_dir: Path
    options: FolderOptions
    prepare: Callable
    finish: Callable | None
    ray_options: RayOptions
    actors: int


def _dataset(ray, job: _Job, items: list[Item]):
    """The Ray Data pipeline over ``items``: blocks of packed items -> decoding tasks ->
    the actor pool. Its rows are ``{"row": JSON, "plan": JSON}``."""
    ro, batch = job.ray_options, job.options.batch_size
    ds = ray.data.from_items([{"item": _pack(item)} for item in items])
    # memory: a picture at the pixel limit decodes to a few hundred MiB. Asking for it also
    # keeps decoding in tasks of its own: Ray Data fuses a task stage into the actors when
    # their resource requests are equal, and each actor would then decode and infer in turn.
    ds = ds.map_batches(decode_batch, batch_size=batch, batch_format="numpy", num_cpus=ro.decode_cpus,
                        memory=DECODE_MEMORY_BYTES,
                        fn_kwargs={"prepare": job.prepare, "options": job.options})
    gpus = {"num_gpus": ro.actor_gpus} if ro.actor_gpus else {}
    return ds.map_batches(DecomposeActor, batch_size=batch, batch_format="numpy",
                          compute=ray.data.ActorPoolStrategy(size=job.actors), num_cpus=ro.actor_cpus, **gpus,
                          fn_constructor_kwargs={"source": job.source, "plan": job.plan, "out_dir": str(job.out_dir),
                                                 "options": job.options, "finish": job.finish})


def lost_worker(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) says a worker or node went away; an actor whose
    constructor raised (its Decomposer cannot be built there) would fail again, so no."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if getattr(exc, "actor_init_failed", False):
            return False
        if any(cls.__name__ in LOST_WORKER_ERRORS for cls in type(exc).__mro__):
            return True
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return False


def failure_line(exc: BaseException) -> str:
    """One line for a failed execution: the :class:`ActorStartError` of an actor that could
    not build its Decomposer (Ray puts the whole traceback in the message), the last line of a
    constructor's error, else the error's type and first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    marker = f"{ActorStartError.__name__}: "
    start_error = next((line for line in reversed(lines) if marker in line), None)
    if start_error is not None:  # Ray Data wraps it in its own error types, with the traceback
        return start_error.split(marker, 1)[-1]
    if getattr(exc, "actor_init_failed", False):
        return f"the actors cannot start: {lines[-1]}"
    return f"{type(exc).__name__}: {lines[0]}"


class _Drive:
    """The driver's loop: executions over what is left until every input has a row, the
    attempts are spent, or a signal stops it."""

    def __init__(self, ray, job: _Job, record: RunRecord, plan: dict):
        self.ray, self.job, self.record, self.plan = ray, job, record, plan
        self.done: set = set()
        self.model_s = 0.0

    def take(self, result: dict) -> None:
        """One row from an actor; a row for an input that already has one (a batch retried
        by Ray after its actor died) is not counted twice."""
        row = json.loads(result["row"])
        if row["input"] in self.done:
            return
        self.done.add(row["input"])
        self.plan = json.loads(result["plan"])
        self.model_s += float(row.get("timings_ms", {}).get("infer_ms", 0.0)) / 1e3
        self.record.write_row(row)

    def execute(self, items: list[Item], stop: StopSignals) -> bool:
        """One execution over ``items``; False when a signal stopped it."""
        rows = iter(_dataset(self.ray, self.job, items).iter_rows())
        try:
            for result in rows:
                self.take(result)
                if stop.received:
                    return False
        finally:
            close = getattr(rows, "close", None)
            if close is not None:
                close()  # stops the execution now, not when the iterator is collected
        return True

    def run(self, todo: list[Item], stop: StopSignals) -> bool:
        """True when every input of ``todo`` got its row; raises :class:`RayEngineError`
        when the attempts are spent or the failure is not a lost worker."""
        for attempt in range(1, self.job.ray_options.attempts + 1):
            left = [item for item in todo if item.key not in self.done]
            if not left:
                return True
            try:
                if not self.execute(left, stop):
                    return False
            except Exception as exc:  # noqa: BLE001 - Ray wraps what failed in its own types
                if stop.received:
                    return False
                remaining = sum(item.key not in self.done for item in todo)
                if not lost_worker(exc) or attempt == self.job.ray_options.attempts:
                    raise RayEngineError(f"the Ray run failed ({failure_line(exc)}); "
                                         f"{remaining} inputs left for a rerun") from exc
        return all(item.key in self.done for item in todo)


def decompose_folder_ray(inputs, out_dir, model, plan: RunPlan, options: FolderOptions | None = None, *,
                         ray_options: RayOptions | None = None, prepare: Callable | None = None,
                         finish: Callable | None = None, progress: Callable | None = None) -> Summary:
    """:func:`sfs_fast.pipeline.decompose_folder` on Ray (module docstring).

    Args:
        inputs, options, prepare, finish, progress: as for ``decompose_folder``; ``prepare``
            and ``finish`` run in Ray workers, so they must pickle (the face hooks do);
            ``progress(row)`` runs on the driver. ``options.workers`` is not used (Ray
            schedules the decoding) and ``options.grid`` is refused.
        model: a built model (:func:`sfs_fast.decomposer.load_model`), an ``.onnx`` path, or
            a callable ``make(plan) -> decomposer``; each actor builds its Decomposer from it
            and ``plan``.
        plan: the :class:`~sfs_fast.plan.RunPlan` every actor runs (``auto`` is measured by
            each actor on its own device).

    Returns the :class:`~sfs_fast.pipeline.Summary` (its plan is what the actors ran);
    raises :class:`RayEngineError` when Ray cannot run or the run is lost (the rows written
    so far stay; the rerun does the rest).
    """
    ray_options = (ray_options or RayOptions()).checked(plan)
    options, out_dir, items = start_run(inputs, out_dir, options)
    if options.grid:
        raise RayEngineError("grid: contact sheets per batch are the local engine's (--engine local)")
    prepare = prepare or prepare_picture
    names, plan_dict = model_facts(model, plan)
    started_here = connect(ray_options)
    try:
        ray = import_ray()
        job = _Job(model, plan, out_dir, options, prepare, finish, ray_options,
                   pool_size(ray, ray_options, started_here and not ray_options.address))
        t0 = time.perf_counter()
        record = RunRecord(out_dir, names, options, prepare=prepare, progress=progress)
        drive = _Drive(ray, job, record, plan_dict)
        finished = False
        try:
            with StopSignals() as stop:
                finished = drive.run(record.skip_done(items), stop)
        finally:
            record.close(items)
        if finished:  # every actor is done: what is left are a lost worker's temporaries
            from sfs_fast.atomic import remove_stale_temporaries

            remove_stale_temporaries(out_dir)
        return record.summary(len(items), stop.received, time.perf_counter() - t0, drive.model_s, drive.plan)
    finally:
        if started_here:
            import_ray().shutdown()


__all__ = ["RayOptions", "RayEngineError", "ActorStartError", "decompose_folder_ray", "connect", "check_reachable", "pool_size",
           "build_decomposer", "model_facts", "decode_batch", "DecomposeActor", "lost_worker", "RAY_EXTRA_HINT"]
