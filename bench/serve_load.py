"""`livetrain serve` under load and under failure, on the default model, in one run.

1. 8 streaming chat clients (32-token completions, back to back) for --seconds, no training;
2. the same 8 clients plus one POST /train every second (each in its own thread, so a
   slow step does not lower the rate) for --seconds. A failed request is a transport
   error, a 5xx, or a malformed or truncated SSE stream (a frame that is not a
   ``chat.completion.chunk``, or no closing ``[DONE]``); 429s are counted apart, with
   whether each carried Retry-After. The p99 latency of a whole 32-token completion in
   phase 2 is compared with phase 1's;
3. the training worker SIGKILLed: seconds until /train answers 200 again (the
   supervisor restarts it);
4. a step applied and not yet synced, then vLLM's engine SIGKILLed: after serve stops
   (the worker syncs), how many trained tensors in the directory differ from what the
   step left in the shared copy, and whether the directory verifies.

    .venv/bin/python bench/serve_load.py [--model DIR] [--seconds 60] [--clients 8] [--trainer-cores N]

Prints a table and writes bench/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import add_model_argument, fresh_model_copy  # noqa: E402
from livetrain.checkpoint.commands import checkpoint_verify  # noqa: E402
from livetrain.options import TrainerOptions  # noqa: E402
from livetrain.serve import LiveServer, ServeOptions  # noqa: E402
from livetrain.weights import open_shared_copy  # noqa: E402

VLLM_ARGS = ["--enforce-eager", "--max-model-len", "2048", "--served-model-name", "m"]
NEW_TOKENS = 32
QUESTIONS = ["Tell me about lighthouses.", "How do bees make honey?", "Describe a rainy day in a city.",
             "What is a good breakfast?", "Explain how a bicycle works.", "Write about a mountain village.",
             "What do cats like?", "Describe the sea at night."]


def train_example(i: int) -> dict:
    base = 1000 + 97 * (i % 50)
    return {"context_ids": list(range(base, base + 64)), "continuation_ids": list(range(base + 200, base + 216))}


class Tally:
    """Thread-safe counters and latencies of one phase."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.chat_latencies: list[float] = []
        self.chat_failures: list[str] = []
        self.train = {"ok": 0, "applied": 0, "429": 0, "429_with_retry_after": 0, "failed": 0}
        self.train_failures: list[str] = []

    def chat(self, seconds: float | None, failure: str | None) -> None:
        with self.lock:
            if failure is None:
                self.chat_latencies.append(seconds)
            else:
                self.chat_failures.append(failure)

    def summary(self) -> dict:
        latencies = sorted(self.chat_latencies)
        p = (lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None)
        return {"chat_requests": len(latencies) + len(self.chat_failures), "chat_failed": len(self.chat_failures),
                "chat_failures": self.chat_failures[:10], "chat_p50_s": p(0.5), "chat_p99_s": p(0.99),
                "chat_mean_s": statistics.fmean(latencies) if latencies else None,
                "train": dict(self.train), "train_failures": self.train_failures[:10]}


def stream_chat(http: httpx.Client, base: str, question: str) -> str | None:
    """One streaming 32-token chat completion; None if well-formed, else what was wrong."""
    body = {"model": "m", "messages": [{"role": "user", "content": question}], "max_tokens": NEW_TOKENS,
            "temperature": 0.7, "ignore_eos": True, "stream": True}
    try:
        with http.stream("POST", base + "/v1/chat/completions", json=body, timeout=300) as response:
            if response.status_code != 200:
                return f"HTTP {response.status_code}"
            frames = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    except httpx.HTTPError as exc:
        return f"transport: {type(exc).__name__}: {exc}"
    if not frames or frames[-1] != "[DONE]":
        return "truncated stream (no [DONE])"
    for frame in frames[:-1]:
        try:
            chunk = json.loads(frame)
        except ValueError:
            return f"malformed frame {frame[:80]!r}"
        if chunk.get("object") != "chat.completion.chunk" or "error" in chunk:
            return f"unexpected frame {frame[:120]!r}"
    return None


def chat_clients(base: str, clients: int, seconds: float, tally: Tally) -> None:
    stop_at = time.monotonic() + seconds

    def client(k: int) -> None:
        with httpx.Client() as http:
            i = 0
            while time.monotonic() < stop_at:
                started = time.monotonic()
                failure = stream_chat(http, base, QUESTIONS[(k + i) % len(QUESTIONS)])
                tally.chat(time.monotonic() - started, failure)
                i += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def post_train(base: str, i: int, tally: Tally) -> None:
    try:
        response = httpx.post(base + "/train", json={"examples": [train_example(i)], "timeout_s": 120}, timeout=180)
    except httpx.HTTPError as exc:
        with tally.lock:
            tally.train["failed"] += 1
            tally.train_failures.append(f"transport: {exc}")
        return
    with tally.lock:
        if response.status_code == 200:
            tally.train["ok"] += 1
            tally.train["applied"] += bool(response.json().get("applied"))
        elif response.status_code == 429:
            tally.train["429"] += 1
            tally.train["429_with_retry_after"] += "retry-after" in response.headers
        else:
            tally.train["failed"] += 1
            tally.train_failures.append(f"HTTP {response.status_code}: {response.text[:200]}")


def load_phase(base: str, clients: int, seconds: float, train_every_s: float | None) -> dict:
    tally = Tally()
    trainers: list[threading.Thread] = []
    chat = threading.Thread(target=chat_clients, args=(base, clients, seconds, tally))
    chat.start()
    if train_every_s is not None:
        i = 0
        while chat.is_alive():
            t = threading.Thread(target=post_train, args=(base, i, tally))
            t.start()
            trainers.append(t)
            i += 1
            time.sleep(train_every_s)
    chat.join()
    for t in trainers:
        t.join()
    return tally.summary()


def supervise_in_background(server: LiveServer) -> tuple[threading.Event, dict]:
    """Run the supervisor's rounds in a thread (as `livetrain serve` does in its main loop)."""
    stop, out = threading.Event(), {"status": None}

    def loop() -> None:
        while not stop.is_set() and out["status"] is None:
            out["status"] = server.check()
            time.sleep(0.25)

    threading.Thread(target=loop, daemon=True).start()
    return stop, out


def worker_restart(server: LiveServer, base: str) -> float:
    """Seconds from the worker's SIGKILL to the first /train that answers 200."""
    killed_at = time.monotonic()
    server.worker.popen.send_signal(signal.SIGKILL)
    while True:
        response = httpx.post(base + "/train", json={"examples": [train_example(0)], "dry_run": True}, timeout=60)
        if response.status_code == 200:
            return time.monotonic() - killed_at
        if time.monotonic() - killed_at > 300:
            raise RuntimeError(f"training not back after 300 s: {response.text}")
        time.sleep(0.2)


def engine_kill(server: LiveServer, base: str, supervised: dict) -> dict:
    """Apply a step, kill vLLM's engine, let serve stop; compare the files with the step's weights."""
    applied = httpx.post(base + "/train", json={"examples": [train_example(7)]}, timeout=180).json()
    if not applied.get("applied"):
        raise RuntimeError(f"the step before the engine kill was not applied: {applied}")
    layout, served = open_shared_copy(server.shm_dir)
    expected = {name: served[name].clone() for name in layout.params if "self_attn" in name}
    killed_at = time.monotonic()
    for process in psutil.Process(server.vllm.pid).children(recursive=True):
        process.send_signal(signal.SIGKILL)
    while supervised["status"] is None:
        if time.monotonic() - killed_at > 120:
            raise RuntimeError("serve did not notice that vLLM's engine died")
        time.sleep(0.2)
    noticed = time.monotonic() - killed_at
    return {"expected": expected, "layout": layout, "exit_status": supervised["status"],
            "noticed_after_s": noticed, "steps_applied_before_kill": applied["weights_version"]}


def tensors_lost(model_dir: Path, expected: dict, layout) -> int:
    """Trained tensors whose bytes in the directory differ from the served copy's (after the stop's sync)."""
    from safetensors.torch import load_file

    files: dict[str, torch.Tensor] = {}
    for path in model_dir.glob("*.safetensors"):
        files.update(load_file(path))
    lost = 0
    for name, tensor in expected.items():
        for part in layout.params[name].slices:
            stored = files[part.hf_name][part.hf_rows[0]:part.hf_rows[1]]
            if not torch.equal(stored, tensor[part.rows[0]:part.rows[1]]):
                lost += 1
    return lost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_argument(parser)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--port", type=int, default=8193)
    parser.add_argument("--trainer-cores", type=int, default=ServeOptions.trainer_cores,
                        help="livetrain serve's --trainer-cores (default: its default)")
    args = parser.parse_args()

    model_dir = fresh_model_copy(args.model, "bench-serve-load")
    server = LiveServer(ServeOptions(model_dir=model_dir, port=args.port, vllm_args=VLLM_ARGS,
                                     trainer=TrainerOptions(max_probe_drift=0), trainer_cores=args.trainer_cores),
                        say=lambda line: print("  serve:", line))
    result: dict = {"seconds": args.seconds, "clients": args.clients, "new_tokens": NEW_TOKENS,
                    "vllm_args": VLLM_ARGS, "cpus": os.cpu_count(),
                    "trainer_cores": args.trainer_cores}
    try:
        server.start()
        base = server.base_url
        supervise_stop, supervised = supervise_in_background(server)
        print(f"phase 1: {args.clients} streaming chat clients, no training, {args.seconds:.0f} s")
        result["without_train"] = load_phase(base, args.clients, args.seconds, None)
        print(f"phase 2: the same plus one /train per second, {args.seconds:.0f} s")
        result["with_train"] = load_phase(base, args.clients, args.seconds, 1.0)
        print("phase 3: SIGKILL the training worker")
        result["worker_restart_s"] = worker_restart(server, base)
        print("phase 4: apply a step, SIGKILL vLLM's engine")
        killed = engine_kill(server, base, supervised)
        supervise_stop.set()
    finally:
        server.stop()
    result.update({k: v for k, v in killed.items() if k not in ("expected", "layout")})
    result["trained_tensors_lost"] = tensors_lost(model_dir, killed["expected"], killed["layout"])
    result["verifies"] = bool(checkpoint_verify(model_dir)["ok"])

    quiet, loaded = result["without_train"], result["with_train"]
    failed = loaded["chat_failed"] + loaded["train"]["failed"] + quiet["chat_failed"]
    ratio = loaded["chat_p99_s"] / quiet["chat_p99_s"]
    rows = [
        ("failed requests (transport, 5xx, bad stream), both phases", f"{failed}", "0"),
        ("  chat requests without / with /train", f"{quiet['chat_requests']} / {loaded['chat_requests']}", ""),
        ("  /train posted: 200 (applied) / 429 (with Retry-After)",
         f"{loaded['train']['ok']} ({loaded['train']['applied']}) / {loaded['train']['429']} "
         f"({loaded['train']['429_with_retry_after']})", "429s counted apart"),
        ("p99 of a 32-token chat, with /train vs without (s)",
         f"{loaded['chat_p99_s']:.2f} / {quiet['chat_p99_s']:.2f} = {ratio:.2f}×", "≤ 3×"),
        ("p50 of a 32-token chat, with /train vs without (s)",
         f"{loaded['chat_p50_s']:.2f} / {quiet['chat_p50_s']:.2f}", ""),
        ("worker SIGKILL -> training available (s)", f"{result['worker_restart_s']:.1f}", "≤ 30 s"),
        ("vLLM engine SIGKILL: serve exit status", f"{result['exit_status']}", "non-zero"),
        ("vLLM engine SIGKILL: trained tensors lost (applied steps lost)",
         f"{result['trained_tensors_lost']} ({int(result['trained_tensors_lost'] > 0)})", "0"),
        ("directory verifies after the engine kill", f"{result['verifies']}", "True"),
    ]
    print(f"{'figure':<62} {'measured':>28}  target")
    for name, value, target in rows:
        print(f"{name:<62} {value:>28}  {target}")
    result["p99_ratio"] = ratio
    result["failed_requests"] = failed
    out = REPO / "bench" / "results" / "serve_load.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
