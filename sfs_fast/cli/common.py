"""What every command shares: one clear error line, exit codes, ``--debug``, the Decomposer
that the model flags ask for."""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

EXIT_OK = 0
EXIT_ERROR = 1  # bad input or a failure before any work was done
EXIT_USAGE = 2  # argparse's own code for bad command lines
EXIT_PARTIAL = 3  # some inputs failed, the rest were processed


class CommandError(Exception):
    """An error to report as one line (no traceback) with a given exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR):
        super().__init__(message)
        self.code = code


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def run_command(prog: str, func, args) -> int:
    """Run ``func(args)``; turn expected failures into one stderr line and an exit code."""
    try:
        code = func(args)
        return EXIT_OK if code is None else int(code)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (CommandError, ValueError, OSError, RuntimeError, ImportError) as exc:
        if getattr(args, "debug", False):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return getattr(exc, "code", EXIT_ERROR) if isinstance(exc, CommandError) else EXIT_ERROR


def checked_plan(args):
    """The run plan of the model flags, after the checks every command makes on them. Flags
    that make no plan (here) are a bad command line (exit 2), a missing file bad input (1)."""
    from sfs_fast.plan import FILE_BACKENDS, plan_from_args

    onnx = getattr(args, "onnx", None)  # sfs-compare has no --onnx
    if onnx and args.backend not in (None, *FILE_BACKENDS):
        raise CommandError(f"--onnx needs --backend {' or '.join(FILE_BACKENDS)} (or no --backend)", EXIT_USAGE)
    if onnx and not Path(onnx).is_file():
        raise CommandError(f"{onnx}: no such ONNX file")
    try:
        return plan_from_args(args)  # a missing checkpoint is load_any's to report (it also takes registry names)
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None


def checked_options(options):
    """``options.checked()`` (a :class:`sfs_fast.pipeline.FolderOptions`); a bad value is a
    bad command line (exit 2)."""
    from sfs_fast.pipeline import PipelineError

    try:
        return options.checked()
    except PipelineError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None


def print_notes(notes, prog: str) -> None:
    for text in notes:
        print(f"{prog}: note: {text}", file=sys.stderr)


def prepared_pictures(items, prepare, prog: str) -> tuple[list, int]:
    """``prepare(item)`` for each input; the pictures that gave crops and the count that did
    not (each reported on one stderr line). None readable is a :class:`CommandError`."""
    good, failed = [], 0
    for item in items:
        picture = prepare(item)
        if picture.crops:
            good.append(picture)
        else:
            print(f"{prog}: failed {item.path}: {picture.error}", file=sys.stderr)
            failed += 1
    if not good:
        raise CommandError("no picture could be read")
    return good, failed


def finish(summary: dict, as_json: bool, line: str, failed: int) -> int:
    """Print a command's summary (one JSON line on stdout with ``--json``, else ``line`` on
    stderr) and return its exit code: OK, or PARTIAL when ``failed`` inputs failed."""
    if as_json:
        print(json.dumps(summary))
    else:
        print(line, file=sys.stderr)
    return EXIT_OK if failed == 0 else EXIT_PARTIAL


def make_decomposer(args, prog: str):
    """The Decomposer that ``args`` (``--method --weights --onnx --backend --precision
    --device --threads``) ask for; its notes (random weights, emulated precision) are printed
    as ``PROG: note: ...`` lines, its warnings not repeated."""
    from sfs_fast.decomposer import Decomposer

    plan = checked_plan(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Decomposer's notes say the same, once, below
        dec = Decomposer(method=args.method, weights=args.weights, onnx=args.onnx, plan=plan)
    print_notes(getattr(dec, "notes", []), prog)
    return dec


def make_model_source(args, prog: str):
    """What an engine whose Decomposers are built elsewhere (Ray actors) ships to them: the
    model the same flags load, or the ``--onnx`` path; the plan is :func:`checked_plan`'s.
    The model's notes (demo or random weights) are printed as for :func:`make_decomposer`."""
    from sfs_fast.decomposer import load_model

    if args.onnx:
        return args.onnx
    model, notes = load_model(method=args.method, weights=args.weights)
    print_notes(notes, prog)
    return model
