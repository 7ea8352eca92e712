"""The launcher and the endpoint plugin: vLLM started the way `livetrain serve` starts it."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from livetrain.vllm_plugin.launcher import (ENTRY_MODULE, UnsupportedVllmConfig, VllmLaunch, start_vllm, stop_vllm,
                                            vllm_command, vllm_env, wait_until_ready)
from livetrain.vllm_plugin.plugins import AccessRuleError, check_access_rule
from livetrain.vllm_plugin.settings import PluginSettings
from livetrain.weights import Layout, read_manifest, remove_shared_copy
from tests.vllm_layouts import expected_layout, write_vllm_tiny_model
from tests.session_helpers import free_port



def test_command_uses_the_launcher_entry_and_the_worker_extension(tmp_path):
    launch = VllmLaunch(tmp_path, PluginSettings(shm_dir=Path("/dev/shm/livetrain-x")), extra_args=["--dtype", "bfloat16"])
    command = vllm_command(launch, python="python")
    assert command[:3] == ["python", "-m", ENTRY_MODULE]
    assert command[command.index("--worker-extension-cls") + 1] == "livetrain.vllm_plugin.extension.LivetrainWorkerExtension"
    assert json.loads(command[command.index("--weight-transfer-config") + 1]) == {"backend": "livetrain_shm"}
    assert command[-2:] == ["--dtype", "bfloat16"]
    for taken in (["--worker-extension-cls=x.Y"], ["--port", "9000"], ["--host=0.0.0.0"], ["--model", "other"]):
        with pytest.raises(UnsupportedVllmConfig, match="set by livetrain"):
            vllm_command(VllmLaunch(tmp_path, launch.settings, extra_args=taken))


@pytest.mark.parametrize("args", [["-tp", "2"], ["--data-parallel-size=2"], ["--api-server-count", "3"]])
def test_configurations_not_designed_yet_are_refused(tmp_path, args):
    settings = PluginSettings(shm_dir=Path("/dev/shm/livetrain-x"))
    with pytest.raises(UnsupportedVllmConfig):
        vllm_command(VllmLaunch(tmp_path, settings, extra_args=args))
    vllm_command(VllmLaunch(tmp_path, settings, extra_args=[args[0].split("=")[0], "1"]))


def test_environment_appends_livetrain_to_vllm_plugins_and_sets_cpu_resources(tmp_path):
    settings = PluginSettings(shm_dir=Path("/dev/shm/livetrain-x"), cpu_mode="zero-copy", worker_address="ipc:///w",
                              trainer_duty=0.25)
    env = vllm_env(VllmLaunch(tmp_path, settings, kv_cache_gib=2, cpus="0-1"), base={"VLLM_PLUGINS": "other"})
    assert env["VLLM_PLUGINS"] == "other,livetrain"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and env["OMP_NUM_THREADS"] == "2"
    assert PluginSettings.from_env(env) == settings
    # Unset meant "all general plugins": the allow-list keeps every installed one.
    own_binding = vllm_env(VllmLaunch(tmp_path, settings), base={})
    assert "livetrain" in own_binding["VLLM_PLUGINS"].split(",")
    # No cores named: vLLM binds its threads as it would alone, or as the user told it to.
    assert "VLLM_CPU_OMP_THREADS_BIND" not in own_binding and "OMP_NUM_THREADS" not in own_binding
    users_binding = vllm_env(VllmLaunch(tmp_path, settings), base={"VLLM_CPU_OMP_THREADS_BIND": "0-1"})
    assert users_binding["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"


def test_waiting_for_vllm_ends_as_soon_as_a_stop_is_asked_for(tmp_path):
    import subprocess
    import sys

    never_ready = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        launch = VllmLaunch(tmp_path, PluginSettings(shm_dir=tmp_path / "livetrain-x"), port=free_port())
        assert wait_until_ready(launch, never_ready, tmp_path / "vllm.log", interrupted=lambda: True) is None
    finally:
        never_ready.kill()
        never_ready.wait()


def test_training_routes_are_loopback_only_without_an_admin_token(tmp_path):
    open_settings = PluginSettings(shm_dir=Path("/dev/shm/livetrain-x"))
    for host in ("127.0.0.1", "::1", "localhost"):
        check_access_rule(host, open_settings)
    for host in (None, "0.0.0.0", "10.1.2.3"):
        with pytest.raises(AccessRuleError):
            check_access_rule(host, open_settings)
    check_access_rule("0.0.0.0", PluginSettings(shm_dir=open_settings.shm_dir, admin_token_file=tmp_path / "t"))


@pytest.mark.vllm
def test_vllm_started_by_the_launcher_serves_openai_and_the_training_routes(tmp_path, tokenizer_dir):
    model_dir = write_vllm_tiny_model(tmp_path / "model", "qwen3", tokenizer_dir)
    shm_dir = Path(f"/dev/shm/livetrain-launch-{os.getpid()}")
    settings = PluginSettings(shm_dir=shm_dir, worker_address=f"ipc://{tmp_path}/no-worker.sock")
    launch = VllmLaunch(model_dir, settings, port=free_port(),
                        extra_args=["--enforce-eager", "--max-model-len", "512"])
    log = tmp_path / "vllm.log"
    process = start_vllm(launch, log)
    try:
        wait_until_ready(launch, process, log, timeout_s=300)
        body = json.dumps({"model": str(model_dir), "prompt": "Hello", "max_tokens": 4, "temperature": 0}).encode()
        request = urllib.request.Request(launch.base_url + "/v1/completions", body,
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.load(response)["usage"]["completion_tokens"] == 4
        # The plugin mounted the training routes; no training worker runs, so they answer with an error.
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(launch.base_url + "/train/status", timeout=60)
        assert error.value.code in (503, 504)
        assert "error" in json.load(error.value)
        # ... and made the shared copy of the served weights, laid out as vLLM packs Qwen3.
        reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        assert Layout.from_dict(read_manifest(shm_dir)["layout"]) == expected_layout(reference)
    finally:
        stop_vllm(process)
        remove_shared_copy(shm_dir)
    assert process.poll() is not None
