"""Crash test: a process running a real sync (or rollback) is SIGKILLed at every file
operation, mid-write too; reopening the directory gives exactly the old or the new
generation, never a mix."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from livetrain.checkpoint import BLOCK_SIZE, ModelDirectory
from livetrain.checkpoint import fileio
from livetrain.formats.safetensors_layout import ModelLayout
from tests.test_checkpoint_sync import nudge

Action = Callable[[ModelDirectory], object]


def tensor_digests(model_dir: Path) -> dict[str, str]:
    return {name: hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()
            for name, t in load_file(model_dir / "model.safetensors").items()}


def _torn_write(op: str, fd: int, data, offset: int | None) -> None:
    """Write the first half of what the call would have written (whole 512-byte sectors
    for model files, as a disk tears them; any byte for the journal's appends)."""
    buf = b"".join(bytes(b) for b in data) if op == "pwrite" else bytes(data)
    if op == "pwrite":
        os.pwrite(fd, buf[:len(buf) // 2 // 512 * 512], offset)
    else:
        os.write(fd, buf[:len(buf) // 2])


def run_and_kill(model_dir: Path, action: Action, kill_at: int | None, torn: bool = False,
                 delay_s: float | None = None) -> int:
    """Run `action` on the directory in a forked child that SIGKILLs itself before file
    operation number `kill_at` (after half of it when `torn`), or that the parent kills
    after `delay_s`. Returns the child's exit status (a signal number as negative)."""
    pid = os.fork()
    if pid == 0:  # the child does no torch compute: safe to fork a process that has torch
        try:
            count = [0]

            def hook(op, path, **details):
                if delay_s is not None:
                    time.sleep(0.0005)  # widen the window the parent's kill can land in
                if count[0] == kill_at:
                    if torn and op in ("pwrite", "write"):
                        _torn_write(op, details["fd"], details["data"], details["offset"])
                    os.kill(os.getpid(), signal.SIGKILL)
                count[0] += 1

            with ModelDirectory.open(model_dir) as directory:
                fileio.set_fault_hook(hook)
                action(directory)
            os._exit(0)
        except BaseException:
            os._exit(3)
    if delay_s is not None:
        time.sleep(delay_s)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def count_ops(model_dir: Path, action: Action, tmp: Path) -> list[str]:
    """The file operations `action` makes, in order (run on a copy)."""
    ops = []
    copy = tmp / "count"
    shutil.copytree(model_dir, copy)
    with ModelDirectory.open(copy) as directory:
        fileio.set_fault_hook(lambda op, path, **details: ops.append(op))
        try:
            action(directory)
        finally:
            fileio.set_fault_hook(None)
    shutil.rmtree(copy)
    return ops


def crash_everywhere(base: Path, action: Action, old: dict, new: dict, old_gen: int, new_gen: int,
                     tmp: Path, random_kills: int = 0) -> dict[str, int]:
    """Kill `action` at every operation (and mid-write), check each outcome."""
    ops = count_ops(base, action, tmp)
    points = [(k, False) for k in range(len(ops))] + [(k, True) for k, op in enumerate(ops)
                                                       if op in ("pwrite", "write")]
    rng = random.Random(0)
    points += [(None, rng.uniform(0, 0.03)) for _ in range(random_kills)]
    outcomes = {"old": 0, "new": 0}
    for n, (kill_at, torn_or_delay) in enumerate(points):
        work = tmp / f"run{n}"
        shutil.copytree(base, work)
        if kill_at is None:
            run_and_kill(work, action, None, delay_s=torn_or_delay)
        else:
            assert run_and_kill(work, action, kill_at, torn=torn_or_delay) == -signal.SIGKILL
        with ModelDirectory.open(work) as directory:  # recovers
            digests = tensor_digests(work)
            state = "old" if digests == old else "new" if digests == new else "mixed"
            assert state != "mixed", f"killed at operation {kill_at} ({'torn' if torn_or_delay else 'clean'})"
            assert directory.latest == (old_gen if state == "old" else new_gen)
            assert directory.verify().ok
            assert directory.pending() == []
        outcomes[state] += 1
        shutil.rmtree(work)
    outcomes["points"] = len(points)
    return outcomes


@pytest.fixture
def base_dir(tiny_model_dir, tmp_path) -> Path:
    """A tiny model's decoder weights (bf16, no embedding: fast to copy) at generation 1."""
    source = tiny_model_dir(dtype=torch.bfloat16)
    base = tmp_path / "base"
    base.mkdir()
    live = {n: t for n, t in load_file(source / "model.safetensors").items() if "embed" not in n}
    save_file(live, base / "model.safetensors")
    nudge(live["model.layers.0.self_attn.q_proj.weight"])
    with ModelDirectory.open(base) as directory:
        assert directory.sync(live).generation == 1
    return base


def test_killed_sync_of_changed_blocks_leaves_old_or_new_generation(base_dir, tmp_path):
    live = load_file(base_dir / "model.safetensors")
    for name, loc in ModelLayout.read(base_dir).tensors.items():  # every other block: many block writes
        if live[name].dim() == 2:
            row_bytes = (loc.end - loc.start) // live[name].shape[0]
            for r in range(live[name].shape[0]):
                if (loc.start + r * row_bytes) // BLOCK_SIZE % 2 == 0:
                    live[name][r, 0] += 1
    nudge(live["model.layers.1.self_attn.q_proj.weight"])
    old = tensor_digests(base_dir)
    new = {name: hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest() for name, t in live.items()}
    outcomes = crash_everywhere(base_dir, lambda d: d.sync(live), old, new, 1, 2, tmp_path, random_kills=6)
    assert outcomes["points"] >= 50
    assert outcomes["old"] > 0 and outcomes["new"] > 0


def test_killed_whole_file_rewrite_leaves_old_or_new_generation(base_dir, tmp_path):
    live = {name: torch.randn(t.shape).to(t.dtype) for name, t in load_file(base_dir / "model.safetensors").items()}
    old = tensor_digests(base_dir)
    new = {name: hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest() for name, t in live.items()}
    outcomes = crash_everywhere(base_dir, lambda d: d.sync(live), old, new, 1, 2, tmp_path)
    assert outcomes["old"] > 0 and outcomes["new"] > 0


def test_killed_rollback_leaves_the_generation_before_or_after_it(base_dir, tmp_path):
    original = base_dir.parent / "original"
    with ModelDirectory.open(base_dir) as directory:
        gen1 = tensor_digests(base_dir)
        live = load_file(base_dir / "model.safetensors")
        nudge(live["model.layers.1.mlp.down_proj.weight"], seed=3)
        directory.sync(live)
        gen2 = tensor_digests(base_dir)
        shutil.copytree(base_dir, original)
        directory.rollback(1)
        assert tensor_digests(base_dir) == gen1
    outcomes = crash_everywhere(original, lambda d: d.rollback(1), gen2, gen1, 2, 1, tmp_path)
    assert outcomes["old"] > 0 and outcomes["new"] > 0
