"""Weight handles: plain data that maps a tensor in another process without copying it."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from livetrain.weights import HandleError, SharedMemoryHandle, handle_from_dict, map_handle
from livetrain.weights.handles import create_shared_file


@pytest.fixture
def shm_path():
    path = f"/dev/shm/livetrain-test-handle-{os.getpid()}"
    yield path
    if os.path.exists(path):
        os.unlink(path)


def test_shared_file_is_private_and_two_mappings_share_bytes(shm_path):
    tensor, handle = create_shared_file(shm_path, torch.bfloat16, (6, 4))
    assert stat.S_IMODE(os.stat(shm_path).st_mode) == 0o600
    again = map_handle(handle_from_dict(json.loads(json.dumps(handle.to_dict()))))
    tensor[2, 1] = 7.0
    assert again[2, 1] == 7.0 and again.dtype == torch.bfloat16 and again.shape == (6, 4)
    with pytest.raises(FileExistsError):
        create_shared_file(shm_path, torch.bfloat16, (6, 4))


def test_handle_with_offset_and_stride_maps_a_slice_of_the_file(shm_path):
    base, handle = create_shared_file(shm_path, torch.float32, (4, 3))
    base.copy_(torch.arange(12.0).view(4, 3))
    column = SharedMemoryHandle(handle.path, "float32", (4,), (3,), offset=1)  # column 1
    assert map_handle(column).tolist() == [1.0, 4.0, 7.0, 10.0]


def test_handles_that_do_not_fit_their_file_are_refused(shm_path):
    _, handle = create_shared_file(shm_path, torch.float32, (2, 2))
    with pytest.raises(HandleError):
        map_handle(SharedMemoryHandle(handle.path, "float32", (3, 2), (2, 1)))
    with pytest.raises(HandleError):
        map_handle(SharedMemoryHandle(handle.path + "-missing", "float32", (2, 2), (2, 1)))
    with pytest.raises(HandleError):
        handle_from_dict({"kind": "carrier-pigeon"})


def test_published_handles_replace_what_an_earlier_server_left(tmp_path, shm_path):
    from livetrain.weights import Layout, ParamLayout, ParamSlice, open_shared_copy, publish_handles
    from livetrain.weights.shared_copy import SharedCopyError

    tensor, handle = create_shared_file(shm_path, torch.float32, (4, 3))
    tensor.fill_(2.0)
    layout = Layout({"w": ParamLayout("w", (4, 3), "float32", (ParamSlice("w.weight", (0, 4), (0, 4)),))},
                    {"w.weight": (4, 3)})
    directory = tmp_path / "livetrain-published"
    directory.mkdir()
    (directory / "step-in-progress").write_text("3")  # a stale record for weights that are gone
    publish_handles(directory, tmp_path, layout, {"w": handle})
    assert sorted(p.name for p in directory.iterdir()) == ["manifest.json"]
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "manifest.json").stat().st_mode) == 0o600
    mapped_layout, tensors = open_shared_copy(directory)
    assert mapped_layout == layout and torch.equal(tensors["w"], tensor)
    with pytest.raises(SharedCopyError, match="livetrain-"):
        publish_handles(tmp_path / "elsewhere", tmp_path, layout, {"w": handle})
