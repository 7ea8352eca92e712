"""Prefix caching in `livetrain serve`: on (stale blocks kept from new requests) vs off.

After a step, KV blocks computed with the old weights must not serve new requests, so
the server salts every generation request's prefix-cache key with the refresh count
and resets vLLM's prefix cache after every refresh when no request holds blocks. The
alternative is to serve with `--no-enable-prefix-caching`. Workload: chat-like requests that share a long
prefix (a 768-token system prompt) with a short distinct question, 16 new tokens each,
one after another; measured idle and while /train steps are posted --train-every
seconds after the previous one ended (in their own thread). Same server flags otherwise, the default model.

    .venv/bin/python bench/prefix_cache.py [--requests 30] [--train-every 0.5]

Prints a table and writes bench/results/prefix_cache.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import add_model_argument, fresh_model_copy  # noqa: E402
from livetrain.options import TrainerOptions  # noqa: E402
from livetrain.serve import LiveServer, ServeOptions  # noqa: E402

VLLM_ARGS = ("--enforce-eager", "--max-model-len", "2048", "--served-model-name", "m")
PREFIX = list(range(1000, 1768))  # 768 shared tokens
TRAIN_EXAMPLE = {"context_ids": list(range(3000, 3064)), "continuation_ids": list(range(4000, 4016))}


def latencies(base: str, count: int) -> list[float]:
    """Seconds per request: the shared prefix, a distinct 8-token question, 16 new tokens."""
    out = []
    for i in range(count):
        prompt = PREFIX + [5000 + 8 * i + j for j in range(8)]
        started = time.perf_counter()
        reply = httpx.post(base + "/v1/completions", timeout=300, json={
            "model": "m", "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True})
        reply.raise_for_status()
        out.append(time.perf_counter() - started)
    return out


def while_training(base: str, count: int, every_s: float) -> tuple[list[float], int]:
    stop = threading.Event()
    applied = []

    def trainer() -> None:
        while not stop.wait(every_s):
            result = httpx.post(base + "/train", timeout=300, json={"examples": [TRAIN_EXAMPLE], "lr": 1e-5}).json()
            applied.append(bool(result.get("applied")))

    thread = threading.Thread(target=trainer, daemon=True)
    thread.start()
    try:
        return latencies(base, count), sum(applied)
    finally:
        stop.set()
        thread.join()


def measure(model_dir: Path, port: int, prefix_caching: bool, count: int, every_s: float) -> dict:
    args = VLLM_ARGS if prefix_caching else (*VLLM_ARGS, "--no-enable-prefix-caching")
    server = LiveServer(ServeOptions(model_dir=model_dir, port=port, vllm_args=args,
                                     trainer=TrainerOptions(max_probe_drift=0)),
                        say=lambda line: None)
    try:
        server.start()
        latencies(server.base_url, 2)  # warm-up (and, with caching, the prefix is cached)
        idle = latencies(server.base_url, count)
        busy, steps = while_training(server.base_url, count, every_s)
    finally:
        server.stop()
    return {"idle_median_s": statistics.median(idle), "training_median_s": statistics.median(busy),
            "training_p90_s": sorted(busy)[int(0.9 * (len(busy) - 1))], "steps_applied": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_argument(parser)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--train-every", type=float, default=0.5)
    parser.add_argument("--port", type=int, default=8194)
    args = parser.parse_args()

    model_dir = fresh_model_copy(args.model, "bench-prefix-cache")
    results = {name: measure(model_dir, args.port, on, args.requests, args.train_every)
               for name, on in (("prefix caching on, reset after each step", True),
                                ("prefix caching off", False))}
    print(f"{'server':<42} {'idle median':>12} {'training median':>16} {'training p90':>13} {'steps':>6}")
    for name, r in results.items():
        print(f"{name:<42} {r['idle_median_s']:>11.3f}s {r['training_median_s']:>15.3f}s "
              f"{r['training_p90_s']:>12.3f}s {r['steps_applied']:>6}")
    out = REPO / "bench" / "results" / "prefix_cache.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results, "requests": args.requests, "train_every_s": args.train_every,
                               "prefix_tokens": len(PREFIX)}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
