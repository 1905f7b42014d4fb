"""``sfs-bench``: eager vs fused vs torch.compile vs ONNX Runtime, with floors, JSON and plots.

    sfs-bench e2e --method 0,3 --batch 1,16 --json e2e.json --markdown e2e.md --plot e2e.png
    sfs-bench op                      # the shading op micro benchmark (sfs_fast.bench.op)
    sfs-bench train --method all --batch 2
    sfs-bench folder                  # the folder pipeline's peak RSS at 200 and 2,000 pictures
    sfs-bench folder-speed            # images/s of the folder run against the model alone, per path
    sfs-bench faces                   # detection + alignment + paste-back per photo, beside the model
    sfs-bench quality                 # bundled weights per method vs constant guesses (held-out renders, examples)
    sfs-bench ray                     # images/s on 1 and 2 local Ray actors vs the local engine, Ray's overhead
    sfs-bench latency                 # p50/p99 against batch, time to first output, peak RSS per path

Every figure is a median of ``--runs`` timed runs after ``--warmup`` untimed ones, inputs
rotated, threads pinned; every path is compared with the baseline in the same run.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from sfs_fast.cli.common import EXIT_PARTIAL, CommandError, add_debug_flag, run_command

PROG = "sfs-bench"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _methods(text: str) -> list[int]:
    from sfs_fast.models import METHODS, method_id

    if text == "all":
        return list(METHODS)
    try:
        return [method_id(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    from sfs_fast.plan import NAMED_PLANS, TRAIN_PLANS, add_plan_arguments

    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"Paths (e2e, accuracy; the named plans of sfs_fast.plan): {', '.join(NAMED_PLANS)}. "
                                       f"Train paths: {', '.join(TRAIN_PLANS)}. A path that cannot run here is "
                                       "listed as skipped with the reason.")
    p.add_argument("kind", nargs="?", default="e2e", choices=("e2e", "op", "train", "accuracy"),
                   help="what to measure (default e2e); accuracy: every precision path against fp32 on the "
                        "example faces and synthetic faces, budget metrics beside the time")
    p.add_argument("--method", type=_methods, default=[0], metavar="N|all",
                   help="method id(s), comma-separated, or 'all' (default 0)")
    p.add_argument("--batch", type=_int_list, default=None, metavar="B[,B..]",
                   help="batch sizes (default 1,16 for e2e, 2 for train)")
    p.add_argument("--size", type=int, default=128,
                   help="image size: 128 for e2e (the Decomposer's input); train takes any multiple of 4")
    p.add_argument("--paths", type=_names, default=None, metavar="P[,P..]", help="paths to run (default: all but onnx-fp16)")
    p.add_argument("--fused-off", type=_names, default=[], metavar="OPT[,OPT..]",
                   help="switch off rewrites of the fused path: fold_bn, conv_before_upsample, channels_last, "
                        "shading_backend (reference shading), share_equal_trunks")
    p.add_argument("--weights", default=None, help="checkpoint or registered name (sfs-weights list) to benchmark (default: the "
                                                   "method's default weights, "
                                                   "else random weights with calibrated BatchNorm)")
    add_plan_arguments(p, flags=("device", "threads"))
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    p.add_argument("--runs", type=int, default=20, help="timed runs (default 20)")
    p.add_argument("--gemm-size", type=int, default=2048, metavar="N",
                   help="size of the N^3 fp32 GEMM whose measured rate sets the compute floor (default 2048)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the full result as JSON")
    p.add_argument("--markdown", default=None, metavar="OUT", help="write a Markdown table")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="draw latency per path and batch (matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress lines, only the table")
    add_debug_flag(p)
    return p


def _run(args) -> int:
    import torch

    from sfs_fast.bench import env as env_mod
    from sfs_fast.bench import report

    if args.runs < 1 or args.warmup < 0:
        raise CommandError("--runs must be >= 1 and --warmup >= 0", 2)
    if args.kind == "e2e" and args.size != 128:
        raise CommandError(f"--size: the Decomposer takes 128x128 images, not {args.size}", 2)
    if args.size < 8 or args.size % 4:
        raise CommandError(f"--size: expected a multiple of 4, at least 8, got {args.size}", 2)
    if args.gemm_size < 16:
        raise CommandError("--gemm-size must be >= 16", 2)
    if args.threads is not None and args.threads < 1:
        raise CommandError("--threads must be >= 1", 2)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda: torch sees no CUDA device here", 2)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    environment = env_mod.capture(device=args.device, threads=torch.get_num_threads())
    log = (lambda *a, **k: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))

    if args.kind == "e2e":
        from sfs_fast.bench.e2e import DEFAULT_PATHS, run_e2e
        from sfs_fast.optimize import FUSED_OPTIONS

        bad = [o for o in args.fused_off if o not in FUSED_OPTIONS]
        if bad:
            raise CommandError(f"--fused-off: unknown option(s) {', '.join(bad)}; known: {', '.join(FUSED_OPTIONS)}", 2)
        fused_options = {o: ("reference" if o == "shading_backend" else False) for o in args.fused_off}
        result = run_e2e(methods=args.method, batches=args.batch or [1, 16], paths=args.paths or DEFAULT_PATHS,
                         device=args.device, threads=args.threads, warmup=args.warmup, runs=args.runs,
                         size=args.size, weights=args.weights, fused_options=fused_options,
                         gemm_n=args.gemm_size, log=log)
    elif args.kind == "accuracy":
        from sfs_fast.bench.accuracy import DEFAULT_PATHS as ACCURACY_PATHS, format_table, run_accuracy

        result = run_accuracy(methods=args.method, paths=args.paths or ACCURACY_PATHS, device=args.device,
                              threads=args.threads, warmup=args.warmup, runs=args.runs, weights=args.weights,
                              log=log)
        result["text"] = format_table(result)
    elif args.kind == "train":
        from sfs_fast.bench.train import TRAIN_PATHS, run_train

        if args.device != "cpu":
            raise CommandError("train: only --device cpu is measured by this command", 2)
        result = run_train(methods=args.method, batches=args.batch or [2], paths=args.paths or tuple(TRAIN_PATHS),
                           threads=args.threads, warmup=args.warmup, runs=args.runs, size=args.size,
                           weights=args.weights, gemm_n=args.gemm_size, log=log)
    else:
        result = _run_op(args, log)
    result["env"] = environment
    result["command"] = " ".join([PROG] + [shlex.quote(a) for a in (args.argv or [])])
    result["settings"] = {"methods": args.method, "batches": args.batch, "paths": args.paths, "size": args.size,
                          "device": args.device, "threads": torch.get_num_threads(), "warmup": args.warmup,
                          "runs": args.runs, "dtype": "float32", "gemm_size": args.gemm_size}
    if "text" in result:  # the op benchmark prints its own table
        print(result["text"])
    else:
        print(report.text_table(result))
    if args.json:
        report.write_json(result, args.json)
    if args.markdown:
        if result.get("kind") == "accuracy":
            from sfs_fast.bench.accuracy import markdown

            report.write_text(args.markdown, markdown(result, command=result["command"]))
        elif "results" in result and result.get("kind") in ("e2e", "train"):
            report.write_markdown(result, args.markdown, command=result["command"])
        else:
            report.write_text(args.markdown, "```\n" + result.get("text", "") + "\n```\n")
    if args.plot:
        if result.get("kind") not in ("e2e", "train"):
            raise CommandError("--plot: only e2e and train results are plotted")
        report.plot(result, args.plot)
    failed = [r for r in result.get("results", []) if r.get("status") == "failed"]
    return EXIT_PARTIAL if failed else 0


def _run_op(args, log) -> dict:
    """Delegate to the op micro benchmark of the kernels (``sfs_fast.bench.op.run``): shapes
    ``[B,3,size,size]`` for each ``--batch`` (its default shapes without ``--batch``),
    ``--paths`` are the op's backends (default: all available on the device)."""
    from sfs_fast.bench import op

    shapes = [(b, 3, args.size, args.size) for b in args.batch] if args.batch else op.DEFAULT_SHAPES
    result = op.run(shapes=shapes, backends=args.paths, runs=args.runs, warmup=args.warmup,
                    threads=args.threads, device=args.device, log=log)
    result["text"] = op.format_table(result)
    # one row per (shape, mode, backend) in the e2e/train layout, so every path says ok or why not
    result["results"] = [{"method": "-", "batch": row["shape"][0], "path": f"{name} {row['mode']}",
                          "shape": row["shape"], "status": r["status"], "reason": r.get("reason"),
                          "max_rel_err": r.get("max_rel_err")}
                         for row in result["rows"] for name, r in row["backends"].items()]
    return result


# sfs-bench subcommands with flags of their own: name -> module with main(argv)
OWN_FLAGS = {"folder": "sfs_fast.bench.folder", "folder-speed": "sfs_fast.bench.folder_speed",
             "faces": "sfs_fast.bench.faces", "quality": "sfs_fast.bench.quality",
             "ray": "sfs_fast.bench.folder_ray", "latency": "sfs_fast.bench.latency"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in OWN_FLAGS:
        import importlib

        return importlib.import_module(OWN_FLAGS[argv[0]]).main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    return run_command(PROG, _run, args)


if __name__ == "__main__":
    sys.exit(main())
