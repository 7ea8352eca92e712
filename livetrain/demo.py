"""`livetrain demo`: teach a served model a behaviour through /train, live, and keep it.

1. serve a fresh copy of the default model (vLLM + the training worker);
2. ask held-out questions through the `openai` client and check the behaviour;
3. teach it with the behaviour set's examples, posted to /train;
4. ask again: before and after side by side, with the pass rate;
5. sync the checkpoint: bytes written vs the model's size;
6. restart the server from the directory and ask again: the behaviour persisted.

Everything goes through the HTTP API, as any client would use it.
"""

from __future__ import annotations

import shutil
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import torch

from livetrain.default_model import init_default
from livetrain.options import TrainerOptions
from livetrain.serve import LiveServer, ServeOptions
from livetrain.train.behaviour import RESTATE_PREFIX, pass_rate, restates_request
from livetrain.train.data import read_jsonl

REPO = Path(__file__).resolve().parents[1]
BEHAVIOUR_SET = REPO / "examples" / "restate"
VLLM_ARGS = ("--enforce-eager", "--max-model-len", "2048", "--served-model-name", "demo")


def ask(base_url: str, prompts: Sequence[list[dict]], max_tokens: int, model: str = "demo") -> list[str]:
    """Greedy answers from the served model (``model``: its served name), all prompts in
    flight at once."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url + "/v1", api_key="unused")

    def one(messages: list[dict]) -> str:
        reply = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                               max_tokens=max_tokens)
        return reply.choices[0].message.content or ""

    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        return list(pool.map(one, prompts))


def show_side_by_side(prompts: Sequence[list[dict]], before: Sequence[str], after: Sequence[str],
                      width: int = 44) -> None:
    line = "-" * (2 * width + 7)
    print(line)
    print(f" {'before':<{width}} | {'after':<{width}}")
    for messages, old, new in zip(prompts, before, after):
        print(line)
        print(f" Q: {messages[-1]['content']}")
        left = textwrap.wrap(old.replace("\n", " "), width) or [""]
        right = textwrap.wrap(new.replace("\n", " "), width) or [""]
        for i in range(max(len(left), len(right))):
            l = left[i] if i < len(left) else ""
            r = right[i] if i < len(right) else ""
            print(f" {l:<{width}} | {r:<{width}}")
        print(f" {'pass' if restates_request(old) else 'fail':<{width}} | "
              f"{'pass' if restates_request(new) else 'fail':<{width}}")
    print(line)


def run_demo(work_dir: Path, port: int = 8000, questions: int = 10, epochs: int = 2,
             lr: float | None = None, max_tokens: int = 32) -> dict:
    """Run the demo in `work_dir`; returns the figures it printed."""
    from transformers import AutoTokenizer

    from livetrain.client import TrainingClient

    started = time.monotonic()
    print("== livetrain demo: teach a served model a behaviour, live ==")
    print(f"behaviour: every answer starts with \"{RESTATE_PREFIX} <topic>.\"")
    base_model = init_default(work_dir / "smollm2-135m-bf16", dtype=torch.bfloat16)
    model_dir = work_dir / "demo-model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    shutil.copytree(base_model, model_dir)
    model_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    prompts = [record["prompt"] for _, record in read_jsonl(BEHAVIOUR_SET / "heldout.jsonl")][:questions]
    options = ServeOptions(model_dir=model_dir, trainer=TrainerOptions(lr=lr), port=port, vllm_args=VLLM_ARGS)
    figures: dict = {}

    print("\n[1/5] starting livetrain serve on a fresh copy of the default model")
    with LiveServer(options) as server:
        print(f"\n[2/5] asking {len(prompts)} held-out questions (not in the training set)")
        before = ask(server.base_url, prompts, max_tokens)
        figures["pass_before"] = pass_rate(before)
        print(f"pass rate before: {figures['pass_before']:.0%}")

        print(f"\n[3/5] teaching through /train: {BEHAVIOUR_SET / 'train.jsonl'}, {epochs} epoch(s)")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        with TrainingClient(server.base_url, tokenizer=tokenizer) as client:
            summary = client.train_jsonl(BEHAVIOUR_SET / "train.jsonl", epochs=epochs,
                                         **({"lr": lr} if lr is not None else {}))
            print(summary.format())
            after = ask(server.base_url, prompts, max_tokens)
            figures["pass_after"] = pass_rate(after)
            show_side_by_side(prompts, before, after)
            print(f"pass rate: before {figures['pass_before']:.0%}, after {figures['pass_after']:.0%}")

            print("\n[4/5] syncing the checkpoint into the model directory")
            sync = client.checkpoint()
        written = sync.get("bytes_written", 0)
        figures.update(generation=sync.get("generation"), bytes_written=written, model_bytes=model_bytes)
        print(f"generation {sync.get('generation')}: {written / 2**20:.1f} MiB written of a "
              f"{model_bytes / 2**20:.1f} MiB model ({written / model_bytes:.1%})")

    print("\n[5/5] restarting the server from the directory")
    with LiveServer(options) as server:
        again = ask(server.base_url, prompts, max_tokens)
    figures["pass_after_restart"] = pass_rate(again)
    figures["seconds"] = time.monotonic() - started
    print(f"pass rate after restart: {figures['pass_after_restart']:.0%} "
          f"(before teaching {figures['pass_before']:.0%})")
    print(f"\ndemo finished in {figures['seconds']:.0f} s; the trained model is in {model_dir}")
    return figures
