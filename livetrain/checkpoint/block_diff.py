"""Compare live tensors with the bytes already in the files, in 4 KiB blocks.

Blocks are aligned to file offsets (block i is bytes ``[4096 i, 4096 (i+1))`` of its
file), so the first and last block of a tensor may also hold its neighbours' bytes or
the header: a changed block's new content is the old block with every changed tensor's
bytes laid over it. Live tensors are read in pieces of at most `CHUNK_BYTES` (cast to the
file's dtype piece by piece when the dtypes differ), so memory stays bounded by one piece
plus the changed blocks.

Comparing is memory-bound: each 1 MiB stretch of whole blocks is first tested with libc's
`memcmp` (vectorised, stops at the first difference, no temporaries), and only a stretch
that differs is compared block by block, as [256, 512] machine words.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from livetrain.checkpoint.errors import LayoutMismatchError
from livetrain.formats.safetensors_layout import ModelLayout, TensorLocation

BLOCK_SIZE = 4096
CHUNK_BYTES = 8 * 2**20
STRETCH_BLOCKS = 256  # blocks per memcmp: 1 MiB, so a differing stretch's temporaries stay small

_memcmp = ctypes.CDLL(None).memcmp
_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_memcmp.restype = ctypes.c_int


@dataclass(frozen=True)
class TensorTarget:
    """Where a live tensor's rows go: rows ``rows`` of the live tensor (dim 0; None = all)
    are rows ``file_rows`` of the file tensor ``name`` (None = all of it).

    vLLM's merged ``qkv_proj`` of a layer maps to three targets (q, k, v rows); a padded
    vocabulary maps its first ``vocab`` rows; a tensor-parallel shard uses ``file_rows``.
    """

    name: str
    rows: tuple[int, int] | None = None
    file_rows: tuple[int, int] | None = None


NameMap = Mapping[str, "TensorTarget | Sequence[TensorTarget]"]


@dataclass(frozen=True)
class Placement:
    """A view of a live tensor and the file bytes ``[start, end)`` it must equal."""

    live_name: str
    location: TensorLocation
    view: torch.Tensor  # shape: the file tensor's (or its `file_rows`), any dtype/device
    start: int
    end: int


def place_tensors(layout: ModelLayout, live: Mapping[str, torch.Tensor],
                  name_map: NameMap | None = None) -> list[Placement]:
    """Check every live tensor against the files and say where its bytes go.

    Raises `LayoutMismatchError` naming the file and tensor on an unknown name, a shape
    that differs, a bad row slice, or two live tensors aimed at the same bytes. A live
    tensor that is not in the files but shares storage with one that is (a tied
    ``lm_head.weight``) is skipped.
    """
    name_map = name_map or {}
    placements: list[Placement] = []
    unplaced: list[str] = []
    for live_name, tensor in live.items():
        targets = name_map.get(live_name, TensorTarget(live_name))
        targets = [targets] if isinstance(targets, TensorTarget) else list(targets)
        if live_name not in name_map and live_name not in layout.tensors:
            unplaced.append(live_name)
            continue
        for target in targets:
            loc = layout.tensors.get(target.name)
            if loc is None:
                raise LayoutMismatchError(
                    f"live tensor {live_name}: no tensor {target.name} in {_files(layout)}")
            view = tensor
            if target.rows is not None:
                r0, r1 = target.rows
                if tensor.dim() == 0 or not 0 <= r0 <= r1 <= tensor.shape[0]:
                    raise LayoutMismatchError(
                        f"live tensor {live_name} of shape {list(tensor.shape)} has no rows {r0}:{r1} "
                        f"(for {loc.file}: {target.name})")
                view = tensor.narrow(0, r0, r1 - r0)
            expected = loc.shape
            if target.file_rows is not None:
                expected = (target.file_rows[1] - target.file_rows[0],) + loc.shape[1:]
            if tuple(view.shape) != expected:
                raise LayoutMismatchError(
                    f"{loc.file}: tensor {target.name} is {loc.dtype} {list(expected)}, but live tensor "
                    f"{live_name}{_rows(target.rows)} is {list(view.shape)}")
            loc.torch_dtype  # raises on a dtype that cannot be written
            start, end = loc.row_bytes(target.file_rows)
            placements.append(Placement(live_name, loc, view, start, end))
    placed_storage = {_storage_key(p.view) for p in placements}
    for live_name in unplaced:
        if _storage_key(live[live_name]) not in placed_storage:
            raise LayoutMismatchError(f"live tensor {live_name}: no tensor of that name in {_files(layout)}")
    by_file = sorted(placements, key=lambda p: (p.location.file, p.start))
    for a, b in zip(by_file, by_file[1:]):
        if a.location.file == b.location.file and b.start < a.end:
            raise LayoutMismatchError(
                f"{a.location.file}: live tensors {a.live_name} and {b.live_name} both write the bytes "
                f"of {b.location.name}")
    return placements


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


def _files(layout: ModelLayout) -> str:
    return ", ".join(str(layout.directory / f) for f in layout.files)


def _rows(rows: tuple[int, int] | None) -> str:
    return "" if rows is None else f"[{rows[0]}:{rows[1]}]"


def file_bytes(view: torch.Tensor, dtype: torch.dtype,
               chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, np.ndarray]]:
    """`view` as the file stores it (dtype `dtype`, C order), in pieces along dim 0.

    Yields (byte offset, uint8 array); no copy when the view is already a contiguous
    CPU tensor of that dtype, else one piece of at most ~`chunk_bytes` at a time.
    """
    view = view.detach()
    if view.dim() == 0:
        view = view.reshape(1)
    if view.shape[0] == 0:
        return
    row_bytes = math.prod(view.shape[1:]) * dtype.itemsize
    rows_per_piece = max(1, chunk_bytes // max(1, row_bytes))
    for r in range(0, view.shape[0], rows_per_piece):
        piece = view[r:r + rows_per_piece].to(device="cpu", dtype=dtype).contiguous()
        yield r * row_bytes, piece.reshape(-1).view(torch.uint8).numpy()


class ChangedBlocks:
    """The new content of each changed block of one file, by block index.

    `old` is the file's current bytes (a read-only mmap as uint8). A block enters the map
    only when some of its bytes differ; it holds the whole new block (the old bytes with
    every change laid over them) as a writable uint8 buffer of shape [4096]. The last
    block of a file may be shorter.
    """

    def __init__(self, file: str, old: np.ndarray):
        self.file = file
        self.old = old  # shape [file size], uint8
        self.size = old.shape[0]
        self.blocks: dict[int, np.ndarray | bytearray] = {}

    def block_range(self, index: int) -> tuple[int, int]:
        start = index * BLOCK_SIZE
        return start, min(start + BLOCK_SIZE, self.size)

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.blocks.values())

    def compare(self, offset: int, new: np.ndarray) -> bool:
        """Compare file bytes ``[offset, offset + len(new))`` with `new` (uint8); keep the
        changed blocks. Returns whether any byte differed."""
        end = offset + new.shape[0]
        head_end = min(end, -(-offset // BLOCK_SIZE) * BLOCK_SIZE)
        body_end = max(head_end, end // BLOCK_SIZE * BLOCK_SIZE)
        changed = False
        if head_end > offset:
            changed |= self._compare_within_block(offset, new[:head_end - offset])
        stretch = STRETCH_BLOCKS * BLOCK_SIZE
        for start in range(head_end, body_end, stretch):
            stop = min(start + stretch, body_end)
            changed |= self._compare_whole_blocks(start, new[start - offset:stop - offset])
        if end > body_end:
            changed |= self._compare_within_block(body_end, new[body_end - offset:])
        return changed

    def _compare_whole_blocks(self, start: int, new: np.ndarray) -> bool:
        """`new`: uint8 [k * 4096], the new content of blocks starting at file offset
        `start` (a block boundary)."""
        old = self.old[start:start + new.shape[0]]
        if _same_bytes(new, old):
            return False
        k = new.shape[0] // BLOCK_SIZE
        word = _widest_aligned_word(new, old)
        differs = (new.view(word).reshape(k, -1) != old.view(word).reshape(k, -1)).any(axis=1)  # [k]
        rows = np.flatnonzero(differs)
        blocks = new.reshape(k, BLOCK_SIZE)[rows]  # [m, 4096], a copy: the live tensor may change later
        self.blocks.update(zip((start // BLOCK_SIZE + rows).tolist(), blocks))
        return True

    def _compare_within_block(self, offset: int, new: np.ndarray) -> bool:
        if _same_bytes(new, self.old[offset:offset + new.shape[0]]):
            return False
        index, at = divmod(offset, BLOCK_SIZE)
        block = self.blocks.get(index)
        if block is None:
            start, stop = self.block_range(index)
            block = self.blocks[index] = self.old[start:stop].copy()
        np.frombuffer(block, dtype=np.uint8)[at:at + new.shape[0]] = new
        return True


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether uint8 arrays `a` and `b` (one length, contiguous) hold the same bytes."""
    return _memcmp(a.ctypes.data, b.ctypes.data, a.shape[0]) == 0


def _widest_aligned_word(a: np.ndarray, b: np.ndarray) -> np.dtype:
    """The widest unsigned word both arrays start aligned to (unaligned views are slow)."""
    for word in (np.uint64, np.uint32, np.uint16):
        size = np.dtype(word).itemsize
        if a.ctypes.data % size == 0 and b.ctypes.data % size == 0:
            return np.dtype(word)
    return np.dtype(np.uint8)


def diff_placements(changed: ChangedBlocks, placements: Sequence[Placement]) -> set[str]:
    """Compare each placement (all in `changed`'s file) with the file; returns the file
    tensor names whose bytes differ."""
    touched = set()
    for p in placements:
        for offset, piece in file_bytes(p.view, p.location.torch_dtype):
            if changed.compare(p.start + offset, piece):
                touched.add(p.location.name)
    return touched
