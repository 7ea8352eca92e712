"""`livetrain serve` stopped each way a deployment stops it, on a real process tree (vLLM on a
tiny model, started by its command line in a session of its own): SIGINT to its process
group (Ctrl-C), SIGTERM to the group, SIGTERM to every process of the tree (systemd's
default KillMode=control-group), SIGTERM to the supervisor alone, SIGKILL of the
supervisor, SIGKILL of the training worker during a stop, SIGKILL of vLLM during a stop
(`tests.serve_tree.STOP_WAYS`).

After each, with steps applied just before: every process of the tree has exited, the
port is free, nothing of the server is left in /dev/shm (its shared copy, vLLM's shared
memory) or in the runtime directory, the directory verifies and holds the applied steps.
When the worker was killed before it could sync, the shared copy is kept instead, and
the next start serves it and syncs it. The cases run in order on one model directory,
so each start is also the recovery check of the case before it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from livetrain import procfs
from livetrain.checkpoint.commands import checkpoint_verify
from livetrain.leftovers import check_port_free
from livetrain.serve import LiveServer, ServeOptions
from livetrain.vllm_plugin.launcher import MULTIPROCESSING_SEGMENTS
from livetrain.weights import hf_views, open_shared_copy, remove_shared_copy
from tests.serve_tree import STOP_WAYS, ServeTree
from tests.session_helpers import example, files_digest, post_json, wire

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

SERVE_ARGS = ("--lr", "1e-2", "--max-probe-drift", "0")
VLLM_ARGS = ("--enforce-eager", "--max-model-len", "256")
STEPS = 3
EXIT_STATUS = {"sigkill-supervisor": -9, "sigkill-worker-during-stop": 1}  # the others: 0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    from tests.vllm_layouts import write_vllm_tiny_model

    return write_vllm_tiny_model(tmp_path_factory.mktemp("stops") / "model", "llama", tokenizer_dir)


@pytest.fixture(scope="module")
def kept(model_dir):
    """What the previous case kept in /dev/shm: Hugging Face name -> tensor, for the next start
    to recover. Removed at the end if no case was left to recover it."""
    tensors: dict = {}
    yield tensors
    if tensors:
        remove_shared_copy(shared_copy_of(model_dir))


def shared_copy_of(model_dir: Path) -> Path:
    return LiveServer(ServeOptions(model_dir=model_dir)).shm_dir


def served_hf_tensors(shm_dir: Path) -> dict:
    layout, tensors = open_shared_copy(shm_dir)
    return {name: view.clone() for name, view in hf_views(layout, tensors).items()}


@pytest.mark.parametrize("way", list(STOP_WAYS))
def test_every_stop_ends_the_tree_and_keeps_every_applied_step(way, model_dir, kept, tmp_path):
    shm_dir = shared_copy_of(model_dir)
    tree = ServeTree.start(model_dir, tmp_path / "serve.log", SERVE_ARGS, VLLM_ARGS)
    try:
        if kept:  # the previous case's copy: served, and synced into the directory on demand
            assert f"found {shm_dir}" in tree.log()
            post_json(tree.base_url + "/checkpoint", {})
            on_disk = load_file(model_dir / "model.safetensors")
            assert all(on_disk[name].equal(kept[name]) for name in on_disk), "the kept steps were not recovered"
            kept.clear()
        for i in range(STEPS):
            assert post_json(tree.base_url + "/train", {"examples": [wire(example(i))]})["applied"]
        before = files_digest(model_dir)
        segments = {path for path in procfs.mapped_shm_files(set(procfs.group_members(tree.vllm)))
                    if Path(path).name.startswith(MULTIPROCESSING_SEGMENTS)}
        assert segments

        seconds = tree.wait_gone(tree.stop(way))
    finally:
        tree.end()
    print(f"{STOP_WAYS[way]}: every process gone after {seconds:.2f} s "
          f"(supervisor {tree.gone_after[tree.serve.pid]:.2f} s, worker {tree.gone_after[tree.worker]:.2f} s, "
          f"vLLM {tree.gone_after[tree.vllm]:.2f} s)")

    assert tree.serve.returncode == EXIT_STATUS.get(way, 0), tree.log()
    check_port_free("127.0.0.1", tree.port)
    assert not tree.runtime_dir.exists()
    assert not [path for path in segments if Path(path).exists()]
    assert checkpoint_verify(model_dir)["ok"]
    if way == "sigkill-worker-during-stop":
        assert files_digest(model_dir) == before  # it was killed before its sync...
        assert f"kept {shm_dir}" in tree.log()  # ...so the served weights stay for the next start
        kept.update(served_hf_tensors(shm_dir))
        assert any(not tensor.equal(kept[name]) for name, tensor in load_file(model_dir / "model.safetensors").items())
    else:
        assert files_digest(model_dir) != before  # the applied steps were synced
        assert not shm_dir.exists()


def test_a_stop_while_vllm_starts_ends_the_tree_at_once(tmp_path, tokenizer_dir):
    """systemctl stop (or restart) while the server is still starting: no wait for vLLM to
    become ready first."""
    from tests.vllm_layouts import write_vllm_tiny_model

    model_dir = write_vllm_tiny_model(tmp_path / "model", "llama", tokenizer_dir)
    tree = ServeTree.start(model_dir, tmp_path / "serve.log", SERVE_ARGS, VLLM_ARGS, until="starting vLLM")
    try:
        seconds = tree.wait_gone(tree.stop("sigterm-supervisor"))
    finally:
        tree.end()
    print(f"every process gone {seconds:.2f} s after a SIGTERM during the start (supervisor "
          f"{tree.gone_after[tree.serve.pid]:.2f} s, worker {tree.gone_after[tree.worker]:.2f} s, "
          f"vLLM {tree.gone_after[tree.vllm]:.2f} s)")
    assert tree.serve.returncode == 0 and "OpenAI API at" not in tree.log(), tree.log()
    check_port_free("127.0.0.1", tree.port)
    assert not tree.runtime_dir.exists() and not shared_copy_of(model_dir).exists()
