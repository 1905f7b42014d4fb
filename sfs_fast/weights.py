"""Checkpoints: safetensors with JSON metadata, named weights, and loading of any format.

``save(model, path, **metadata)`` writes every tensor of the model's state dict (buffers
included), metadata that says how to rebuild it (method, config, SH and normal conventions,
input size) and a sha256 of the tensors; ``load(spec)`` rebuilds the model from a file or a
registered name. Pickle files are never executed: ``.pth``/``.pkl`` files go through
``torch.load(weights_only=True)`` in :mod:`sfs_fast.importers`.

Named weights (``REGISTRY``): ``sfsnet`` is the official SfSNet (Caffe release, fetched once
into the cache by :func:`fetch`, checked by git blob id, converted by the exact Caffe
importer); ``demo-0`` ... ``demo-7`` are the bundled checkpoints, one per method, trained by
``sfs-train`` on synthetic renders (``tools/bundle_weights.py``; 1-7 stored against ``demo-0``).

Imports point one way: ``weights -> importers -> errors`` and ``weights -> download ->
errors``; neither importers nor download import this module.

Every model this module returns carries ``model.weights_source``:
``{"name": registry name or None, "path": file, "sha256": of the file, "demo": bool}``,
so that a command can say from data what it ran.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sfs_fast import download, importers
from sfs_fast.atomic import TEMP_PREFIX, atomic_destination
from sfs_fast.errors import CheckpointError, WeightsDownloadError
from sfs_fast.models import METHODS, SkipNet, build_model, method_id
from sfs_fast.sh import CONVENTION

__all__ = ["CheckpointError", "WeightsDownloadError", "WeightsEntry", "REGISTRY", "register", "save", "load",
           "load_any", "read_metadata", "fetch", "verify", "local_path", "default_weights",
           "default_weights_note", "file_sha256", "tensors_sha256", "entry", "resolve", "cache_path",
           "remove_cached", "WEIGHTS_DIR"]

FORMAT = "sfs_fast"
FORMAT_VERSION = "1"
INPUT = {"shape": [3, 128, 128], "layout": "NCHW", "color": "RGB", "range": [0.0, 1.0]}


def describe_method(m: int) -> str:
    return f"method {m} ({METHODS[m].slug})"


def tensors_sha256(state: dict) -> str:
    """A sha256 over tensor names, dtypes, shapes and bytes in name order: stored in the
    metadata by :func:`save` and checked by :func:`load`, so that a damaged file is found
    even where the safetensors header is intact."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _checkpoint_metadata(model, state: dict, dtype, metadata: dict) -> dict:
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": "skipnet" if isinstance(model, SkipNet) else "sfsnet",
        "config": json.dumps(model.config.to_dict()),
        "convention": json.dumps(CONVENTION),
        "input": json.dumps(INPUT),
        "stored_dtype": str(dtype or "as-trained").replace("torch.", ""),
        "tensors_sha256": tensors_sha256(state),
    }
    if not isinstance(model, SkipNet):
        meta["method"] = str(model.method)
        meta["slug"] = model.spec.slug
    for key, value in metadata.items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    return meta


def save(model: torch.nn.Module, path, *, dtype: torch.dtype | None = None, base=None, **metadata) -> Path:
    """Write ``model`` to ``path`` (safetensors) atomically; returns the path.

    ``dtype`` (e.g. ``torch.float16``) stores floating tensors in that type to save space;
    ``load`` returns them as float32. ``base`` (a checkpoint path or registered name): store
    only the top-level modules whose stored tensors differ from that checkpoint's, with the
    base's tensor hash, so that methods trained on a frozen trunk do not each carry a copy of
    it; :func:`load` takes the rest from the base. Extra ``metadata`` values are stored as JSON.
    """
    path = Path(path)
    state = {}
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        state[name] = t.contiguous().clone()
    meta = _checkpoint_metadata(model, state, dtype, metadata)
    if base is not None:
        state, meta["base"] = _delta_from_base(state, base)
    with atomic_destination(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path


def _module_of(key: str) -> str:
    return key.split(".", 1)[0]


def _delta_from_base(state: dict, base) -> tuple[dict, str]:
    """``state`` less the top-level modules equal (bit for bit) to the base's, and the JSON
    ``base`` field: the base's tensor hash, its registered name and the modules taken from it."""
    base_path, base_name = resolve(base)
    base_meta = read_metadata(base_path)
    if "base" in base_meta:
        raise CheckpointError(f"{base_path}: is itself stored against a base; use a full checkpoint as base")
    base_state = _read_state(base_path, base_meta)
    same = set()
    for module in {_module_of(k) for k in state}:
        keys = [k for k in state if _module_of(k) == module]
        if all(k in base_state and base_state[k].dtype == state[k].dtype
               and torch.equal(base_state[k], state[k]) for k in keys):
            same.add(module)
    delta = {k: t for k, t in state.items() if _module_of(k) not in same}
    field = {"tensors_sha256": base_meta.get("tensors_sha256") or tensors_sha256(base_state),
             "name": base_name, "modules": sorted(same)}
    return delta, json.dumps(field)


def _base_candidates(path: Path):
    """Where a base checkpoint may be: the registered weights on this machine, then the
    safetensors files beside the delta."""
    for name in REGISTRY:
        local = local_path(name)
        if local is not None and local.suffix == ".safetensors":
            yield local
    yield from sorted(Path(path).parent.glob("*.safetensors"))


def _merge_base(path: Path, meta: dict, state: dict) -> dict:
    """The full state of a checkpoint saved with ``base=``: its own tensors plus the base's
    modules, the base found by its tensor hash (a changed base is refused, not mixed in)."""
    want = meta["base"]
    for candidate in _base_candidates(path):
        if candidate.resolve() == Path(path).resolve():
            continue
        try:
            cand_meta = read_metadata(candidate)
        except CheckpointError:
            continue
        if cand_meta.get("tensors_sha256") != want["tensors_sha256"] or "base" in cand_meta:
            continue
        base_state = _read_state(candidate, cand_meta)
        merged = {k: t for k, t in base_state.items() if _module_of(k) in set(want["modules"])}
        merged.update(state)
        return merged
    raise CheckpointError(f"{path}: stored against base weights {want.get('name') or ''} "
                          f"(tensors sha256 {want['tensors_sha256'][:12]}) that are not on this machine")


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


def _read_state(path, meta: dict, check: bool = True) -> dict:
    """The stored tensors (with the base's modules for a checkpoint saved with ``base=``),
    checked against the recorded tensor hash (when there is one)."""
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: damaged checkpoint ({str(exc).splitlines()[0]})") from None
    if "base" in meta:
        state = _merge_base(path, meta, state)
    if check:
        _check_hash(path, meta, state)
    return state


def _check_hash(path, meta: dict, state: dict) -> None:
    recorded = meta.get("tensors_sha256")
    if recorded and tensors_sha256(state) != recorded:
        raise CheckpointError(f"{path}: damaged checkpoint (tensors do not match their recorded sha256)")


def _check_frame(path, meta: dict) -> None:
    # The same normal frame for every checkpoint: one that says another frame is refused,
    # not silently mirrored. Older files (the demo weights) predate the field and were
    # trained on sfs-data synth, whose frame this is.
    frame = (meta.get("convention") or {}).get("normal_frame")
    if frame is not None and frame != CONVENTION["normal_frame"]:
        raise CheckpointError(f"{path}: stored with normal frame {frame!r}, expected {CONVENTION['normal_frame']!r}")


def _build_for(path, meta: dict, method, config_overrides: dict):
    config = dict(meta.get("config") or {})
    for key, value in config_overrides.items():
        if key in config and key != "shading_backend" and config[key] != value:
            raise CheckpointError(f"{path}: stored with {key}={config[key]!r}, cannot load with {key}={value!r}")
        config[key] = value
    if meta.get("architecture") == "skipnet":
        if method is not None:
            raise CheckpointError(f"{path}: holds a SkipNet, not {describe_method(method_id(method))}")
        return SkipNet(normalize=config.get("normalize", True), shading_backend=config.get("shading_backend", "auto"))
    stored = int(meta["method"])
    if method is not None and method_id(method) != stored:
        raise CheckpointError(f"{path}: holds {describe_method(stored)}, not {describe_method(method_id(method))}")
    return build_model(stored, **config)


def load(spec, method=None, **config_overrides) -> torch.nn.Module:
    """Rebuild the model stored at ``spec``: a safetensors path or a registered name
    (``"sfsnet"`` fetches the official weights on first use; see :data:`REGISTRY`).

    ``method``, when given, must match the checkpoint's method (a checkpoint of one method
    never loads as another). ``config_overrides`` change run-time fields only
    (``shading_backend``); architecture fields must match the checkpoint.
    """
    path, name = resolve(spec)
    return _load_file(path, name, method, config_overrides)


def _load_file(path: Path, name, method, config_overrides: dict):
    meta = read_metadata(path)
    _check_frame(path, meta)
    model = _build_for(path, meta, method, config_overrides)
    state = _read_state(path, meta, check=False)  # a misfit is named as such, damage after
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}")
    _check_hash(path, meta, state)
    for key, tensor in state.items():
        state[key] = tensor.to(expected[key].dtype)
    model.load_state_dict(state)
    model.checkpoint_metadata = meta
    # Modules whose weights came from a file (an import records them; a trained checkpoint
    # holds all); the trainer freezes only these.
    model.loaded_modules = list(meta.get("loaded_modules") or [n for n, _ in model.named_children()])
    _attach_source(model, path, name)
    return model.eval()


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _import_file(path: Path, method, config: dict):
    """Any supported weight file, by content and suffix: our safetensors, the Caffe
    ``.caffemodel.h5``, or a PyTorch ``.pth``/``.pkl``/``.pt``."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"\x89HDF"):
        return importers.import_caffe_h5(path, method=method, **config)
    if path.suffix in (".pth", ".pkl", ".pt") or head.startswith(b"PK") or head[:1] == b"\x80":
        return importers.import_pth(path, method=method, **config)
    return None


def load_any(spec, method=None, **config) -> torch.nn.Module:
    """Load a model from a registered name or any supported weight file (see
    :func:`_import_file`). A missing file or unknown name raises CheckpointError with one
    line: ``NAME: no such checkpoint or registered weights name (see sfs-weights list)``."""
    path, name = resolve(spec)
    model = _import_file(path, method, config)
    if model is None:
        return _load_file(path, name, method, config)
    _attach_source(model, path, name)
    return model


# --------------------------------------------------------------------------------------
# Named weights


@dataclasses.dataclass(frozen=True)
class WeightsEntry:
    """One named set of weights.

    Bundled entries (no ``urls``) name a file in :data:`WEIGHTS_DIR`. Remote entries name the
    file to fetch (``filename``, also the name asked of ``SFS_FAST_WEIGHTS_MIRROR``), its URLs
    in order (mirrors with the same bytes), its git blob id (the fingerprint known before
    anyone downloads it), and its licence, printed on first fetch and kept in the metadata.
    """
    name: str
    method: int
    description: str
    filename: str
    urls: tuple = ()
    blob_id: str | None = None
    licence: str = ""
    licence_url: str = ""
    demo: bool = False

    @property
    def bundled(self) -> bool:
        return not self.urls


# Bundled weights (the demo checkpoints trained by ``sfs-train``).
WEIGHTS_DIR = Path(__file__).parent / "data"

_SFSNET_COMMIT = "158d18bc20c53faae607ce9b0874c673c5b6ac63"
_DEMO_TEXT = "trained briefly on synthetic mesh-face renders only (sfs-data synth), not real photographs"

REGISTRY: dict[str, WeightsEntry] = {}


def register(entry: WeightsEntry, *, replace: bool = False) -> WeightsEntry:
    """Add ``entry`` to :data:`REGISTRY` (``replace=True`` to change an existing name)."""
    if entry.name in REGISTRY and not replace:
        raise ValueError(f"weights name {entry.name!r} is already registered")
    if not entry.bundled and not entry.blob_id:
        raise ValueError(f"{entry.name}: a remote entry needs a fingerprint (git blob id)")
    REGISTRY[entry.name] = entry
    return entry


register(WeightsEntry(
    name="sfsnet", method=0, filename="SfSNet.caffemodel.h5",
    description="official SfSNet (Sengupta et al., CVPR 2018), Caffe release, converted exactly",
    urls=(f"https://github.com/senguptaumd/SfSNet/raw/{_SFSNET_COMMIT}/SfSNet.caffemodel.h5",
          "https://github.com/Mannix1994/SfSNet-Python/raw/c41115e3d9a562e68d64ec2f7e9b6dcdb3e556c7/"
          "weights/SfSNet.caffemodel.h5"),
    blob_id="5dea2585898c6d1a754da737c58b4a62d9efd101",
    licence="MIT-style grant, Copyright 2018 University of Maryland (SfSNet README)",
    licence_url=f"https://github.com/senguptaumd/SfSNet/blob/{_SFSNET_COMMIT}/README.md"))
for _m, _spec in METHODS.items():  # one bundled checkpoint per method; 1-7 stored against demo-0
    register(WeightsEntry(name=f"demo-{_m}", method=_m, filename=f"method{_m}_demo.safetensors",
                          description=f"{_spec.slug} (method {_m}), {_DEMO_TEXT}", demo=True))


def _unknown(spec) -> CheckpointError:
    return CheckpointError(f"{spec}: no such checkpoint or registered weights name (see sfs-weights list)")


def entry(name: str) -> WeightsEntry:
    """The registry entry of ``name``; CheckpointError (one line) for an unknown name."""
    if name not in REGISTRY:
        raise _unknown(name)
    return REGISTRY[name]


def cache_path(name: str) -> Path:
    """Where the converted checkpoint of a remote entry lives (whether or not it is there)."""
    return download.cache_dir() / "weights" / f"{name}.safetensors"


def _entry_file(name: str) -> Path:
    e = entry(name)
    return WEIGHTS_DIR / e.filename if e.bundled else cache_path(name)


def local_path(name: str) -> Path | None:
    """The file of a registered name if it is on this machine (bundled or cached), else None.
    Touches no network and verifies nothing (:func:`verify` does)."""
    path = _entry_file(name)
    return path if path.is_file() else None


def resolve(spec) -> tuple[Path, str | None]:
    """``(file, registry name or None)`` for a path or a registered name.

    An existing file wins over a name (a local file is what the user pointed at); a name
    that is not cached is fetched (the only way a load touches the network)."""
    path = Path(spec)
    if path.is_file():
        return path, _name_of(path)
    if isinstance(spec, str) and spec in REGISTRY:
        return fetch(spec), spec
    raise _unknown(spec)


def _name_of(path: Path) -> str | None:
    """The registry name whose local file ``path`` is, if any."""
    resolved = path.resolve()
    for name in REGISTRY:
        candidate = _entry_file(name)
        if candidate.is_file() and candidate.resolve() == resolved:
            return name
    return None


def _attach_source(model, path: Path, name: str | None) -> None:
    e = REGISTRY.get(name) if name else None
    model.weights_source = {"name": name, "path": str(path), "sha256": file_sha256(path),
                            "demo": bool(e and e.demo)}


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def _manual_route(e: WeightsEntry) -> str:
    return (f"manual route: get {e.filename} from that URL on a machine with internet, then "
            f"sfs-convert {e.filename} -o {e.name}.safetensors and pass --weights {e.name}.safetensors")


def fetch(name: str, *, force: bool = False, progress: bool | None = None, log=_log) -> Path:
    """The local checkpoint of a registered name; a remote entry not yet cached (or whose
    cache entry is damaged, or ``force``) is downloaded, verified, converted once with the
    exact importer and stored atomically. Raises CheckpointError / WeightsDownloadError with
    one line (offline, HTTP errors, a refused fingerprint), leaving nothing in the cache."""
    e = entry(name)
    if e.bundled:
        path = local_path(name)
        if path is None:
            raise CheckpointError(f"{name}: the bundled file {WEIGHTS_DIR / e.filename} is missing from this install")
        return path
    dest = cache_path(name)
    if not force and dest.is_file() and _problem(dest) is None:
        return dest
    if download.offline():
        raise WeightsDownloadError(f"{name}: not cached, and {download.OFFLINE_ENV}=1 forbids downloading it from "
                                   f"{download.source_urls(e.urls, e.filename)[0]}; {_manual_route(e)}")
    with download.cache_lock(name):
        if not force and _cache_ok(dest, log):  # another process fetched it while we waited
            return dest
        _fetch_locked(e, dest, sys.stderr.isatty() if progress is None else progress, log)
    return dest


def _cache_ok(dest: Path, log) -> bool:
    """Whether a cache entry is present and whole; a damaged one is removed (and refetched).
    Called with the entry's lock held, so that it never removes a file another process has
    just written."""
    if not dest.is_file():
        return False
    problem = _problem(dest)
    if problem is None:
        return True
    log(f"sfs_fast: {problem}; removing it and fetching again")
    dest.unlink(missing_ok=True)
    return False


def _problem(path: Path) -> str | None:
    """None if ``path`` is a readable checkpoint whose tensors match their hash, else why not."""
    try:
        _read_state(path, read_metadata(path))
    except CheckpointError as exc:
        return str(exc)
    return None


def _fetch_locked(e: WeightsEntry, dest: Path, progress: bool, log) -> None:
    folder = dest.parent
    folder.mkdir(parents=True, exist_ok=True)
    # Temporaries of a killed earlier fetch of this name: safe to remove, we hold its lock.
    for stale in folder.glob(f"{TEMP_PREFIX}{e.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{e.name}-", dir=folder) as tmp:
        raw = Path(tmp) / e.filename
        urls = download.source_urls(e.urls, e.filename)
        try:
            url = download.download_verified(urls, e.blob_id, raw, progress=progress)
        except WeightsDownloadError as exc:
            raise WeightsDownloadError(f"{e.name}: download failed: {exc}; {_manual_route(e)}") from None
        log(f"sfs_fast: fetched {e.name} from {url}; licence: {e.licence} ({e.licence_url})")
        # The exact importer, as sfs-convert runs it: the test files take this path too.
        model = _import_file(raw, e.method, {})
        if model is None:
            raise CheckpointError(f"{e.name}: {url} is not a weight file this package can import")
        meta = {"weights_name": e.name, "source": e.filename, "source_url": url,
                "source_blob_id": e.blob_id, "source_sha256": file_sha256(raw),
                "licence": e.licence, "licence_url": e.licence_url}
        meta.update(getattr(model, "import_metadata", {}))
        save(model, dest, **meta)


def verify(name: str) -> tuple[str, str]:
    """``(status, detail)`` of a registered name on this machine, without network:
    ``ok``, ``not cached`` (remote entry not fetched), ``missing`` (bundled file absent) or
    ``damaged`` (unreadable, or tensors that differ from their recorded hash)."""
    e = entry(name)
    path = _entry_file(name)
    if not path.is_file():
        return ("missing" if e.bundled else "not cached"), str(path)
    problem = _problem(path)
    return ("ok", str(path)) if problem is None else ("damaged", problem)


def remove_cached(name: str) -> bool:
    """Delete the cache entry of a remote name (under its lock); returns whether there was one."""
    path = cache_path(name)
    if entry(name).bundled or not path.is_file():
        return False
    with download.cache_lock(name):
        path.unlink(missing_ok=True)
    return True


# --------------------------------------------------------------------------------------
# Default weights

OFFICIAL = "sfsnet"


def default_weights(method: int):
    """The default checkpoint of ``method``: the cached official SfSNet for method 0 when
    it has been downloaded, else the bundled demo checkpoint, else None. Never downloads."""
    m = method_id(method)
    if m == REGISTRY[OFFICIAL].method and local_path(OFFICIAL) is not None:
        return local_path(OFFICIAL)
    for name, e in REGISTRY.items():
        if e.bundled and e.method == m and local_path(name) is not None:
            return local_path(name)
    return None


def default_weights_note(method: int) -> str | None:
    """The one line to print when the default of ``method`` is a demo checkpoint, else None."""
    path = default_weights(method)
    if path is None:
        return None
    name = _name_of(Path(path))
    if name is None or not REGISTRY[name].demo:
        return None
    m = method_id(method)
    how = ("sfs-weights download sfsnet gives the official SfSNet" if m == 0 else
           "official weights exist for method 0 only: sfs-weights download sfsnet, then "
           f"sfs-train --method {m} --load_pretrained_model sfsnet")
    return (f"using the bundled demo weights of method {m}, a demo trained on synthetic faces only "
            f"(rough on real photos); {how}")
