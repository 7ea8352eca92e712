"""Where each tensor's bytes are in a model directory's safetensors files.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``),
then the raw data; ``data_offsets`` count from the end of the header, so a tensor's
bytes sit at file offsets ``[8 + N + begin, 8 + N + end)``. A sharded model lists its
files in ``model.safetensors.index.json`` (``{"weight_map": {tensor: file}}``).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from livetrain.formats.dtypes import UnknownDtype, dtype_from_safetensors

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit


class SafetensorsLayoutError(Exception):
    """A model directory's safetensors files cannot be read as this layout needs; the
    message names the file (and tensor, where there is one)."""


class MissingFileError(SafetensorsLayoutError):
    """A model file (or a shard named by the index) does not exist."""


class DamagedFileError(SafetensorsLayoutError):
    """A model file cannot be read as safetensors: bad header, truncated data, overlaps."""


class LayoutMismatchError(SafetensorsLayoutError):
    """Tensors do not fit the files: unknown name, wrong shape or dtype, bad row slice."""


@dataclass(frozen=True)
class TensorLocation:
    """One tensor of one file: its dtype, shape and absolute byte range ``[start, end)``."""

    name: str
    file: str  # file name inside the model directory
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        try:
            return dtype_from_safetensors(self.dtype)
        except UnknownDtype:
            raise LayoutMismatchError(
                f"{self.file}: tensor {self.name} has dtype {self.dtype}, which checkpoint sync "
                f"cannot write") from None

    def row_bytes(self, rows: tuple[int, int] | None) -> tuple[int, int]:
        """Absolute byte range of rows ``[r0, r1)`` along dim 0 (all rows for None)."""
        if rows is None:
            return self.start, self.end
        r0, r1 = rows
        if not self.shape or not 0 <= r0 <= r1 <= self.shape[0]:
            raise LayoutMismatchError(
                f"{self.file}: tensor {self.name} of shape {list(self.shape)} has no rows {r0}:{r1}")
        per_row = (self.end - self.start) // self.shape[0] if self.shape[0] else 0
        return self.start + r0 * per_row, self.start + r1 * per_row


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed, checked safetensors header."""

    file: str
    size: int  # bytes in the file
    data_start: int  # 8 + N
    tensors: dict[str, TensorLocation]

    @classmethod
    def read(cls, path: Path) -> SafetensorsHeader:
        """Parse and check the header of `path` against the file's size."""
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise DamagedFileError(f"{path}: truncated ({size} bytes, no header length)")
                (n,) = struct.unpack("<Q", f.read(8))
                if n > min(MAX_HEADER_BYTES, size - 8):
                    raise DamagedFileError(
                        f"{path}: header length {n} does not fit a file of {size} bytes (truncated?)")
                raw = f.read(n)
        except FileNotFoundError:
            raise MissingFileError(f"{path} does not exist") from None
        except IsADirectoryError:
            raise DamagedFileError(f"{path} is a folder, not a safetensors file") from None
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DamagedFileError(f"{path}: header is not valid JSON ({exc})") from None
        if not isinstance(header, dict):
            raise DamagedFileError(f"{path}: header is not a JSON object")
        header.pop("__metadata__", None)
        data_start = 8 + n
        tensors = {}
        for name, info in header.items():
            try:
                dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise DamagedFileError(f"{path}: tensor {name} has a malformed header entry") from None
            loc = TensorLocation(name, path.name, dtype, shape, data_start + begin, data_start + end)
            if not 0 <= begin <= end:
                raise DamagedFileError(f"{path}: tensor {name} has offsets {begin}..{end}")
            itemsize = _itemsize(dtype)
            if itemsize is not None and end - begin != math.prod(shape) * itemsize:
                raise DamagedFileError(
                    f"{path}: tensor {name} spans {end - begin} bytes, but {dtype} {list(shape)} "
                    f"needs {math.prod(shape) * itemsize}")
            if loc.end > size:
                raise DamagedFileError(
                    f"{path}: truncated: tensor {name} ends at byte {loc.end}, the file has {size}")
            tensors[name] = loc
        ordered = sorted(tensors.values(), key=lambda t: (t.start, t.end))
        for a, b in zip(ordered, ordered[1:]):
            if b.start < a.end:
                raise DamagedFileError(f"{path}: tensors {a.name} and {b.name} overlap")
        return cls(path.name, size, data_start, tensors)


@dataclass(frozen=True)
class ModelLayout:
    """Every tensor of a model directory: file headers plus name -> location."""

    directory: Path
    files: dict[str, SafetensorsHeader]
    tensors: dict[str, TensorLocation]

    @classmethod
    def read(cls, directory: str | os.PathLike) -> ModelLayout:
        """Read the weight files the way Hugging Face loaders pick them.

        ``model.safetensors`` if present, else the shards of ``model.safetensors.index.json``.
        """
        directory = Path(directory)
        if (directory / SINGLE_FILE).exists():
            names = [SINGLE_FILE]
            weight_map = None
        elif (directory / INDEX_FILE).exists():
            try:
                weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DamagedFileError(f"{directory / INDEX_FILE}: not a safetensors index ({exc})") from None
            names = sorted(set(weight_map.values()))
        else:
            raise MissingFileError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        files, tensors = {}, {}
        for name in names:
            if Path(name).name != name:
                raise DamagedFileError(f"{directory / INDEX_FILE}: shard {name!r} is not a file name")
            path = directory / name
            if not path.exists():
                hint = next((t for t, f in (weight_map or {}).items() if f == name), None)
                raise MissingFileError(f"{path} does not exist" + (f" (it should hold {hint})" if hint else ""))
            files[name] = SafetensorsHeader.read(path)
            for tname, loc in files[name].tensors.items():
                if tname in tensors:
                    raise DamagedFileError(f"tensor {tname} is in both {tensors[tname].file} and {name}")
                tensors[tname] = loc
        for tname, fname in (weight_map or {}).items():
            if tname not in files[fname].tensors:
                raise DamagedFileError(f"{directory / fname}: the index says it holds {tname}, its header does not")
        return cls(directory, files, tensors)


def _itemsize(code: str) -> int | None:
    """Bytes per element of a safetensors dtype code; None for one livetrain does not know."""
    try:
        return dtype_from_safetensors(code).itemsize
    except UnknownDtype:
        return None
