"""``Decomposer``: the one inference path that every command, benchmark and example uses.

    dec = Decomposer(method=3, backend="fused")          # or weights="ckpt.safetensors"
    dec = Decomposer(model, plan=resolve_plan(precision="bf16"))   # the same, from a plan
    out = dec.decompose(images)                           # images [B,3,128,128] RGB in [0,1]
    out["normal"], out["albedo"], out["light"], ...       # float32 CPU tensors
    dec.plan                                              # the RunPlan that runs

How it runs is a :class:`sfs_fast.plan.RunPlan` (backend, precision, device, shading, ONNX
settings); the keyword settings (``backend=``, ``precision=``, ...) build one with
:func:`sfs_fast.plan.resolve_plan`. Backends:

- ``eager``: the model as built (reference shading, no rewrites): the baseline.
- ``fused``: BatchNorm folded into convolutions, the heads' first 1x1 conv before their
  upsampling, channels-last, the fused shading op (``sfs_fast.optimize``; each switchable).
- ``compile``: ``torch.compile`` of the fused model (the first call compiles).
- ``onnx``: an ONNX Runtime session (``sfs_fast.export.OnnxRunner``) on an exported file.
- ``openvino``: OpenVINO's CPU plugin on the exported fp32 file
  (``sfs_fast.export.openvino_runner.OpenVinoRunner``; the ``openvino`` extra): fp32, or bf16
  with the float32 islands of the PyTorch bf16 path (the graph cut into pieces by precision).

Precisions (see :mod:`sfs_fast.precision`): ``fp32``; ``bf16`` (fused or compile: the
residual trunks' and a residue head's convolutions in bf16; the other decoders, the BatchNorm
parameters and the shading in float32: :func:`sfs_fast.precision.to_low_precision`);
``fp16`` (the same on CUDA; an fp16 ONNX file with backend onnx); ``int8`` (backend onnx:
static QDQ int8, :func:`sfs_fast.export.quantize.quantize_int8`); ``auto``:
:func:`auto_plan` takes the fastest, measured here, of the pairs of
:func:`sfs_fast.precision.auto_candidates` that meet the accuracy budget against float32 on
:func:`sfs_fast.samples.check_images`, and caches that decision
(:mod:`sfs_fast.plan_cache`); with one candidate it decides without running anything.
``dec.auto_report`` says what was tried, ``dec.plan_reason`` says it in one line.

The Python default precision is ``fp32`` (exact float32, nothing measured): a library call
does what it says. The commands (``sfs-decompose``, ``sfs-relight``, ``sfs-interpolate``)
default to ``auto``; ``Decomposer(model, precision="auto")`` or
``plan=resolve_plan(precision="auto")`` asks for it here, with the same cache.
"""
from __future__ import annotations

import dataclasses
import time
import warnings

import torch

from sfs_fast.models import build_model, method_id, output_names
from sfs_fast.optimize import FUSED_OPTIONS, eager_reference, optimize_for_inference
from sfs_fast.plan import BACKENDS, FUSED_BACKENDS, LOW_PRECISION_CPU_MICRO_BATCH, RunPlan, resolve_plan

INPUT_SIZE = 128
RANDOM_WEIGHTS_NOTE = "no trained weights given: the model has random weights, so the outputs are not meaningful"
__all__ = ["Decomposer", "auto_plan", "describe_plan_choice", "load_model", "BACKENDS", "INPUT_SIZE",
           "LOW_PRECISION_CPU_MICRO_BATCH"]


class Decomposer:
    """Holds a model and a :class:`~sfs_fast.plan.RunPlan`; ``decompose(batch) -> dict``.

    Args:
        model: a built model (``build_model`` or ``weights.load``); or give ``weights`` or
            ``method`` and the model is loaded or built here.
        method: method id or slug, used when no model or weights are given, and checked
            against the weights when both are.
        weights: a checkpoint (anything :func:`sfs_fast.weights.load_any` takes).
        onnx: an exported ``.onnx`` file to run (alone), or where the ``onnx`` backend writes
            the model's export (with a model or weights; a temporary file when omitted).
        plan: how to run it (:func:`sfs_fast.plan.resolve_plan`); or the keyword settings
            ``backend``, ``device``, ``precision``, ``threads``, ``optimizations``,
            ``micro_batch``, which build one (see :class:`~sfs_fast.plan.RunPlan`). The
            default precision is ``fp32`` (exact float32); ``precision="auto"`` chooses the
            fastest path within the accuracy budget here (module docstring). For an
            ``.onnx`` file the precision is the file's own unless one is given.

    ``notes``: one-line notes for the user about this run (demo or random weights, emulated
    precision, a first auto decision), also issued as warnings where they are; commands
    print them. ``auto_report``: how precision auto decided (None otherwise);
    ``plan_reason``: why this plan runs, one line (:func:`describe_plan_choice`).
    """

    def __init__(self, model=None, *, method=None, weights=None, onnx=None, plan: RunPlan | None = None,
                 backend=None, device=None, threads=None, optimizations=None, precision=None, micro_batch=None):
        self.notes: list[str] = []
        file_only = onnx is not None and model is None and weights is None
        keywords = {"backend": backend, "device": device, "threads": threads, "optimizations": optimizations,
                    "precision": precision, "micro_batch": micro_batch}
        if plan is None:
            plan = resolve_plan(**{**keywords, "device": device or "cpu"}, onnx_file=file_only)
        elif any(v is not None for v in keywords.values()):
            raise ValueError("plan: give a plan or the keyword settings (backend=, precision=, ...), not both")
        if torch.device(plan.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device: CUDA was asked for but torch sees no CUDA device")
        if plan.threads is not None:
            torch.set_num_threads(plan.threads)
        self.auto_report = None
        self.runner = None
        self.plan_reason = "as requested"
        if plan.is_auto:
            chosen, self.auto_report = _choose_auto(self._resolve_model(model, method, weights), plan, onnx)
            self._take(chosen)
            if self.auto_report["decided"] == "measured":
                where = self.auto_report["cache"] or "nowhere (the plan cache is off)"
                self.notes.append(f"precision auto: {len(self.auto_report['tried'])} paths checked against fp32 "
                                  f"and timed in {self.auto_report['decision_s']:.1f} s (once: the decision "
                                  f"is kept in {where})")
            self.plan_reason = describe_plan_choice(self.auto_report)
        elif file_only:
            self._open_file(onnx, plan, method)
            self.plan_reason = "the ONNX file's own precision" if plan.precision is None else "as requested"
        else:
            self.plan = plan
            self.model = self._resolve_model(model, method, weights)
            self.method = self.model.method
            self.output_names = output_names(self.method)
            self._run = self._prepare(onnx)

    # what runs, as attributes of the plan (read-only: make a new Decomposer to change them)
    backend = property(lambda self: self.plan.backend)
    precision = property(lambda self: self.plan.precision)
    device = property(lambda self: torch.device(self.plan.device))
    threads = property(lambda self: self.plan.threads)
    micro_batch = property(lambda self: self.plan.micro_batch)

    def _take(self, chosen: Decomposer) -> None:
        """Run as ``chosen`` (the candidate auto built and checked) runs."""
        self.plan, self.model, self.method = chosen.plan, chosen.model, chosen.method
        self.output_names, self.runner, self._run = chosen.output_names, chosen.runner, chosen._run
        self.notes += [n for n in chosen.notes if n not in self.notes]

    def _open_file(self, path, plan: RunPlan, method) -> None:
        if plan.backend == "openvino":
            self.runner = _openvino_file_runner(path, plan)
        else:
            from sfs_fast.export import OnnxRunner

            self.runner = OnnxRunner(path, device=plan.device, threads=plan.threads, providers=plan.providers)
        self.method = self.runner.method
        if method is not None and method_id(method) != self.method:
            raise ValueError(f"onnx: {path} holds method {self.method}, not method {method_id(method)}")
        self.model, self._run = None, None
        self.output_names = list(self.runner.output_names)
        meta = self.runner.metadata
        file_precision = meta.get("precision", "fp32")
        if plan.backend == "openvino":  # an fp32 file (the runner checked) compiled at the plan's precision
            file_precision = plan.precision or "fp32"
        elif plan.precision is not None and plan.precision != file_precision:
            raise ValueError(f"precision: {path} is a {file_precision} export, not {plan.precision}")
        layers = (plan.int8_layers or meta.get("int8_layers", "budget")) if file_precision == "int8" else None
        self.plan = dataclasses.replace(plan, precision=file_precision, int8_layers=layers)

    def _resolve_model(self, model, method, weights):
        model, notes = load_model(model, method=method, weights=weights)
        self.notes += notes
        if RANDOM_WEIGHTS_NOTE in notes:  # worth a warning too, for callers that do not print notes
            warnings.warn(RANDOM_WEIGHTS_NOTE, stacklevel=3)
        return model

    def _prepare(self, onnx):
        plan = self.plan
        model = self.model.to(self.device)
        if plan.backend == "eager":
            eager = eager_reference(model).to(self.device).eval()
            return lambda x: eager(x)
        if plan.backend == "onnx":
            from sfs_fast.export import export_session

            self.runner = export_session(model, path=onnx, device=plan.device, threads=plan.threads,
                                         providers=plan.providers, precision=plan.precision,
                                         int8_layers=plan.int8_layers or "budget")
            return None
        if plan.backend == "openvino":
            from sfs_fast.export import export_openvino_session

            self.runner = export_openvino_session(model, path=onnx, precision=plan.precision, threads=plan.threads)
            return None
        fused = optimize_for_inference(model, **plan.fused_options())
        if plan.precision in ("bf16", "fp16"):
            from sfs_fast.precision import TORCH_DTYPES, capabilities, to_low_precision

            if not capabilities(self.device)[plan.precision]:
                self.notes.append(f"{plan.precision} has no hardware support on this {self.device.type} "
                                  "(emulated: slower than fp32)")
                warnings.warn(self.notes[-1], stacklevel=4)
            fused = to_low_precision(fused, TORCH_DTYPES[plan.precision])
        if plan.backend == "compile":
            fused = torch.compile(fused)
        if not {**FUSED_OPTIONS, **dict(plan.optimizations)}["channels_last"]:
            return lambda x: fused(x)
        return lambda x: fused(x.contiguous(memory_format=torch.channels_last))

    def decompose(self, images) -> dict:
        """Decompose a batch: ``images`` ``[B,3,128,128]`` float RGB in [0,1] (tensor or
        NumPy). Returns a dict of contiguous float32 CPU tensors by output name."""
        x = torch.as_tensor(images)
        if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"images: expected [B,3,{INPUT_SIZE},{INPUT_SIZE}], got {tuple(x.shape)}")
        x = x.float()
        if self.runner is not None:
            outs = self.runner.run(x.numpy())
            return {k: torch.from_numpy(v) for k, v in outs.items()}
        x = x.to(self.device)
        step = self.micro_batch
        with torch.inference_mode():
            if step is None or len(x) <= step:
                outs = self._run(x)
            else:
                parts = [self._run(x[i:i + step]) for i in range(0, len(x), step)]
                outs = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return {k: v.float().cpu().contiguous() for k, v in outs.items()}

    __call__ = decompose

    def __repr__(self):
        return f"Decomposer(method={self.method}, plan={self.plan})"


def _openvino_file_runner(path, plan: RunPlan):
    """An exported fp32 file on OpenVINO; bf16 keeps in float32 what the PyTorch bf16 path
    of the file's method keeps (the scopes are those of any model of the method)."""
    from sfs_fast.export.openvino_runner import OpenVinoRunner, trunk_scopes

    return OpenVinoRunner(path, plan.precision or "fp32", threads=plan.threads,
                          bf16_scopes=lambda method: trunk_scopes(build_model(method)))


def load_model(model=None, *, method=None, weights=None):
    """The model a :class:`Decomposer` runs, without building its backend: ``model`` as
    given (checked against ``method``), else ``weights`` loaded (anything
    :func:`sfs_fast.weights.load_any` takes), else the method's default weights, else a
    random model. Returns ``(model in eval mode, notes)``: one-line notes for the user (demo
    or random weights). An engine that builds its Decomposers elsewhere (Ray actors) loads
    the model once with this and ships it."""
    from sfs_fast import weights as weights_mod

    notes = []
    if model is None and weights is not None:
        model = weights_mod.load_any(weights, method=method)
    elif model is None:
        m = method_id(method if method is not None else 0)
        default = weights_mod.default_weights(m)
        if default is not None:
            model = weights_mod.load(default)
            note = weights_mod.default_weights_note(m)  # the demo weights say what they are
            notes += [note] if note else []
        else:
            notes.append(RANDOM_WEIGHTS_NOTE)
            model = build_model(method if method is not None else 0)
    elif method is not None and method_id(method) != model.method:
        raise ValueError(f"model is method {model.method}, not method {method_id(method)}")
    return model.eval(), notes


# ---------------------------------------------------------------------------------------
# auto


def _candidate_plan(request: RunPlan, backend: str, precision: str) -> RunPlan:
    """The plan of one auto candidate: the request's settings that apply to its backend."""
    fused = backend in FUSED_BACKENDS
    return resolve_plan(backend=backend, precision=precision, device=request.device, threads=request.threads,
                        shading_backend=request.shading_backend if fused else None,
                        optimizations=dict(request.optimizations) if fused else None,
                        micro_batch=request.micro_batch if fused else None,
                        int8_layers=request.int8_layers if precision == "int8" else None,
                        providers=request.providers if backend == "onnx" else None)


def _build_candidate(model, request: RunPlan, pair, onnx) -> Decomposer:
    backend, precision = pair
    return Decomposer(model, plan=_candidate_plan(request, backend, precision),
                      onnx=onnx if backend == "onnx" else None)


def _ms_per_image(dec: Decomposer, images, calls: int) -> float:
    """The fastest of ``calls`` timed calls on ``images``, per image (the fastest is the one
    least disturbed by other work on a shared machine). ``decompose`` returns CPU tensors,
    so a CUDA call has finished when it returns."""
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        dec.decompose(images)
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best / len(images)


def _measure_candidates(model, request: RunPlan, candidates, onnx) -> tuple[Decomposer, dict]:
    """Check every candidate against float32 on the check images, time those within the
    accuracy budget (fp32, the reference precision, counts as within it even where reordered
    sums differ), and return the fastest, with ``{"chosen", "tried", "images"}``: each tried
    candidate's budget report and, when timed, its ``ms_per_image``."""
    from sfs_fast import precision as precision_mod
    from sfs_fast.samples import check_images

    images = check_images(precision_mod.AUTO_CHECK_IMAGES)
    reference = precision_mod.reference_outputs(model, images)
    tried, best, best_ms = [], None, float("inf")
    for pair in candidates:
        entry = {"backend": pair[0], "precision": pair[1], "ms_per_image": None}
        try:
            cand = _build_candidate(model, request, pair, onnx)
            entry.update(precision_mod.check_budget(cand.decompose(images), reference))  # the warm-up call too
            if entry["passed"] or pair[1] == "fp32":
                entry["ms_per_image"] = _ms_per_image(cand, images, precision_mod.AUTO_TIMED_CALLS)
        except Exception as exc:  # a path that cannot be built or run here is not chosen
            entry.update(passed=False, metrics={}, failures=[f"{type(exc).__name__}: {str(exc)[:200]}"])
        entry.pop("budget", None)  # the same for every candidate; the cache key holds it
        tried.append(entry)
        if entry["ms_per_image"] is not None and entry["ms_per_image"] < best_ms:
            best, best_ms = cand, entry["ms_per_image"]
    if best is None:
        raise ValueError("precision auto: no path could be built here: "
                         + "; ".join(f"{t['backend']}-{t['precision']}: {t['failures']}" for t in tried))
    chosen = {"backend": best.plan.backend, "precision": best.plan.precision}
    return best, {"chosen": chosen, "tried": tried, "images": len(images)}


def _choose_auto(model, request: RunPlan, onnx=None) -> tuple[Decomposer, dict]:
    """The candidate ``request`` (precision auto) runs as, and the report of how it was
    decided (``"decided"``: ``only candidate`` without any check, ``cached``, or
    ``measured`` by :func:`_measure_candidates` and then cached: :mod:`sfs_fast.plan_cache`)."""
    from sfs_fast import plan_cache
    from sfs_fast.precision import auto_choices

    candidates, ruled_out = auto_choices(request.backend, request.device)
    about = {"candidates": [list(c) for c in candidates], "ruled_out": ruled_out}
    if len(candidates) == 1:  # nothing to choose between: no model runs for the decision
        chosen = {"backend": candidates[0][0], "precision": candidates[0][1]}
        return (_build_candidate(model, request, candidates[0], onnx),
                {"decided": "only candidate", "chosen": chosen, "tried": [], "images": 0, **about})
    key = plan_cache.decision_key(model, request, candidates)
    stored = plan_cache.read_decision(key)
    pair = (stored["chosen"]["backend"], stored["chosen"]["precision"]) if stored else None
    if pair in candidates:
        try:
            return (_build_candidate(model, request, pair, onnx),
                    {**stored, **about, "decided": "cached", "cache": str(plan_cache.key_path(key))})
        except Exception:  # noqa: BLE001 - a stored choice that no longer builds is decided again
            pass
    t0 = time.perf_counter()
    chosen, report = _measure_candidates(model, request, candidates, onnx)
    report = {**report, **about, "decided": "measured", "decision_s": round(time.perf_counter() - t0, 3)}
    path = plan_cache.write_decision(key, report)
    return chosen, {**report, "cache": None if path is None else str(path)}


def describe_plan_choice(report: dict | None) -> str:
    """One line on why a plan runs, from an auto report (``Decomposer.auto_report``), e.g.
    ``auto: cached; fastest within budget of fused-bf16 41.2 ms/img, fused-fp32 96.0 ms/img``;
    ``as requested`` without one."""
    if not report:
        return "as requested"
    parts = [f"auto: {report['decided']}"]
    timed = [t for t in report.get("tried", []) if t.get("ms_per_image") is not None]
    if len(timed) > 1:
        parts.append("fastest within budget of " + ", ".join(
            f"{t['backend']}-{t['precision']} {t['ms_per_image']:.1f} ms/img" for t in timed))
    for t in report.get("tried", []):
        if t.get("ms_per_image") is None:
            parts.append(f"{t['backend']}-{t['precision']} not taken: {'; '.join(t['failures'][:1])}")
    for r in report.get("ruled_out", []):
        line = (f"{r['backend']}-{r['precision']} not tried: {r['why']}" if r.get("by") == "package"
                else f"{r['precision']} not supported here: {r['why']}")
        if line not in parts:  # bf16 is ruled out once, whichever backends would run it
            parts.append(line)
    return "; ".join(parts)


def auto_plan(model, request: RunPlan | None = None, *, onnx=None) -> tuple[RunPlan, dict]:
    """Resolve precision ``auto``: the concrete :class:`~sfs_fast.plan.RunPlan` that runs
    ``model`` fastest within the accuracy budget here, and the report of how it was decided
    (see :func:`_choose_auto`; the decision is cached like the Decomposer's). ``request``:
    a plan with precision auto (default ``resolve_plan(precision="auto")``: any backend)."""
    request = request or resolve_plan(precision="auto")
    if not request.is_auto:
        raise ValueError(f"request: precision auto expected, got {request.precision}")
    chosen, report = _choose_auto(model.eval(), request, onnx)
    return chosen.plan, report
