"""What a web page can make a browser send to a token-less `livetrain serve`, and what the
checks against it cost the served model, in one run on the default model.

1. Attacks: every kind of request a page can make a browser send (simple cross-site
   requests, forms, foreign or ``null`` origins, DNS rebinding, deeply nested JSON),
   against every training route that changes or reads the model. For each: the status,
   and whether the served weights (hashed in the shared copy) or the model directory
   changed. Target: no request of these kinds changes anything.
2. Served tokens/s with the checks vs without: the same server from this tree and from
   ``--baseline`` (a git ref without the checks, extracted with ``git archive`` and put
   first on ``PYTHONPATH``, so vLLM's plugin loads from it too), alternating, ``--rounds``
   times each. Target: ≥ 0.98×.

    .venv/bin/python bench/cross_site.py [--model DIR] [--baseline REF] [--rounds 3] [--runs 3]

Prints a table and writes bench/results/cross_site.json.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import add_model_argument, fresh_model_copy  # noqa: E402
from bench.serve import VLLM_ARGS, throughput  # noqa: E402
from livetrain.options import ADMIN_TOKEN_ENV, TrainerOptions  # noqa: E402
from livetrain.serve import LiveServer, ServeOptions  # noqa: E402

EXAMPLE = {"context_ids": list(range(1000, 1064)), "continuation_ids": list(range(2000, 2016))}
BODIES = {"/train": {"examples": [EXAMPLE], "lr": 1e-2}, "/rollback": {"generation": 0}, "/checkpoint": {},
          "/train/logprobs": EXAMPLE}
EVIL = "http://evil.example"


def attacks(port: int) -> list[tuple[str, str, bytes | None, dict[str, str]]]:
    """(kind, path, body, headers): what a page can make a browser send, to each route."""
    rebound = f"evil.example:{port}"
    nested = b"[" * 100_000 + b"]" * 100_000
    kinds = []
    for path, fields in BODIES.items():
        body = json.dumps(fields).encode()
        kinds += [
            ("text/plain, foreign Origin", path, body, {"Content-Type": "text/plain", "Origin": EVIL}),
            ("text/plain, no Origin", path, body, {"Content-Type": "text/plain"}),
            ("HTML form", path, b"", {"Content-Type": "application/x-www-form-urlencoded", "Origin": EVIL}),
            ("multipart form", path, b"--x--\r\n", {"Content-Type": "multipart/form-data; boundary=x",
                                                     "Origin": EVIL}),
            ("no-cors fetch, no body", path, None, {"Origin": EVIL}),
            ("JSON, Origin null", path, body, {"Content-Type": "application/json", "Origin": "null"}),
            ("JSON, foreign Origin", path, body, {"Content-Type": "application/json", "Origin": EVIL}),
            ("DNS rebinding", path, body, {"Content-Type": "application/json", "Host": rebound,
                                           "Origin": f"http://{rebound}"}),
            ("nested JSON", path, nested, {"Content-Type": "application/json"}),
        ]
    return kinds


def send(port: int, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        connection.request(method, path, body, headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def served_state(server: LiveServer) -> str:
    """A digest of the served weights (the shared copy) and the model directory's files."""
    digest = hashlib.sha256()
    for directory in (server.shm_dir, server.model_dir):
        for path in sorted(directory.glob("*")):
            if path.is_file() and path.suffix != ".json":
                digest.update(path.read_bytes())
    return digest.hexdigest()


def run_attacks(model_dir: Path, port: int) -> list[dict]:
    rows = []
    server = LiveServer(ServeOptions(model_dir=model_dir, port=port, vllm_args=VLLM_ARGS,
                                     trainer=TrainerOptions(max_probe_drift=0, sync_interval_s=3600)),
                        say=lambda line: None)
    with server:
        ok = send(port, "POST", "/train", json.dumps(BODIES["/train"]).encode(), {"Content-Type": "application/json"})
        assert ok == 200, f"an ordinary /train got {ok}"  # the generation to roll back to differs from the files
        for kind, path, body, headers in attacks(port):
            before = served_state(server)
            status = send(port, "POST", path, body, headers)
            rows.append({"kind": kind, "path": path, "status": status, "changed": served_state(server) != before})
    return rows


def served_tokens_per_s(source: Path, model_dir: Path, port: int, runs: int, log: Path) -> dict[str, float]:
    """`livetrain serve` with livetrain imported from ``source``; its throughput (bench/serve.py's)."""
    command = [sys.executable, "-c", "import sys; from livetrain.cli import main; sys.exit(main())", "serve",
               "--model", str(model_dir), "--port", str(port), "--", *VLLM_ARGS]
    env = {**os.environ, "PYTHONPATH": str(source)}
    with open(log, "w") as out:
        # From the tree's own root: `python -c` and `-m` put the working directory first on sys.path.
        process = subprocess.Popen(command, env=env, cwd=source, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        while "ready after" not in log.read_text():
            if process.poll() is not None:
                raise RuntimeError(f"livetrain serve from {source} exited:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        return throughput(f"http://127.0.0.1:{port}", runs)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_argument(parser)
    parser.add_argument("--baseline", default="986d8ec",
                        help="a git ref without the cross-site checks (default: the last commit before them)")
    parser.add_argument("--rounds", type=int, default=3, help="servers started per variant, alternating")
    parser.add_argument("--runs", type=int, default=3, help="throughput measurements per server")
    parser.add_argument("--port", type=int, default=8193)
    args = parser.parse_args()
    os.environ.pop(ADMIN_TOKEN_ENV, None)  # the checks that matter most are those of a token-less server

    model_dir = fresh_model_copy(args.model, "bench-cross-site")
    rows = run_attacks(model_dir, args.port)
    print(f"{'request a page can make a browser send':<30} {'route':<16} {'status':>6}  changed")
    for row in rows:
        print(f"{row['kind']:<30} {row['path']:<16} {row['status']:>6}  {'YES' if row['changed'] else 'no'}")
    changed = sum(row["changed"] for row in rows)
    accepted = sum(200 <= row["status"] < 300 for row in rows)
    print(f"{len(rows)} requests: {accepted} accepted, {changed} changed the weights or files (target 0)\n")

    baseline_dir = Path(tempfile.mkdtemp(prefix="livetrain-baseline-"))
    subprocess.run(f"git -C {REPO} archive {args.baseline} livetrain | tar -x -C {baseline_dir}",
                   shell=True, check=True)
    measured: dict[str, list[dict[str, float]]] = {"checks": [], "baseline": []}
    for round_ in range(args.rounds):
        order = ("checks", "baseline") if round_ % 2 == 0 else ("baseline", "checks")
        for variant in order:
            source = REPO if variant == "checks" else baseline_dir
            model_dir = fresh_model_copy(args.model, "bench-cross-site")
            measured[variant].append(served_tokens_per_s(source, model_dir, args.port, args.runs,
                                                         model_dir.parent / f"serve-{variant}-{round_}.log"))
            print(f"round {round_ + 1} {variant}: {measured[variant][-1]}")
    figures = {}
    for key in ("single_tok_s", "concurrent8_tok_s"):
        checks = statistics.median(run[key] for run in measured["checks"])
        baseline = statistics.median(run[key] for run in measured["baseline"])
        figures[key] = {"checks": checks, "baseline": baseline, "ratio": checks / baseline}
    print(f"\n{'served tokens/s (median of rounds)':<36} {'checks':>8} {'without':>8} {'ratio':>7}  target")
    for key, label in (("single_tok_s", "single stream"), ("concurrent8_tok_s", "8 concurrent")):
        f = figures[key]
        print(f"{label:<36} {f['checks']:>8.1f} {f['baseline']:>8.1f} {f['ratio']:>6.3f}×  ≥ 0.98×")
    out = REPO / "bench" / "results" / "cross_site.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"attacks": rows, "changed": changed, "throughput": figures, "runs": measured,
                               "baseline": args.baseline, "vllm_args": VLLM_ARGS}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
