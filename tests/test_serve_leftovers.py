"""A server that dies before syncing leaves its shared copy in /dev/shm; the next server on
the same directory finds it, undoes a step the crash tore, serves it and syncs it, so no
applied step is lost and no torn one is kept."""

from __future__ import annotations

import os
import shutil
import signal

import pytest
from safetensors.torch import load_file

from livetrain.checkpoint.commands import checkpoint_verify
from livetrain.options import TrainerOptions
from livetrain.serve import LiveServer, ServeOptions
from livetrain.weights import hf_views, open_shared_copy
from livetrain.weights.step_undo import StepUndo
from tests.session_helpers import example, free_port, post_json, wire
from tests.vllm_layouts import write_vllm_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.vllm]




def shared_hf_tensors(server: LiveServer) -> dict:
    layout, tensors = open_shared_copy(server.shm_dir)
    return {name: view.clone() for name, view in hf_views(layout, tensors).items()}


def test_a_copy_left_by_a_killed_server_is_reused_and_synced(tmp_path, tokenizer_dir,
                                                          killed_vllm_segments_removed):
    model_dir = write_vllm_tiny_model(tmp_path / "model", "llama", tokenizer_dir)
    on_disk = {n: t.clone() for n, t in load_file(model_dir / "model.safetensors").items()}
    options = ServeOptions(model_dir=model_dir, port=free_port(),
                           trainer=TrainerOptions(lr=1e-2, max_probe_drift=0, sync_interval_s=3600),
                           vllm_args=("--enforce-eager", "--max-model-len", "256"))

    crashed = LiveServer(options, say=lambda line: None)
    try:
        crashed.start()
        assert post_json(crashed.base_url + "/train", {"examples": [wire(example(0))]})["applied"]
        trained = shared_hf_tensors(crashed)
        changed = [n for n in on_disk if not on_disk[n].equal(trained[n])]
        assert changed
        # Both sides die at once, before any sync.
        crashed.worker.popen.kill()
        os.killpg(crashed.vllm.pid, signal.SIGKILL)
        crashed.worker.popen.wait()
        crashed.vllm.wait()
    finally:
        shutil.rmtree(crashed.runtime_dir, ignore_errors=True)
    assert crashed.shm_dir.exists()
    assert all(on_disk[n].equal(t) for n, t in load_file(model_dir / "model.safetensors").items())
    # What a worker killed halfway through a second step leaves: its undo copies and mark,
    # and one tensor written.
    layout, tensors = open_shared_copy(crashed.shm_dir)
    views = hf_views(layout, tensors)
    StepUndo({n: views[n] for n in changed}, crashed.shm_dir).begin(2)
    views[changed[0]].add_(1.0)

    with LiveServer(options, say=lambda line: None) as restarted:
        assert restarted.shm_dir == crashed.shm_dir
        served = shared_hf_tensors(restarted)
        assert all(served[n].equal(trained[n]) for n in changed)  # step 1 kept, step 2 undone
        status = restarted.worker.request("status")
        assert status["torn_step_undone"] == {"weights_version": 2, "tensors": len(changed)}
        assert status["weights_version"] == 1 and status["optimizer_state"] == "restored (1 steps)"
        # vLLM undid it when it reused the copy, so it never loaded the torn weights.
        assert "undid step 2" in (restarted.log_dir / "vllm.log").read_text()
    assert not restarted.shm_dir.exists()
    synced = load_file(model_dir / "model.safetensors")
    assert all(synced[n].equal(trained[n]) for n in changed)
    assert checkpoint_verify(model_dir)["ok"]
