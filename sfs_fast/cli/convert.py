"""sfs-convert: import weights (Caffe .caffemodel.h5, PyTorch .pth/.pkl, ours) to safetensors."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sfs_fast.cli.common import CommandError, add_debug_flag, run_command

DESCRIPTION = """\
Convert weights to an sfs_fast safetensors checkpoint.

Sources (recognised by content):
  SfSNet.caffemodel.h5   the official Caffe release (h5py layout); imported with
                         upsample=caffe, BGR and the 2x-1 normal mapping folded in
  *.pth / *.pkl          SfSNet-PyTorch (net_epoch_r5_5.pth), the Illum pipelines'
                         state dicts, or the Mannix port; read with weights_only=True
  *.safetensors          an sfs_fast checkpoint (re-written, e.g. to another dtype)
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sfs-convert", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="weight file to import")
    p.add_argument("-o", "--output", required=True, help="destination .safetensors file")
    p.add_argument("--method", default=None,
                   help="method id 0-7 or slug to build (default: 0 for SfSNet weights, or the checkpoint's own)")
    p.add_argument("--upsample", choices=["bilinear", "caffe"], default=None,
                   help="upsampling of the generation nets (default: caffe for Caffe weights, bilinear otherwise)")
    p.add_argument("--fp16", action="store_true", help="store the weights as float16 (half the size)")
    add_debug_flag(p)
    return p


def convert(args) -> int:
    import torch

    from sfs_fast import weights
    from sfs_fast.models import method_id

    src = Path(args.src)
    if not src.is_file():
        raise CommandError(f"{src}: no such file")
    out = Path(args.output)
    if out.suffix != ".safetensors":
        raise CommandError(f"{out}: the output must end in .safetensors")
    method = method_id(args.method) if args.method is not None else None
    config = {} if args.upsample is None else {"upsample": args.upsample}
    model = weights.load_any(src, method=method, **config)
    meta = {"source": src.name, "source_sha256": weights.file_sha256(src)}
    # Provenance from the importers: source format and layout, the folds applied, and the
    # modules that came from the file (the trainer freezes only those).
    meta.update(getattr(model, "import_metadata", {}))
    weights.save(model, out, dtype=torch.float16 if args.fp16 else None, **meta)
    label = f"method {model.method}" if hasattr(model, "method") else "SkipNet"
    print(f"wrote {out} ({label}, {out.stat().st_size / 1e6:.1f} MB)")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("sfs-convert", convert, args)


if __name__ == "__main__":
    sys.exit(main())
