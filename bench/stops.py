"""`livetrain serve` stopped each way a deployment stops it, on the default model.

For each way, in turn on one copy of the default model: start `livetrain serve` (its
command line, in a session of its own, as a terminal or a process manager starts it),
apply --steps /train steps, stop it that way, and time from the first signal until every
process of the tree has exited (the supervisor, the training worker, each of vLLM's
processes). A SIGKILL during a stop is sent as soon as the supervisor says it is
stopping. Also checked: the port is free, the directory verifies, and the applied steps
are in it, or, when the worker was killed before its sync, kept in /dev/shm and
recovered by the next start.

    .venv/bin/python bench/stops.py [--model DIR] [--steps 3]

Prints a table and writes bench/results/stops.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import add_model_argument, fresh_model_copy  # noqa: E402
from livetrain.checkpoint.commands import checkpoint_verify  # noqa: E402
from livetrain.leftovers import PortInUse, check_port_free  # noqa: E402
from livetrain.serve import LiveServer, ServeOptions  # noqa: E402
from tests.serve_tree import STOP_WAYS, ServeTree  # noqa: E402
from tests.session_helpers import files_digest, post_json  # noqa: E402

VLLM_ARGS = ("--enforce-eager", "--max-model-len", "2048")
TARGET_S = 10.0  # signal -> every process gone
ORPHANS_TARGET_S = 5.0  # supervisor SIGKILLed -> vLLM and the worker gone


def train_example(i: int) -> dict:
    base = 1000 + 97 * i
    return {"context_ids": list(range(base, base + 64)), "continuation_ids": list(range(base + 200, base + 216))}


def port_free(port: int) -> bool:
    try:
        check_port_free("127.0.0.1", port)
    except PortInUse:
        return False
    return True


def run_way(way: str, model_dir: Path, shm_dir: Path, steps: int) -> dict:
    """Start, train, stop ``way``; what it took and what it left."""
    log_path = model_dir.parent / f"{way}.log"
    tree = ServeTree.start(model_dir, log_path, vllm_args=VLLM_ARGS)
    try:
        for i in range(steps):
            assert post_json(tree.base_url + "/train", {"examples": [train_example(i)]})["applied"]
        before = files_digest(model_dir)
        load = os.getloadavg()[0]
        seconds = tree.wait_gone(tree.stop(way, hold_victim=False))
    finally:
        tree.end()
    vllm = [after for pid, after in tree.gone_after.items() if pid not in (tree.serve.pid, tree.worker)]
    return {"way": way, "description": STOP_WAYS[way], "seconds": seconds,
            "supervisor_s": tree.gone_after[tree.serve.pid], "worker_s": tree.gone_after[tree.worker],
            "vllm_s": max(vllm), "vllm_processes": len(vllm), "exit_status": tree.serve.returncode,
            "port_free": port_free(tree.port), "runtime_dir_left": tree.runtime_dir.exists(),
            "verifies": bool(checkpoint_verify(model_dir)["ok"]),
            "steps_in_directory": files_digest(model_dir) != before,
            "copy_kept": shm_dir.exists(), "found_previous_copy": f"found {shm_dir}" in log_path.read_text(),
            "load_average_1m": load, "log": str(log_path)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_argument(parser)
    parser.add_argument("--steps", type=int, default=3, help="applied /train steps before each stop")
    args = parser.parse_args()
    model_dir = fresh_model_copy(args.model, "stops")
    shm_dir = LiveServer(ServeOptions(model_dir=model_dir)).shm_dir
    results = []
    for way in STOP_WAYS:
        print(f"{STOP_WAYS[way]} ...", flush=True)
        results.append(run_way(way, model_dir, shm_dir, args.steps))
    for result, following in zip(results, results[1:] + [None]):
        result["recovered_by_next_start"] = (None if not result["copy_kept"] or following is None
                                             else following["found_previous_copy"])

    print(f"\n{'stopped by':<62} {'all gone':>8} {'superv.':>8} {'worker':>7} {'vLLM':>6}  exit  "
          "steps in dir / kept")
    for r in results:
        kept = "kept in /dev/shm, recovered by the next start" if r["recovered_by_next_start"] else (
            "kept in /dev/shm" if r["copy_kept"] else "in the directory" if r["steps_in_directory"] else "LOST")
        print(f"{r['description']:<62} {r['seconds']:>7.2f}s {r['supervisor_s']:>7.2f}s {r['worker_s']:>6.2f}s "
              f"{r['vllm_s']:>5.2f}s  {r['exit_status']:>4}  {kept}")
    orphaned = next(r for r in results if r["way"] == "sigkill-supervisor")
    orphans_gone = max(orphaned["worker_s"], orphaned["vllm_s"])
    slowest = max(r["seconds"] for r in results)
    clean = all(r["port_free"] and r["verifies"] and not r["runtime_dir_left"] for r in results)
    print(f"\nslowest stop {slowest:.2f} s (target ≤ {TARGET_S:g} s); supervisor SIGKILLed -> vLLM and worker gone "
          f"{orphans_gone:.2f} s (target ≤ {ORPHANS_TARGET_S:g} s); port free, no runtime dir left, directory "
          f"verifies after every stop: {clean}")
    out = REPO / "bench" / "results" / "stops.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": str(args.model), "steps": args.steps, "vllm_args": VLLM_ARGS,
                               "cpus": os.cpu_count(), "ways": results, "slowest_s": slowest,
                               "orphans_gone_s": orphans_gone, "all_clean": clean}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
