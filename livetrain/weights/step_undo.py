"""Pre-step copies of the trained tensors, so that a step torn by a crash is undone.

An optimizer step writes the served weights in place, one tensor after another. A
process killed halfway leaves some tensors stepped and the rest not: a state nobody
asked for, which inference would serve and the next sync would keep. So before each
step the training session copies the tensors the step may change into a :class:`StepUndo`
and marks the step as in progress (:meth:`StepUndo.begin`); a kept step is committed by
writing the trainer's state after it (:meth:`StepUndo.end`), and then the mark goes.

With a directory (the shared copy's, which outlives the training worker), all of this
lives in shared-memory files there. Whoever maps the shared copy next - a restarted
worker, or vLLM reusing a copy left by a server that died - calls :func:`undo_torn_step`
first: a mark without the state of its step means the step was torn, and the saved
tensors are copied back: the weights are exactly those from before it. A report of the
undone step stays there until the training session takes it (:func:`take_undo_report`)
to show it in its status. The copies
double as the step's "before" for the update norm, the non-finite guard and the probe
guard, so all the guarding costs one copy of the trained tensors.

Files (mode 0600), each replaced atomically: ``step-undo.bin`` (the tensors back to
back), ``step-undo.json`` (name, dtype, shape, byte offset of each), ``step-in-progress``
(the weights version being written; there only while a step runs),
``state-<version>.pt`` (the caller's state after the last kept step, opaque bytes) and
``undone-step.json`` (the report of an undone torn step, until taken).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from livetrain.formats.dtypes import dtype_from_name, dtype_name
from livetrain.weights.handles import SharedMemoryHandle, create_shared_file, map_handle

DATA_FILE = "step-undo.bin"
INDEX_FILE = "step-undo.json"
MARK_FILE = "step-in-progress"
STATE_PREFIX = "state-"
REPORT_FILE = "undone-step.json"
_ALIGN = 64  # bytes: every saved tensor starts on a cache line


class StepUndo:
    """Saved copies of ``live`` (name -> tensor being trained), in ``directory`` if given.

    ``directory=None`` keeps the copies in ordinary memory (a session whose weights die
    with its process needs no crash recovery, only the copies).
    """

    def __init__(self, live: Mapping[str, torch.Tensor], directory: str | os.PathLike | None = None) -> None:
        self.names = list(live)
        self.live = [live[n] for n in self.names]
        self.directory = None if directory is None else Path(directory)
        self._version = 0  # of the step in progress
        if self.directory is None:
            self.saved = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in self.live]
        # With a directory the copies are host memory whatever the device of the weights.
        else:
            self.saved = self._create_files()

    def _create_files(self) -> list[torch.Tensor]:
        assert self.directory is not None
        index, offset = [], 0
        for name, tensor in zip(self.names, self.live):
            index.append({"name": name, "dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape),
                          "offset": offset})
            offset += -(-tensor.numel() * tensor.element_size() // _ALIGN) * _ALIGN
        data = self.directory / DATA_FILE
        (self.directory / MARK_FILE).unlink(missing_ok=True)
        data.unlink(missing_ok=True)
        flat, _ = create_shared_file(data, torch.uint8, (max(offset, 1),))
        _write_atomically(self.directory / INDEX_FILE, json.dumps(index).encode())
        return [_view(flat, entry) for entry in index]

    def begin(self, weights_version: int) -> None:
        """Copy the live tensors, then mark the step that makes ``weights_version`` as in progress."""
        with torch.no_grad():
            for saved, live in zip(self.saved, self.live):  # across devices too (GPU weights, host copies)
                saved.copy_(live)
        if self.directory is not None:
            self._write(MARK_FILE, str(weights_version).encode())
        self._version = weights_version

    def restore(self) -> None:
        """Put the saved tensors back into the live ones (the step is undone)."""
        with torch.no_grad():
            for saved, live in zip(self.saved, self.live):
                live.copy_(saved)

    def end(self, kept_state: bytes | None = None) -> None:
        """The step is over. If it was kept, ``kept_state`` (the caller's state after it)
        is written first: that write commits the step. Then the mark goes."""
        if self.directory is None:
            return
        if kept_state is not None:
            self.keep_state(self._version, kept_state)
        (self.directory / MARK_FILE).unlink(missing_ok=True)

    def keep_state(self, weights_version: int, state: bytes) -> None:
        """Record ``state`` as the caller's state at ``weights_version`` (replacing older ones)."""
        if self.directory is None:
            return
        self._write(f"{STATE_PREFIX}{weights_version}.pt", state)
        for version, path in _state_files(self.directory):
            if version != weights_version:
                path.unlink(missing_ok=True)


    def _write(self, name: str, data: bytes) -> None:
        assert self.directory is not None
        try:
            _write_atomically(self.directory / name, data)
        except FileNotFoundError:
            # The directory was removed under us: the server is stopping at once (a second
            # signal) and this process only syncs before it exits; there is nothing to recover.
            pass


def undo_torn_step(directory: str | os.PathLike, live: Mapping[str, torch.Tensor]) -> dict | None:
    """Undo the step a crash interrupted in ``directory``'s weights, if there was one.

    ``live``: Hugging Face name -> the tensor the weights live in (views of the shared
    copy). Returns ``{"weights_version", "tensors"}`` for the undone step (the version
    it would have had; how many tensors were restored), or None if no step was torn (a
    step whose state was written was kept; only its mark is cleared). Raises
    ``ValueError`` if the saved copies do not fit ``live`` (then nothing is written).
    """
    directory = Path(directory)
    mark = directory / MARK_FILE
    try:
        version = int(mark.read_text())
    except FileNotFoundError:
        return None
    if (directory / f"{STATE_PREFIX}{version}.pt").exists():
        mark.unlink()
        return None
    index = json.loads((directory / INDEX_FILE).read_text())
    flat = map_handle(SharedMemoryHandle(str(directory / DATA_FILE), "uint8",
                                         (os.stat(directory / DATA_FILE).st_size,), (1,), 0))
    pairs = []
    for entry in index:
        target = live.get(entry["name"])
        if target is None or list(target.shape) != entry["shape"] or dtype_name(target.dtype) != entry["dtype"]:
            raise ValueError(f"{directory}: the step undo record for {entry['name']} does not fit the weights")
        pairs.append((target, _view(flat, entry)))
    with torch.no_grad():
        for target, saved in pairs:
            target.copy_(saved)
    report = {"weights_version": version, "tensors": len(pairs)}
    _write_atomically(directory / REPORT_FILE, json.dumps(report).encode())
    mark.unlink()
    return report


def take_undo_report(directory: str | os.PathLike) -> dict | None:
    """The report :func:`undo_torn_step` left in ``directory`` (removed), or None."""
    path = Path(directory) / REPORT_FILE
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    path.unlink()
    return report


def last_kept_state(directory: str | os.PathLike) -> bytes | None:
    """The state written with the last kept step in ``directory`` (None if there is none)."""
    files = _state_files(Path(directory))
    return max(files)[1].read_bytes() if files else None


def _state_files(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for path in directory.glob(f"{STATE_PREFIX}*.pt"):
        version = path.name[len(STATE_PREFIX):-len(".pt")]
        if version.isdigit():
            found.append((int(version), path))
    return found


def _view(flat: torch.Tensor, entry: dict) -> torch.Tensor:
    """The saved tensor described by an index entry, as a view of the mapped bytes."""
    dtype = dtype_from_name(entry["dtype"])
    numel = 1
    for size in entry["shape"]:
        numel *= size
    start = entry["offset"]
    return flat[start:start + numel * dtype.itemsize].view(dtype).view(entry["shape"])


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` (temp file + rename, mode 0600). No fsync: these
    files live in shared memory, which a process crash keeps and a machine crash loses."""
    temp = path.with_name(path.name + ".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(temp, path)
