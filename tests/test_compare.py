"""sfs-compare: one labelled picture per face, a row per method, its tiles the Decomposer's."""
import json

import numpy as np
import pytest
from PIL import Image

from sfs_fast import images
from sfs_fast.cli import compare as cli
from sfs_fast.cli.common import EXIT_ERROR, EXIT_PARTIAL, EXIT_USAGE, CommandError
from sfs_fast.decomposer import Decomposer
from pictures import face_like

TILE = 130  # 128 + the grid's 2-pixel gap


def test_parse_methods():
    assert cli.parse_methods("0-7") == list(range(8))
    assert cli.parse_methods("3,0,1-2,3") == [0, 1, 2, 3]
    for bad in ("", "x", "0-9", "8"):
        with pytest.raises(CommandError, match="--methods"):
            cli.parse_methods(bad)


def test_figure_rows_are_each_methods_own_decomposition(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(face_like(128, 128)).save(src / "a.png")
    (src / "broken.png").write_bytes(b"not a picture")
    code = cli.main([str(src), str(tmp_path / "out"), "--methods", "0,3", "--faces", "off", "--precision", "fp32",
                     "--json"])
    captured = capsys.readouterr()
    assert code == EXIT_PARTIAL and "broken.png" in captured.err and "Traceback" not in captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["faces"] == 1 and summary["failed"] == 1 and summary["methods"] == [0, 3]
    sheet = np.asarray(Image.open(tmp_path / "out" / "a_compare.png"))
    top, left = sheet.shape[0] - (2 * TILE + 2), sheet.shape[1] - (len(cli.COLUMNS) * TILE + 2)
    assert top > 0 and left > 0 and sheet[:top].min() < 128 and sheet[top:, :left].min() < 128

    def tile(row, column):
        y, x = top + 2 + row * TILE, left + 2 + cli.COLUMNS.index(column) * TILE
        return sheet[y:y + 128, x:x + 128]

    face = images.load_image(src / "a.png")[0]
    for row, method in enumerate((0, 3)):
        out = Decomposer(method=method, precision="fp32").decompose(face[None])
        np.testing.assert_array_equal(tile(row, "recon"), images.unit_to_rgb(out["recon"][0].numpy()))
        np.testing.assert_array_equal(tile(row, "normal"), images.normal_to_rgb(out["normal"][0].numpy()))
        np.testing.assert_array_equal(tile(row, "face"), images.unit_to_rgb(face))
    assert (tile(0, "residue") == 255).all()  # method 0 has no residue: a blank cell
    assert (tile(1, "residue") != 255).any()


def test_nothing_readable_is_one_line(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.png").write_bytes(b"")
    assert cli.main([str(tmp_path / "in"), str(tmp_path / "out"), "--faces", "off"]) == EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "sfs-compare: error: no picture could be read" and not (tmp_path / "out").exists()
    assert cli.main([str(tmp_path / "in"), str(tmp_path / "out"), "--methods", "9"]) == EXIT_USAGE
    # the same run-plan check as every command (cli.common.checked_plan)
    assert cli.main([str(tmp_path / "in"), str(tmp_path / "out"), "--precision", "int8", "--backend", "fused"]) == EXIT_USAGE
