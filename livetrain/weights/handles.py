"""Weight handles: how another process maps a tensor without copying it.

A handle is plain data. `SharedMemoryHandle` names a file in ``/dev/shm`` (the CPU
training copy, owned by livetrain); `CudaIpcHandle` carries what
``torch.multiprocessing.reductions.reduce_tensor`` exports for a CUDA tensor (vLLM's
own weights on a GPU). Either may describe one shard of a larger tensor.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from livetrain.formats.dtypes import UnknownDtype, dtype_from_name, dtype_name


class HandleError(ValueError):
    """A handle cannot be mapped (missing or short file, unknown kind or dtype)."""


def _torch_dtype(name: str) -> torch.dtype:
    try:
        return dtype_from_name(name)
    except UnknownDtype as exc:
        raise HandleError(str(exc)) from None


@dataclass(frozen=True)
class SharedMemoryHandle:
    """A tensor stored in a shared-memory file: ``path`` (mode 0600), dtype, shape, stride, offset.

    ``offset`` and ``stride`` count elements, as in ``torch.Tensor.as_strided``.
    """

    path: str
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int = 0

    kind = "shm"

    @property
    def nbytes_needed(self) -> int:
        """Bytes from the start of the file to the end of the last element."""
        itemsize = _torch_dtype(self.dtype).itemsize
        if 0 in self.shape:
            return self.offset * itemsize
        last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        return (last + 1) * itemsize

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "dtype": self.dtype, "shape": list(self.shape),
                "stride": list(self.stride), "offset": self.offset}


@dataclass(frozen=True)
class CudaIpcHandle:
    """A CUDA tensor exported with ``torch.multiprocessing.reductions.reduce_tensor``.

    ``rebuild_args`` are that function's arguments for ``rebuild_cuda_tensor``, with the
    classes dropped, the dtype by name and bytes as ``"hex:..."`` strings (JSON-safe);
    ``device_uuid`` names the GPU so a mapper can check it sees the same device.
    """

    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    device_uuid: str
    rebuild_args: tuple[Any, ...]

    kind = "cuda_ipc"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "dtype": self.dtype, "shape": list(self.shape), "stride": list(self.stride),
                "offset": self.offset, "device_uuid": self.device_uuid, "rebuild_args": list(self.rebuild_args)}


WeightHandle = SharedMemoryHandle | CudaIpcHandle


def handle_from_dict(data: dict[str, Any]) -> WeightHandle:
    kind = data.get("kind")
    if kind == SharedMemoryHandle.kind:
        return SharedMemoryHandle(data["path"], data["dtype"], tuple(data["shape"]), tuple(data["stride"]),
                                  int(data.get("offset", 0)))
    if kind == CudaIpcHandle.kind:
        return CudaIpcHandle(data["dtype"], tuple(data["shape"]), tuple(data["stride"]), int(data["offset"]),
                             data["device_uuid"], tuple(data["rebuild_args"]))
    raise HandleError(f"unknown handle kind {kind!r}")


def create_shared_file(path: Path, dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[torch.Tensor, SharedMemoryHandle]:
    """Create a zero-filled shared-memory file (mode 0600, never overwriting) and map it.

    Returns the mapped tensor (writes reach the file) and its handle.
    """
    nbytes = max(1, math.prod(shape) * dtype.itemsize)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, nbytes)
    finally:
        os.close(fd)
    stride = torch.empty(shape, device="meta").stride() if shape else ()
    handle = SharedMemoryHandle(str(path), dtype_name(dtype), tuple(shape), tuple(stride), 0)
    return map_handle(handle), handle


def map_handle(handle: WeightHandle) -> torch.Tensor:
    """Map a handle into this process: a tensor whose storage is the shared memory itself."""
    if isinstance(handle, SharedMemoryHandle):
        return _map_shared_file(handle)
    if isinstance(handle, CudaIpcHandle):
        return _map_cuda_ipc(handle)
    raise HandleError(f"not a weight handle: {handle!r}")


def _map_shared_file(handle: SharedMemoryHandle) -> torch.Tensor:
    try:
        size = os.stat(handle.path).st_size
    except FileNotFoundError:
        raise HandleError(f"shared weights file {handle.path} does not exist") from None
    if size < handle.nbytes_needed:
        raise HandleError(f"{handle.path} holds {size} bytes; the handle needs {handle.nbytes_needed}")
    dtype = _torch_dtype(handle.dtype)
    storage = torch.UntypedStorage.from_file(handle.path, shared=True, nbytes=size)
    flat = torch.empty(0, dtype=dtype).set_(storage, 0, (size // dtype.itemsize,), (1,))
    return flat.as_strided(handle.shape, handle.stride, handle.offset)


def _map_cuda_ipc(handle: CudaIpcHandle) -> torch.Tensor:
    # Untested here (no GPU on the CI machine); scripts/gpu_check.py exercises it.
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    args = [_unhex(a) for a in handle.rebuild_args]
    # reduce_tensor's order: (tensor_cls, size, stride, offset, storage_cls, dtype, device, ipc_handle,
    # storage_size_bytes, storage_offset_bytes, requires_grad, ref_counter_handle, ref_counter_offset,
    # event_handle, event_sync_required); classes and dtype travel as names.
    args[0], args[4], args[5] = torch.Tensor, torch.storage.TypedStorage, _torch_dtype(handle.dtype)
    args[1], args[2] = torch.Size(args[1]), tuple(args[2])
    if str(torch.cuda.get_device_properties(args[6]).uuid) != handle.device_uuid:
        raise HandleError(f"handle is for GPU {handle.device_uuid}, device {args[6]} is another one")
    return rebuild_cuda_tensor(*args)


def _hex(value: Any) -> Any:
    return "hex:" + value.hex() if isinstance(value, bytes) else value


def _unhex(value: Any) -> Any:
    return bytes.fromhex(value[4:]) if isinstance(value, str) and value.startswith("hex:") else value


def export_cuda_tensor(tensor: torch.Tensor) -> CudaIpcHandle:
    """Export a CUDA tensor as a `CudaIpcHandle` (untested here: no GPU on the CI machine).

    The exporting process must keep ``tensor`` alive while any other process maps it.
    """
    from torch.multiprocessing.reductions import reduce_tensor

    if not tensor.is_cuda:
        raise HandleError("export_cuda_tensor needs a CUDA tensor")
    _, args = reduce_tensor(tensor.detach())
    args = [_hex(a) for a in args]
    args[0], args[4], args[5] = None, None, dtype_name(tensor.dtype)
    args[1], args[2] = list(args[1]), list(args[2])
    device_uuid = str(torch.cuda.get_device_properties(tensor.device).uuid)
    return CudaIpcHandle(dtype_name(tensor.dtype), tuple(tensor.shape), tuple(tensor.stride()),
                         tensor.storage_offset(), device_uuid, tuple(args))
