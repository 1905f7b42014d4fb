"""Atomic files: the one way this package writes a file that someone may read while it is
being written, or that a killed run may leave behind.

    atomic_write(path, lambda f: f.write(data))       # a writer that takes a file object
    with atomic_destination(path) as tmp:             # a writer that takes a path
        save_file(state, tmp)                         # (safetensors, onnx.save, ...)

Both write to a temporary name in the destination's folder (``TEMP_PREFIX`` + pid + name)
and rename it onto ``path`` only when the writer returned: readers, and a rerun after a
killed process, see no file or the whole file. A failed writer leaves nothing behind. No
fsync: this guards against interrupted processes, not power loss.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

TEMP_PREFIX = ".sfs-tmp-"  # a rerun removes stale ones (remove_stale_temporaries)


@contextlib.contextmanager
def atomic_destination(path):
    """Yield a temporary path beside ``path``; on a clean exit rename it onto ``path``,
    on an exception delete it (a folder the writer made there too: a checkpoint folder
    appears whole or not at all). The destination's folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TEMP_PREFIX}{os.getpid()}-{path.name}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise


def atomic_write(path, write) -> Path:
    """Call ``write(file_object)`` on a temporary file and rename it onto ``path``."""
    with atomic_destination(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return Path(path)


def remove_stale_temporaries(folder) -> int:
    """Delete temporary files left by a killed run under ``folder``; returns how many."""
    count = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if name.startswith(TEMP_PREFIX):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(root, name))
                    count += 1
    return count
