"""The folder pipeline: pictures in, decompositions out, robustly.

    from sfs_fast import Decomposer
    from sfs_fast.pipeline import FolderOptions, decompose_folder

    summary = decompose_folder("photos/", "out/", Decomposer(method=3),
                               FolderOptions(recursive=True, formats=("png", "npy")))
    summary.ok, summary.failed, summary.exit_code

The stages, each usable alone (a distributed engine runs them as its own tasks):

1. :func:`discover` ``(src, out_dir) -> [Item]``: a folder, a picture or a list file; masks
   matched; every input gets a distinct output stem (:func:`assign_stems`).
2. ``prepare(item, options) -> Picture``: decode an input into zero or more :class:`Crop`
   (the unit the model sees). The default, :func:`prepare_picture`, makes one crop per
   picture (center crop or pad to a square, 128x128, its mask); a face detector replaces it
   and makes one crop per face, or none with a reason ("no face found").
3. :func:`infer` ``(crops, decomposer) -> [outputs]``: one model call on the crops of any
   number of pictures; outputs are per-crop dicts of float32 NumPy arrays.
4. :func:`encode_crop` ``(crop, outputs, out_dir, formats) -> [Path]``: the crop's files,
   each written atomically (:mod:`sfs_fast.images` ``save_*``).
5. ``finish(picture, outputs_per_crop) -> dict`` (optional): runs once every crop of a
   picture is encoded (a face module pastes the results back onto the photo there).
6. :func:`manifest_row` builds an input's line of ``OUT/manifest.jsonl``; :class:`Manifest`
   appends whole lines (a killed run leaves whole lines) and compacts them at the end.

Engines: stages 3-6 are one class, :class:`PictureStages` (batches of crops, inference,
encoding, ``finish``, the row); the manifest, counts, skips and summary are another,
:class:`RunRecord`, kept where the run is driven. The local engine (:class:`FolderRun`,
:func:`decompose_folder`) feeds the stages from decoder threads and encodes on a pool;
:mod:`sfs_fast.ray_engine` runs stage 2 in Ray tasks and the stages in a pool of Ray actors,
and writes their rows through the same :class:`RunRecord` on the driver.

Resume: an input is skipped when its previous manifest row is ``ok`` (or ``skipped``) for the
same formats and every output file that row lists exists, so it works when the number of
outputs is only known after the run (faces); with the default preparer, an input whose
expected outputs all exist is skipped too (a run killed between the files and the line).

SIGINT and SIGTERM (when run from the main thread): the run stops after the batch in flight,
finishes encoding it, writes the manifest and returns a :class:`Summary` with
``interrupted`` set and exit code 130 / 143; a second signal stops at once
(``KeyboardInterrupt``), still without half-written files.

Memory stays flat in the number of inputs: decoding runs at most a window of pictures ahead
of the model, at most two batches are being encoded, and finished pictures are dropped.
"""
from __future__ import annotations

import collections
import functools
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from sfs_fast import images
from sfs_fast.atomic import remove_stale_temporaries

MANIFEST = "manifest.jsonl"
PNG_KINDS = ("normal", "albedo", "shading", "residue", "recon")
FORMATS = ("png", "npy")
# the commands' exit codes (sfs_fast.cli.common); a signal gives 128 + its number, as a shell
EXIT_OK, EXIT_ERROR, EXIT_PARTIAL = 0, 1, 3
STOP_SIGNALS = ("SIGINT", "SIGTERM")


class PipelineError(ValueError):
    """Inputs or options that cannot run at all; the message is one line."""


# --------------------------------------------------------------------------------------
# Data


@dataclass
class Item:
    """One input: its path, its path relative to IN (mirrored under OUT), its mask.

    ``stem`` is where its outputs go, relative to OUT without a suffix (``sub/a``; ``sub/a_jpg``
    when ``a.jpg`` and ``a.png`` share a folder, see :func:`assign_stems`)."""

    path: Path
    rel: Path
    mask: Path | None = None
    error: str | None = None  # set when the input is refused before decoding
    stem: str = ""

    def __post_init__(self):
        self.path, self.rel = Path(self.path), Path(self.rel)
        if not self.stem:
            self.stem = self.rel.with_suffix("").as_posix()

    @property
    def key(self) -> str:
        """The input's name in the manifest."""
        return self.rel.as_posix()


@dataclass
class Crop:
    """What the model decomposes: ``image`` float32 ``[3,128,128]`` RGB in [0,1], ``mask``
    float32 ``[128,128]`` in [0,1] or None, ``stem`` the outputs' path relative to OUT without
    suffix (``sub/a``, ``sub/a_face0``), ``meta`` JSON-able facts for the manifest (a face's box)."""

    image: np.ndarray
    stem: str
    mask: np.ndarray | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class Picture:
    """One prepared input: its crops (0..N), ``meta`` for its manifest row (the default
    preparer's ``crop`` box and ``size``), ``error`` the reason when it has no crops,
    ``timings`` in ms."""

    item: Item
    crops: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    error: str | None = None
    timings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class FolderOptions:
    """The folder command's choices. ``workers``: decoder threads and encoder threads, each
    (None: min(4, CPUs)); ``max_pixels`` None: :data:`sfs_fast.images.DEFAULT_MAX_PIXELS`."""

    recursive: bool = False
    masks: Path | None = None
    fit: str = "crop"
    batch_size: int = 16
    workers: int | None = None
    overwrite: bool = False
    formats: tuple = ("png",)
    grid: bool = False
    max_pixels: int | None = None

    def checked(self) -> FolderOptions:
        """These options with defaults filled in; :class:`PipelineError` for bad values."""
        formats = tuple(self.formats)
        if not formats or not set(formats) <= set(FORMATS):
            raise PipelineError(f"formats: choose from {', '.join(FORMATS)} (got {','.join(formats)!r})")
        if self.fit not in images.FITS:
            raise PipelineError(f"fit: choose from {', '.join(images.FITS)} (got {self.fit!r})")
        if int(self.batch_size) < 1:
            raise PipelineError("batch size must be at least 1")
        workers = self.workers if self.workers is not None else min(4, os.cpu_count() or 1)
        if int(workers) < 1:
            raise PipelineError("workers must be at least 1")
        max_pixels = int(self.max_pixels) if self.max_pixels else images.DEFAULT_MAX_PIXELS
        masks = Path(self.masks) if self.masks is not None else None
        return replace(self, formats=formats, workers=int(workers), max_pixels=max_pixels,
                       batch_size=int(self.batch_size), masks=masks)


@dataclass
class Summary:
    """What a run did. ``remaining``: inputs not reached (an interrupted run);
    ``interrupted``: the signal's name or None; ``timings``: ``wall_s``, ``model_s`` and the
    rates; ``plan``: how the model ran (method, backend, precision, batch size) and
    ``plan_reason``, why (the Decomposer's one line: how precision auto decided)."""

    ok: int
    skipped: int
    failed: int
    inputs: int
    remaining: int
    interrupted: str | None
    exit_code: int
    timings: dict
    plan: dict
    manifest: str

    def to_dict(self) -> dict:
        """One flat JSON-able dict (the commands' ``--json`` line)."""
        data = asdict(self)
        return {**data.pop("plan"), **data.pop("timings"), **data}


# --------------------------------------------------------------------------------------
# 1. Discovery


def _is_mask_name(name: str) -> bool:
    return Path(name).stem.lower().endswith("_mask")


def _has_picture_ext(name: str) -> bool:
    return Path(name).suffix.lower() in images.IMAGE_EXTENSIONS


def _mask_stems(stem: str) -> list[str]:
    stems = [f"{stem}_mask"]
    if stem.lower().endswith("_face"):
        stems.append(stem[: -len("_face")] + "_mask")  # SfSNet demo naming: N_face.png / N_mask.png
    return stems


def _index_folder(folder: Path) -> dict:
    """stem -> path of the picture-named files of one folder (for masks beside pictures)."""
    index = {}
    try:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if _has_picture_ext(entry.name):
                index.setdefault(Path(entry.name).stem, Path(entry.path))
    except OSError:
        pass
    return index


def _index_masks(masks_dir: Path) -> dict:
    """Keys: relative path without suffix ('sub/a') and bare stem ('a') -> mask path."""
    index = {}
    for root, dirs, files in os.walk(masks_dir):
        dirs.sort()
        for name in sorted(files):
            if not _has_picture_ext(name):
                continue
            path = Path(root) / name
            rel = path.relative_to(masks_dir).with_suffix("")
            index.setdefault(rel.as_posix(), path)
            index.setdefault(rel.name, path)
    return index


def find_inputs(src: Path, out_dir: Path, *, recursive: bool = False, masks: Path | None = None) -> list[Item]:
    """The inputs named by ``src``: a folder (sub-folders with ``recursive``; OUT and the
    masks folder are never read), one picture, or a text file listing pictures."""
    src, out_real = Path(src), Path(out_dir).resolve()
    masks_real = Path(masks).resolve() if masks else None
    if src.is_dir():
        if src.resolve() == out_real:
            raise PipelineError("OUT must not be IN itself (outputs would be read as inputs next time)")
        items = []
        for root, dirs, files in os.walk(src):
            root_p = Path(root)
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                             and (root_p / d).resolve() not in (out_real, masks_real)) if recursive else []
            for name in sorted(files):
                if not name.startswith(".") and _has_picture_ext(name) and not _is_mask_name(name):
                    items.append(Item(root_p / name, (root_p / name).relative_to(src)))
        return items
    if src.is_file() and (_has_picture_ext(src.name) or images.is_picture(src)):
        return [Item(src, Path(src.name))]
    if src.is_file():
        return read_list(src)
    if src.is_symlink():
        raise PipelineError(f"{src}: dangling symbolic link")
    raise PipelineError(f"{src}: no such file or folder")


def read_list(list_file: Path) -> list[Item]:
    """Items of a text list: one path a line, relative to the list's folder, '#' comments."""
    try:
        text = Path(list_file).read_text(encoding="utf-8")
    except (UnicodeDecodeError, ValueError):
        raise PipelineError(f"{list_file}: neither a picture nor a text list of pictures") from None
    base = Path(list_file).parent
    items = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path = Path(line).expanduser()
        if not path.is_absolute():
            path = base / path
        try:
            rel = path.resolve().relative_to(base.resolve())
        except ValueError:
            rel = Path(path.name)
        items.append(Item(path, rel))
    if not items:
        raise PipelineError(f"{list_file}: the list names no pictures")
    return items


def assign_stems(items: list[Item]) -> list[Item]:
    """Give every input a distinct output stem, deterministically from the set of inputs.

    Inputs whose outputs would share a name (``a.jpg`` and ``a.png`` in one folder) all get
    their extension in the stem (``a_jpg``, ``a_png``); the others keep ``a``. An input whose
    stem still clashes (``a_jpg.png`` beside those two) is refused with the reason."""
    by_stem = collections.defaultdict(list)
    for item in items:
        by_stem[item.rel.with_suffix("").as_posix()].append(item)
    taken = {stem for stem, group in by_stem.items() if len(group) == 1}
    for stem, group in by_stem.items():
        for item in group:
            item.stem = stem
            if len(group) == 1:
                continue
            item.stem = f"{stem}_{item.rel.suffix[1:]}"
            if item.stem in taken:
                item.error = f"output name {item.stem} clashes with another input's"
            taken.add(item.stem)
    return items


def attach_masks(items: list[Item], masks: Path | None = None) -> list[Item]:
    """Find each input's mask: in ``masks`` by relative path or stem (``STEM.*`` or
    ``STEM_mask.*``); without it, ``STEM_mask.*`` beside the picture (and for SfSNet's
    ``N_face.png``, ``N_mask.*``)."""
    mask_index = _index_masks(Path(masks)) if masks else None
    folder_cache: dict = {}
    for item in items:
        stem = item.rel.with_suffix("").as_posix()
        if mask_index is not None:
            keys = [stem, *[str(Path(stem).parent / s) for s in _mask_stems(Path(stem).name)],
                    item.rel.stem, *_mask_stems(item.rel.stem)]
            item.mask = next((mask_index[k] for k in keys if k in mask_index), None)
            continue
        folder = item.path.parent
        if folder not in folder_cache:
            folder_cache[folder] = _index_folder(folder)
        index = folder_cache[folder]
        item.mask = next((index[s] for s in _mask_stems(item.path.stem) if s in index), None)
    return items


def discover(src, out_dir, *, recursive: bool = False, masks=None) -> list[Item]:
    """:func:`find_inputs`, then :func:`assign_stems` and :func:`attach_masks`."""
    if masks is not None and not Path(masks).is_dir():
        raise PipelineError(f"masks {masks}: no such folder")
    items = find_inputs(Path(src), Path(out_dir), recursive=recursive, masks=masks)
    return attach_masks(assign_stems(items), masks)


# --------------------------------------------------------------------------------------
# 2. Prepare (decode)


def prepare_picture(item: Item, options: FolderOptions) -> Picture:
    """The default preparer: the whole picture center-cropped (or padded, ``options.fit``)
    to a square, 128x128, with its mask; one :class:`Crop` with the item's stem. Never
    raises: an unusable input becomes a Picture without crops and with the reason."""
    picture = Picture(item)
    if item.error:
        picture.error = item.error
        return picture
    t0 = time.perf_counter()
    max_pixels = options.max_pixels or images.DEFAULT_MAX_PIXELS
    try:
        image, box, size = images.load_image(item.path, fit=options.fit, max_pixels=max_pixels)
        picture.meta = {"crop": list(box), "size": list(size)}
        mask = None
        if item.mask is not None:
            try:
                mask = images.load_mask(item.mask, box, size, max_pixels=max_pixels)
            except images.ImageError as exc:
                raise images.ImageError(f"mask {item.mask}: {exc}") from None
        picture.crops = [Crop(image, item.stem, mask)]
    except images.ImageError as exc:
        picture.error = str(exc)
    except MemoryError:
        picture.error = "out of memory while decoding"
    except Exception as exc:  # noqa: BLE001 - a decoder bug must not end the run
        picture.error = f"cannot decode: {type(exc).__name__}: {exc}"
    picture.timings["decode_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
    return picture


def prepare_safely(prepare, options, item: Item) -> Picture:
    """Run a ``prepare`` hook; an exception from it fails this input, not the run."""
    try:
        return prepare(item, options)
    except Exception as exc:  # noqa: BLE001
        return Picture(item, error=f"cannot prepare: {type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------------------
# 3. Infer


def infer(crops: list[Crop], decomposer) -> list[dict]:
    """One model call on ``crops`` (of any pictures). Returns, per crop, name -> float32
    array without the batch dimension (``normal`` ``[3,128,128]``, ``light`` ``[27]``, ...)."""
    import torch

    x = torch.from_numpy(np.stack([c.image for c in crops]))
    arrays = {k: v.numpy() for k, v in decomposer.decompose(x).items()}
    return [{k: v[i] for k, v in arrays.items()} for i in range(len(crops))]


def decompose_crops(crops: list[Crop], decomposer, batch_size: int = 16) -> list[dict]:
    """:func:`infer` over ``crops`` in batches of ``batch_size``; outputs in order."""
    outs = []
    for start in range(0, len(crops), batch_size):
        outs += infer(crops[start:start + batch_size], decomposer)
    return outs


# --------------------------------------------------------------------------------------
# 4. Encode


def output_paths(out_dir: Path, stem: str, names, formats, masked: bool) -> dict:
    """kind -> destination of one crop's outputs (``OUT/<stem>_<kind>.<ext>``)."""
    base = Path(out_dir) / stem
    folder, stem = base.parent, base.name
    paths = {}
    if "png" in formats:
        for kind in PNG_KINDS:
            if kind in names:
                paths[kind] = folder / f"{stem}_{kind}.png"
    if "light" in names:
        paths["light.txt"] = folder / f"{stem}_light.txt"
    if "npy" in formats:
        for name in names:
            paths[f"{name}.npy"] = folder / f"{stem}_{name}.npy"
        if masked:
            paths["mask.npy"] = folder / f"{stem}_mask.npy"
    return paths


def encode_outputs(outs: dict, mask, paths: dict) -> None:
    """Write one crop's outputs (``outs``: name -> float array without the batch dim) to
    ``paths`` (from :func:`output_paths`), each atomically."""
    from sfs_fast.sh import format_light

    writers = {
        "normal": images.normal_to_rgb,
        "albedo": images.unit_to_rgb,
        "shading": images.shading_to_rgb,
        "residue": images.residue_to_rgb,
        "recon": images.unit_to_rgb,
    }
    for kind, path in paths.items():
        if kind in writers:
            images.save_png(path, writers[kind](outs[kind], mask))
        elif kind == "light.txt":
            images.save_text(path, format_light(outs["light"]))
        elif kind == "mask.npy":
            images.save_npy(path, mask)
        else:
            images.save_npy(path, outs[kind[: -len(".npy")]])


def encode_crop(crop: Crop, outputs: dict, out_dir: Path, formats) -> list[Path]:
    """Write ``crop``'s files under ``out_dir``; returns their paths."""
    paths = output_paths(out_dir, crop.stem, list(outputs), formats, crop.mask is not None)
    encode_outputs(outputs, crop.mask, paths)
    return list(paths.values())


def grid_columns(outputs: dict) -> list[str]:
    """The contact sheet's column labels for a model with these outputs."""
    return ["face", "normal", "albedo", "shading"] + (["residue"] if "residue" in outputs else []) + ["recon"]


def grid_rows(crops: list[Crop], outs_list: list[dict]) -> list:
    """Contact-sheet rows, one per crop, in the columns of :func:`grid_columns`."""
    rows = []
    for crop, outs in zip(crops, outs_list):
        mask = crop.mask
        row = [images.unit_to_rgb(crop.image), images.normal_to_rgb(outs["normal"], mask),
               images.unit_to_rgb(outs["albedo"], mask), images.shading_to_rgb(outs["shading"], mask)]
        if "residue" in outs:
            row.append(images.residue_to_rgb(outs["residue"], mask))
        row.append(images.unit_to_rgb(outs["recon"], mask))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------
# 6. Manifest


def manifest_row(picture: Picture, status: str, reason: str | None = None, outputs=(), *,
                 out_dir=None, formats=(), timings: dict | None = None) -> dict:
    """An input's manifest line: input, path, mask, the picture's meta (crop, size), crops'
    meta when there is any, status ok/skipped/failed, reason, formats, outputs relative to
    ``out_dir``, timings in ms."""
    item = picture.item
    row = {"input": item.key, "path": str(item.path), "mask": str(item.mask) if item.mask else None,
           **picture.meta}
    if any(c.meta for c in picture.crops):
        row["crops"] = [{"stem": c.stem, **c.meta} for c in picture.crops]
    files = [Path(p) for p in outputs]
    if out_dir is not None:
        files = [p.relative_to(out_dir) if p.is_absolute() else p for p in files]
    row.update(status=status, reason=reason, formats=list(formats), outputs=sorted(p.as_posix() for p in files))
    row["timings_ms"] = dict(picture.timings if timings is None else timings)
    return row


def row_is_done(row: dict | None, out_dir: Path, formats) -> bool:
    """Whether a previous manifest row stands: ok (or skipped) with these formats, and every
    output it lists exists and is not empty."""
    if not row or row.get("status") not in ("ok", "skipped") or row.get("formats") != list(formats):
        return False
    return bool(row.get("outputs")) and outputs_exist(Path(out_dir) / p for p in row["outputs"])


def outputs_exist(paths) -> bool:
    return all(p.is_file() and p.stat().st_size > 0 for p in paths)


class Manifest:
    """``OUT/manifest.jsonl``: lines appended as inputs finish (one ``write`` each, so a killed
    run leaves whole lines), compacted to one line per input by :meth:`close`.

    Rows are held as their JSON text, not as dicts (a few times smaller), so a run over many
    pictures keeps its memory flat; :meth:`previous_row` parses one when asked."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / MANIFEST
        self._previous = self.read_lines(self.path)
        self.lock = threading.Lock()
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    @staticmethod
    def read_lines(path: Path) -> dict:
        """input -> the text of its latest whole line."""
        lines = {}
        try:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        lines[json.loads(line)["input"]] = line.rstrip("\n")
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut by a killed run
        except (OSError, UnicodeDecodeError):
            pass
        return lines

    @classmethod
    def read(cls, path: Path) -> dict:
        """input -> its latest whole line, parsed."""
        return {key: json.loads(line) for key, line in cls.read_lines(path).items()}

    def previous_row(self, key: str) -> dict | None:
        """The row that an earlier run wrote for input ``key``, or None."""
        line = self._previous.get(key)
        return None if line is None else json.loads(line)

    def write(self, entry: dict) -> None:
        data = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        with self.lock:
            os.write(self.fd, data)

    def close(self, order: list[str]) -> None:
        """Rewrite the manifest with the latest line of every input, ``order`` first."""
        os.close(self.fd)
        self._previous = {}
        latest = self.read_lines(self.path)
        ordered = set(order)
        keys = [k for k in order if k in latest] + [k for k in latest if k not in ordered]
        images.save_text(self.path, "".join(latest[k] + "\n" for k in keys))


# --------------------------------------------------------------------------------------
# The local engine


class StopSignals:
    """While active (main thread only), SIGINT and SIGTERM ask the run to stop after the
    current batch (``received`` names the signal); a second one raises KeyboardInterrupt."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def _handle(self, signum, _frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                self._previous[name] = signal.signal(getattr(signal, name), self._handle)
        return self

    def __exit__(self, *exc):
        for name, handler in self._previous.items():
            signal.signal(getattr(signal, name), handler)
        return False


def _ordered(pool, func, items, window):
    """``pool.map`` with at most ``window`` jobs ahead of the consumer (bounded memory)."""
    pending = collections.deque()
    it = iter(items)
    for item in it:
        pending.append(pool.submit(func, item))
        if len(pending) >= window:
            break
    while pending:
        yield pending.popleft().result()
        for item in it:
            pending.append(pool.submit(func, item))
            break


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type name when the message is empty): what a
    manifest row or a one-line error says."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _InFlight:
    """One picture whose crops are being inferred and encoded: it gets its manifest row
    when the last crop is written. ``outputs`` is kept only for a ``finish`` hook."""

    def __init__(self, picture: Picture, keep_outputs: bool):
        self.picture = picture
        self.pending = len(picture.crops)
        self.files: list = []
        self.errors: list = []
        self.outputs = [None] * len(picture.crops) if keep_outputs else None
        self.timings = dict(picture.timings, infer_ms=0.0, encode_ms=0.0)


class PictureStages:
    """Stages 3-6 for decoded pictures, the same in every engine: the crops of many pictures
    fill batches of ``options.batch_size``, each batch is inferred once, its crops are
    encoded (on ``encode_pool``, or inline without one), and a picture's manifest row goes
    to ``emit(row)`` once its last crop is written (after the ``finish`` hook).

    The local engine feeds it from decoder threads and encodes on a pool; a Ray actor feeds
    it the pictures of one Ray batch and encodes inline (its parallelism is the actor pool).
    ``model_s`` and ``batches`` count the model calls that succeeded."""

    def __init__(self, out_dir: Path, decomposer, options: FolderOptions, *, emit: Callable,
                 finish: Callable | None = None, encode_pool=None):
        self.out_dir, self.decomposer, self.options = Path(out_dir), decomposer, options
        self.emit, self.finish, self.encode_pool = emit, finish, encode_pool
        # every row the model ran for says which path ran and why (resume keeps a skipped
        # input's old record: its files came from that run)
        self.plan_record = {"backend": getattr(decomposer, "backend", None),
                            "precision": getattr(decomposer, "precision", None),
                            "reason": getattr(decomposer, "plan_reason", None)}
        self.lock = threading.Lock()
        self.pending: list = []  # (in-flight picture, crop index) not yet inferred
        self.encoding = collections.deque()
        self.model_s = 0.0
        self.batches = 0

    def add(self, picture: Picture, stop: Callable = lambda: False) -> None:
        """Queue ``picture``'s crops, inferring each batch as it fills; a picture without
        crops gets its failed row at once. After a batch, ``stop()`` true drops the rest of
        this picture's crops (its row is then never written: a rerun redoes it)."""
        if not picture.crops:
            self.emit(manifest_row(picture, "failed", picture.error or "nothing to decompose",
                                   formats=self.options.formats))
            return
        state = _InFlight(picture, keep_outputs=self.finish is not None)
        for index in range(len(picture.crops)):
            self.pending.append((state, index))
            if len(self.pending) == self.options.batch_size:
                batch, self.pending = self.pending, []
                self.run_batch(batch)
                if stop():
                    return

    def flush(self) -> None:
        """Infer the partial batch, then wait until every queued crop is written."""
        if self.pending:
            batch, self.pending = self.pending, []
            self.run_batch(batch)
        self.wait()

    def wait(self) -> None:
        while self.encoding:
            self.encoding.popleft().result()

    def _encode_later(self, func, *args) -> None:
        if self.encode_pool is None:
            func(*args)
        else:
            self.encoding.append(self.encode_pool.submit(func, *args))

    def run_batch(self, batch: list) -> None:
        """Infer one batch of ``(in_flight_picture, crop_index)`` and queue its encoding."""
        crops = [state.picture.crops[i] for state, i in batch]
        t0 = time.perf_counter()
        try:
            outs = infer(crops, self.decomposer)
        except (RuntimeError, ValueError, MemoryError) as exc:
            for state, index in batch:
                self.crop_done(state, index, error=f"inference failed: {first_line(exc)}")
            return
        dt = time.perf_counter() - t0
        self.model_s += dt
        self.batches += 1
        for (state, index), out in zip(batch, outs):
            self._encode_later(self.encode_one, state, index, out, dt * 1e3 / len(batch))
        if self.options.grid:
            self._encode_later(_write_grid, self.out_dir / "grids" / f"batch_{self.batches:05d}.png", crops, outs)
        while len(self.encoding) > 2 * (len(batch) + 1):  # at most two batches being encoded
            self.encoding.popleft().result()

    def encode_one(self, state: _InFlight, index: int, outputs: dict, infer_ms: float) -> None:
        t0 = time.perf_counter()
        files, error = [], None
        try:
            files = encode_crop(state.picture.crops[index], outputs, self.out_dir, self.options.formats)
        except Exception as exc:  # noqa: BLE001 - a full disk or an odd output fails this input, not the run
            error = f"cannot write outputs: {first_line(exc)}"
        timings = {"infer_ms": infer_ms, "encode_ms": (time.perf_counter() - t0) * 1e3}
        self.crop_done(state, index, files, outputs, error, timings)

    def crop_done(self, state: _InFlight, index: int, files=(), outputs=None, error=None, timings=None) -> None:
        """Record one crop; the picture's row is emitted when its last crop is in."""
        with self.lock:
            state.files += files
            if error:
                state.errors.append(error)
            if state.outputs is not None:
                state.outputs[index] = outputs
            for key, value in (timings or {}).items():
                state.timings[key] += value
            state.pending -= 1
            last = state.pending == 0
        if last:
            self.emit(self.picture_row(state))

    def picture_row(self, state: _InFlight) -> dict:
        """The finished picture's row, after the ``finish`` hook when there is one."""
        timings = {k: round(v, 3) for k, v in state.timings.items()}
        opts = self.options
        if state.errors:
            row = manifest_row(state.picture, "failed", state.errors[0], formats=opts.formats, timings=timings)
            return {**row, "plan": self.plan_record}
        extra = {}
        if self.finish is not None:
            try:
                extra = dict(self.finish(state.picture, state.outputs) or {})
            except Exception as exc:  # noqa: BLE001 - a hook's bug fails this input, not the run
                return manifest_row(state.picture, "failed", f"finish failed: {first_line(exc)}",
                                    formats=opts.formats, timings=timings)
        files = state.files + [Path(p) for p in extra.pop("outputs", [])]
        row = manifest_row(state.picture, "ok", None, files, out_dir=self.out_dir, formats=opts.formats,
                           timings=timings)
        row.update(extra)
        row["plan"] = self.plan_record
        return row


class RunRecord:
    """What one run keeps on the machine that drives it, whatever the engine: the manifest
    (one writer), the counts, the progress hook, the skips of a rerun, the summary.

    ``output_names`` are the model's (a rerun with the default preparer also skips an input
    whose expected files all exist without a manifest line)."""

    def __init__(self, out_dir: Path, output_names, options: FolderOptions, *, prepare=None, progress=None):
        self.out_dir, self.options = Path(out_dir), options
        self.names = list(output_names)
        self.prepare = prepare or prepare_picture
        self.progress = progress
        self.manifest = Manifest(self.out_dir)
        self.counts = collections.Counter()
        self.lock = threading.Lock()

    def write_row(self, row: dict) -> None:
        self.manifest.write(row)
        with self.lock:
            self.counts[row["status"]] += 1
            if self.progress is not None:
                self.progress(row)

    def previous_outputs(self, item: Item) -> list | None:
        """The outputs of ``item`` that a rerun keeps, or None when it must be done."""
        if self.options.overwrite or item.error is not None:
            return None
        row = self.manifest.previous_row(item.key)
        if row_is_done(row, self.out_dir, self.options.formats):
            return [self.out_dir / p for p in row["outputs"]]
        if self.prepare is prepare_picture:  # outputs known in advance: files without a line count too
            paths = list(output_paths(self.out_dir, item.stem, self.names, self.options.formats,
                                      item.mask is not None).values())
            if outputs_exist(paths):
                return paths
        return None

    def skip_done(self, items: list[Item]) -> list[Item]:
        """Write a ``skipped`` row for each finished input; returns the others."""
        todo = []
        for item in items:
            files = self.previous_outputs(item)
            if files is None:
                todo.append(item)
                continue
            old = self.manifest.previous_row(item.key) or {}
            meta = {k: old[k] for k in ("crop", "size") if k in old}
            row = manifest_row(Picture(item, meta=meta), "skipped", "outputs exist (--overwrite redoes them)",
                               files, out_dir=self.out_dir, formats=self.options.formats, timings={})
            for key in ("crops", "plan"):
                if key in old:
                    row[key] = old[key]
            self.write_row(row)
        return todo

    def close(self, items: list[Item]) -> None:
        """Compact the manifest to one line per input, in the order of ``items``."""
        self.manifest.close([it.key for it in items])

    def summary(self, inputs: int, interrupted: str | None, wall_s: float, model_s: float, plan: dict) -> Summary:
        """The run's :class:`Summary`; ``plan``: method, backend, precision of what ran."""
        ok, skipped, failed = self.counts["ok"], self.counts["skipped"], self.counts["failed"]
        if interrupted:
            code = 128 + signal.Signals[interrupted].value
        elif failed == 0:
            code = EXIT_OK
        else:
            code = EXIT_PARTIAL if ok + skipped > 0 else EXIT_ERROR
        timings = {"wall_s": round(wall_s, 3), "images_per_s": round(ok / wall_s, 3) if wall_s > 0 else None,
                   "model_s": round(model_s, 3),
                   "model_images_per_s": round(ok / model_s, 3) if model_s > 0 else None}
        plan = {**plan, "batch_size": self.options.batch_size}
        return Summary(ok, skipped, failed, inputs, inputs - ok - skipped - failed, interrupted, code,
                       timings, plan, str(self.manifest.path))


def decomposer_plan(decomposer) -> dict:
    """What a decomposer runs, for the summary: method, backend, precision, and why."""
    return {"method": getattr(decomposer, "method", None), "backend": getattr(decomposer, "backend", None),
            "precision": getattr(decomposer, "precision", None),
            "plan_reason": getattr(decomposer, "plan_reason", None)}


class FolderRun:
    """The local engine's state for one run (see :func:`decompose_folder`): decoder threads
    feeding one :class:`PictureStages` that encodes on a pool, and the :class:`RunRecord`.
    Use :meth:`run` once."""

    def __init__(self, out_dir: Path, decomposer, options: FolderOptions, *, prepare=None,
                 finish=None, progress=None):
        self.out_dir, self.decomposer, self.options = Path(out_dir), decomposer, options
        self.prepare = prepare or prepare_picture
        self.finish = finish
        self.record = RunRecord(self.out_dir, decomposer.output_names, options, prepare=prepare,
                                progress=progress)
        self.stages = None

    def run(self, items: list[Item], stop: StopSignals) -> None:
        """Decode ahead, fill batches with crops of many pictures, infer, encode in the
        background; stop early when ``stop`` received a signal."""
        opts = self.options
        todo = self.record.skip_done(items)
        decode_pool = ThreadPoolExecutor(opts.workers, thread_name_prefix="sfs-decode")
        encode_pool = ThreadPoolExecutor(opts.workers, thread_name_prefix="sfs-encode")
        self.stages = PictureStages(self.out_dir, self.decomposer, opts, emit=self.record.write_row,
                                    finish=self.finish, encode_pool=encode_pool)
        prepare = functools.partial(prepare_safely, self.prepare, opts)
        try:
            window = max(2 * opts.batch_size, 2 * opts.workers)
            for picture in _ordered(decode_pool, prepare, todo, window):
                if stop.received:
                    break
                self.stages.add(picture, stop=lambda: stop.received is not None)
            if not stop.received:
                self.stages.flush()
            self.stages.wait()
        finally:
            decode_pool.shutdown(wait=True, cancel_futures=True)
            encode_pool.shutdown(wait=True)
            self.record.close(items)

    def summary(self, inputs: int, interrupted: str | None, wall_s: float) -> Summary:
        model_s = self.stages.model_s if self.stages is not None else 0.0
        return self.record.summary(inputs, interrupted, wall_s, model_s, decomposer_plan(self.decomposer))


def _write_grid(path: Path, crops: list[Crop], outs: list[dict]) -> None:
    sheet = images.grid(grid_rows(crops, outs), col_labels=grid_columns(outs[0]),
                        row_labels=[crop.stem for crop in crops])
    images.save_png(path, sheet)


def _as_items(inputs, out_dir: Path, options: FolderOptions) -> list[Item]:
    if isinstance(inputs, (str, os.PathLike)):
        return discover(inputs, out_dir, recursive=options.recursive, masks=options.masks)
    items = [x if isinstance(x, Item) else Item(Path(x), Path(Path(x).name)) for x in inputs]
    if any(not isinstance(x, Item) for x in inputs):
        attach_masks(assign_stems(items), options.masks)
    return items


def start_run(inputs, out_dir, options: FolderOptions | None = None) -> tuple[FolderOptions, Path, list[Item]]:
    """What every engine does before its first picture: check the options, list the inputs
    (:func:`decompose_folder`'s ``inputs``), create OUT, remove a killed run's temporaries.
    Returns ``(checked options, out_dir, items)``; :class:`PipelineError` when nothing can run."""
    options = (options or FolderOptions()).checked()
    out_dir = Path(out_dir)
    items = _as_items(inputs, out_dir, options)
    if not items:
        raise PipelineError(f"{inputs}: no pictures found" if isinstance(inputs, (str, os.PathLike))
                            else "no pictures given")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(f"{out_dir}: cannot create the output folder ({exc.strerror or exc})") from None
    remove_stale_temporaries(out_dir)
    return options, out_dir, items


def decompose_folder(inputs, out_dir, decomposer, options: FolderOptions | None = None, *,
                     prepare: Callable | None = None, finish: Callable | None = None,
                     progress: Callable | None = None) -> Summary:
    """Decompose ``inputs`` into ``out_dir`` (module docstring).

    Args:
        inputs: a folder, a picture or a list file (:func:`discover`), or a list of
            :class:`Item` (used as given) or of paths.
        decomposer: a :class:`sfs_fast.Decomposer` (anything with ``decompose(images
            [B,3,128,128]) -> dict of tensors`` and ``output_names``).
        prepare: ``prepare(item, options) -> Picture``; default :func:`prepare_picture`.
        finish: ``finish(picture, outputs_per_crop) -> dict`` after a picture's crops are
            written; ``outputs_per_crop[i]`` is crop i's outputs (name -> array). The dict's
            ``outputs`` (paths the hook wrote, atomically) join the row's outputs; its other
            keys are added to the row.
        progress: ``progress(row)`` per manifest row, as it is written (under a lock, maybe
            from a worker thread).

    Returns a :class:`Summary`; raises :class:`PipelineError` when nothing can run.
    """
    options, out_dir, items = start_run(inputs, out_dir, options)
    t0 = time.perf_counter()
    run = FolderRun(out_dir, decomposer, options, prepare=prepare, finish=finish, progress=progress)
    with StopSignals() as stop:
        run.run(items, stop)
    return run.summary(len(items), stop.received, time.perf_counter() - t0)


__all__ = [
    "MANIFEST", "PNG_KINDS", "FORMATS", "PipelineError", "Item", "Crop", "Picture", "FolderOptions", "Summary",
    "discover", "find_inputs", "read_list", "assign_stems", "attach_masks", "prepare_picture", "infer",
    "decompose_crops", "output_paths", "encode_outputs", "encode_crop", "grid_columns", "grid_rows", "manifest_row",
    "row_is_done", "outputs_exist", "Manifest", "StopSignals", "prepare_safely", "PictureStages", "RunRecord",
    "decomposer_plan", "first_line", "FolderRun", "start_run", "decompose_folder",
]
