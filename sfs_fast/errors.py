"""Errors shared by the checkpoint code (a leaf module: it imports nothing of the package).

:mod:`sfs_fast.importers`, :mod:`sfs_fast.download` and :mod:`sfs_fast.weights` all raise
these; they live here so that imports point one way, ``weights -> importers -> errors``,
instead of importers reaching back into weights.
"""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit what was asked of it.

    A ValueError, so that every command reports it as one line.
    """


class WeightsDownloadError(CheckpointError):
    """Named weights that could not be fetched, or were fetched and refused."""
