"""Write the bundled weights (``sfs_fast/data/method{N}_demo.safetensors``) from sfs-train runs.

    python tools/bundle_weights.py RUNS --before "sfs-data synth ... && sfs-train ..." [--methods 0,1,...]

RUNS holds one sfs-train log dir per method, ``m0b`` (method 0's last run) and ``m1`` ... ``m7``; each run's
``model.safetensors`` is stored in float16. Method 0 is stored whole; the others are stored
against it (``weights.save(base=...)``): only the modules their training changed, since they
start from method 0's frozen trunk. ``--before`` (the commands that made the data and the runs
each run starts from) joined with the run's own command, and the run's last metrics, go into
the file's metadata.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sfs_fast import weights

NOTICE = ("Bundled weights from a short CPU training on mesh-face renders (sfs-data synth), not real "
          "photographs; for method 0 on real photographs the official SfSNet is better: sfs-weights download sfsnet")
TRAINING_DATA = "sfs-data synth (mesh generator: MediaPipe canonical face, procedural albedo and surroundings)"


def bundle(runs: Path, methods, before: str) -> None:
    base = weights.WEIGHTS_DIR / "method0_demo.safetensors"
    method0_command = weights.read_metadata(runs / "m0b" / "model.safetensors").get("command", "")
    for m in methods:
        model = weights.load(runs / (f"m{m}" if m else "m0b") / "model.safetensors", method=m)
        meta = model.checkpoint_metadata
        extra = {"trained_by": "sfs-train", "command": " && ".join([before] + ([method0_command] if m else []) + [meta.get("command", "")]),
                 "options": meta.get("options"), "metrics": meta.get("metrics"),
                 "pretrained_modules": meta.get("pretrained_modules"), "frozen_modules": meta.get("frozen_modules"),
                 "epoch": meta.get("epoch"), "step": meta.get("step"), "training_data": TRAINING_DATA,
                 "notice": NOTICE}
        if m != 0 and "metrics" not in meta:
            raise SystemExit(f"m{m}: the run's checkpoint has no metrics; is it finished?")
        out = weights.WEIGHTS_DIR / f"method{m}_demo.safetensors"
        weights.save(model, out, dtype=torch.float16, base=None if m == 0 else base,
                     **{k: v for k, v in extra.items() if v is not None})
        print(f"method {m}: {out} ({out.stat().st_size / 1e6:.1f} MB)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path)
    p.add_argument("--methods", default="0,1,2,3,4,5,6,7")
    p.add_argument("--before", required=True, help="the commands before the runs (data, the base runs)")
    args = p.parse_args()
    methods = [int(x) for x in args.methods.split(",")]
    if methods[0] != 0 and not (weights.WEIGHTS_DIR / "method0_demo.safetensors").is_file():
        raise SystemExit("method 0 first: the other methods are stored against it")
    bundle(args.runs, methods, args.before)


if __name__ == "__main__":
    main()
