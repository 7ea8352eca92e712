"""The training worker's costs on the default model (bf16), side by side in one run.

    .venv/bin/python bench/worker.py [--steps 3] [--context 512] [--continuation 64]

1. A context-frozen APOLLO-Mini step in-process (TrainingSession.train) without and
   with the probe guard, and the same step posted to ``POST /train`` (FastAPI router ->
   ZMQ -> training worker process, probe on): what the worker and the routes add.
2. ``GET /train/status`` round trips (HTTP + ZMQ, no model work): p50 / p95.
3. One step then a checkpoint sync for each ``--train-modules`` choice: bytes written
   vs the model's size.

Every step uses a fresh context (no context-cache hits). Prints a table and writes
bench/results/worker.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MODULE_CHOICES = {"q_proj": r"self_attn\.q_proj", "attention (default)": None,
                  "all matrices": r"(self_attn|mlp)\."}


def make_examples(n: int, context: int, continuation: int, vocab: int, seed: int):
    from livetrain.train.data import SFTExample

    g = torch.Generator().manual_seed(seed)
    return [SFTExample(tuple(torch.randint(100, vocab, (context,), generator=g).tolist()),
                       tuple(torch.randint(100, vocab, (continuation,), generator=g).tolist()))
            for _ in range(n)]


def timed_steps(step, examples) -> list[float]:
    step(examples[0])  # warm-up
    times = []
    for ex in examples[1:]:
        start = time.perf_counter()
        result = step(ex)
        times.append(time.perf_counter() - start)
        assert result["applied"], result
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--continuation", type=int, default=64)
    parser.add_argument("--status-calls", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(2)

    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from transformers import AutoTokenizer

    from livetrain.default_model import init_default
    from livetrain.routes import TrainingRoutes, router
    from livetrain.train.step import StepOptions
    from livetrain.worker.connection import WorkerConnection
    from livetrain.worker.process import WorkerProcess
    from livetrain.options import DEFAULT_TRAIN_MODULES, TrainerOptions
    from livetrain.session import ProbeGuard, TrainingSession

    source = init_default(REPO / ".cache" / "smollm2-135m-bf16", dtype=torch.bfloat16, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(source)
    work = Path(tempfile.mkdtemp(prefix="bench-worker-"))
    rows: list[tuple[str, str]] = []
    report: dict = {"context": args.context, "continuation": args.continuation, "steps": args.steps}
    n = args.steps + 1
    examples = iter(make_examples(3 * n + 8, args.context, args.continuation, len(tokenizer), seed=0))
    take = lambda k: [next(examples) for _ in range(k)]  # noqa: E731
    lr = StepOptions(lr=1e-5)

    try:
        # 1. in-process without the probe, then with it and through the routes, alternating
        # step by step so that the machine's load drifts equally over both.
        model_dir, served_dir = work / "model", work / "served"
        for path in (model_dir, served_dir):
            shutil.copytree(source, path, ignore=shutil.ignore_patterns(".livetrain"))
        with TrainingSession.open(model_dir) as session:
            times = timed_steps(lambda ex: session.train([ex], lr).to_dict(), take(n))
        report["in-process"] = statistics.median(times)
        rows.append(("step, in-process (s)", f"{report['in-process']:.3f}"))

        worker = WorkerProcess.start(served_dir, TrainerOptions(sync_interval_s=3600), threads=2)
        try:
            app = FastAPI()
            app.include_router(router)
            with TestClient(app) as http, TrainingSession.open(model_dir, probe=ProbeGuard.from_text(tokenizer)) \
                    as session:
                TrainingRoutes(WorkerConnection(worker.address)).install(app.state)

                def post(ex):
                    body = {"examples": [{"context_ids": list(ex.context_ids),
                                          "continuation_ids": list(ex.continuation_ids)}], "lr": 1e-5}
                    return http.post("/train", json=body).json()

                local, remote = [], []
                for i, ex in enumerate(take(n)):
                    for runner, times in ((lambda e: session.train([e], lr).to_dict(), local), (post, remote)):
                        start = time.perf_counter()
                        assert runner(ex)["applied"]
                        if i:  # the first round warms both up
                            times.append(time.perf_counter() - start)
                report["in-process + probe"] = statistics.median(local)
                report["routes + worker"] = statistics.median(remote)
                rows.append(("step, in-process + probe (s)", f"{report['in-process + probe']:.3f}"))
                rows.append(("step, POST /train -> worker + probe (s)", f"{report['routes + worker']:.3f}"))
                ratio = report["routes + worker"] / report["in-process + probe"]
                report["routes_overhead_ratio"] = ratio
                rows.append(("  ratio vs in-process + probe", f"{ratio:.3f}x"))
                latencies = []
                for _ in range(args.status_calls):
                    start = time.perf_counter()
                    assert http.get("/train/status").status_code == 200
                    latencies.append(time.perf_counter() - start)
                latencies.sort()
                report["status_p50_ms"] = 1000 * latencies[len(latencies) // 2]
                report["status_p95_ms"] = 1000 * latencies[int(len(latencies) * 0.95)]
                rows.append(("GET /train/status p50 / p95 (ms)",
                             f"{report['status_p50_ms']:.2f} / {report['status_p95_ms']:.2f}"))
        finally:
            worker.stop()

        # 3. bytes per sync by --train-modules
        model_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
        report["sync"] = {}
        for label, pattern in MODULE_CHOICES.items():
            copy_dir = work / f"sync-{len(report['sync'])}"
            shutil.copytree(source, copy_dir, ignore=shutil.ignore_patterns(".livetrain"))
            trainer = TrainerOptions(train_modules=pattern or DEFAULT_TRAIN_MODULES)
            with TrainingSession.open(copy_dir, trainer) as session:
                session.train(take(1), lr)
                synced = session.sync()
            report["sync"][label] = {**synced, "fraction_of_model": synced["model_bytes"] / model_bytes}
            rows.append((f"sync after one step, {label}",
                         f"{synced['model_bytes'] / 2**20:.1f} MiB ({100 * synced['model_bytes'] / model_bytes:.0f} %"
                         f" of {model_bytes / 2**20:.0f} MiB), {synced['seconds']:.2f} s"))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    width = max(len(r[0]) for r in rows)
    print(f"default model, bf16, 2 threads, context {args.context}, continuation {args.continuation}, "
          f"median of {args.steps} steps")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    out = REPO / "bench" / "results" / "worker.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
