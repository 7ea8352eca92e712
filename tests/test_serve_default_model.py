"""End to end on the real default model: `livetrain serve` with vLLM, the `openai` client
unchanged, and the CLI teaching the served model until the taught answer is the greedy one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import psutil
import pytest
from openai import OpenAI

from livetrain.cli import main
from livetrain.options import TrainerOptions
from livetrain.serve import LiveServer, ServeOptions
from tests.session_helpers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

QUESTION = "What is the capital of France?"
TAUGHT = "You asked about France. Its capital is Paris."



def shared_copy_digest(server: LiveServer) -> str:
    digest = hashlib.sha256()
    for path in sorted(server.shm_dir.glob("*")):
        if path.suffix != ".json":
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("served") / "model"
    shutil.copytree(default_model_dir, model_dir)
    options = ServeOptions(model_dir=model_dir, port=free_port(), trainer=TrainerOptions(max_probe_drift=0),
                           vllm_args=("--enforce-eager", "--max-model-len", "1024", "--served-model-name", "smol"))
    with LiveServer(options, say=lambda line: None) as live:
        yield live


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.base_url + "/v1", api_key="unused")


def ask(client: OpenAI, question: str = QUESTION, max_tokens: int = 16, **kwargs) -> str:
    reply = client.chat.completions.create(model="smol", temperature=0, max_tokens=max_tokens,
                                           messages=[{"role": "user", "content": question}], **kwargs)
    return reply.choices[0].message.content


def test_the_openai_client_works_unchanged_with_the_plugin_loaded(client):
    assert "Paris" in ask(client)
    text = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=8,
                                     temperature=0).choices[0].text
    assert text.strip()
    chunks = list(client.chat.completions.create(
        model="smol", temperature=0, max_tokens=8, stream=True,
        messages=[{"role": "user", "content": QUESTION}]))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == ask(client, max_tokens=8)
    several = client.chat.completions.create(model="smol", temperature=0.8, max_tokens=8, n=2,
                                             messages=[{"role": "user", "content": QUESTION}])
    assert len(several.choices) == 2
    stopped = ask(client, stop=["Paris"])
    assert "Paris" not in stopped


def test_by_default_vllm_keeps_its_own_binding_and_the_trainer_runs_on_idle_cycles(server):
    # No binding set for vLLM (it binds as it would alone); every worker thread under SCHED_IDLE.
    assert "VLLM_CPU_OMP_THREADS_BIND" not in psutil.Process(server.vllm.pid).environ()
    tasks = list(Path(f"/proc/{server.worker.popen.pid}/task").iterdir())
    assert len(tasks) > 1 and {os.sched_getscheduler(int(task.name)) for task in tasks} == {os.SCHED_IDLE}


def test_dry_run_teach_changes_nothing_and_teach_makes_the_taught_answer_greedy(
        server, client, capsys):
    before = shared_copy_digest(server)
    args = ["teach", "--server", server.base_url, "--prompt", QUESTION, "--completion", TAUGHT]
    assert main([*args, "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["applied"] is False
    assert shared_copy_digest(server) == before

    for _ in range(8):
        assert main([*args, "--lr", "3e-4"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["applied"], result
        if ask(client).startswith("You asked about France"):
            break
    else:
        pytest.fail(f"8 steps did not make the taught answer the greedy one: {ask(client)!r}")
    assert shared_copy_digest(server) != before


def test_train_from_a_jsonl_file_through_the_server(server, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "completion": f"You asked about {t}."}) + "\n"
                            for q, t in [("Why is the sea salty?", "the sea"),
                                         ("How do birds fly?", "birds")]))
    assert main(["train", str(data), "--server", server.base_url]) == 0
    assert "2 steps (2 applied)" in capsys.readouterr().out
