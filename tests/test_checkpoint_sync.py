"""Checkpoint sync writes exactly the changed blocks, and the files stay a loadable model."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from livetrain.checkpoint import (BLOCK_SIZE, DamagedFileError, DiskFullError, LayoutMismatchError,
                                  MissingFileError, ModelDirectory, NotWritableError, TensorTarget)
from livetrain.checkpoint import fileio
from livetrain.formats.safetensors_layout import ModelLayout

Q0 = "model.layers.0.self_attn.q_proj.weight"
K0 = "model.layers.0.self_attn.k_proj.weight"
V0 = "model.layers.0.self_attn.v_proj.weight"


def file_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory, as copies (nothing keeps the files mapped)."""
    out = {}
    for f in ModelLayout.read(model_dir).files:
        out.update({name: t.clone() for name, t in load_file(model_dir / f).items()})
    return out


def tree_digest(model_dir: Path) -> dict[str, str]:
    """SHA-256 of every file under the directory (the journal folder included)."""
    return {str(p.relative_to(model_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(model_dir.rglob("*")) if p.is_file() and p.name != "lock"}


def nudge(t: torch.Tensor, lr: float = 1e-3, seed: int = 0) -> torch.Tensor:
    """A dense small update in place, as a training step makes."""
    g = torch.Generator().manual_seed(seed)
    t += (lr * torch.randn(t.shape, generator=g)).to(t.dtype)
    return t


def assert_files_equal_live(model_dir: Path, live: dict[str, torch.Tensor]) -> None:
    on_disk = file_tensors(model_dir)
    for name, tensor in live.items():
        if name in on_disk:
            assert torch.equal(on_disk[name].view(torch.uint8), tensor.contiguous().view(torch.uint8)), name


def test_synced_files_equal_live_tensors_bit_for_bit_and_load_as_a_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dir(dtype=torch.bfloat16)
    live = file_tensors(model_dir)
    for name in (Q0, K0, "model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        nudge(live[name])
    with ModelDirectory.open(model_dir) as directory:
        result = directory.sync(live)
    assert result.generation == 1
    assert set(result.tensors_touched) == {Q0, K0, "model.layers.1.mlp.down_proj.weight", "model.norm.weight"}
    assert_files_equal_live(model_dir, live)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    for name, param in model.state_dict().items():
        if name in live:
            assert torch.equal(param, live[name]), name


def test_sync_without_changes_writes_nothing(tiny_model_dir):
    model_dir = tiny_model_dir(dtype=torch.bfloat16)
    before = tree_digest(model_dir)
    with ModelDirectory.open(model_dir) as directory:
        result = directory.sync(file_tensors(model_dir))
        assert (result.generation, result.bytes_written, result.blocks_changed) == (0, 0, 0)
        assert directory.generations() == []
    assert tree_digest(model_dir) == before


def _io_counters() -> dict[str, int]:
    return {k: int(v) for k, v in (line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())}


def _cache_in_small_pages(path: Path) -> None:
    """Reload `path` into the page cache one 4 KiB page at a time.

    The kernel counts `write_bytes` per page-cache folio dirtied; a file read sequentially
    sits in large folios (up to MiBs), so dirtying 4 KiB would count the whole folio.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for offset in range(0, os.fstat(fd).st_size, BLOCK_SIZE):
            os.pread(fd, BLOCK_SIZE, offset)
    finally:
        os.close(fd)


def test_only_changed_blocks_are_written_by_count_and_by_the_kernel(tiny_model_dir):
    model_dir = tiny_model_dir(dtype=torch.float32)
    path = model_dir / "model.safetensors"
    old_bytes = path.read_bytes()
    live = file_tensors(model_dir)
    live[Q0][3, 5] += 1.0  # one value: one block
    live["model.layers.1.mlp.up_proj.weight"][7:9] += 0.5  # two rows: 512 contiguous bytes
    with ModelDirectory.open(model_dir) as directory:
        _cache_in_small_pages(path)
        before = _io_counters()
        result = directory.sync(live)
        after = _io_counters()
    new_bytes = path.read_bytes()
    differing = {i // BLOCK_SIZE for i in range(0, len(old_bytes), BLOCK_SIZE)
                 if old_bytes[i:i + BLOCK_SIZE] != new_bytes[i:i + BLOCK_SIZE]}
    assert result.blocks_changed == len(differing) <= 3
    assert result.model_bytes == result.changed_block_bytes == BLOCK_SIZE * len(differing)
    assert result.bytes_written == result.model_bytes + result.journal_bytes + result.metadata_bytes
    assert result.journal_bytes < BLOCK_SIZE * len(differing)  # XOR undo compresses
    # the kernel saw the same bytes go through write calls...
    assert after["wchar"] - before["wchar"] == result.bytes_written
    # ...and dirtied pages for at most them (new small files round up to a page each)
    written_to_storage = after["write_bytes"] - before["write_bytes"]
    assert result.model_bytes <= written_to_storage <= result.model_bytes + 3 * BLOCK_SIZE + result.journal_bytes
    assert written_to_storage < len(old_bytes) // 100


def test_live_tensors_in_another_dtype_are_cast_to_the_files_dtype(tiny_model_dir):
    model_dir = tiny_model_dir(dtype=torch.bfloat16)
    live = {name: t.float() for name, t in file_tensors(model_dir).items()}  # an fp32 training copy
    with ModelDirectory.open(model_dir) as directory:
        live[Q0] *= 1 + 1e-4  # within half a bf16 step of every value: nothing to write
        assert directory.sync(live).blocks_changed == 0
        nudge(live[Q0], lr=1e-2)
        big = torch.randn(49152, 64)  # bigger than one piece of the cast: cast piece by piece
        live["model.embed_tokens.weight"] = big
        result = directory.sync(live)
    on_disk = file_tensors(model_dir)
    assert on_disk[Q0].dtype == torch.bfloat16
    assert torch.equal(on_disk[Q0], live[Q0].to(torch.bfloat16))
    assert torch.equal(on_disk["model.embed_tokens.weight"], big.to(torch.bfloat16))
    assert set(result.tensors_touched) == {Q0, "model.embed_tokens.weight"}


def test_a_merged_live_tensor_syncs_into_the_separate_hugging_face_tensors(tiny_model_dir):
    model_dir = tiny_model_dir(dtype=torch.bfloat16)
    files = file_tensors(model_dir)
    q, k, v = files[Q0], files[K0], files[V0]
    qkv = torch.cat([q, k, v])  # vLLM's qkv_proj: q | k | v rows
    nq, nk = q.shape[0], k.shape[0]
    name_map = {"layers.0.qkv_proj": [TensorTarget(Q0, (0, nq)), TensorTarget(K0, (nq, nq + nk)),
                                      TensorTarget(V0, (nq + nk, qkv.shape[0]))]}
    nudge(qkv)
    with ModelDirectory.open(model_dir) as directory:
        result = directory.sync({"layers.0.qkv_proj": qkv}, name_map)
    assert set(result.tensors_touched) == {Q0, K0, V0}
    on_disk = file_tensors(model_dir)
    assert torch.equal(on_disk[Q0], qkv[:nq])
    assert torch.equal(on_disk[K0], qkv[nq:nq + nk])
    assert torch.equal(on_disk[V0], qkv[nq + nk:])


def test_a_padded_vocabulary_syncs_its_real_rows(tiny_model_dir):
    model_dir = tiny_model_dir(dtype=torch.bfloat16)
    emb = file_tensors(model_dir)["model.embed_tokens.weight"]
    padded = torch.cat([emb, torch.zeros(64, emb.shape[1], dtype=emb.dtype)])
    padded[10] += 1
    name_map = {"embed": TensorTarget("model.embed_tokens.weight", rows=(0, emb.shape[0]))}
    with ModelDirectory.open(model_dir) as directory:
        directory.sync({"embed": padded}, name_map)
    assert torch.equal(file_tensors(model_dir)["model.embed_tokens.weight"], padded[:emb.shape[0]])


def test_tied_output_projection_is_not_written_twice(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dir(dtype=torch.float32, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.embed_tokens.weight[5] += 1
    with ModelDirectory.open(model_dir) as directory:
        result = directory.sync(model.state_dict())  # holds lm_head.weight, the same storage
    assert result.tensors_touched == ["model.embed_tokens.weight"]


def test_sharded_model_syncs_through_its_index(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    source = tiny_model_dir(dtype=torch.float32, num_layers=4)
    model = AutoModelForCausalLM.from_pretrained(source)
    model_dir = tmp_path / "sharded"
    model.save_pretrained(model_dir, max_shard_size="1MB")
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1
    live = file_tensors(model_dir)
    touched = ["model.embed_tokens.weight", "model.layers.3.mlp.gate_proj.weight"]
    assert index[touched[0]] != index[touched[1]]
    for name in touched:
        nudge(live[name])
    with ModelDirectory.open(model_dir) as directory:
        result = directory.sync(live)
    assert sorted(result.modes) == sorted({index[n] for n in touched})
    assert_files_equal_live(model_dir, live)
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir)
    assert torch.equal(reloaded.state_dict()[touched[1]], live[touched[1]])


def test_a_file_rewritten_whole_when_that_writes_less_still_rolls_back(tiny_model_dir):
    model_dir = tiny_model_dir(dtype=torch.float32)
    original = file_tensors(model_dir)
    live = {name: torch.randn_like(t) for name, t in original.items()}  # every byte changes, XOR is noise
    with ModelDirectory.open(model_dir) as directory:
        result = directory.sync(live)
        assert result.modes == {"model.safetensors": "whole"}
        size = (model_dir / "model.safetensors").stat().st_size
        assert result.model_bytes == size and result.journal_bytes < BLOCK_SIZE
        assert_files_equal_live(model_dir, live)
        directory.rollback(0)
    assert_files_equal_live(model_dir, original)


# ---------------------------------------------------------------- bad input


def test_unknown_live_name_is_refused_naming_the_tensor(tiny_model_dir):
    model_dir = tiny_model_dir()
    before = tree_digest(model_dir)
    with ModelDirectory.open(model_dir) as directory:
        with pytest.raises(LayoutMismatchError, match="model.layers.9.self_attn.q_proj.weight"):
            directory.sync({"model.layers.9.self_attn.q_proj.weight": torch.zeros(64, 64)})
    assert tree_digest(model_dir) == before


def test_live_shape_that_differs_from_the_header_is_refused(tiny_model_dir):
    model_dir = tiny_model_dir()
    live = file_tensors(model_dir)
    live[Q0] = torch.zeros(32, 64)
    before = tree_digest(model_dir)
    with ModelDirectory.open(model_dir) as directory:
        with pytest.raises(LayoutMismatchError, match=rf"model.safetensors: tensor {Q0} is F32 \[64, 64\]"):
            directory.sync(live)
    assert tree_digest(model_dir) == before


def test_missing_and_truncated_files_are_reported_by_name(tiny_model_dir):
    model_dir = tiny_model_dir()
    live = file_tensors(model_dir)
    path = model_dir / "model.safetensors"
    with ModelDirectory.open(model_dir) as directory:
        data = path.read_bytes()
        path.write_bytes(data[:-100])
        with pytest.raises(DamagedFileError, match="model.safetensors: truncated: tensor .* ends at byte"):
            directory.sync(live)
        path.unlink()
        with pytest.raises(MissingFileError, match="has neither model.safetensors"):
            directory.sync(live)


@pytest.mark.parametrize("mode,failing_op,nth", [
    ("blocks", "write", 0), ("blocks", "write", 1), ("blocks", "fsync", 0), ("blocks", "pwrite", 0),
    ("blocks", "pwrite", 1), ("blocks", "fsync", 1), ("blocks", "rename", 1),
    ("whole", "write", 0), ("whole", "fsync", 1), ("whole", "link", 0), ("whole", "rename", 1)])
def test_disk_full_anywhere_leaves_the_directory_unchanged(tiny_model_dir, mode, failing_op, nth):
    model_dir = tiny_model_dir(dtype=torch.bfloat16)
    live = file_tensors(model_dir)
    changed = live if mode == "whole" else (Q0, "model.layers.1.mlp.down_proj.weight", "model.norm.weight")
    for i, name in enumerate(changed):
        nudge(live[name], lr=1.0 if mode == "whole" else 1e-3, seed=i)
    before = tree_digest(model_dir)
    seen = []

    def fail(op, path, **details):
        if op == failing_op:
            seen.append(path)
            if len(seen) == nth + 1:
                raise OSError(errno.ENOSPC, "No space left on device")

    with ModelDirectory.open(model_dir) as directory:
        fileio.set_fault_hook(fail)
        try:
            with pytest.raises(DiskFullError, match=r"no space left on the device while .* /"):
                directory.sync(live)
        finally:
            fileio.set_fault_hook(None)
        assert tree_digest(model_dir) == before
        result = directory.sync(live)  # and the next sync goes through
        assert result.generation == 1 and result.modes == {"model.safetensors": mode}
    assert_files_equal_live(model_dir, live)


def test_unwritable_model_file_is_refused_before_anything_changes(tiny_model_dir):
    model_dir = tiny_model_dir()
    live = file_tensors(model_dir)
    nudge(live[Q0])
    before = tree_digest(model_dir)

    def deny(op, path, **details):  # tests run as root, where chmod does not stop a write
        if op == "open" and details["flags"] & os.O_RDWR and path.endswith("model.safetensors"):
            raise OSError(errno.EACCES, "Permission denied")

    with ModelDirectory.open(model_dir) as directory:
        fileio.set_fault_hook(deny)
        try:
            with pytest.raises(NotWritableError, match="model.safetensors"):
                directory.sync(live)
        finally:
            fileio.set_fault_hook(None)
    assert tree_digest(model_dir) == before


def test_misaligned_tensors_sharing_blocks_with_neighbours_sync_exactly(tmp_path):
    # odd sizes: tensors start mid-block and share their first and last blocks
    tensors = {f"t{i}": torch.randn(1 + 37 * i, 3).to(torch.float16) for i in range(40)}
    tensors["i"] = torch.arange(5, dtype=torch.int8)
    save_file(tensors, tmp_path / "model.safetensors")
    live = {k: v.clone() for k, v in tensors.items()}
    live["t7"][0, 0] += 1
    live["t8"][-1, -1] += 1
    live["t30"] += 1
    live["i"][4] = 100
    with ModelDirectory.open(tmp_path) as directory:
        result = directory.sync(live)
    assert set(result.tensors_touched) == {"t7", "t8", "t30", "i"}
    assert_files_equal_live(tmp_path, live)
    assert shutil.disk_usage(tmp_path)  # the directory is still there and readable
