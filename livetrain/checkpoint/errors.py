"""Failures of checkpoint sync a caller can act on: `CheckpointError` and its subclasses,
and the safetensors layout's own errors (`SafetensorsLayoutError`: a file missing,
damaged, or not holding the tensors asked for), which checkpoint sync raises too.

Every message names the model directory's file (and tensor, where there is one), so a
person reading it knows what to fix. When one of these is raised by `sync` or
`rollback`, the model files are as they were before the call.
"""

from __future__ import annotations

from livetrain.formats.safetensors_layout import (DamagedFileError, LayoutMismatchError, MissingFileError,
                                                  SafetensorsLayoutError)

__all__ = ["CheckpointError", "DIRECTORY_ERRORS", "DamagedFileError", "DirectoryInUse", "DiskFullError",
           "GenerationNotFoundError", "LayoutMismatchError", "MissingFileError", "NotWritableError", "RecoveryError",
           "SafetensorsLayoutError"]


class CheckpointError(Exception):
    """Base class of the checkpoint's own failures."""


class NotWritableError(CheckpointError):
    """A model file or the journal folder cannot be written (permissions, read-only fs)."""


class DiskFullError(CheckpointError):
    """No space left while writing the journal or the model files."""


class DirectoryInUse(CheckpointError):
    """Another livetrain process holds the model directory open for writing."""


class GenerationNotFoundError(CheckpointError):
    """The generation asked for does not exist or its undo records were pruned."""


class RecoveryError(CheckpointError):
    """A journal cannot be applied: the file holds neither the old nor the new bytes.

    The file was changed behind the checkpoint's back (or damaged); the journal is kept
    so that nothing more is lost.
    """


# What reading or writing a model directory can raise.
DIRECTORY_ERRORS = (CheckpointError, SafetensorsLayoutError)
