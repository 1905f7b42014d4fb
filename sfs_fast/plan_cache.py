"""The cache of precision ``auto``'s decisions: one small JSON file per key, so that only the
first run for given weights, request, machine and software pays for the check and timing.

    key = decision_key(model, request, candidates)   # a JSON-ready dict
    read_decision(key)                                # the stored decision, or None
    write_decision(key, decision)                     # the file's path, or None (no cache)

The key holds everything that changes the outcome:

- ``weights``: the model's class, method and config, and the sha256 of its tensors
  (:func:`sfs_fast.weights.tensors_sha256` over the state dict: the same hash a checkpoint
  records, and it also covers a model built or changed in Python without a file);
- ``request``: the :class:`~sfs_fast.plan.RunPlan` with precision auto (backend, device,
  shading backend, threads, options), the candidates it allows, the accuracy budget and the
  number of check images and timed calls, and the fused path's rewrites
  (:data:`sfs_fast.optimize.FUSED_OPTIONS`: a new one changes what the fused candidates cost);
- ``hardware``: :func:`sfs_fast.precision.capabilities` of the device, the CPU model (or the
  GPU's name and compute capability), and the intra-op thread count (timings depend on it);
- ``versions``: sfs_fast, torch, and ONNX Runtime when a candidate runs on it;
- ``numerics``: what the low-precision candidates compute (:func:`numerics`), which can
  change between two commits of one version.

Location: ``$SFS_FAST_PLAN_CACHE`` when set (``off``, ``0`` or ``none`` turns the cache off:
every run decides anew, nothing is written), else ``plans/`` under the package's cache
folder (:func:`sfs_fast.download.cache_dir`, ``~/.cache/sfs_fast`` by default). Deleting the
folder clears it. The file name is a hash of the key; the file holds the key itself, which
is compared on reading, so a file that does not match, or one that cannot be read or parsed,
is ignored (and rewritten by the next decision), never an error.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from sfs_fast.atomic import atomic_write
from sfs_fast.download import cache_dir
from sfs_fast.optimize import FUSED_OPTIONS

CACHE_ENV = "SFS_FAST_PLAN_CACHE"
OFF_VALUES = ("off", "0", "none", "false", "no")
FORMAT_VERSION = 1  # bump when the decision's meaning changes: old files then miss


def cache_folder(env: str, name: str) -> Path | None:
    """A cache's folder: ``$env`` when set (one of :data:`OFF_VALUES`: None, the cache is
    off), else ``name`` under the package's cache folder. The plan cache's and the export
    cache's (:mod:`sfs_fast.export.export_cache`) rule."""
    override = os.environ.get(env, "").strip()
    if override.lower() in OFF_VALUES:
        return None
    return Path(override).expanduser() if override else cache_dir() / name


def plans_dir() -> Path | None:
    """The folder of the decision files, or None when the cache is off."""
    return cache_folder(CACHE_ENV, "plans")


def hardware(device) -> dict:
    """What the timings and the supported precisions of ``device`` depend on."""
    from sfs_fast.precision import capabilities, cpu_model

    dev = torch.device(device)
    caps = {k: v for k, v in capabilities(dev).items() if k != "why"}
    if dev.type == "cuda" and torch.cuda.is_available():
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        chip = {"gpu": torch.cuda.get_device_name(index),
                "compute_capability": list(torch.cuda.get_device_capability(index))}
    else:
        chip = {"cpu": cpu_model(), "cpus": os.cpu_count()}
    return {"capabilities": caps, **chip, "threads": torch.get_num_threads()}


def runtime_versions(candidates) -> dict:
    """The versions of the software that runs the candidates."""
    import sfs_fast

    versions = {"sfs_fast": sfs_fast.__version__, "torch": torch.__version__}
    for backend, package in (("onnx", "onnxruntime"), ("openvino", "openvino")):
        if any(b == backend for b, _ in candidates):
            versions[package] = package_version(package)
    return versions


def package_version(name: str) -> str | None:
    """The installed version of ``name`` from its metadata (nothing imported), None if absent."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def numerics(model, candidates) -> dict:
    """What the low-precision candidates compute, so that a new rule (another float island,
    another int8 layer set) is decided anew rather than read from a decision made under the
    old one, although the package version is the same: per bf16/fp16 candidate the hash of
    this model's :func:`~sfs_fast.precision.float_islands`, for int8 the hash of the
    quantizer's source (the file that chooses the quantized layers), for openvino the hash
    of its runner's source (the file that cuts the graph into bf16 and float32 pieces)."""
    import importlib.util

    from sfs_fast import precision

    out = {}
    for prec in sorted({p for _, p in candidates if p in ("bf16", "fp16")}):
        out[prec] = _sha256(json.dumps(sorted(precision.float_islands(model, precision.TORCH_DTYPES[prec]))))
    # the files that choose what runs in low precision: read, not imported (onnx stays unloaded)
    for key, module, wanted in (("int8", "sfs_fast.export.quantize", lambda b, p: p == "int8"),
                                ("openvino", "sfs_fast.export.openvino_runner", lambda b, p: b == "openvino")):
        if any(wanted(b, p) for b, p in candidates):
            spec = importlib.util.find_spec(module)
            out[key] = _sha256(Path(spec.origin).read_text()) if spec and spec.origin else None
    return out


def weights_fingerprint(model) -> dict:
    """The model's identity: class, method, config and the sha256 of its tensors."""
    from sfs_fast.weights import tensors_sha256

    config = getattr(model, "config", None)
    return {"class": type(model).__name__, "method": getattr(model, "method", None),
            "config": config.to_dict() if hasattr(config, "to_dict") else None,
            "tensors_sha256": tensors_sha256(model.state_dict())}


def decision_key(model, request, candidates) -> dict:
    """The key of ``auto``'s decision for ``model`` under ``request`` (a RunPlan with
    precision auto) choosing among ``candidates`` (``(backend, precision)`` pairs)."""
    from sfs_fast import precision

    return {"format": FORMAT_VERSION, "weights": weights_fingerprint(model), "request": request.to_dict(),
            "candidates": [list(c) for c in candidates], "budget": dict(precision.BUDGET),
            "check_images": precision.AUTO_CHECK_IMAGES, "timed_calls": precision.AUTO_TIMED_CALLS,
            "fused_options": dict(FUSED_OPTIONS), "hardware": hardware(request.device),
            "versions": runtime_versions(candidates),
            "numerics": numerics(model, candidates)}


def _canonical(key: dict) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def key_digest(key: dict) -> str:
    """The first 32 hex digits of the sha256 of ``key`` as canonical JSON: a cache file's name."""
    return _sha256(_canonical(key))[:32]


def key_path(key: dict) -> Path | None:
    """The file of ``key``'s decision (None when the cache is off)."""
    folder = plans_dir()
    if folder is None:
        return None
    return folder / f"{key_digest(key)}.json"


def read_decision(key: dict) -> dict | None:
    """The decision stored for ``key``; None when there is none, the cache is off, or the
    file is unreadable, not JSON, of another format or for another key."""
    path = key_path(key)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        decision = data["decision"]
        chosen = decision["chosen"]
        if data.get("key") != json.loads(_canonical(key)) or not (
                isinstance(chosen.get("backend"), str) and isinstance(chosen.get("precision"), str)):
            return None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return decision


def write_decision(key: dict, decision: dict) -> Path | None:
    """Store ``decision`` (JSON-ready) for ``key`` atomically; returns the file, or None when
    the cache is off or cannot be written (a read-only home costs a re-check, not a run)."""
    path = key_path(key)
    if path is None:
        return None
    record = {"key": key, "decision": {**decision, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}}
    text = json.dumps(record, indent=1, sort_keys=True) + "\n"
    try:
        atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    except OSError:
        return None
    return path


__all__ = ["CACHE_ENV", "cache_folder", "plans_dir", "package_version", "key_digest", "hardware", "runtime_versions", "weights_fingerprint", "decision_key",
           "key_path", "read_decision", "write_decision"]
