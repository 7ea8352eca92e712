"""Checkpoint sync: the model directory's own safetensors files follow the live weights.

Only changed 4 KiB blocks are written, an undo journal makes every sync crash-consistent,
and the undo records of the last N generations give rollback. See docs/checkpoint.md.
"""

from livetrain.checkpoint.block_diff import BLOCK_SIZE, TensorTarget
from livetrain.checkpoint.errors import (DIRECTORY_ERRORS, CheckpointError, DamagedFileError, DirectoryInUse,
                                         DiskFullError, GenerationNotFoundError, LayoutMismatchError,
                                         MissingFileError, NotWritableError, RecoveryError, SafetensorsLayoutError)
from livetrain.checkpoint.directory import ModelDirectory
from livetrain.checkpoint.generations import Generation
from livetrain.checkpoint.sync_writer import SyncResult
from livetrain.checkpoint.verify import VerifyReport
from livetrain.checkpoint.scheduler import SyncScheduler

__all__ = [
    "BLOCK_SIZE", "CheckpointError", "DIRECTORY_ERRORS", "DamagedFileError", "DirectoryInUse", "DiskFullError", "Generation",
    "GenerationNotFoundError", "LayoutMismatchError", "MissingFileError", "ModelDirectory", "NotWritableError",
    "RecoveryError", "SafetensorsLayoutError", "SyncResult", "SyncScheduler", "TensorTarget", "VerifyReport",
]
