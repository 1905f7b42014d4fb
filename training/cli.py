"""``sfs-train`` and ``sfs-data``.

    sfs-data synth OUT --n 1000 [--seed 0] [--size 128]     synthetic faces + CSVs (--generator mesh|procedural)
    sfs-data csv DIR                                           CSVs of a synthetic / pseudo / CelebA folder
    sfs-data pseudo --weights CKPT CELEBA_DIR OUT             pseudo labels of real faces + CSVs
    sfs-train --method 3 --syn_data OUT --epochs 10 ...       train (the original flags, SPEC B.4.5)
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from sfs_fast.cli.common import CommandError, add_debug_flag, run_command

TRAIN_DESCRIPTION = """\
Train one of the eight methods (0 SfSNet ... 7 GAN train_2) on the SfSNet synthetic layout
and/or CelebA pseudo labels (CSV indexes; make procedural data with `sfs-data synth`).

Writes to --log_dir: checkpoints/epoch-NNNN/{model.safetensors,state.pt} and checkpoints/LATEST
(each epoch, atomically; resume with --load_model LOG_DIR), model.safetensors (the latest
model, usable by sfs-decompose / sfs-export), metrics.jsonl (one line per epoch),
samples/epoch_NNN.png, and details.txt when --details is given.
"""


def _read_first(value: str):
    n = int(value)
    return None if n < 0 else n


def build_train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sfs-train", description=TRAIN_DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, help="method id 0-7 or slug (e.g. 3 or shading-residue)")
    p.add_argument("--batch_size", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--epochs", type=int, default=10, help="epochs (of each stage for methods 6 and 7; default 10)")
    p.add_argument("--lr", type=float, default=0.001, help="Adam learning rate, also for G and D (default 0.001)")
    p.add_argument("--wt_decay", type=float, default=0.0005,
                   help="Adam weight decay of the pipeline (default 0.0005; methods 5-7 use none, as the original)")
    p.add_argument("--no_cuda", action="store_true", help="do not use CUDA")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--seed", type=int, default=1, help="random seed: init, data order, read_first, val split (default 1)")
    p.add_argument("--read_first", type=_read_first, default=None,
                   help="use N rows of each CSV, sampled with --seed (default: all)")
    p.add_argument("--details", default=None, help="text written to <log_dir>/details.txt")
    p.add_argument("--load_pretrained_model", default=None,
                   help="initialise from weights (Caffe .h5, .pth/.pkl, ours, or a registered name such as "
                        "sfsnet); the modules it held are "
                        "frozen as the method's fix_weights() did")
    p.add_argument("--syn_data", default=None, help="synthetic data folder with train.csv, test.csv, train/, test/")
    p.add_argument("--celeba_data", default=None, help="CelebA pseudo-label folder with train.csv (and test.csv)")
    p.add_argument("--log_dir", default="./results/", help="output folder (default ./results/)")
    p.add_argument("--load_model", default=None, help="resume from a log dir (or its checkpoints/epoch-NNNN)")
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes (default 0)")
    p.add_argument("--mask-losses", dest="mask_losses", action="store_true", default=True,
                   help="restrict image losses to the mask (default, as Caffe)")
    p.add_argument("--no-mask-losses", dest="mask_losses", action="store_false",
                   help="supervise every pixel (the PyTorch port)")
    p.add_argument("--loss-variant", default=None, help="alternative loss table: shading, recon-mse (methods 1-4) or light (method 0)")
    p.add_argument("--crop", type=int, default=None,
                   help="train on random NxN crops (same scale, fewer pixels: cheaper steps on a CPU)")
    p.add_argument("--val-split", type=float, default=2.0, help="validation percent of the training rows (default 2)")
    p.add_argument("--shading-backend", default="auto",
                   help="backend of the fused shading op: auto (fastest available), reference, cpu, ...")
    p.add_argument("--freeze", type=lambda t: tuple(x for x in t.split(",") if x), default=(),
                   help="comma-separated modules to keep fixed, besides those the method freezes when loaded "
                        "(e.g. all but light_estimator_model: fine-tune the light alone)")
    p.add_argument("--threads", type=int, default=None, help="intra-op CPU threads (default: torch's)")
    p.add_argument("--log-every", type=int, default=50, help="print the loss every N steps (0: per epoch only)")
    p.add_argument("--samples", type=int, default=4, help="decompositions in each epoch's sample grid (0: none)")
    add_debug_flag(p)
    return p


def _train(args) -> int:
    import torch

    from sfs_fast.models import method_id
    from sfs_fast.training.trainer import TrainOptions, Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.no_cuda else "cpu")
    if args.no_cuda and device.startswith("cuda"):
        raise CommandError("--no_cuda and --device cuda contradict each other")
    if args.syn_data is None and args.celeba_data is None:
        raise CommandError("no training data: give --syn_data (make some with `sfs-data synth OUT --n 1000`) "
                           "and/or --celeba_data")
    opts = TrainOptions(
        method=method_id(args.method), syn_data=args.syn_data, celeba_data=args.celeba_data, log_dir=args.log_dir,
        batch_size=args.batch_size, epochs=args.epochs, lr=args.lr, wt_decay=args.wt_decay, seed=args.seed,
        read_first=args.read_first, details=args.details, load_pretrained_model=args.load_pretrained_model,
        load_model=args.load_model, device=device, workers=args.workers, mask_losses=args.mask_losses,
        loss_variant=args.loss_variant, crop=args.crop, val_split=args.val_split, freeze=args.freeze,
        shading_backend=args.shading_backend, log_every=args.log_every, samples=args.samples,
        command=args.command)
    trainer = Trainer(opts)
    trainer.fit(log=lambda msg: print(msg, flush=True))
    print(f"sfs-train: model written to {Path(args.log_dir) / 'model.safetensors'}")
    return 0


def train_main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_train_parser().parse_args(argv)
    args.command = shlex.join(["sfs-train"] + argv)
    return run_command("sfs-train", _train, args)


# ------------------------------------------------------------------------------------------


def build_data_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sfs-data", description="Make and index training data.")
    add_debug_flag(p)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write synthetic faces in the SfSNet synthetic layout (+ CSVs)")
    s.add_argument("out", help="output folder")
    s.add_argument("--n", type=int, required=True, help="number of faces")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--size", type=int, default=128, help="image size in pixels (default 128)")
    s.add_argument("--test-fraction", type=float, default=0.1, help="fraction of faces in test/ (default 0.1)")
    s.add_argument("--lights-per-face", type=int, default=1, help="renderings of each face under new lights (default 1)")
    s.add_argument("--light-tint", type=float, default=1.0,
                   help="mesh generator: how much of the SfSNet lights' colour tint to keep (1 as the files, 0 grey)")
    s.add_argument("--generator", choices=["mesh", "procedural"], default="mesh",
                   help="mesh: MediaPipe face geometry with hair, neck, background, highlights, shadows and "
                        "camera effects (default); procedural: the older height-field heads")
    s.add_argument("--threads", type=int, default=1,
                   help="torch threads while rendering (default 1: the batches are small)")
    add_debug_flag(s)

    c = sub.add_parser("csv", help="write train.csv/test.csv of a data folder")
    c.add_argument("dir", help="synthetic, pseudo-label or CelebA folder")
    c.add_argument("--layout", default="auto", choices=["auto", "synthetic", "pseudo", "celeba"])
    add_debug_flag(c)

    q = sub.add_parser("pseudo", help="pseudo labels of real faces with a trained model (+ CSVs)")
    q.add_argument("celeba_dir", help="folder of face images (train/ and test/ sub-folders are kept as splits)")
    q.add_argument("out", help="output folder")
    q.add_argument("--weights", required=True, help="trained model: SfSNet-type (method with a light) or SkipNet")
    q.add_argument("--method", default=None, help="method of the weights, when the file does not say")
    q.add_argument("--batch-size", type=int, default=16)
    q.add_argument("--device", default="cpu")
    add_debug_flag(q)
    return p


def _synth(args) -> int:
    import torch

    from sfs_fast.training.synth import write_dataset

    if args.n < 1:
        raise CommandError(f"--n: need at least one face, got {args.n}")
    if args.lights_per_face < 1:
        raise CommandError(f"--lights-per-face: need at least 1, got {args.lights_per_face}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"{out}: exists and is not a folder")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    counts = write_dataset(out, args.n, seed=args.seed, size=args.size, test_fraction=args.test_fraction,
                           lights_per_face=args.lights_per_face, generator=args.generator,
                           light_tint=args.light_tint)
    print(f"sfs-data: wrote {counts.get('train', 0)} train and {counts.get('test', 0)} test samples to {out} "
          f"in {time.perf_counter() - started:.1f} s")
    return 0


def _csv(args) -> int:
    from sfs_fast.training.data import write_csvs

    layout, counts = write_csvs(args.dir, args.layout)
    print(f"sfs-data: {layout} layout; " + ", ".join(f"{Path(args.dir) / (s + '.csv')}: {n} rows" for s, n in counts.items()))
    return 0


def _pseudo(args) -> int:
    from sfs_fast.training.pseudo import write_pseudo_labels

    counts, mean_l1 = write_pseudo_labels(args.weights, args.celeba_dir, args.out, method=args.method,
                                          batch_size=args.batch_size, device=args.device)
    print(f"sfs-data: pseudo labels for {sum(counts.values())} faces in {args.out} "
          f"({', '.join(f'{s}: {n}' for s, n in counts.items())}); mean L1 recon error {mean_l1:.4f}")
    return 0


def data_main(argv=None) -> int:
    args = build_data_parser().parse_args(argv)
    func = {"synth": _synth, "csv": _csv, "pseudo": _pseudo}[args.command]
    return run_command(f"sfs-data {args.command}", func, args)


if __name__ == "__main__":
    sys.exit(train_main())
