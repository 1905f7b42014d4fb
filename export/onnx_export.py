"""Export a model to ONNX, convert its precision, and verify it against PyTorch.

    result = export_onnx(model, "method3.onnx")          # fp32, dynamic batch, opset 17
    result.parity["normal"]["max_abs"]                    # measured ORT vs PyTorch

The graph: input ``image`` float32 ``[B,3,128,128]`` RGB in [0,1]; outputs named by
:func:`sfs_fast.models.output_names`. The shading traces the reference op (plain ONNX
operators: Mul, Sqrt, MatMul, ...), so the file needs no custom-operator library.

Why the TorchScript-based exporter (``dynamo=False``): on this model it writes the same graph
in a small fraction of the dynamo exporter's time, and both match eager PyTorch in ONNX
Runtime, grouped ConvTranspose and the 64x64 light average included (bench/README.md).

Parity: every export is run in ONNX Runtime on fresh random inputs at two batch sizes and
compared with the PyTorch model (float32, reference shading). Per output it reports
``max_abs = max|ort - torch|``, ``max_rel = max_abs / max|torch|`` and ``mean_abs``; it passes
when ``max_abs <= atol * max(1, max|torch|)`` (absolute for outputs of unit scale, relative
for larger ones; for int8 ``mean_abs`` takes the place of ``max_abs``, see
:data:`CRITERION`). Default ``atol`` per precision in :data:`DEFAULT_ATOL`.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from sfs_fast.atomic import atomic_destination, atomic_write
from sfs_fast.models import SfSNetModel, output_names
from sfs_fast.optimize import eager_reference
from sfs_fast.plan import INT8_LAYERS, ONNX_PRECISIONS
from sfs_fast.precision import output_error
from sfs_fast.sh import CONVENTION
from sfs_fast.weights import INPUT

from sfs_fast.export.runner import INPUT_NAME, INPUT_SIZE, OnnxRunner

DEFAULT_OPSET = 17
# ReduceMean/Resize/ConvTranspose forms the graph uses are all there from 13 on; the
# TorchScript exporter writes at most opset 20.
MIN_OPSET, MAX_OPSET = 13, 20
# Parity bounds (see the module docstring), set above the errors each precision shows on
# calibrated random models (bench/README.md, "Lab notes"): fp16 runs weights and activations
# in half (its max error grows where raw normals are short); static int8 quantizes the
# convolutions, so its mean error is bounded instead (see CRITERION).
DEFAULT_ATOL = {"fp32": 1e-4, "fp16": 5e-2, "int8": 1e-1}
# Which error the bound applies to: the max over all pixels, or (int8) the mean. A quantized
# trunk moves every feature a little; where a raw normal is short, normalizing it turns that
# into a large change of direction at a few pixels, so int8's max error says little.
CRITERION = {"fp32": "max", "fp16": "max", "int8": "mean"}
NORMAL_CONVENTION = "unit (x, y, z) per pixel, channels 0..2 of 'normal'; shading takes the raw head output normalized with eps 1e-8"
EXPORTER = "torch.onnx.export (TorchScript-based, dynamo=False)"


class ParityError(RuntimeError):
    """ONNX Runtime does not match PyTorch within the tolerance; the file is kept as
    ``*.failed.onnx`` for inspection."""


@dataclass
class ExportResult:
    """What an export wrote and measured. ``parity``: ``{output: {max_abs, max_rel, bound}}``."""

    path: str
    method: int
    precision: str
    opset: int
    batch: int | None
    size_bytes: int
    export_seconds: float
    verify_seconds: float
    atol: float
    verify_batches: list
    parity: dict = field(default_factory=dict)
    passed: bool = True
    sidecar: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class _OutputTuple(torch.nn.Module):
    """The model with its dict outputs as a tuple in ``output_names`` order (ONNX outputs
    are positional)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.names = output_names(model.method)

    def forward(self, image):
        out = self.model(image)
        return tuple(out[n] for n in self.names)


def export_model_copy(model: SfSNetModel) -> SfSNetModel:
    """A float32 CPU eval copy of ``model`` whose shading runs the reference op (the form
    that exports as standard operators); the caller's model is not touched."""
    if not isinstance(model, SfSNetModel):
        raise ValueError(f"model: expected an SfSNet model (build_model / weights.load), got {type(model).__name__}")
    return eager_reference(model).cpu().float().eval()


def _versions() -> dict:
    import onnx
    import onnxruntime

    versions = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import onnxslim

        versions["onnxslim"] = onnxslim.__version__
    except ImportError:
        pass
    return versions


def trace_to_onnx(model: SfSNetModel, *, opset: int = DEFAULT_OPSET, batch: int | None = None):
    """The ONNX ``ModelProto`` of ``model`` (a copy made by :func:`export_model_copy`);
    ``batch=None`` gives a dynamic batch dimension named ``batch``."""
    import onnx

    wrapper = _OutputTuple(model).eval()
    names = wrapper.names
    example = torch.rand(batch or 2, 3, INPUT_SIZE, INPUT_SIZE)
    dynamic = None if batch else {n: {0: "batch"} for n in [INPUT_NAME, *names]}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (example,), buf, input_names=[INPUT_NAME], output_names=names,
                          opset_version=opset, dynamic_axes=dynamic, do_constant_folding=True, dynamo=False)
    return onnx.load_from_string(buf.getvalue())


def simplify(proto):
    """onnxslim's graph clean-up (constant folding, dead nodes, fusions); names kept."""
    import onnxslim

    return onnxslim.slim(proto)


def set_metadata(proto, meta: dict) -> None:
    """Replace the ``metadata_props`` of ``proto`` by ``meta`` (values JSON unless str)."""
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value)


def export_metadata(model: SfSNetModel, *, opset, precision, batch, source_sha256=None, extra=None) -> dict:
    """The metadata written into the file and its JSON sidecar."""
    meta = {
        "format": "sfs_fast.onnx",
        "method": str(model.method),
        "slug": model.spec.slug,
        "config": {k: v for k, v in model.config.to_dict().items() if k != "shading_backend"},
        "input": {"name": INPUT_NAME, "shape": ["batch" if batch is None else batch, *INPUT["shape"]],
                  "dtype": "float32", "layout": INPUT["layout"], "color": INPUT["color"], "range": INPUT["range"]},
        "output_names": output_names(model.method),
        "sh_convention": CONVENTION,
        "normal_convention": NORMAL_CONVENTION,
        "opset": str(opset),
        "precision": precision,
        "io_dtype": "float32",
        "source_sha256": source_sha256 or "none (weights not from a file)",
        "exporter": EXPORTER,
        "versions": _versions(),
    }
    meta.update(extra or {})
    return meta


def random_images(batch: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform random ``[batch,3,128,128]`` float32 images in [0,1]."""
    return rng.random((batch, 3, INPUT_SIZE, INPUT_SIZE), dtype=np.float32)


def compare_outputs(ort_out: dict, ref_out: dict, atol: float, criterion: str = "max") -> dict:
    """Per output ``{max_abs, max_rel, mean_abs, bound, ok}`` (see the module docstring),
    from :func:`sfs_fast.precision.output_error`; ``criterion`` says which of max_abs or
    mean_abs must stay within the bound."""
    report = {}
    for name, ref in ref_out.items():
        err = output_error(ort_out[name], ref)
        if err["shape"]:
            report[name] = {"max_abs": float("inf"), "max_rel": float("inf"), "mean_abs": float("inf"),
                            "bound": atol, "ok": False, "note": err["shape"]}
            continue
        scale, diff, mean = err["ref_max_abs"], err["max_abs"], err["mean_abs"]
        bound = atol * max(1.0, scale)
        measured = mean if criterion == "mean" else diff
        report[name] = {"max_abs": diff, "max_rel": diff / scale if scale > 0 else diff, "mean_abs": mean,
                        "bound": bound, "ok": bool(measured <= bound)}
    return report


def verify(path, model: SfSNetModel, *, batches=(1, 5), atol=1e-4, seed=None, inputs=None,
           criterion="max") -> dict:
    """Run ``path`` in ONNX Runtime (CPU) and ``model`` in PyTorch on fresh random images at
    each batch size; returns ``{output: {max_abs, max_rel, bound, ok}}``, the worst over the
    batches. ``inputs(batch, rng)`` makes the images (default :func:`random_images`)."""
    runner = OnnxRunner(path, device="cpu", threads=torch.get_num_threads())
    rng = np.random.default_rng(seed)
    make = inputs or random_images
    worst = {}
    for b in batches:
        x = make(b, rng)
        with torch.no_grad():
            ref = {k: v.numpy() for k, v in model(torch.from_numpy(x)).items()}
        report = compare_outputs(runner.run(x), {n: ref[n] for n in runner.output_names}, atol, criterion)
        for name, r in report.items():
            if name not in worst:
                worst[name] = r
                continue
            w = worst[name]
            w["max_abs"], w["max_rel"] = max(w["max_abs"], r["max_abs"]), max(w["max_rel"], r["max_rel"])
            w["mean_abs"], w["bound"] = max(w["mean_abs"], r["mean_abs"]), min(w["bound"], r["bound"])
            w["ok"] = w["ok"] and r["ok"]
    return worst


def format_parity(parity: dict) -> list[str]:
    """One line per output, as the command prints them."""
    width = max(len(n) for n in parity)
    return [f"  {n:<{width}}  max abs {r['max_abs']:.2e}  rel {r['max_rel']:.2e}  mean abs {r['mean_abs']:.1e}  "
            f"(bound {r['bound']:.1e})  "
            f"{'ok' if r['ok'] else 'FAIL'}" for n, r in parity.items()]


def check_output_path(path) -> Path:
    """``path`` as a Path whose folder exists and is writable; ValueError otherwise."""
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"{path}: the output must end in .onnx")
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder")
    if not folder.is_dir():
        raise ValueError(f"{folder}: output folder does not exist")
    try:  # os.access misses read-only mounts and runs as root: try a real file
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:
        raise ValueError(f"{folder}: output folder is not writable") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{path}: exists and is not writable")
    return path


def export_onnx(model: SfSNetModel, path, *, opset: int = DEFAULT_OPSET, batch: int | None = None,
                precision: str = "fp32", simplify_graph: bool = True, atol: float | None = None,
                verify_batches=None, seed=None, source_sha256: str | None = None, sidecar: bool = True,
                calibration=None, int8_layers: str = "budget", log=print) -> ExportResult:
    """Export ``model`` to ``path``, verify it, and write metadata (and a JSON sidecar
    ``<stem>.json`` unless ``sidecar=False``).

    Args:
        model: an SfSNet model of any method (its weights, config and upsampling kept).
        path: destination ``.onnx``; written only once verification passed (atomically).
        opset: ONNX opset, :data:`MIN_OPSET` to :data:`MAX_OPSET`.
        batch: a fixed batch size, or None for a dynamic batch dimension.
        precision: ``fp32``, ``fp16`` (half weights and activations, float32 inputs and
            outputs) or ``int8`` (static QDQ quantization of the convolutions).
        simplify_graph: run onnxslim on the graph.
        atol: parity bound (default :data:`DEFAULT_ATOL` of the precision).
        verify_batches: batch sizes to verify at (default ``(1, 5)``, or ``(B, B)`` with two
            fresh draws for a fixed batch ``B``).
        source_sha256: hash of the checkpoint the weights came from (for the metadata).
        calibration: int8 only, ``[N,3,128,128]`` float32 images (default
            :func:`sfs_fast.export.quantize.calibration_images`).
        int8_layers: int8 only, which convolutions are quantized:
            ``budget`` (within the accuracy budget) or ``all``
            (:data:`sfs_fast.plan.INT8_LAYERS`).
        log: a ``print``-like callable for progress lines, or None for silence.

    Returns an :class:`ExportResult`. Raises :class:`ParityError` (the file renamed
    ``*.failed.onnx``) when ONNX Runtime and PyTorch disagree beyond ``atol``.
    """
    opset, batch, atol, verify_batches = _check_export_args(precision, opset, batch, atol, verify_batches,
                                                            int8_layers)
    path = check_output_path(path)
    say = log or (lambda *a, **k: None)
    ref = export_model_copy(model)
    t0 = time.perf_counter()
    proto = _build_graph(ref, opset=opset, batch=batch, precision=precision, simplify_graph=simplify_graph,
                         calibration=calibration, int8_layers=int8_layers)
    meta = export_metadata(ref, opset=opset, precision=precision, batch=batch, source_sha256=source_sha256,
                           extra={"int8_layers": int8_layers} if precision == "int8" else None)
    set_metadata(proto, meta)
    _check_graph(proto)
    export_seconds = time.perf_counter() - t0
    result = ExportResult(str(path), ref.method, precision, opset, batch, 0, export_seconds, 0.0,
                          atol, list(verify_batches))
    _verify_and_write(proto, meta, ref, path, result, seed=seed, say=say)
    result.size_bytes = path.stat().st_size
    if sidecar:
        side = path.with_suffix(".json")
        text = json.dumps({**meta, "file": path.name, "size_bytes": result.size_bytes}, indent=2) + "\n"
        atomic_write(side, lambda f: f.write(text.encode()))
        result.sidecar = str(side)
    say(f"wrote {path} (method {ref.method}, {precision}, opset {opset}, "
        f"{'dynamic batch' if batch is None else f'batch {batch}'}, {result.size_bytes / 1e6:.1f} MB, "
        f"export {export_seconds:.1f} s, verify {result.verify_seconds:.1f} s)")
    say(f"parity vs PyTorch at batch {', '.join(map(str, verify_batches))} (atol {atol:g}):")
    for line in format_parity(result.parity):
        say(line)
    return result


def _check_export_args(precision, opset, batch, atol, verify_batches, int8_layers):
    """The export settings checked and defaulted: ``(opset, batch, atol, verify_batches)``."""
    if precision not in ONNX_PRECISIONS:
        raise ValueError(f"precision: expected one of {ONNX_PRECISIONS}, got {precision!r}")
    if int8_layers not in INT8_LAYERS:
        raise ValueError(f"int8_layers: expected one of {', '.join(INT8_LAYERS)}, got {int8_layers!r}")
    opset = int(opset)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset: {opset} is not supported; use {MIN_OPSET} to {MAX_OPSET} (default {DEFAULT_OPSET})")
    if batch is not None and int(batch) < 1:
        raise ValueError(f"batch: must be a positive integer, got {batch}")
    batch = None if batch is None else int(batch)
    atol = DEFAULT_ATOL[precision] if atol is None else float(atol)
    if verify_batches is None:
        verify_batches = (1, 5) if batch is None else (batch, batch)
    elif batch is not None and any(b != batch for b in verify_batches):
        raise ValueError(f"verify_batches: a batch-{batch} export runs only batch {batch}")
    return opset, batch, atol, verify_batches


def _build_graph(ref, *, opset, batch, precision, simplify_graph, calibration, int8_layers):
    """The traced, simplified and precision-converted ``ModelProto`` of ``ref``."""
    proto = trace_to_onnx(ref, opset=opset, batch=batch)
    if simplify_graph:
        proto = simplify(proto)
    if precision == "fp16":
        from sfs_fast.export.quantize import to_float16

        proto = to_float16(proto)
    elif precision == "int8":
        from sfs_fast.export.quantize import calibration_images, quantize_int8

        if calibration is None:
            calibration = calibration_images()
        proto = quantize_int8(proto, calibration, batch=batch, layers=int8_layers)
    return proto


def _check_graph(proto) -> None:
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise RuntimeError(f"onnx.checker rejects the exported graph: {str(exc).splitlines()[0]}") from exc


def _verify_and_write(proto, meta, ref, path: Path, result: ExportResult, *, seed, say) -> None:
    """Verify ``proto`` in ONNX Runtime against ``ref`` and write it to ``path`` with the
    measured parity in its metadata (atomically); on a failure keep it as
    ``*.failed.onnx`` and raise :class:`ParityError`."""
    import onnx

    from sfs_fast.samples import face_like_images

    precision, atol = result.precision, result.atol
    with atomic_destination(path) as tmp:
        onnx.save(proto, str(tmp))
        t1 = time.perf_counter()
        parity = verify(tmp, ref, batches=result.verify_batches, atol=atol, seed=seed,
                        inputs=face_like_images if precision == "int8" else None, criterion=CRITERION[precision])
        result.verify_seconds = time.perf_counter() - t1
        result.parity, result.passed = parity, all(r["ok"] for r in parity.values())
        meta["parity"] = {"atol": atol, "criterion": CRITERION[precision], "batches": list(result.verify_batches),
                          "inputs": "face-like synthetic" if precision == "int8" else "uniform random",
                          "outputs": {n: {k: r[k] for k in ("max_abs", "max_rel", "mean_abs")}
                                      for n, r in parity.items()}}
        set_metadata(proto, meta)
        if not result.passed:
            failed = path.with_name(f"{path.stem}.failed.onnx")
            with atomic_destination(failed) as failed_tmp:
                onnx.save(proto, str(failed_tmp))
            result.path = str(failed)
            for line in format_parity(parity):
                say(line)
            bad = ", ".join(n for n, r in parity.items() if not r["ok"])
            raise ParityError(f"method {ref.method} {precision}: ONNX Runtime differs from PyTorch beyond "
                              f"atol {atol:g} on {bad}; kept as {failed}")
        onnx.save(proto, str(tmp))  # again, now with the parity in its metadata


def export_session(model: SfSNetModel, path=None, *, device="cpu", threads=None, providers=None,
                   **export_options) -> OnnxRunner:
    """Export ``model`` (verified, :func:`export_onnx`) and open it in an :class:`OnnxRunner`:
    the ``Decomposer``'s ``onnx`` backend for a model. With ``path=None`` the file goes to a
    temporary folder that is removed once the session holds the model."""
    return _export_and_open(model, path, lambda f: OnnxRunner(f, device=device, threads=threads, providers=providers),
                            export_options)


def export_openvino_session(model: SfSNetModel, path=None, *, precision="fp32", threads=None):
    """Export ``model`` to fp32 ONNX (verified) and compile it with OpenVINO at ``precision``:
    the ``Decomposer``'s ``openvino`` backend. bf16 keeps the layers the PyTorch bf16 path
    keeps in float32 (:func:`~sfs_fast.export.openvino_runner.trunk_scopes`, cut by ONNX scope:
    :class:`sfs_fast.export.openvino_runner.OpenVinoRunner`). ``path`` as in :func:`export_session`."""
    from sfs_fast.export.openvino_runner import OpenVinoRunner, openvino_module, trunk_scopes

    openvino_module()  # the missing package in one line, before seconds of export
    scopes = trunk_scopes(model)
    return _export_and_open(model, path, lambda f: OpenVinoRunner(f, precision, threads=threads, bf16_scopes=scopes),
                            {"precision": "fp32"})


def _export_and_open(model, path, open_file, export_options):
    """``open_file`` of ``model`` exported with ``export_options``: at ``path``; else the
    file of the export cache (:mod:`sfs_fast.export.export_cache`), once more after a
    cached file that does not open; else in a temporary folder, removed once it is open."""
    import shutil

    from sfs_fast.export import export_cache

    export_options.setdefault("verify_batches", (1, 2))
    if path is not None:
        export_onnx(model, path, log=None, **export_options)
        return open_file(path)
    for _ in range(2):
        cached, fresh = export_cache.cached_export(
            model, export_options, lambda target: export_onnx(model, target, log=None, sidecar=False,
                                                              **export_options))
        if cached is None:
            break
        try:
            return open_file(cached)
        except (RuntimeError, ValueError, OSError):
            export_cache.forget(cached)
            if fresh:  # the file just exported does not open: exporting again will not help
                raise
    folder = tempfile.mkdtemp(prefix="sfs_fast_onnx_")
    try:
        target = os.path.join(folder, f"method{model.method}.onnx")
        export_onnx(model, target, log=None, sidecar=False, **export_options)
        return open_file(target)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
