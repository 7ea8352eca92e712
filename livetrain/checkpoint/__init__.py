"""Checkpoint sync: the model directory's own safetensors files follow the live weights.

Only changed 4 KiB blocks are written, an undo journal makes every sync crash-consistent,
and the undo records of the last N generations give rollback. See docs/checkpoint.md.
"""

from livetrain.checkpoint.block_diff import BLOCK_SIZE, TensorTarget
from livetrain.checkpoint.errors import (CheckpointError, DamagedFileError, DirectoryInUse, DiskFullError,
                                         GenerationNotFoundError, LayoutMismatchError, MissingFileError,
                                         NotWritableError, RecoveryError)
from livetrain.checkpoint.generations import Generation, ModelDirectory, SyncResult, VerifyReport
from livetrain.checkpoint.scheduler import SyncScheduler

__all__ = [
    "BLOCK_SIZE", "CheckpointError", "DamagedFileError", "DirectoryInUse", "DiskFullError", "Generation",
    "GenerationNotFoundError", "LayoutMismatchError", "MissingFileError", "ModelDirectory", "NotWritableError",
    "RecoveryError", "SyncResult", "SyncScheduler", "TensorTarget", "VerifyReport",
]
