"""The exported ONNX files that the ``onnx`` and ``openvino`` backends open for a model, kept
on disk so that only the first run for given weights pays for the export and its parity
check (about 6 s for method 0 here; the inference that follows takes about 1 s).

    path, fresh = cached_export(model, {"precision": "fp32"}, export)   # export(target) on a miss

The file's name is a hash of :func:`export_key`: the weights (:func:`sfs_fast.plan_cache.weights_fingerprint`),
the export options, the versions of sfs_fast, torch, onnx and onnxslim, and the sha256 of the
package's Python sources (the model code that is traced can change within one version).
Location: ``$SFS_FAST_EXPORT_CACHE`` when set (``off``, ``0`` or ``none`` turns it off: each
run exports into a temporary folder, as before), else ``exports/`` under the package's cache
folder (:func:`sfs_fast.download.cache_dir`). Files are written whole (an atomic rename, after
the parity check passed) and a file that does not open is exported again. Delete the folder
to clear it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

CACHE_ENV = "SFS_FAST_EXPORT_CACHE"
FORMAT_VERSION = 1


def exports_dir() -> Path | None:
    """The folder of the cached files, or None when the cache is off."""
    from sfs_fast.plan_cache import cache_folder

    return cache_folder(CACHE_ENV, "exports")


def sources_sha256() -> str:
    """sha256 over the package's Python files (relative name and bytes, in name order)."""
    import sfs_fast
    import sfs_fast.export

    h = hashlib.sha256()
    for root in sorted({Path(sfs_fast.__file__).parent, Path(sfs_fast.export.__file__).parent}):
        for file in sorted(root.rglob("*.py")):
            h.update(f"{root.name}/{file.relative_to(root)}\n".encode())
            h.update(file.read_bytes())
    return h.hexdigest()


def export_key(model, export_options: dict) -> dict:
    """Everything the exported file depends on (JSON-ready)."""
    from sfs_fast.plan_cache import package_version, weights_fingerprint

    return {"format": FORMAT_VERSION, "weights": weights_fingerprint(model),
            "options": {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(export_options.items())},
            "versions": {name: package_version(name) for name in ("sfs_fast", "torch", "onnx", "onnxslim")},
            "sources": sources_sha256()}


def cached_export(model, export_options: dict, export) -> tuple[Path | None, bool]:
    """``(path, fresh)``: the cached file of ``model`` exported with ``export_options``;
    on a miss ``export(target)`` writes it (atomically, verified) first and ``fresh`` is
    True. ``(None, False)`` when the cache is off or its folder cannot be written (the
    caller exports into a temporary folder)."""
    from sfs_fast.plan_cache import key_digest

    folder = exports_dir()
    if folder is None:
        return None, False
    path = folder / f"method{model.method}-{key_digest(export_key(model, export_options))}.onnx"
    if path.is_file():
        return path, False
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None, False
    if not os.access(folder, os.W_OK):
        return None, False
    export(path)
    return path, True


def forget(path) -> None:
    """Remove a cached file that did not open, so the next run exports it again."""
    try:
        Path(path).unlink()
    except OSError:
        pass


__all__ = ["CACHE_ENV", "exports_dir", "export_key", "cached_export", "forget", "sources_sha256"]
