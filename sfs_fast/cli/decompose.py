"""sfs-decompose: decompose a folder (or a list, or one picture) of faces into normals,
albedo, SH light, shading, residue and reconstruction, robustly and fast.

Pipeline: a pool of decoder threads reads and resizes pictures ahead of the model; the main
thread fills batches and runs :class:`sfs_fast.Decomposer` (the one inference path); a pool of
encoder threads writes the outputs while the next batch runs. Every output is written to a
temporary name and renamed, and an input's manifest line is written only once all its outputs
exist, so a killed run leaves no half files and a rerun picks up where it stopped.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from sfs_fast.cli.common import EXIT_ERROR, EXIT_OK, EXIT_PARTIAL, CommandError, add_debug_flag, run_command

PROG = "sfs-decompose"
MANIFEST = "manifest.jsonl"
PNG_KINDS = ("normal", "albedo", "shading", "residue", "recon")
FORMATS = ("png", "npy")

DESCRIPTION = """\
Decompose face pictures into normals, albedo, SH lighting, shading, residue and
reconstruction with one of the eight methods (0 = SfSNet, 1-7 = residue methods).

IN is a folder (pictures directly inside it; -r for sub-folders), one picture, or a text
file listing pictures (one path a line, relative to the list file; '#' starts a comment).
In a folder, files with a picture extension (.png .jpg .jpeg .bmp .tif .webp ...) are
inputs; the format itself is recognised by content, not by the extension. Files named
NAME_mask.* are masks, never inputs.

Pre-processing: EXIF orientation is applied; grey, palette, RGBA (alpha dropped), CMYK and
16-bit pictures become 8-bit RGB. Pictures that are not square are CENTER-CROPPED to the
square of side min(W,H) by default (--fit pad pads them with black to side max(W,H)
instead); the square is resized to 128x128. The square's box (left, top, right, bottom) in
the upright picture's pixels is kept in the manifest as "crop".

Masks: --masks DIR matches masks by relative path or stem (STEM.* or STEM_mask.*); without
it, NAME_mask.* beside the picture is used (and, for SfSNet's NAME_face.png, NAME_mask.*).
A mask gets the same crop and resize as its picture and multiplies the picture outputs
(black background); the .npy outputs stay unmasked and the resized mask is saved as
STEM_mask.npy.
"""

EPILOG = """\
outputs (the input tree is mirrored under OUT):
  STEM_normal.png    unit normals mapped to RGB as (n + 1) / 2
  STEM_albedo.png    albedo, clipped to [0, 1]
  STEM_shading.png   shading divided by its maximum over the picture (display only)
  STEM_residue.png   signed shading residue, 0.5 + r / (2 max|r|) (methods 3-7)
  STEM_recon.png     reconstruction shading x albedo, clipped to [0, 1]
  STEM_light.txt     27 SH coefficients, R|G|B blocks of 9, one tab-separated line
                     (the SfSNet light-file format; none for method 2)
  STEM_NAME.npy      with --formats png,npy: every float output of the model, unmasked
  manifest.jsonl     one JSON line per input: status ok/skipped/failed, reason, crop,
                     timings, outputs
  grids/             with --grid: a contact sheet per batch (face, normal, albedo,
                     shading, [residue], recon per row)

A rerun skips inputs whose outputs all exist (--overwrite redoes them) and retries failed
ones. Unreadable, empty, truncated, corrupt, non-picture and oversized (--max-pixels)
inputs are reported (manifest and one stderr line) and skipped; the rest is processed.

exit codes:
  0  every input succeeded (or was already done)
  1  nothing usable: bad arguments, no inputs, a model that cannot be loaded, or every
     input failed
  2  command-line syntax error (argparse)
  3  partial failure: some inputs failed, the others were processed
"""


def build_parser() -> argparse.ArgumentParser:
    from sfs_fast.plan import add_plan_arguments

    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="IN", help="folder, picture, or text file listing pictures")
    p.add_argument("output", metavar="OUT", help="output folder (created; mirrors IN's tree)")
    p.add_argument("--method", default=None,
                   help="method id 0-7 or slug (default: the checkpoint's, else 0)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--weights", metavar="CKPT", default=None,
                     help="checkpoint (.safetensors, or .pth/.pkl/.caffemodel.h5 imported on the fly); "
                          "default: the bundled demo weights of the method")
    src.add_argument("--onnx", metavar="FILE", default=None,
                     help="an exported .onnx model (implies --backend onnx)")
    add_plan_arguments(p)  # --backend, --device, --precision, --threads (sfs_fast.plan)
    p.add_argument("--masks", metavar="DIR", default=None, help="folder of masks, matched by path or stem")
    p.add_argument("-r", "--recursive", action="store_true", help="descend into sub-folders of IN")
    p.add_argument("--fit", choices=["crop", "pad"], default="crop",
                   help="non-square pictures: center crop (default) or pad with black to a square")
    p.add_argument("--batch-size", type=int, default=16, help="pictures per model call (default: 16)")
    p.add_argument("--workers", type=int, default=None,
                   help="decoder threads and encoder threads, each (default: min(4, CPUs))")
    p.add_argument("--overwrite", action="store_true", help="redo inputs whose outputs already exist")
    p.add_argument("--formats", default="png",
                   help="comma-separated output formats: png (pictures + light file), npy (float arrays); "
                        "default: png")
    p.add_argument("--grid", action="store_true", help="also write a contact sheet per batch under OUT/grids/")
    p.add_argument("--max-pixels", type=float, default=None,
                   help="refuse pictures with more pixels than this (default: 100e6)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    add_debug_flag(p)
    return p


# --------------------------------------------------------------------------------------
# Inputs


@dataclass
class Item:
    """One input: its path, its path relative to IN (mirrored under OUT), its mask."""

    path: Path
    rel: Path
    mask: Path | None = None
    error: str | None = None  # set when the input is refused before decoding

    @property
    def key(self) -> str:
        return self.rel.as_posix()


@dataclass
class Result:
    item: Item
    image: object = None
    mask: object = None
    crop: tuple | None = None
    size: tuple | None = None
    error: str | None = None
    timings: dict = field(default_factory=dict)


def _is_mask_name(name: str) -> bool:
    return Path(name).stem.lower().endswith("_mask")


def _has_picture_ext(name: str) -> bool:
    from sfs_fast.images import IMAGE_EXTENSIONS

    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


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


def collect_inputs(src: Path, out_dir: Path, *, recursive: bool, masks_dir: Path | None) -> list[Item]:
    """The inputs named by ``src`` (folder, picture, or list file), with their masks."""
    from sfs_fast.images import is_picture

    out_real = out_dir.resolve()
    masks_real = masks_dir.resolve() if masks_dir else None
    items: list[Item] = []
    if src.is_dir():
        if src.resolve() == out_real:
            raise CommandError("OUT must not be IN itself (outputs would be read as inputs next time)")
        for root, dirs, files in os.walk(src):
            root_p = Path(root)
            # never read our own outputs or the masks as inputs
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                             and (root_p / d).resolve() not in (out_real, masks_real)) if recursive else []
            for name in sorted(files):
                if name.startswith(".") or not _has_picture_ext(name) or _is_mask_name(name):
                    continue
                path = root_p / name
                items.append(Item(path, path.relative_to(src)))
    elif src.is_file() and (_has_picture_ext(src.name) or is_picture(src)):
        items.append(Item(src, Path(src.name)))
    elif src.is_file():
        items = _read_list(src)
    elif src.is_symlink():
        raise CommandError(f"{src}: dangling symbolic link")
    else:
        raise CommandError(f"{src}: no such file or folder")

    mask_index = _index_masks(masks_dir) if masks_dir else None
    folder_cache: dict = {}
    seen: dict = {}
    for item in items:
        stem = item.rel.with_suffix("").as_posix()
        if stem in seen:
            item.error = f"output name clashes with {seen[stem]} (same name, other extension)"
            continue
        seen[stem] = item.key
        if mask_index is not None:
            keys = [stem, *[str(Path(stem).parent / s) for s in _mask_stems(Path(stem).name)],
                    item.rel.stem, *_mask_stems(item.rel.stem)]
            item.mask = next((mask_index[k] for k in keys if k in mask_index), None)
        else:
            folder = item.path.parent
            if folder not in folder_cache:
                folder_cache[folder] = _index_folder(folder)
            index = folder_cache[folder]
            item.mask = next((index[s] for s in _mask_stems(item.path.stem) if s in index), None)
    return items


def _read_list(list_file: Path) -> list[Item]:
    try:
        text = list_file.read_text(encoding="utf-8")
    except (UnicodeDecodeError, ValueError):
        raise CommandError(f"{list_file}: neither a picture nor a text list of pictures") from None
    base = list_file.parent
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
        raise CommandError(f"{list_file}: the list names no pictures")
    return items


# --------------------------------------------------------------------------------------
# Outputs


def output_paths(out_dir: Path, rel: Path, names: list[str], formats: set, masked: bool) -> dict:
    """kind -> destination path of one input's outputs."""
    folder = out_dir / rel.parent
    stem = rel.stem
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


def outputs_complete(paths: dict) -> bool:
    return all(p.is_file() and p.stat().st_size > 0 for p in paths.values())


def encode_outputs(outs: dict, mask, paths: dict) -> None:
    """Write one input's outputs (``outs``: name -> float array without the batch dim)."""
    from sfs_fast import images
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


def grid_rows(faces, outs_list, masks, names) -> list:
    """Contact-sheet rows: face, normal, albedo, shading, [residue], recon per input."""
    from sfs_fast import images

    rows = []
    for face, outs, mask in zip(faces, outs_list, masks):
        row = [images.unit_to_rgb(face), images.normal_to_rgb(outs["normal"], mask),
               images.unit_to_rgb(outs["albedo"], mask), images.shading_to_rgb(outs["shading"], mask)]
        if "residue" in names:
            row.append(images.residue_to_rgb(outs["residue"], mask))
        row.append(images.unit_to_rgb(outs["recon"], mask))
        rows.append(row)
    return rows


class Manifest:
    """``OUT/manifest.jsonl``: lines appended as inputs finish (one write each, so a killed
    run leaves whole lines), compacted to one line per input at the end of a run."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / MANIFEST
        self.previous = self.read(self.path)
        self.lock = threading.Lock()
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    @staticmethod
    def read(path: Path) -> dict:
        entries = {}
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return entries
        for line in lines:
            try:
                entry = json.loads(line)
                entries[entry["input"]] = entry
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a killed run
        return entries

    def write(self, entry: dict) -> None:
        data = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        with self.lock:
            os.write(self.fd, data)

    def close(self, order: list[str]) -> None:
        """Rewrite the manifest with the latest line of every input, this run's first."""
        from sfs_fast.images import save_text

        os.close(self.fd)
        latest = self.read(self.path)
        keys = [k for k in order if k in latest] + [k for k in latest if k not in set(order)]
        save_text(self.path, "".join(json.dumps(latest[k], ensure_ascii=False) + "\n" for k in keys))


# --------------------------------------------------------------------------------------
# The run


def _ordered(pool, func, items, window):
    """``pool.map`` with at most ``window`` jobs ahead of the consumer."""
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


def _load(item: Item, fit: str, max_pixels: int) -> Result:
    from sfs_fast.images import ImageError, load_image, load_mask

    res = Result(item)
    if item.error:
        res.error = item.error
        return res
    t0 = time.perf_counter()
    try:
        res.image, res.crop, res.size = load_image(item.path, fit=fit, max_pixels=max_pixels)
        if item.mask is not None:
            try:
                res.mask = load_mask(item.mask, res.crop, res.size, max_pixels=max_pixels)
            except ImageError as exc:
                raise ImageError(f"mask {item.mask}: {exc}") from None
    except ImageError as exc:
        res.error = str(exc)
    except MemoryError:
        res.error = "out of memory while decoding"
    except Exception as exc:  # noqa: BLE001 - a decoder bug must not end the run
        res.error = f"cannot decode: {type(exc).__name__}: {exc}"
    res.timings["decode_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
    return res


def _make_decomposer(args, prog=PROG):
    from sfs_fast.decomposer import Decomposer
    from sfs_fast.plan import plan_from_args

    if args.onnx and args.backend not in (None, "onnx"):
        raise CommandError("--onnx needs --backend onnx (or no --backend)")
    if args.onnx and not Path(args.onnx).is_file():
        raise CommandError(f"{args.onnx}: no such ONNX file")
    plan = plan_from_args(args)  # a missing checkpoint is load_any's to report (it also takes registry names)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dec = Decomposer(method=args.method, weights=args.weights, onnx=args.onnx, plan=plan)
    notes = []
    for w in caught:
        text = str(w.message).strip().splitlines()[0] if str(w.message).strip() else ""
        if "weights" in text and text not in notes:  # the random-weights notice of the Decomposer
            notes.append(text)
    for text in notes:
        print(f"{prog}: note: {text}; outputs are not meaningful", file=sys.stderr)
    return dec


def decompose(args) -> int:
    import numpy as np
    import torch
    from tqdm import tqdm

    from sfs_fast import images

    formats = {f.strip() for f in args.formats.split(",") if f.strip()}
    if not formats or not formats <= set(FORMATS):
        raise CommandError(f"--formats: choose from {', '.join(FORMATS)} (got {args.formats!r})")
    if args.batch_size < 1:
        raise CommandError("--batch-size must be at least 1")
    workers = args.workers if args.workers is not None else min(4, os.cpu_count() or 1)
    if workers < 1:
        raise CommandError("--workers must be at least 1")
    max_pixels = int(args.max_pixels) if args.max_pixels else images.DEFAULT_MAX_PIXELS
    src, out_dir = Path(args.input), Path(args.output)
    masks_dir = Path(args.masks) if args.masks else None
    if masks_dir is not None and not masks_dir.is_dir():
        raise CommandError(f"--masks {masks_dir}: no such folder")

    items = collect_inputs(src, out_dir, recursive=args.recursive, masks_dir=masks_dir)
    if not items:
        raise CommandError(f"{src}: no pictures found" + ("" if args.recursive else " (use -r for sub-folders)"))
    t_start = time.perf_counter()
    dec = _make_decomposer(args)
    names = list(dec.output_names)
    t_loaded = time.perf_counter()

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CommandError(f"{out_dir}: cannot create the output folder ({exc.strerror or exc})") from None
    images.remove_stale_temporaries(out_dir)
    manifest = Manifest(out_dir)
    counts = collections.Counter()
    use_bar = sys.stderr.isatty()
    bar = tqdm(total=len(items), unit="img", disable=not use_bar, file=sys.stderr, dynamic_ncols=True)
    lock = threading.Lock()

    def say(line):
        (tqdm.write if use_bar else print)(line, file=sys.stderr)

    def finish(entry):
        manifest.write(entry)
        with lock:
            counts[entry["status"]] += 1
            bar.update(1)
        if entry["status"] == "failed":
            say(f"{PROG}: failed {entry['path']}: {entry['reason']}")

    def base_entry(item):
        return {"input": item.key, "path": str(item.path), "mask": str(item.mask) if item.mask else None}

    def rel_out(path):
        return path.relative_to(out_dir).as_posix()

    todo = []
    for item in items:
        paths = output_paths(out_dir, item.rel, names, formats, item.mask is not None)
        if not args.overwrite and item.error is None and outputs_complete(paths):
            old = manifest.previous.get(item.key, {})
            entry = {**base_entry(item), **{k: old[k] for k in ("crop", "size") if k in old},
                     "status": "skipped", "reason": "outputs exist (--overwrite redoes them)",
                     "outputs": sorted(rel_out(p) for p in paths.values())}
            finish(entry)
        else:
            todo.append(item)

    def encode(res, outs, infer_ms):
        t0 = time.perf_counter()
        item = res.item
        paths = output_paths(out_dir, item.rel, names, formats, res.mask is not None)
        entry = {**base_entry(item), "crop": list(res.crop), "size": list(res.size)}
        try:
            encode_outputs(outs, res.mask, paths)
            entry.update(status="ok", reason=None, outputs=sorted(rel_out(p) for p in paths.values()))
        except (OSError, ValueError) as exc:
            entry.update(status="failed", reason=f"cannot write outputs: {exc}", outputs=[])
        entry["timings_ms"] = {**res.timings, "infer_ms": round(infer_ms, 3),
                               "encode_ms": round((time.perf_counter() - t0) * 1e3, 3)}
        finish(entry)

    def write_grid(number, faces, outs_list, masks):
        path = out_dir / "grids" / f"batch_{number:05d}.png"
        images.save_png(path, images.grid(grid_rows(faces, outs_list, masks, names)))

    infer_s = 0.0
    n_batches = 0
    encode_futures = collections.deque()
    decode_pool = ThreadPoolExecutor(workers, thread_name_prefix="sfs-decode")
    encode_pool = ThreadPoolExecutor(workers, thread_name_prefix="sfs-encode")

    def run_batch(batch):
        nonlocal infer_s, n_batches
        x = torch.from_numpy(np.stack([r.image for r in batch]))
        t0 = time.perf_counter()
        try:
            outs = dec.decompose(x)
        except (RuntimeError, ValueError, MemoryError) as exc:
            for r in batch:
                finish({**base_entry(r.item), "crop": list(r.crop), "size": list(r.size), "status": "failed",
                        "reason": f"inference failed: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc}",
                        "outputs": [], "timings_ms": r.timings})
            return
        dt = time.perf_counter() - t0
        infer_s += dt
        n_batches += 1
        arrays = {k: v.numpy() for k, v in outs.items()}
        per_item = []
        for i, r in enumerate(batch):
            one = {k: v[i] for k, v in arrays.items()}
            per_item.append(one)
            encode_futures.append(encode_pool.submit(encode, r, one, dt * 1e3 / len(batch)))
        if args.grid:
            encode_futures.append(encode_pool.submit(write_grid, n_batches, [r.image for r in batch],
                                                     per_item, [r.mask for r in batch]))
        # keep at most two batches of encoding in flight (bounded memory)
        while len(encode_futures) > 2 * (len(batch) + 1):
            encode_futures.popleft().result()

    try:
        batch = []
        window = max(2 * args.batch_size, 2 * workers)
        for res in _ordered(decode_pool, lambda it: _load(it, args.fit, max_pixels), todo, window):
            if res.error is not None:
                finish({**base_entry(res.item), "status": "failed", "reason": res.error, "outputs": [],
                        "timings_ms": res.timings})
                continue
            batch.append(res)
            if len(batch) == args.batch_size:
                run_batch(batch)
                batch = []
        if batch:
            run_batch(batch)
        while encode_futures:
            encode_futures.popleft().result()
    finally:
        decode_pool.shutdown(wait=True, cancel_futures=True)
        encode_pool.shutdown(wait=True)
        bar.close()
        manifest.close([it.key for it in items])

    wall = time.perf_counter() - t_loaded
    ok, skipped, failed = counts["ok"], counts["skipped"], counts["failed"]
    summary = {
        "ok": ok, "skipped": skipped, "failed": failed, "inputs": len(items),
        "method": dec.method, "backend": dec.backend, "precision": getattr(dec, "precision", None),
        "batch_size": args.batch_size,
        "load_s": round(t_loaded - t_start, 3), "wall_s": round(wall, 3),
        "images_per_s": round(ok / wall, 3) if wall > 0 else None,
        "model_s": round(infer_s, 3),
        "model_images_per_s": round(ok / infer_s, 3) if infer_s > 0 else None,
        "manifest": str(manifest.path),
    }
    if failed == 0:
        code = EXIT_OK
    elif ok + skipped > 0:
        code = EXIT_PARTIAL
    else:
        code = EXIT_ERROR
    summary["exit_code"] = code
    if args.json:
        print(json.dumps(summary))
    else:
        rate = f", {summary['images_per_s']:.1f} images/s" if ok and summary["images_per_s"] else ""
        print(f"{PROG}: {ok} ok, {skipped} skipped, {failed} failed in {wall:.1f} s{rate} "
              f"({summary['backend']} {summary['precision'] or 'fp32'}); manifest {manifest.path}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, decompose, args)


if __name__ == "__main__":
    sys.exit(main())
