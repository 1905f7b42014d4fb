"""sfs-export: one verified ONNX file per method (or ``--all``), with a metadata sidecar."""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from sfs_fast.cli.common import EXIT_ERROR, CommandError, add_debug_flag, run_command

DESCRIPTION = """\
Export a method to ONNX, verified against PyTorch before it is reported done.

The graph takes `image` float32 [B,3,128,128] RGB in [0,1] and returns the method's
outputs by name (normal, albedo, light, sh_shading, residue, shading, recon, ...).
The SH shading is plain ONNX operators: onnxruntime alone runs the file.

Every export passes onnx.checker (full check), then runs in ONNX Runtime on fresh random
inputs at two batch sizes (1 and 5; B twice for --batch B) against PyTorch, printing the
max abs / relative / mean abs difference per output. It fails (exit 1, the file kept as
NAME.failed.onnx) when an output differs by more than atol * max(1, max|output|):
  fp32: max difference, atol 1e-4
  fp16: max difference, atol 5e-2 (half weights and activations; float32 inputs,
        outputs, output convolutions and shading)
  int8: mean difference, atol 1e-1 (static QDQ, per-channel int8 convolutions,
        calibrated on the example faces and synthetic face-like images, checked on
        fresh face-like images). --int8-layers budget (default) quantizes only the
        convolutions whose error stays within the accuracy budget of sfs-bench
        accuracy; all quantizes every convolution but the 3-channel outputs.
Metadata (method, input layout and range, output names, SH and normal conventions, opset,
precision, checkpoint sha256, versions, measured parity) is stored in the file's
metadata_props and in NAME.json beside it.
"""

EPILOG = """\
examples:
  sfs-export --method 3 --onnx -o method3.onnx --weights method3.safetensors
  sfs-export --all --onnx -o onnx/ --int8
  sfs-export --method sfsnet --onnx --weights SfSNet.caffemodel.h5 --batch 1
"""


def build_parser() -> argparse.ArgumentParser:
    from sfs_fast.plan import INT8_LAYERS, add_plan_arguments

    from sfs_fast.export.onnx_export import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET

    p = argparse.ArgumentParser(prog="sfs-export", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--method", help="method id 0-7 or slug (e.g. 3 or shading-residue)")
    which.add_argument("--all", action="store_true", help="export methods 0-7 into the folder -o DIR")
    p.add_argument("--onnx", action="store_true", help="export to ONNX (the only format; accepted for clarity)")
    p.add_argument("-o", "--output", default=None,
                   help="output .onnx file (default: method{N}-{slug}[-fp16|-int8].onnx here), "
                        "or the folder with --all (default: onnx/)")
    p.add_argument("--weights", default=None,
                   help="checkpoint (safetensors, Caffe .h5, .pth/.pkl) or registered name (sfsnet, demo-0 ... "
                        "demo-7: sfs-weights list); default: the default weights of "
                        "the method, else random (untrained) weights with a warning")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset, {MIN_OPSET}-{MAX_OPSET} (default {DEFAULT_OPSET})")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--batch", type=int, default=None, help="fixed batch size instead of a dynamic one")
    size.add_argument("--dynamic-batch", action="store_true", help="dynamic batch dimension (the default)")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true", help="float16 weights and activations (float32 I/O)")
    prec.add_argument("--int8", action="store_true", help="static int8 quantization (QDQ, per-channel)")
    add_plan_arguments(prec, flags=("precision",), onnx_precisions=True)  # an ONNX file's precisions
    p.add_argument("--int8-layers", choices=INT8_LAYERS, default=None,
                   help="int8: quantize only the convolutions whose error stays within the accuracy budget "
                        "(default), or every convolution but the 3-channel outputs (faster, over budget)")
    p.add_argument("--simplify", action=argparse.BooleanOptionalAction, default=True,
                   help="simplify the graph with onnxslim (default: on)")
    p.add_argument("--atol", type=float, default=None, help="parity bound (default: 1e-4 fp32, 5e-2 fp16, 1e-1 int8)")
    p.add_argument("--upsample", choices=["bilinear", "caffe"], default=None,
                   help="upsampling of the generation nets for random weights (checkpoints carry their own)")
    p.add_argument("--seed", type=int, default=None, help="seed of the verification inputs (default: fresh)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    add_debug_flag(p)
    return p


def _load_model(method: int, weights, upsample):
    """``(model, source sha256 or None)``; random weights warn on stderr."""
    from sfs_fast import weights as weights_mod
    from sfs_fast.models import build_model

    config = {} if upsample is None else {"upsample": upsample}
    if weights is not None:
        model = weights_mod.load_any(weights, method=method, **config)  # a path or a registered name
        return model, model.weights_source["sha256"]
    default = weights_mod.default_weights(method)
    if default is not None:  # bundled weights carry their own upsampling (--upsample is for random ones)
        return weights_mod.load(default), weights_mod.file_sha256(default)
    print(f"sfs-export: warning: no weights for method {method}; exporting random, untrained weights",
          file=sys.stderr)
    return build_model(method, **config).eval(), None


def default_name(method: int, precision: str) -> str:
    from sfs_fast.models import METHODS

    suffix = "" if precision == "fp32" else f"-{precision}"
    return f"method{method}-{METHODS[method].slug}{suffix}.onnx"


def export_command(args) -> int:
    from sfs_fast.models import METHODS, method_id

    from sfs_fast.export.onnx_export import MAX_OPSET, MIN_OPSET, ParityError, check_output_path, export_onnx

    precision = "fp16" if args.fp16 else "int8" if args.int8 else (args.precision or "fp32")
    if not MIN_OPSET <= args.opset <= MAX_OPSET:
        raise CommandError(f"--opset {args.opset} is not supported; use {MIN_OPSET} to {MAX_OPSET}")
    if args.batch is not None and args.batch < 1:
        raise CommandError(f"--batch must be a positive integer, got {args.batch}")
    if args.int8_layers is not None and precision != "int8":
        raise CommandError(f"--int8-layers applies to int8 exports, not {precision}")
    if args.atol is not None and not args.atol > 0:
        raise CommandError(f"--atol must be positive, got {args.atol}")
    if args.all:
        if args.weights is not None:
            raise CommandError("--weights holds one method; it cannot be used with --all")
        folder = Path(args.output or "onnx")
        if folder.suffix == ".onnx":
            raise CommandError(f"{folder}: --all writes a folder, not one .onnx file")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CommandError(f"{folder}: cannot create the output folder ({exc.strerror})") from None
        jobs = [(m, folder / default_name(m, precision)) for m in METHODS]
    else:
        method = method_id(args.method)
        jobs = [(method, Path(args.output) if args.output else Path(default_name(method, precision)))]
    for _, path in jobs:
        check_output_path(path)  # before any work: a bad path fails in a second, not a minute

    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    results, failed = [], []
    for method, path in jobs:
        model, sha = _load_model(method, args.weights, args.upsample)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                result = export_onnx(model, path, opset=args.opset, batch=args.batch, precision=precision,
                                     simplify_graph=args.simplify, atol=args.atol, seed=args.seed,
                                     source_sha256=sha, int8_layers=args.int8_layers or "budget", log=log)
            except ParityError as exc:
                print(f"sfs-export: error: {exc}", file=sys.stderr)
                failed.append(method)
                continue
        results.append(result.to_dict())
    if args.json:
        print(json.dumps({"results": results, "failed_methods": failed}, indent=2))
    if failed:
        return EXIT_ERROR
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("sfs-export", export_command, args)


if __name__ == "__main__":
    sys.exit(main())
