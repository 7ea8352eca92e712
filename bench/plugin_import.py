"""What loading livetrain's vLLM general plugin costs each vLLM process, this tree against
``--baseline`` (a git ref, extracted with ``git archive``), in one run.

vLLM loads the general plugin (``livetrain.vllm_plugin.plugins``) in every one of its
processes (API server, engine core, worker). Each measurement is a fresh interpreter
that first imports what a vLLM process has imported anyway (vLLM and torch), then the
plugin module: the time of that last import, the resident memory it adds, and which of
livetrain's trainer packages came with it.

    .venv/bin/python bench/plugin_import.py [--baseline REF] [--runs 7]

Prints a table and writes bench/results/plugin_import.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAINER_PACKAGES = ("livetrain.optim", "livetrain.train", "livetrain.checkpoint", "livetrain.worker",
                    "livetrain.session", "transformers.cache_utils")

MEASURE = f"""
import json, resource, sys, time
import torch, vllm  # already in every vLLM process
def rss_kib():
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmRSS:")))
before, started = rss_kib(), time.perf_counter()
import livetrain.vllm_plugin.plugins
seconds = time.perf_counter() - started
print(json.dumps({{"seconds": seconds, "rss_kib": rss_kib() - before,
                  "trainer_modules": sorted(m for m in sys.modules if m.startswith({TRAINER_PACKAGES!r}))}}))
"""


def measure(source: Path, runs: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(source)}
    # Run from the tree's own root: `python -c` puts the working directory first on sys.path.
    samples = [json.loads(subprocess.run([sys.executable, "-c", MEASURE], env=env, cwd=source, check=True,
                                         capture_output=True, text=True).stdout.strip().splitlines()[-1])
               for _ in range(runs)]
    return {"seconds": statistics.median(s["seconds"] for s in samples),
            "rss_mib": statistics.median(s["rss_kib"] for s in samples) / 1024,
            "trainer_modules": samples[-1]["trainer_modules"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="986d8ec",
                        help="a git ref whose plugin imported the trainer (default: the last commit that did)")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    baseline_dir = Path(tempfile.mkdtemp(prefix="livetrain-baseline-"))
    subprocess.run(f"git -C {REPO} archive {args.baseline} livetrain | tar -x -C {baseline_dir}", shell=True,
                   check=True)
    now, before = measure(REPO, args.runs), measure(baseline_dir, args.runs)
    print(f"{'importing the general plugin, after torch and vLLM':<52} {'this tree':>10} {args.baseline:>10}")
    print(f"{'time (s, median of ' + str(args.runs) + ')':<52} {now['seconds']:>10.3f} {before['seconds']:>10.3f}")
    print(f"{'resident memory added (MiB)':<52} {now['rss_mib']:>10.1f} {before['rss_mib']:>10.1f}")
    print(f"{'trainer modules imported':<52} {len(now['trainer_modules']):>10} {len(before['trainer_modules']):>10}")
    print(f"per vLLM process; vLLM runs 3 (API server, engine core, worker): saving "
          f"{3 * (before['seconds'] - now['seconds']):.2f} s of import time and "
          f"{3 * (before['rss_mib'] - now['rss_mib']):.0f} MiB in all")
    out = REPO / "bench" / "results" / "plugin_import.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"this_tree": now, "baseline": before, "baseline_ref": args.baseline}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
