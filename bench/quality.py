"""``sfs-bench quality``: how good each method's bundled weights are, beside constant guesses.

    sfs-bench quality [--method 0-7|all] [--faces 24] [--lights 3] [--real DIR ...] [--json OUT] [--markdown OUT]

What a user picks weights by. Real faces with ground truth are scarce, so the check is built
from what the package has:

- **held-out renders** of the mesh face generator (``sfs_fast.training.face_synth``) from a
  seed the training data never uses (:data:`HELDOUT_SEED`), each face under ``--lights``
  lights. Per method: the mean normal angle on the face (degrees), against the constant
  frontal normal (0, 0, 1); the angle between the estimated and the true first-order light
  direction, against always answering "frontal light"; the albedo's mean absolute error;
  and how much the albedo of one face changes across its relit versions (mean absolute
  deviation from the per-pixel mean; an estimator that returned the photo itself scores the
  ``photo`` column). These mirror the three held-out numbers the weights issue measures on
  real faces (fitted 3D normals, relit photos), which is how they relate to real photos.
- **plausibility on the bundled example faces** (real photos, no ground truth): the lowest
  DC light term over images and channels (must be positive), the worst ratio of one colour
  channel's mean shading to another's (near-grey light: at most 1.5) and the reconstruction's
  mean absolute error on the face (template mask). ``--real DIR`` adds the same three numbers
  on the face crops of other folders (e.g. the 19 SfSNet crops of the shared reference data,
  which are framed like the template; files named ``*_mask*`` are skipped).

Methods without bundled weights are listed as such (never random weights). Every model runs
through the Decomposer in eager float32.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from sfs_fast.cli.common import CommandError, add_debug_flag, run_command

PROG = "sfs-bench quality"
HELDOUT_SEED = 90210  # sfs-data synth defaults to seed 0; the demo weights were trained on seed 0
FRONTAL = (0.0, 0.0, 1.0)
COLOUR_RATIO_LIMIT = 1.5


def heldout_faces(faces: int, lights: int) -> dict:
    """``faces`` generator faces under ``lights`` lights each, as float tensors: ``image``,
    ``albedo`` ``[N,3,128,128]`` in [0,1], ``normal`` ``[N,3,128,128]`` (decoded as the
    training loader decodes it), ``mask`` ``[N,128,128]`` bool, ``light`` ``[N,27]``, with
    ``N = faces * lights``, the versions of one face next to each other."""
    from sfs_fast.training import face_synth

    parts = [arrays for _, arrays in face_synth.generate(faces, seed=HELDOUT_SEED, lights_per_face=lights)]
    a = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    as_float = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0  # noqa: E731
    return {"image": as_float(a["face"]), "albedo": as_float(a["albedo"]),
            "normal": (torch.from_numpy(a["normal"]).permute(0, 3, 1, 2).float() - 128.0) / 128.0,
            "mask": torch.from_numpy(a["mask"] >= 128), "light": torch.from_numpy(a["light"]).float()}


def light_directions(light: torch.Tensor) -> torch.Tensor:
    """``[N,27]`` lights -> ``[N,3]`` unit (x, y, z) of their channel-mean first-order terms
    (SfSNet order: index 1 = z, 2 = x, 3 = y)."""
    grey = light.double().reshape(-1, 3, 9).mean(1)
    d = grey[:, [2, 3, 1]]
    return d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)


def angle_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angles in degrees between matching unit rows of ``a`` and ``b`` ``[N,3]``."""
    return torch.rad2deg(torch.acos((a.double() * b.double()).sum(1).clamp(-1.0, 1.0)))


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of ``values`` ``[N,H,W]`` (or ``[N,C,H,W]``, channels averaged) where ``mask``."""
    if values.dim() == 4:
        values = values.mean(1)
    return float(values.double()[mask].mean())


def albedo_variation(albedo: torch.Tensor, mask: torch.Tensor, lights: int) -> float:
    """Mean absolute deviation of each face's albedo ``[F*L,3,H,W]`` from its mean over its
    ``lights`` relit versions, on the face mask."""
    a = albedo.double().reshape(-1, lights, *albedo.shape[1:])
    dev = (a - a.mean(1, keepdim=True)).abs().mean(2).reshape(-1, *albedo.shape[2:])
    return masked_mean(dev, mask)


def heldout_scores(out: dict, truth: dict, lights: int) -> dict:
    """The held-out metrics of one method's outputs ``out`` on :func:`heldout_faces`."""
    from sfs_fast.precision import normal_angles_deg

    mask = truth["mask"]
    angles = normal_angles_deg(out["normal"], truth["normal"]).reshape(mask.shape)
    scores = {"normal_deg": float(angles[mask].mean()),
              "albedo_l1": masked_mean((out["albedo"] - truth["albedo"]).abs(), mask),
              "albedo_variation": albedo_variation(out["albedo"], mask, lights)}
    if "light" in out:
        scores["light_deg"] = float(angle_deg(light_directions(out["light"]), light_directions(truth["light"])).mean())
    return scores


def baseline_scores(truth: dict, lights: int) -> dict:
    """The constant guesses: frontal normal, frontal light, the photo as its own albedo."""
    mask = truth["mask"]
    frontal = torch.tensor(FRONTAL).view(1, 3, 1, 1).expand_as(truth["normal"])
    angles = torch.rad2deg(torch.acos((torch.nn.functional.normalize(truth["normal"].double(), dim=1)
                                       * frontal.double()).sum(1).clamp(-1, 1)))
    front = torch.tensor([FRONTAL]).expand(len(truth["light"]), 3)
    return {"normal_deg": float(angles[mask].mean()),
            "light_deg": float(angle_deg(front, light_directions(truth["light"])).mean()),
            "albedo_variation": albedo_variation(truth["image"], mask, lights)}


def plausibility(out: dict, images: torch.Tensor, mask: torch.Tensor) -> dict:
    """On real faces without ground truth: the lowest per-channel DC light term, the worst
    ratio of two channels' mean shading on the face, the reconstruction's mean absolute error
    on the face (``mask`` ``[H,W]`` bool, the same for every image)."""
    m = mask.expand(len(images), *mask.shape)
    shading_means = torch.stack([out["shading"][:, c].double()[m].mean() for c in range(3)])
    result = {"colour_ratio": float(shading_means.max() / shading_means.min().clamp_min(1e-12)),
              "recon_mae": masked_mean((out["recon"] - images).abs(), m)}
    if "light" in out:
        result["dc_min"] = float(out["light"].reshape(-1, 3, 9)[:, :, 0].min())
    return result


def evaluate(method, truth: dict, lights: int, examples: torch.Tensor, mask: torch.Tensor, spec=None,
             real: torch.Tensor | None = None) -> dict:
    """One row: the method's bundled weights (or ``spec``: a checkpoint or registered name,
    whose file says the method) through the Decomposer (eager fp32)."""
    from sfs_fast import Decomposer, weights

    if spec is None:
        spec = weights.default_weights(method)
        if spec is None:
            return {"method": method, "status": "no bundled weights"}
    model = weights.load_any(spec, method).eval()
    dec = Decomposer(model, plan=_eager_plan())
    out = _decompose(dec, truth["image"])
    row = {"method": dec.method, "status": "ok", "weights": Path(str(spec)).name, **heldout_scores(out, truth, lights)}
    row.update({f"examples_{k}": v for k, v in plausibility(_decompose(dec, examples), examples, mask).items()})
    if real is not None:
        row.update({f"real_{k}": v for k, v in plausibility(_decompose(dec, real), real, mask).items()})
    return row


def _eager_plan():
    from sfs_fast.plan import resolve_plan

    return resolve_plan(backend="eager", precision="fp32")


def _decompose(dec, images: torch.Tensor, batch: int = 16) -> dict:
    parts = [dec.decompose(images[i:i + batch]) for i in range(0, len(images), batch)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def real_crops(folders) -> torch.Tensor | None:
    """The face pictures of ``folders`` (sorted, ``*_mask*`` skipped) as ``[N,3,128,128]``."""
    from sfs_fast import images

    paths = sorted(p for d in folders for p in Path(d).iterdir()
                   if "_mask" not in p.name and p.is_file() and images.is_picture(p))
    if folders and not paths:
        raise CommandError(f"--real {' '.join(map(str, folders))}: no pictures found")
    return torch.from_numpy(np.stack([images.load_image(p)[0] for p in paths])) if paths else None


def run(methods, faces: int, lights: int, spec=None, real=()) -> dict:
    from sfs_fast.faces import template_mask
    from sfs_fast.samples import example_faces

    truth = heldout_faces(faces, lights)
    examples = torch.from_numpy(example_faces())
    mask = torch.from_numpy(template_mask() > 0.5)
    real_images = real_crops(real)
    rows = [evaluate(m, truth, lights, examples, mask, spec, real_images) for m in methods]
    return {"kind": "quality", "faces": faces, "lights": lights, "seed": HELDOUT_SEED,
            "real": [str(d) for d in real], "real_pictures": 0 if real_images is None else len(real_images),
            "baseline": baseline_scores(truth, lights), "results": rows}


COLUMNS = (("normal_deg", "normal (deg)", "{:.1f}"), ("light_deg", "light dir (deg)", "{:.1f}"),
           ("albedo_l1", "albedo L1", "{:.3f}"), ("albedo_variation", "albedo var", "{:.3f}"),
           ("examples_dc_min", "ex. min DC", "{:+.3f}"), ("examples_colour_ratio", "ex. colour ratio", "{:.2f}"),
           ("examples_recon_mae", "ex. recon MAE", "{:.3f}"), ("real_dc_min", "real min DC", "{:+.3f}"),
           ("real_colour_ratio", "real colour ratio", "{:.2f}"), ("real_recon_mae", "real recon MAE", "{:.3f}"))


def format_table(result: dict) -> str:
    """The Markdown table: one row per method, then the constant guesses."""
    head = "| method | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for row in result["results"] + [{"method": "constant", "status": "ok", **result["baseline"]}]:
        if row["status"] != "ok":
            lines.append(f"| {row['method']} | {row['status']} |" + " |" * (len(COLUMNS) - 1))
            continue
        cells = [fmt.format(row[key]) if key in row else "-" for key, _, fmt in COLUMNS]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--method", default="all", help="method ids, comma-separated, or all (default all)")
    p.add_argument("--faces", type=int, default=24, help="held-out generator faces (default 24)")
    p.add_argument("--lights", type=int, default=3, help="relit versions of each face (default 3; at least 2)")
    p.add_argument("--weights", default=None, help="a checkpoint or registered name to measure instead of the "
                   "bundled weights (with one --method, or none: the file's)")
    p.add_argument("--real", nargs="+", default=[], metavar="DIR",
                   help="folders of real face crops framed like the examples: plausibility there too")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads")
    p.add_argument("--json", default=None, metavar="OUT", help="write the result as JSON")
    p.add_argument("--markdown", default=None, metavar="OUT", help="write the table as Markdown")
    add_debug_flag(p)
    return p


def _methods(text: str) -> list[int]:
    from sfs_fast.models import METHODS, method_id

    if text == "all":
        return sorted(METHODS)
    try:
        return [method_id(v.strip()) for v in text.split(",") if v.strip()]
    except (KeyError, ValueError) as exc:
        raise CommandError(f"--method: {exc}", 2) from None


def _run(args) -> int:
    if args.faces < 1 or args.lights < 2:
        raise CommandError("--faces must be >= 1 and --lights >= 2", 2)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    methods = _methods(args.method) if args.weights is None or args.method != "all" else [None]
    if args.weights is not None and len(methods) != 1:
        raise CommandError("--weights: give at most one --method", 2)
    result = run(methods, args.faces, args.lights, args.weights, args.real)
    table = format_table(result)
    print(table)
    if args.json:
        from sfs_fast.bench.report import write_json

        write_json(result, args.json)
    if args.markdown:
        from sfs_fast.bench.report import write_text

        write_text(args.markdown, table + "\n")
    return 0


def main(argv=None) -> int:
    return run_command(PROG, _run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
