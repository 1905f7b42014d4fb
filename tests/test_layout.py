"""The package's import rules, read from the source (no imports run, so this is cheap).

One import style: every module imports the package's own modules by their absolute
``sfs_fast.*`` name. Imports point one way: SH math <- kernels <- core <- export, bench,
training, commands; the one upward tie allowed is the ONNX runner, which the Decomposer's
onnx backend loads lazily inside a function.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package it installs as (setup.py's package_dir)
PACKAGES = {"sfs_fast": "sfs_fast", "sfs_fast/cli": "sfs_fast.cli", "kernels": "sfs_fast.kernels",
            "export": "sfs_fast.export", "bench": "sfs_fast.bench", "training": "sfs_fast.training"}
ABOVE_CORE = ("sfs_fast.export", "sfs_fast.bench", "sfs_fast.training", "sfs_fast.cli")
# (importing module, imported module): allowed only inside a function (the ONNX runner, for
# the onnx backend of the Decomposer and of the Ray engine's actors)
LAZY_UPWARD = {("sfs_fast.decomposer", "sfs_fast.export"), ("sfs_fast.ray_engine", "sfs_fast.export")}


def modules():
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            yield f"{package}.{path.stem}", ast.parse(path.read_text(), filename=str(path))


def package_imports(tree):
    """(module name, at top level?) for every import of an sfs_fast module in ``tree``."""
    top = set(tree.body)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sfs_fast"):
            yield node.module, node in top
        elif isinstance(node, ast.Import):
            yield from ((a.name, node in top) for a in node.names if a.name.startswith("sfs_fast"))


def test_the_layout_covers_the_package():
    names = {name for name, _ in modules()}
    assert {"sfs_fast.sh", "sfs_fast.kernels.dispatch", "sfs_fast.export.runner", "sfs_fast.bench.e2e",
            "sfs_fast.training.trainer", "sfs_fast.cli.decompose"} <= names


@pytest.mark.parametrize("name,tree", list(modules()), ids=lambda v: v if isinstance(v, str) else "")
def test_imports_are_absolute(name, tree):
    relative = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level]
    assert not relative, f"{name}: relative imports on lines {relative}"


def test_imports_point_one_way():
    wrong = []
    for name, tree in modules():
        for target, at_top in package_imports(tree):
            if name == "sfs_fast.sh":
                ok = False  # the SH math stands alone
            elif name.startswith("sfs_fast.kernels"):
                ok = target == "sfs_fast.sh" or target.startswith("sfs_fast.kernels")
            elif name.startswith(ABOVE_CORE):
                ok = True
            else:  # core
                upward = target.startswith(ABOVE_CORE)
                ok = not upward or (not at_top and any(name == m and target.startswith(t) for m, t in LAZY_UPWARD))
            if not ok:
                wrong.append(f"{name} imports {target}")
    assert not wrong, wrong
