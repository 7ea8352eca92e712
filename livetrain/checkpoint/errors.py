"""Failures of checkpoint sync a caller can act on; all derive from `CheckpointError`.

Every message names the model directory's file (and tensor, where there is one), so a
person reading it knows what to fix. When one of these is raised by `sync` or
`rollback`, the model files are as they were before the call.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every checkpoint failure."""


class MissingFileError(CheckpointError):
    """A model file (or a shard named by the index) does not exist."""


class DamagedFileError(CheckpointError):
    """A model file cannot be read as safetensors: bad header, truncated data, overlaps."""


class LayoutMismatchError(CheckpointError):
    """The live tensors do not fit the files: unknown name, wrong shape, bad row slice."""


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
