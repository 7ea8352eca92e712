"""retain_freed_memory: memory a step frees is reused by the next step without page faults.

Each case runs in a fresh interpreter (the setting is process-wide) with glibc's
MALLOC_* variables removed, so that both cases start from glibc's defaults.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

# Like a training step: 16 gradient-sized blocks (4 MiB each) allocated, written, and
# all freed at the end. The page faults of rounds 2-4 are counted (glibc's own heuristics
# stop giving such blocks back after a few rounds of this simple pattern, but not for a
# real training step's mix of sizes).
ROUNDS = """
import json, resource, sys, torch
if sys.argv[1] == "retain":
    from livetrain.train.host_memory import retain_freed_memory
    assert retain_freed_memory()
def step():
    blocks = [torch.empty(1 << 20).fill_(1.0) for _ in range(16)]
    del blocks
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step(); step(); step()
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""
PAGES = 16 * (4 << 20) // 4096


def _faults_after_first_round(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", ROUNDS, mode], env=env, check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the C library is not glibc")
def test_freed_blocks_are_reused_without_page_faults():
    assert _faults_after_first_round("default") > PAGES // 2  # glibc gave the blocks back to the kernel
    assert _faults_after_first_round("retain") < PAGES // 8
