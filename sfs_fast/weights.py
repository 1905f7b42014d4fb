"""Checkpoints: safetensors with JSON metadata, and the importers of other formats.

``save(model, path, **metadata)`` writes every tensor of the model's state dict (buffers
included) and metadata that says how to rebuild it (method, config, SH and normal
conventions, input size); ``load(path)`` rebuilds the model. Pickle files are never
executed: ``.pth``/``.pkl`` files go through ``torch.load(weights_only=True)`` in
:mod:`sfs_fast.importers`.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from sfs_fast.models import METHODS, SkipNet, build_model, method_id
from sfs_fast.sh import CONVENTION

FORMAT = "sfs_fast"
FORMAT_VERSION = "1"
INPUT = {"shape": [3, 128, 128], "layout": "NCHW", "color": "RGB", "range": [0.0, 1.0]}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit what was asked of it."""


def describe_method(m: int) -> str:
    return f"method {m} ({METHODS[m].slug})"


def save(model: torch.nn.Module, path, *, dtype: torch.dtype | None = None, **metadata) -> Path:
    """Write ``model`` to ``path`` (safetensors) atomically; returns the path.

    ``dtype`` (e.g. ``torch.float16``) stores floating tensors in that type to save space;
    ``load`` returns them as float32. Extra ``metadata`` values are stored as JSON.
    """
    path = Path(path)
    state = {}
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        state[name] = t.contiguous().clone()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": "skipnet" if isinstance(model, SkipNet) else "sfsnet",
        "config": json.dumps(model.config.to_dict()),
        "convention": json.dumps(CONVENTION),
        "input": json.dumps(INPUT),
        "stored_dtype": str(dtype or "as-trained").replace("torch.", ""),
    }
    if not isinstance(model, SkipNet):
        meta["method"] = str(model.method)
        meta["slug"] = model.spec.slug
    for key, value in metadata.items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_metadata(path) -> dict:
    """The metadata of a checkpoint written by :func:`save` (JSON values decoded)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({exc})") from None
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an sfs_fast checkpoint (convert it with sfs-convert)")
    meta = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    return meta


def load(path, method=None, **config_overrides) -> torch.nn.Module:
    """Rebuild the model stored at ``path``.

    ``method``, when given, must match the checkpoint's method (a checkpoint of one method
    never loads as another). ``config_overrides`` change run-time fields only
    (``shading_backend``); architecture fields must match the checkpoint.
    """
    meta = read_metadata(path)
    config = dict(meta.get("config") or {})
    for key, value in config_overrides.items():
        if key in config and key != "shading_backend" and config[key] != value:
            raise CheckpointError(f"{path}: stored with {key}={config[key]!r}, cannot load with {key}={value!r}")
        config[key] = value
    if meta.get("architecture") == "skipnet":
        if method is not None:
            raise CheckpointError(f"{path}: holds a SkipNet, not {describe_method(method_id(method))}")
        model = SkipNet(normalize=config.get("normalize", True), shading_backend=config.get("shading_backend", "auto"))
    else:
        stored = int(meta["method"])
        if method is not None and method_id(method) != stored:
            raise CheckpointError(
                f"{path}: holds {describe_method(stored)}, not {describe_method(method_id(method))}")
        model = build_model(stored, **config)
    state = load_file(str(path))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}")
        state[name] = tensor.to(expected[name].dtype)
    model.load_state_dict(state)
    model.checkpoint_metadata = meta
    # Modules whose weights came from a file (an import records them; a trained checkpoint
    # holds all); the trainer freezes only these.
    model.loaded_modules = list(meta.get("loaded_modules") or [n for n, _ in model.named_children()])
    return model.eval()


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_any(path, method=None, **config) -> torch.nn.Module:
    """Load a model from any supported weight file, by content and suffix:
    our safetensors, the Caffe ``.caffemodel.h5``, or a PyTorch ``.pth``/``.pkl``/``.pt``."""
    from sfs_fast import importers

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"\x89HDF"):
        return importers.import_caffe_h5(path, method=method, **config)
    if path.suffix in (".pth", ".pkl", ".pt") or head.startswith(b"PK") or head[:1] == b"\x80":
        return importers.import_pth(path, method=method, **config)
    return load(path, method=method, **config)


# Bundled weights (the demo checkpoints trained by ``sfs-train``), by method id.
WEIGHTS_DIR = Path(__file__).parent / "data"


def default_weights(method: int):
    """The bundled checkpoint of ``method``, or None when the package ships none."""
    candidate = WEIGHTS_DIR / f"method{method_id(method)}_demo.safetensors"
    return candidate if candidate.is_file() else None
