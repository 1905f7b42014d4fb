"""sfs-decompose --faces/--paste and sfs-relight: faces in the folder pipeline.

One mixed folder is decomposed once per module (two bundled SfSNet crops, a 1024x768 photo
of three faces, a picture of noise, a corrupt file) and the tests read that run's outputs.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

cv2 = pytest.importorskip("cv2")
pytest.importorskip("matplotlib")

from sfs_fast import faces as F  # noqa: E402
from sfs_fast.atomic import TEMP_PREFIX  # noqa: E402
from sfs_fast.bench.faces import group_photo  # noqa: E402
from sfs_fast.cli import decompose as decompose_cli  # noqa: E402
from sfs_fast.cli import relight as relight_cli  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "faces"
FAST = ["--backend", "eager", "--method", "3", "--workers", "1"]


def rows_of(out: Path) -> dict:
    return {r["input"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    src = tmp_path_factory.mktemp("in")
    for name in ("1_face.png", "1_mask.png", "face6.png"):
        shutil.copy(EXAMPLES / name, src / name)
    Image.fromarray(group_photo(3)).save(src / "group.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(src / "noise.png")
    (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return src


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    code = decompose_cli.main([str(folder), str(out), "--paste", *FAST])
    return code, out


def test_mixed_folder_exit_code_and_failures(run):
    code, out = run
    assert code == 3
    rows = rows_of(out)
    assert rows["noise.png"]["status"] == "failed" and rows["noise.png"]["reason"].startswith("no face found")
    assert rows["corrupt.png"]["status"] == "failed" and rows["corrupt.png"]["reason"]
    assert all(rows[k]["status"] == "ok" for k in ("1_face.png", "face6.png", "group.png"))
    assert not [p for p in out.rglob("*") if p.name.startswith(TEMP_PREFIX)], "temporary files left"


def test_every_face_of_the_photo_has_outputs_and_a_manifest_entry(run):
    _, out = run
    row = rows_of(out)["group.png"]
    assert row["faces"]["count"] == 3 and len(row["crops"]) == 3
    for k, crop in enumerate(row["crops"]):
        assert crop["stem"] == f"group_face{k}"
        assert {"box", "landmarks", "score", "transform", "inverse"} <= set(crop)
        assert len(crop["landmarks"]) == 5 and crop["score"] >= F.SCORE_THRESHOLD
        for kind in ("normal", "albedo", "shading", "residue", "recon"):
            assert f"group_face{k}_{kind}.png" in row["outputs"]
            assert (out / f"group_face{k}_{kind}.png").is_file()
        assert (out / f"group_face{k}_light.txt").is_file()
    assert "group_paste_recon.png" in row["outputs"] and "group_paste_shading.png" in row["outputs"]


def test_faces_of_many_pictures_share_a_batch(run):
    _, out = run
    rows = rows_of(out)
    # the batch's time is split evenly over its crops: 3 faces take 3 shares, a crop one
    one, three = rows["face6.png"]["timings_ms"]["infer_ms"], rows["group.png"]["timings_ms"]["infer_ms"]
    assert three == pytest.approx(3 * one, rel=1e-3)


def test_auto_leaves_the_bundled_crops_as_faces_off_does(folder, tmp_path):
    # the same pictures in the same batch (float results depend on the batch's size)
    crops = tmp_path / "crops"
    crops.mkdir()
    for name in ("1_face.png", "1_mask.png", "face6.png"):
        shutil.copy(folder / name, crops / name)
    auto, off = tmp_path / "auto", tmp_path / "off"
    assert decompose_cli.main([str(crops), str(auto), *FAST]) == 0
    assert decompose_cli.main([str(crops), str(off), "--faces", "off", *FAST]) == 0
    files = sorted(p.name for p in off.glob("*.png")) + sorted(p.name for p in off.glob("*.txt"))
    assert len(files) == 2 * 6
    assert sorted(p.name for p in auto.glob("*.png")) + sorted(p.name for p in auto.glob("*.txt")) == files
    for name in files:
        assert (auto / name).read_bytes() == (off / name).read_bytes(), name
    assert rows_of(auto)["1_face.png"]["faces"]["mode"] == "as-is"


def test_paste_changes_nothing_outside_the_faces(run, folder):
    _, out = run
    photo = pixels(folder / "group.png")
    pasted = pixels(out / "group_paste_recon.png")
    assert pasted.shape == photo.shape
    weight = np.zeros(photo.shape[:2], np.float32)
    for crop in rows_of(out)["group.png"]["crops"]:
        m = np.array(crop["transform"])
        _, w = F.paste(photo, [(m, np.zeros((3, 128, 128)), F.feather(F.template_mask()))])
        weight = np.maximum(weight, w)
    # the manifest's transform is rounded to 1e-6: allow a 2 px rim around the weights
    near = cv2.dilate((weight > 0).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    np.testing.assert_array_equal(pasted[~near], photo[~near])
    assert (pasted != photo).any(-1)[weight == 1].mean() > 0.5, "the faces were pasted"
    crop_paste = pixels(out / "1_face_paste_recon.png")  # a crop used whole: pasted at its size
    assert crop_paste.shape == (128, 128, 3)


@pytest.mark.slow
def test_resume_skips_finished_pictures_and_redoes_a_damaged_one(run, folder, tmp_path):
    _, first = run
    out = tmp_path / "out"
    shutil.copytree(first, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert decompose_cli.main([str(folder), str(out), "--paste", *FAST]) == 3
    rows = rows_of(out)
    assert {k: r["status"] for k, r in rows.items() if r["status"] != "failed"} == {
        "1_face.png": "skipped", "face6.png": "skipped", "group.png": "skipped"}
    assert rows["group.png"]["crops"][0]["stem"] == "group_face0", "the faces survive in the skipped row"
    assert all(p.stat().st_mtime_ns == before[p.name] for p in out.iterdir() if p.name != "manifest.jsonl")
    (out / "group_face2_recon.png").unlink()
    assert decompose_cli.main([str(folder), str(out), "--paste", *FAST]) == 3
    rows = rows_of(out)
    assert rows["group.png"]["status"] == "ok" and rows["face6.png"]["status"] == "skipped"
    assert (out / "group_face2_recon.png").is_file()


@pytest.mark.slow
def test_max_faces_min_face_size_and_bad_values(folder, tmp_path, capsys):
    out = tmp_path / "two"
    pic = str(folder / "group.png")
    assert decompose_cli.main([pic, str(out), "--faces", "detect", "--max-faces", "2", *FAST]) == 0
    row = rows_of(out)["group.png"]
    assert [c["stem"] for c in row["crops"]] == ["group_face0", "group_face1"]
    sizes = sorted(max(c["box"][2:]) for c in rows_of(out)["group.png"]["crops"])
    big = tmp_path / "big"
    assert decompose_cli.main([pic, str(big), "--faces", "detect", "--max-faces", "1",
                               "--min-face-size", str(sizes[-1] + 50), *FAST]) == 1
    assert "no face found" in capsys.readouterr().err
    assert decompose_cli.main([pic, str(big), "--max-faces", "0"]) == 1
    assert "--max-faces" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# sfs-relight


@pytest.fixture(scope="module")
def relit(tmp_path_factory):
    src = tmp_path_factory.mktemp("relight_in")
    Image.fromarray(group_photo(1)).save(src / "portrait.png")
    out = tmp_path_factory.mktemp("relight_out")
    # the target is the light the model estimates for the same photo: a no-op relighting
    code = relight_cli.main([str(src), str(out), "--from", str(src / "portrait.png"), "--steps", "3", *FAST])
    return code, src, out


def test_relight_with_the_estimated_light_reproduces_the_reconstruction(relit):
    code, src, out = relit
    assert code == 0
    row = rows_of(out)["portrait.png"]
    assert row["status"] == "ok" and row["relight"]["residue"] == "keep"
    relit_crop = pixels(out / "portrait_face0_relit_crop.png").astype(int)
    recon = pixels(out / "portrait_face0_recon.png").astype(int)
    assert np.abs(relit_crop - recon).max() <= 1
    strip = pixels(out / "portrait_face0_relight_strip.png")
    assert strip.shape[1] > 3 * 128 and strip.shape[0] > 2 * 128


def test_relight_paste_keeps_the_photo_outside_the_face(relit):
    _, src, out = relit
    photo, composite = pixels(src / "portrait.png"), pixels(out / "portrait_relit.png")
    crop = rows_of(out)["portrait.png"]["crops"][0]
    _, weight = F.paste(photo, [(np.array(crop["transform"]), np.zeros((3, 128, 128)),
                                 F.feather(F.template_mask()))])
    near = cv2.dilate((weight > 0).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    np.testing.assert_array_equal(composite[~near], photo[~near])
    assert (composite != photo).any(-1)[weight == 1].mean() > 0.5


def test_relight_bad_light_is_one_line(tmp_path, capsys):
    (tmp_path / "p.png").write_bytes((EXAMPLES / "face6.png").read_bytes())
    (tmp_path / "three.txt").write_text("1 2 3\n")
    assert relight_cli.main([str(tmp_path / "p.png"), str(tmp_path / "o"), "--light", str(tmp_path / "three.txt")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "27 (SfSNet) or 9 (DPR)" in err[0]
    assert relight_cli.main([str(tmp_path / "p.png"), str(tmp_path / "o"), "--light", "sideways"]) == 1
    assert "preset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        relight_cli.main([str(tmp_path / "p.png"), str(tmp_path / "o")])  # --light or --from required


# --------------------------------------------------------------------------------------
# The hooks alone (no model)


def test_user_mask_follows_each_face(folder, tmp_path):
    from sfs_fast.face_folder import FaceOptions, prepare_faces
    from sfs_fast.pipeline import FolderOptions, Item

    photo = pixels(folder / "group.png")
    mask = np.zeros(photo.shape[:2], np.uint8)
    mask[:, : photo.shape[1] // 2] = 255  # the photo's left half
    Image.fromarray(mask).resize((photo.shape[1] // 2, photo.shape[0] // 2)).save(tmp_path / "m.png")
    item = Item(folder / "group.png", Path("group.png"), mask=tmp_path / "m.png")
    picture = prepare_faces(item, FolderOptions().checked(), FaceOptions("detect"), keep_photo=False)
    assert len(picture.crops) == 3
    sides = []
    for crop in picture.crops:
        x = np.mean(crop.meta["landmarks"], axis=0)[0]
        if abs(x - photo.shape[1] / 2) > 100:  # the middle column's faces straddle the edge
            sides.append("left" if x < photo.shape[1] / 2 else "right")
            assert crop.mask.min() == 1.0 if sides[-1] == "left" else crop.mask.max() == 0.0
    assert sorted(sides) == ["left", "right"]


def test_a_crop_used_whole_maps_back_through_its_box(tmp_path):
    from sfs_fast import images
    from sfs_fast.face_folder import box_matrix

    rng = np.random.default_rng(4)
    smooth = cv2.GaussianBlur(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8), (0, 0), 6)
    Image.fromarray(smooth).save(tmp_path / "s.png")
    image, box, _ = images.load_image(tmp_path / "s.png")
    m = box_matrix(box)
    np.testing.assert_allclose(F.apply(m, [[box[0] - 0.5, box[1] - 0.5]]), [[-0.5, -0.5]], atol=1e-9)
    warped = F.warp_face(smooth, m).astype(np.float32) / 255
    assert np.abs(warped.transpose(2, 0, 1) - image).max() < 3 / 255
