#!/usr/bin/env bash
# One-step set-up: a virtual environment in .venv with torch and sfs_fast (editable, with
# the test extras). Safe to run again: it reinstalls only when the packaging or the C++
# sources changed.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
# torch 2.13.0 is pinned here (not in the package's requirements, which take a range):
# on this machine that version is a CPU build on disk, while an unpinned torch pulls a
# multi-GB CUDA build.
TORCH_SPEC=${SFS_TORCH_SPEC:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
fi
stamp=$(cat setup.py pyproject.toml kernels/csrc/* 2>/dev/null | sha256sum | cut -c1-16)
if [ "$(cat .venv/.sfs_fast_installed 2>/dev/null)" != "$stamp" ]; then
    .venv/bin/python -m pip install -q "$TORCH_SPEC"
    .venv/bin/python -m pip install -q -e ".[test]"
    echo "$stamp" > .venv/.sfs_fast_installed
fi
