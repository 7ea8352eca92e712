"""`livetrain serve` against plain vLLM with the same flags, over HTTP, in one run.

For each server: start-up to ready, single-stream and 8-concurrent tokens/s (64-token
completions, ignore_eos), and peak memory of all its processes (sum of PSS, sampled
every 0.25 s: shared pages count once). Plain vLLM keeps its own core binding (or
``--plain-cpus``), livetrain serve its own (or ``--trainer-cores``). For livetrain also: single-stream
tokens/s while /train runs back to back (and the trainer's steps/s meanwhile and alone),
and the time from an applied step's end (as the worker measured it) to the moment a
request can see it (the /train reply comes after the refresh; the next request's
log-prob shows the new weights).

    .venv/bin/python bench/serve.py [--model DIR] [--runs 3] [--steps 10] [--trainer-cores N] [--plain-cpus 0-1]

Prints a table and writes bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import add_model_argument, fresh_model_copy, plain_vllm, wait_until_healthy  # noqa: E402
from livetrain.cpus import parse_cpus  # noqa: E402
from livetrain.options import TrainerOptions  # noqa: E402
from livetrain.serve import LiveServer, ServeOptions  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
NEW_TOKENS = 64
VLLM_ARGS = ["--enforce-eager", "--max-model-len", "2048", "--served-model-name", "m"]
TRAIN_EXAMPLE = {"context_ids": list(range(1000, 1064)), "continuation_ids": list(range(2000, 2016))}


def process_tree(root: int) -> list[int]:
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def pss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class PeakMemory:
    """Samples the summed PSS of the process trees under `roots()` (pids; None: not started
    yet) until stopped; also keeps when the peak came (seconds after start) and each
    tree's share of it."""

    def __init__(self, roots) -> None:
        self.roots, self.peak, self._stop = roots, 0, threading.Event()
        self.peak_at_s, self.peak_by_tree, self._started = 0.0, [], time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            by_tree = [pss_bytes(process_tree(root)) if root else 0 for root in self.roots()]
            if sum(by_tree) > self.peak:
                self.peak, self.peak_by_tree = sum(by_tree), by_tree
                self.peak_at_s = time.monotonic() - self._started
            self._stop.wait(0.25)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def complete(base: str, max_tokens: int = NEW_TOKENS) -> int:
    reply = httpx.post(base + "/v1/completions", timeout=300, json={
        "model": "m", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    reply.raise_for_status()
    return reply.json()["usage"]["completion_tokens"]


def throughput(base: str, runs: int) -> dict[str, float]:
    complete(base)  # warm-up
    single, concurrent = [], []
    with ThreadPoolExecutor(8) as pool:
        for _ in range(runs):
            started = time.perf_counter()
            tokens = complete(base)
            single.append(tokens / (time.perf_counter() - started))
            started = time.perf_counter()
            tokens = sum(pool.map(lambda _: complete(base), range(8)))
            concurrent.append(tokens / (time.perf_counter() - started))
    return {"single_tok_s": statistics.median(single), "concurrent8_tok_s": statistics.median(concurrent)}


def next_token_logprob(base: str) -> float:
    reply = httpx.post(base + "/v1/completions", timeout=300, json={
        "model": "m", "prompt": TRAIN_EXAMPLE["context_ids"], "max_tokens": 1, "temperature": 0,
        "logprobs": 1})
    reply.raise_for_status()
    return reply.json()["choices"][0]["logprobs"]["token_logprobs"][0]


def visibility(base: str, steps: int) -> dict[str, float]:
    """Per applied step: /train wall time minus the worker's step time (refresh, prefix-cache
    reset, transport), and whether the next request's log-prob changed."""
    lags, seen = [], 0
    before = next_token_logprob(base)
    for _ in range(steps):
        started = time.perf_counter()
        result = httpx.post(base + "/train", timeout=300,
                            json={"examples": [TRAIN_EXAMPLE], "lr": 1e-3}).json()
        wall = time.perf_counter() - started
        if not result.get("applied"):
            continue
        lags.append(wall - result["seconds"])
        after = next_token_logprob(base)
        seen += after != before
        before = after
    lags.sort()
    return {"applied_steps": len(lags), "seen_by_next_request": seen,
            "lag_p50_s": lags[len(lags) // 2], "lag_p95_s": lags[min(len(lags) - 1, round(0.95 * (len(lags) - 1)))]}


def train_back_to_back(base: str, stop: threading.Event, steps: list[float]) -> None:
    """Post one small /train step after another until ``stop``; each step's end time goes to ``steps``."""
    while not stop.is_set():
        reply = httpx.post(base + "/train", timeout=300, json={"examples": [TRAIN_EXAMPLE], "lr": 1e-5})
        reply.raise_for_status()
        steps.append(time.perf_counter())


def while_training(base: str, runs: int) -> dict[str, float]:
    """Single-stream tokens/s while /train runs back to back, the trainer's steps/s meanwhile,
    and its steps/s with no inference at all (the same length of time)."""
    stop, steps = threading.Event(), []
    trainer = threading.Thread(target=train_back_to_back, args=(base, stop, steps), daemon=True)
    trainer.start()
    try:
        time.sleep(2)
        rates = []
        started, first = time.perf_counter(), len(steps)
        for _ in range(runs):
            run_started = time.perf_counter()
            rates.append(complete(base) / (time.perf_counter() - run_started))
        serving_steps_s = (len(steps) - first) / (time.perf_counter() - started)
        time.sleep(0.5)  # the last completion's tail
        alone_started, alone_first = time.perf_counter(), len(steps)
        time.sleep(max(5.0, time.perf_counter() - started))
        alone_steps_s = (len(steps) - alone_first) / (time.perf_counter() - alone_started)
    finally:
        stop.set()
        trainer.join()
    return {"single_tok_s_while_training": statistics.median(rates),
            "train_steps_s_while_serving": serving_steps_s, "train_steps_s_alone": alone_steps_s}


def measure_plain_vllm(model_dir: Path, port: int, runs: int, log: Path, cpus: str | None) -> dict:
    """vLLM without livetrain: the same flags and KV cache, its own core binding unless ``cpus``
    (by default vLLM's CPU worker binds its OpenMP threads to all cores but the last, which it
    leaves to its API server)."""
    env = {} if cpus is None else {"VLLM_CPU_OMP_THREADS_BIND": cpus, "OMP_NUM_THREADS": str(len(parse_cpus(cpus)))}
    started = time.monotonic()
    with plain_vllm(model_dir, port, log, VLLM_ARGS, env) as process:
        memory = PeakMemory(lambda: [process.pid])
        try:
            wait_until_healthy(process, port, log)
            result = {"startup_s": time.monotonic() - started, **throughput(f"http://127.0.0.1:{port}", runs)}
        finally:
            result_memory = memory.stop()
    return {**result, "peak_pss_bytes": result_memory, "omp_cores": omp_cores(log)}


def omp_cores(log: Path) -> str:
    """The cores vLLM's log says its OpenMP threads were bound to."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if "core ids=" in line]
    return lines[-1].split("core ids=")[1].strip() if lines else "unknown"


def livetrain_serve(model_dir: Path, port: int, runs: int, steps: int, trainer_cores: int) -> dict:
    server = LiveServer(ServeOptions(model_dir=model_dir, port=port, vllm_args=VLLM_ARGS,
                                     trainer=TrainerOptions(max_probe_drift=0), trainer_cores=trainer_cores),
                        say=lambda line: None)
    memory = PeakMemory(lambda: [p and p.pid for p in (server.vllm, server.worker and server.worker.popen)])
    try:
        startup = server.start()
        base = server.base_url
        result = {"startup_s": startup, **throughput(base, runs), "cores": server.cores.describe(),
                  "vllm_omp_cores": omp_cores(server.log_dir / "vllm.log")}
        result.update(while_training(base, runs))
        result.update(visibility(base, steps))
    finally:
        result["peak_pss_bytes"] = memory.stop()
        result["peak_at_s"], result["peak_pss_by_process"] = memory.peak_at_s, dict(
            zip(("vllm", "worker"), memory.peak_by_tree))
        server.stop()
    state = model_dir / ".livetrain" / "optimizer.pt"
    result["optimizer_state_bytes"] = state.stat().st_size if state.exists() else 0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_argument(parser)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--port", type=int, default=8191)
    parser.add_argument("--trainer-cores", type=int, default=ServeOptions.trainer_cores,
                        help="livetrain serve's --trainer-cores (default: its default)")
    parser.add_argument("--plain-cpus", metavar="LIST",
                        help="bind plain vLLM's OpenMP threads to these cores (default: vLLM's own binding)")
    args = parser.parse_args()

    model_dir = fresh_model_copy(args.model, "bench-serve")
    plain = measure_plain_vllm(model_dir, args.port, args.runs, model_dir.parent / "plain-vllm.log", args.plain_cpus)
    live = livetrain_serve(model_dir, args.port, args.runs, args.steps, args.trainer_cores)

    rows = [
        ("single-stream tok/s, serve vs plain vLLM", live["single_tok_s"], plain["single_tok_s"], "≥ 0.9×"),
        ("8 concurrent tok/s, serve vs plain vLLM", live["concurrent8_tok_s"], plain["concurrent8_tok_s"], "≥ 0.9×"),
        ("single-stream tok/s, /train running vs idle", live["single_tok_s_while_training"],
         live["single_tok_s"], "≥ 0.5×"),
        ("peak memory (PSS, all processes), serve vs plain", live["peak_pss_bytes"] / 2**20,
         plain["peak_pss_bytes"] / 2**20, "≤ 1.3× + optimizer state"),
        ("start-up to ready (s), serve vs plain", live["startup_s"], plain["startup_s"], "≤ 1.2×"),
    ]
    print(f"{'figure':<52} {'livetrain':>10} {'reference':>10} {'ratio':>7}  target")
    for name, value, reference, target in rows:
        print(f"{name:<52} {value:>10.1f} {reference:>10.1f} {value / reference:>6.2f}×  {target}")
    print(f"step end -> visible to the next request: p50 {live['lag_p50_s'] * 1000:.0f} ms, "
          f"p95 {live['lag_p95_s'] * 1000:.0f} ms over {live['applied_steps']} applied steps "
          f"({live['seen_by_next_request']} seen by the next request); target p95 ≤ 500 ms")
    print(f"training steps/s (64-token context, 16-token continuation), while one stream is served: "
          f"{live['train_steps_s_while_serving']:.2f}, alone: {live['train_steps_s_alone']:.2f}")
    print(f"OpenMP cores: plain vLLM {plain['omp_cores']}; livetrain serve's vLLM {live['vllm_omp_cores']} "
          f"({live['cores']})")
    print(f"optimizer state on disk: {live['optimizer_state_bytes'] / 2**20:.2f} MiB")
    print(f"livetrain's memory peak {live['peak_at_s']:.0f} s after start: " + ", ".join(
        f"{name} {size / 2**20:.0f} MiB" for name, size in live["peak_pss_by_process"].items()))
    out = REPO / "bench" / "results" / "serve.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"plain_vllm": plain, "livetrain_serve": live, "vllm_args": VLLM_ARGS,
                               "cpus": os.cpu_count()}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
