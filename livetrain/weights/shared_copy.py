"""The CPU training copy: vLLM-shaped tensors in shared-memory files, filled from a model directory.

On CPU vLLM repacks its linear weights into kernels and drops the plain tensors, so
livetrain keeps the weights being trained itself: one ``/dev/shm`` file per vLLM
parameter (merged and padded exactly as vLLM holds it, in the checkpoint's dtype), in
a 0700 directory named ``livetrain-*``. The training worker maps them and trains
Hugging Face-named views of them; vLLM either serves them directly or reloads its
kernels from them. A ``manifest.json`` beside the files lets any process map the
whole copy again, and the copy outlives the processes that use it until it is removed.
On a GPU vLLM keeps the weights and the directory holds only the manifest, with CUDA
IPC handles of vLLM's own tensors (:func:`publish_handles`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from livetrain.formats.safetensors_layout import ModelLayout
from livetrain.formats.dtypes import dtype_from_name
from livetrain.weights.handles import SharedMemoryHandle, WeightHandle, create_shared_file, handle_from_dict, map_handle
from livetrain.weights.layout import Layout, LayoutError

MANIFEST = "manifest.json"
SHM_PREFIX = "livetrain-"


class SharedCopyError(RuntimeError):
    """The shared copy cannot be created or opened (directory taken, manifest missing or stale)."""


def create_shared_copy(model_dir: str | Path, layout: Layout, directory: str | Path) -> dict[str, SharedMemoryHandle]:
    """Create the shared copy of every parameter in ``layout`` from ``model_dir``'s safetensors.

    ``directory`` must not exist yet; it is created with mode 0700 and its basename must
    start with ``livetrain-``. Each vLLM parameter gets a file (mode 0600) of its full vLLM
    shape in the dtype of its checkpoint tensors; padding rows are zero. Returns vLLM
    parameter name -> handle and writes the same, with the layout, to ``manifest.json``.
    """
    directory = Path(directory)
    if not directory.name.startswith(SHM_PREFIX):
        raise SharedCopyError(f"shared copy directory {directory} must be named {SHM_PREFIX}*")
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:
        raise SharedCopyError(f"{directory} already exists; open it or remove it first") from None
    try:
        stored = ModelLayout.read(model_dir).tensors
        files: dict[str, object] = {}
        handles: dict[str, SharedMemoryHandle] = {}
        for index, param in enumerate(layout.params.values()):
            sources = []
            for s in param.slices:
                if s.hf_name not in stored:
                    raise LayoutError(f"{param.name}: {s.hf_name} is not in {model_dir}")
                file_name = stored[s.hf_name].file
                if file_name not in files:
                    files[file_name] = safe_open(Path(model_dir) / file_name, framework="pt")
                sources.append((s, files[file_name].get_tensor(s.hf_name)))
            dtype = sources[0][1].dtype if sources else dtype_from_name(param.dtype)
            tensor, handle = create_shared_file(directory / f"{index:05d}.bin", dtype, param.shape)
            for s, source in sources:
                if source.dtype != dtype:
                    raise SharedCopyError(f"{param.name}: its checkpoint tensors mix {dtype} and {source.dtype}")
                tensor[s.rows[0]:s.rows[1]].copy_(source[s.hf_rows[0]:s.hf_rows[1]])
            handles[param.name] = handle
        _write_manifest(directory, model_dir, layout, handles)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return handles


def publish_handles(directory: str | Path, model_dir: str | Path, layout: Layout,
                    handles: Mapping[str, WeightHandle]) -> None:
    """Publish handles of weights that live elsewhere (vLLM's own GPU tensors) the way a
    shared copy is published: a fresh 0700 ``livetrain-*`` directory with ``manifest.json``.

    Whatever an earlier server left in ``directory`` is removed first: step-undo records
    and state there describe weights that no longer exist.
    """
    directory = Path(directory)
    if not directory.name.startswith(SHM_PREFIX):
        raise SharedCopyError(f"weights directory {directory} must be named {SHM_PREFIX}*")
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o700)
    _write_manifest(directory, model_dir, layout, handles)


def _write_manifest(directory: Path, model_dir: str | Path, layout: Layout,
                    handles: Mapping[str, WeightHandle]) -> None:
    manifest = {"model_dir": str(model_dir), "layout": layout.to_dict(),
                "handles": {name: h.to_dict() for name, h in handles.items()}}
    fd = os.open(directory / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(manifest))


def read_manifest(directory: str | Path) -> dict:
    """A shared copy's manifest: ``{model_dir, layout (plain data), handles (vLLM name -> handle dict)}``."""
    try:
        return json.loads((Path(directory) / MANIFEST).read_text())
    except FileNotFoundError:
        raise SharedCopyError(f"{directory} holds no shared copy ({MANIFEST} missing)") from None


def open_shared_copy(directory: str | Path) -> tuple[Layout, dict[str, torch.Tensor]]:
    """Map an existing shared copy: its layout and vLLM parameter name -> mapped tensor."""
    manifest = read_manifest(directory)
    return Layout.from_dict(manifest["layout"]), map_handles(manifest["handles"])


def map_handles(handles: Mapping[str, dict]) -> dict[str, torch.Tensor]:
    """vLLM parameter name -> handle dict, mapped into this process (no copies)."""
    return {name: map_handle(handle_from_dict(h)) for name, h in handles.items()}


def remove_shared_copy(directory: str | Path) -> None:
    """Delete a shared copy (only ``livetrain-*`` directories). Mapped tensors stay valid until unmapped."""
    directory = Path(directory)
    if not directory.name.startswith(SHM_PREFIX):
        raise SharedCopyError(f"refusing to remove {directory}: not a livetrain shared copy")
    shutil.rmtree(directory, ignore_errors=True)
