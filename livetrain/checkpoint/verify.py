"""Verify: re-read every tensor of every file, and check it against what the newest kept
generation that wrote it recorded."""

from __future__ import annotations

import hashlib
import mmap
from dataclasses import dataclass

from livetrain.checkpoint import journal
from livetrain.checkpoint.errors import DIRECTORY_ERRORS
from livetrain.checkpoint.generations import GenerationFiles
from livetrain.formats.safetensors_layout import ModelLayout


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of a verify: `ok` when `problems` is empty."""

    generation: int
    files: int
    tensors: int
    checksums_checked: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(files: GenerationFiles) -> VerifyReport:
    """Check the headers and sizes of the model directory's files, each tensor against the
    checksum its newest kept generation recorded, and that every undo record reads."""
    path = files.path
    problems = [f"generation {g} was interrupted and is not undone yet: open {path} for writing to recover"
                for g in files.pending()]
    try:
        layout = ModelLayout.read(path)
    except DIRECTORY_ERRORS as exc:
        return VerifyReport(files.latest, 0, 0, 0, problems + [str(exc)])
    recorded: dict[str, tuple[int, str]] = {}
    for gen in reversed(files.generations()):
        for name, digest in gen.tensors.items():
            recorded.setdefault(name, (gen.generation, digest))
    checked = 0
    for file, header in layout.files.items():
        with open(path / file, "rb") as f:
            data = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        for loc in header.tensors.values():
            try:
                digest = hashlib.sha256(data[loc.start:loc.end]).hexdigest()
            except OSError as exc:
                problems.append(f"{path / file}: tensor {loc.name} cannot be read ({exc})")
                continue
            if loc.name in recorded:
                checked += 1
                g, want = recorded[loc.name]
                if digest != want:
                    problems.append(f"{path / file}: tensor {loc.name} differs from what generation "
                                    f"{g} wrote (damaged, or changed outside livetrain)")
        del data
    for name, (g, _) in recorded.items():
        if name not in layout.tensors:
            problems.append(f"{path}: tensor {name}, written by generation {g}, is in no file")
    for g in files.numbers(".undo"):
        try:
            journal.UndoRecord.read(files.file(g, ".undo"))
        except DIRECTORY_ERRORS as exc:
            problems.append(str(exc))
    return VerifyReport(files.latest, len(layout.files), len(layout.tensors), checked, problems)
