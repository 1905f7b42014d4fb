"""Fetching weight files by URL: the cache folder, a per-name lock, verified downloads.

The transfer itself is ``torch.hub.download_url_to_file`` (progress bar, temporary file,
rename when complete); this module adds what it lacks: a socket timeout, one retry per URL,
the git blob id check, the offline switch and the mirror variable. It knows nothing about
models: :mod:`sfs_fast.weights` converts what it fetched.

Environment:
    SFS_FAST_HOME            cache root (else ``$XDG_CACHE_HOME/sfs_fast``, else ``~/.cache/sfs_fast``)
    SFS_FAST_OFFLINE=1       never touch the network
    SFS_FAST_WEIGHTS_MIRROR  base URL every file is fetched from instead (``BASE/<file name>``)
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import socket
import time
import urllib.error
from pathlib import Path

from sfs_fast.errors import WeightsDownloadError

HOME_ENV = "SFS_FAST_HOME"
OFFLINE_ENV = "SFS_FAST_OFFLINE"
MIRROR_ENV = "SFS_FAST_WEIGHTS_MIRROR"

TIMEOUT_S = 30.0  # per connect and per read: a stalled server fails instead of hanging
ATTEMPTS_PER_URL = 2  # one retry: transient failures (reset, cut, timeout, 5xx) are common
RETRY_PAUSE_S = 0.5
LOCK_TIMEOUT_S = 1800.0  # how long a second process waits for the first one's download


def git_blob_id(path) -> str:
    """The git blob id of a file: SHA-1 of ``b"blob <size>\\0"`` + its bytes, what
    ``git hash-object FILE`` prints. The official SfSNet file is only known by this id
    (it is what its repository records), so it is the fingerprint checked before use."""
    path = Path(path)
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_dir() -> Path:
    """The cache root; created on first write, not here."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "sfs_fast"
    return Path.home() / ".cache" / "sfs_fast"


def offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def source_urls(urls, filename: str) -> list[str]:
    """The URLs to try, in order: the mirror alone when ``SFS_FAST_WEIGHTS_MIRROR`` is set
    (a company mirror must not leak requests to the public hosts), else ``urls``."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if mirror:
        return [f"{mirror.rstrip('/')}/{filename}"]
    return list(urls)


@contextlib.contextmanager
def cache_lock(name: str):
    """Hold the lock of one cache entry (an OS file lock: released if the process dies).

    Locks live in ``<cache>/locks/`` so that the weights folder holds entries only."""
    import filelock  # a torch dependency

    folder = cache_dir() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(folder / f"{name}.lock"), timeout=LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise WeightsDownloadError(f"{name}: another process has held the download lock for "
                                   f"{LOCK_TIMEOUT_S:.0f} s ({folder / (name + '.lock')})") from None
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    # download_url_to_file has no timeout argument; urllib sockets take the default timeout
    # when they are created, so set it for the duration of the transfer only.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _reason(exc: BaseException) -> tuple[str, bool]:
    """``(one-line reason, worth a retry)`` for a failed transfer."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}", exc.code >= 500
    if isinstance(exc, urllib.error.URLError):
        return f"{exc.reason}", True
    if isinstance(exc, http.client.IncompleteRead):
        return f"transfer cut after {len(exc.partial)} bytes", True
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"timed out ({TIMEOUT_S:.0f} s without data)", True
    if isinstance(exc, (http.client.HTTPException, OSError)):
        return f"{type(exc).__name__}: {exc}".strip().splitlines()[0], True
    raise exc


def _attempt(url: str, dest: Path, blob_id: str, progress: bool) -> tuple[str | None, bool]:
    """One transfer and its check: ``(None, _)`` when ``dest`` holds the right bytes, else
    ``(reason, worth a retry)`` with ``dest`` removed."""
    from torch.hub import download_url_to_file

    try:
        with _socket_timeout(TIMEOUT_S):
            download_url_to_file(url, str(dest), progress=progress)
    except Exception as exc:  # noqa: BLE001 - _reason re-raises what is not a transfer failure
        dest.unlink(missing_ok=True)
        return _reason(exc)
    got = git_blob_id(dest)
    if got == blob_id:
        return None, False
    dest.unlink(missing_ok=True)
    # urllib returns a short body without an error when the server closes early, so a cut
    # transfer shows up here, as bytes with another id: worth the one retry.
    return f"refused: git blob id {got}, expected {blob_id} (a cut transfer or other bytes)", True


def download_verified(urls, blob_id: str, dest, *, progress: bool = False) -> str:
    """Fetch the first URL whose bytes have git blob id ``blob_id`` to ``dest``; returns it.

    Each URL gets ``ATTEMPTS_PER_URL`` tries (an HTTP 4xx gets one). A file with another id
    is deleted (never kept, never loaded). Raises WeightsDownloadError listing every URL
    with its last reason; ``dest`` is then absent.
    """
    dest = Path(dest)
    failures = []
    for url in urls:
        for attempt in range(ATTEMPTS_PER_URL):
            reason, transient = _attempt(url, dest, blob_id, progress)
            if reason is None:
                return url
            if not transient:
                break
            if attempt + 1 < ATTEMPTS_PER_URL:
                time.sleep(RETRY_PAUSE_S)
        failures.append(f"{url}: {reason}")
    raise WeightsDownloadError("; ".join(failures) or "no URL to fetch from")
