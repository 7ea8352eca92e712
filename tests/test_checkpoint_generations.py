"""Generations: rollback restores each one bit for bit, pruning keeps what it promises,
verify finds damage, recovery undoes torn blocks, the scheduler debounces."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from livetrain.checkpoint import (BLOCK_SIZE, DirectoryInUse, GenerationNotFoundError, ModelDirectory,
                                  NotWritableError, SyncScheduler)
from livetrain.checkpoint import fileio, journal
from livetrain.checkpoint.block_diff import ChangedBlocks
from livetrain.checkpoint.commands import checkpoint_log, checkpoint_status, checkpoint_sync, checkpoint_verify
from tests.test_checkpoint_sync import Q0, file_tensors, nudge, tree_digest

TRAINED = (Q0, "model.layers.1.self_attn.o_proj.weight", "model.layers.0.mlp.gate_proj.weight", "model.norm.weight")


def snapshot(model_dir) -> dict[str, bytes]:
    return {name: t.view(torch.uint8).numpy().tobytes() for name, t in file_tensors(model_dir).items()}


def test_rollback_restores_every_generation_bit_for_bit(tiny_model_dir):
    model_dir = tiny_model_dir(dtype=torch.bfloat16)
    live = file_tensors(model_dir)
    states = [snapshot(model_dir)]
    with ModelDirectory.open(model_dir) as directory:
        for step in range(4):
            nudge(live[TRAINED[step % len(TRAINED)]], seed=step)
            nudge(live[Q0], seed=100 + step)
            assert directory.sync(live).generation == step + 1
            states.append(snapshot(model_dir))
        assert [g.generation for g in directory.generations()] == [1, 2, 3, 4]
        for g in (3, 1, 0):
            restored = directory.rollback(g)
            assert snapshot(model_dir) == states[g]
            assert directory.latest == g
            assert Q0 in restored and torch.equal(restored[Q0], file_tensors(model_dir)[Q0])
        # history goes on from the generation rolled back to
        nudge(live["model.norm.weight"], seed=9)
        assert directory.sync(live).generation == 1
        assert directory.verify().ok


def test_pruning_keeps_undo_records_of_the_last_n_generations(tiny_model_dir):
    model_dir = tiny_model_dir(dtype=torch.bfloat16)
    live = file_tensors(model_dir)
    states = {0: snapshot(model_dir)}
    with ModelDirectory.open(model_dir, keep_generations=2) as directory:
        for step in range(1, 6):
            nudge(live[Q0], seed=step)
            directory.sync(live)
            states[step] = snapshot(model_dir)
        assert directory.reachable() == [3, 4, 5]
        kept = sorted(p.name for p in directory.checkpoint_dir.iterdir() if p.name != "lock")
        assert kept == ["00000003.json", "00000004.json", "00000004.undo", "00000005.json", "00000005.undo"]
        before = tree_digest(model_dir)
        with pytest.raises(GenerationNotFoundError, match="reachable: 3..5"):
            directory.rollback(2)
        assert tree_digest(model_dir) == before
        directory.rollback(3)
        assert snapshot(model_dir) == states[3]


def test_keep_zero_generations_keeps_no_undo_data(tiny_model_dir):
    model_dir = tiny_model_dir(dtype=torch.bfloat16)
    live = file_tensors(model_dir)
    with ModelDirectory.open(model_dir, keep_generations=0) as directory:
        nudge(live[Q0])
        directory.sync(live)
        assert [p.name for p in directory.checkpoint_dir.iterdir() if p.name != "lock"] == ["00000001.json"]
        assert directory.reachable() == [1]


def test_verify_names_the_damaged_file_and_tensor(tiny_model_dir):
    model_dir = tiny_model_dir(dtype=torch.bfloat16)
    live = file_tensors(model_dir)
    nudge(live[Q0])
    with ModelDirectory.open(model_dir) as directory:
        directory.sync(live)
        report = directory.verify()
        assert report.ok and report.checksums_checked == 1 and report.tensors == len(live)
        path = model_dir / "model.safetensors"
        from livetrain.formats.safetensors_layout import ModelLayout
        loc = ModelLayout.read(model_dir).tensors[Q0]
        data = bytearray(path.read_bytes())
        data[loc.start + 10] ^= 0x40
        path.write_bytes(data)
        report = directory.verify()
        assert not report.ok
        assert report.problems == [f"{path}: tensor {Q0} differs from what generation 1 wrote "
                                   f"(damaged, or changed outside livetrain)"]
        path.write_bytes(data[:-7])
        assert "truncated" in directory.verify().problems[0]


def test_only_one_writer_and_read_only_readers(tiny_model_dir):
    model_dir = tiny_model_dir()
    with ModelDirectory.open(model_dir):
        with pytest.raises(DirectoryInUse):
            ModelDirectory.open(model_dir)
        reader = ModelDirectory.open(model_dir, read_only=True)
        assert reader.verify().ok
        with pytest.raises(NotWritableError, match="read-only"):
            reader.sync({})


def test_recovery_restores_a_block_torn_between_sectors(tmp_path):
    """Power loss can leave a block with some 512-byte sectors new and others old."""
    size = 3 * BLOCK_SIZE + 100
    rng = np.random.default_rng(0)
    old = rng.integers(0, 256, size, dtype=np.uint8)
    path = tmp_path / "model.safetensors"
    path.write_bytes(old.tobytes())
    change = ChangedBlocks("model.safetensors", old.copy())
    new = old.copy()
    new[BLOCK_SIZE:] ^= rng.integers(0, 2, size - BLOCK_SIZE, dtype=np.uint8)  # blocks 1, 2, 3 change
    for i in (1, 2, 3):
        start, stop = change.block_range(i)
        change.blocks[i] = bytearray(new[start:stop])
    record_path = tmp_path / "00000001.undo"
    journal.write_undo_record(record_path, 1, [change], [], fileio.WriteStats())
    on_disk = new.copy()
    on_disk[BLOCK_SIZE:BLOCK_SIZE + 3 * 512] = old[BLOCK_SIZE:BLOCK_SIZE + 3 * 512]  # block 1: torn
    on_disk[2 * BLOCK_SIZE:3 * BLOCK_SIZE] = old[2 * BLOCK_SIZE:3 * BLOCK_SIZE]  # block 2: not written yet
    path.write_bytes(on_disk.tobytes())  # block 3 (short, the file's end): new
    journal.undo(journal.UndoRecord.read(record_path), tmp_path, fileio.WriteStats())
    assert path.read_bytes() == old.tobytes()


def test_commands_return_printable_data(tiny_model_dir, tmp_path):
    from safetensors.torch import save_file

    model_dir = tiny_model_dir(dtype=torch.bfloat16)
    live = file_tensors(model_dir)
    nudge(live[Q0])
    save_file({Q0: live[Q0]}, tmp_path / "trained.safetensors")
    result = checkpoint_sync(model_dir, tmp_path / "trained.safetensors")
    assert result["generation"] == 1 and result["tensors_touched"] == [Q0]
    assert checkpoint_sync(model_dir)["generation"] == 1  # nothing to sync
    assert checkpoint_status(model_dir)["generation"] == 1
    assert [g["generation"] for g in checkpoint_log(model_dir)] == [1]
    assert checkpoint_verify(model_dir)["ok"]


def test_scheduler_debounces_and_never_overlaps():
    calls, running, overlaps = [], [0], [0]
    done = threading.Event()
    lock = threading.Lock()

    def sync():
        with lock:
            running[0] += 1
            overlaps[0] = max(overlaps[0], running[0])
        calls.append(len(calls))
        done.set()
        with lock:
            running[0] -= 1
        return len(calls)

    scheduler = SyncScheduler(sync, interval_s=0.2)
    for _ in range(20):  # a burst of steps: one sync after the last
        scheduler.mark_dirty()
    assert done.wait(10)
    assert len(calls) == 1 and not scheduler.dirty
    threads = [threading.Thread(target=scheduler.sync_now) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps[0] == 1 and len(calls) == 5
    scheduler.mark_dirty()
    assert scheduler.close() == 6  # close syncs what is dirty
    assert scheduler.close() is None


def test_scheduler_keeps_a_failed_sync_dirty():
    attempts = []

    def sync():
        attempts.append(1)
        raise OSError("disk gone")

    scheduler = SyncScheduler(sync, interval_s=600)
    scheduler.mark_dirty()
    with pytest.raises(OSError):
        scheduler.sync_now()
    assert scheduler.dirty
    with pytest.raises(OSError):
        scheduler.close()
