"""Checkpoint sync on the default model (bf16), side by side with a full safetensors save.

    .venv/bin/python bench/checkpoint.py

One APOLLO-Mini step (livetrain.optim.apollo_mini) on a short language-modelling batch,
training either only the attention query projections or every decoder matrix, at lr
1e-5 and 1e-4; each scenario syncs into a fresh copy of the model directory. Prints a
table and writes bench/results/checkpoint.json.

Peak extra memory during a sync: Python and numpy allocations from tracemalloc, and
the peak of the process's anonymous resident memory (RssAnon, sampled every ms) above
its level before the sync. Page-cache pages of the mmap'd files are not counted: they
are the kernel's cache, shared with every reader of the file.

Timing method: every copy of the model directory is fsync'd before it is synced (else the
sync's own fsync would also flush the copy's 256 MiB of dirty pages). Each timed figure is
taken `--repeats` times and reported as median (the figures) and best; the CPU may be
shared with other work, which the spread shows. The memcpy reference copies the file's own
bytes between two in-memory buffers, interleaved with the no-change scans.

"sync s" is a sync on a directory that is open and was synced before (nothing changed
then), as in a running server: its file map exists. "cold s" is the first sync after
opening, which also maps the file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from livetrain.checkpoint import BLOCK_SIZE, ModelDirectory
from livetrain.default_model import init_default

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20
SUBSETS = {"q_proj": ("self_attn.q_proj",),
           "all_matrices": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakMemory:
    """Peak RssAnon above the starting level, and tracemalloc's peak, over a block."""

    def __enter__(self):
        self.start = self.peak = rss_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        tracemalloc.start()
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_anon())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())
        self.traced_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        self.rss_extra = self.peak - self.start


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_copy(source: Path, dest: Path) -> None:
    """Copy a model directory and fsync every file and folder of the copy."""
    shutil.copytree(source, dest)
    for path in [dest, *dest.rglob("*")]:
        fsync_path(path)


def full_save(state: dict[str, torch.Tensor], out: Path) -> tuple[float, int]:
    """The reference: save every tensor with safetensors, fsync'd. Returns (seconds, bytes)."""
    t0 = time.perf_counter()
    save_file(state, out, metadata={"format": "pt"})
    fsync_path(out)
    return time.perf_counter() - t0, out.stat().st_size


def memcpy_seconds(path: Path, repeats: int) -> list[float]:
    """Seconds of each of `repeats` plain in-memory copies of the file's bytes (the
    destination is written once first, so no run pays page faults)."""
    src = np.fromfile(path, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    return [_timed(lambda: np.copyto(dst, src)) for _ in range(repeats)]


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def gradients(model, seq_len: int = 256) -> None:
    """Fill .grad of every decoder matrix from one language-modelling batch."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, seq_len), generator=g)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()


def trained_params(model, subset: str) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters()
            if p.dim() == 2 and ".layers." in n and any(k in n for k in SUBSETS[subset])}


def change_fractions(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Fraction of values, and of whole-tensor 4 KiB blocks, that changed in the trained tensors."""
    values = changed_values = blocks = changed_blocks = 0
    for name, old in before.items():
        new = after[name]
        values += old.numel()
        changed_values += int((old.view(torch.int16) != new.view(torch.int16)).sum())
        per_block = BLOCK_SIZE // old.element_size()
        diff = (old.view(torch.int16) != new.view(torch.int16)).reshape(-1)
        pad = (-diff.numel()) % per_block
        diff = torch.cat([diff, diff.new_zeros(pad)]).reshape(-1, per_block).any(dim=1)
        blocks += diff.numel()
        changed_blocks += int(diff.sum())
    return changed_values / values, changed_blocks / blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=REPO / ".cache")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each timed figure")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "checkpoint.json")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from livetrain.optim import apollo_mini

    torch.manual_seed(0)
    source = init_default(args.cache / "smollm2-135m-bf16", dtype=torch.bfloat16, progress=False)
    work = args.cache / "bench-checkpoint"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained_params(model, "all_matrices").values():
        p.requires_grad_(True)
    gradients(model)
    original = {n: p.detach().clone() for n, p in trained_params(model, "all_matrices").items()}
    file_state = {n: t for n, t in model.state_dict().items()
                  if not (model.config.tie_word_embeddings and n == "lm_head.weight")}
    file_bytes = (source / "model.safetensors").stat().st_size

    # the reference: a full save of the same model, fsync'd
    saves = []
    for i in range(args.repeats):
        saves.append(full_save(file_state, work / "full.safetensors"))
        (work / "full.safetensors").unlink()
    save_s = statistics.median(s for s, _ in saves)
    save_bytes = saves[0][1]

    results = {"model": str(source), "file_bytes": file_bytes, "repeats": args.repeats,
               "full_save_s": save_s, "full_save_best_s": min(s for s, _ in saves),
               "full_save_bytes": save_bytes, "optimizer": "livetrain.optim.apollo_mini", "scenarios": {}}
    for subset in SUBSETS:
        for lr in (1e-5, 1e-4):
            params = trained_params(model, subset)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in original:
                        p.copy_(original[n])
            before = {n: p.detach().clone() for n, p in params.items()}
            optimizer = apollo_mini(list(params.values()), lr=lr)
            optimizer.step()
            values_frac, blocks_frac = change_fractions(before, {n: p.detach() for n, p in params.items()})
            model_dir = work / f"{subset}-{lr:g}"
            live = model.state_dict()
            unchanged = {n: original.get(n, t) for n, t in live.items()}
            sync_s, cold_sync_s = [], []
            for _ in range(args.repeats):
                durable_copy(source, model_dir)
                with ModelDirectory.open(model_dir) as directory:  # cold: the first sync also maps the file
                    cold_sync_s.append(directory.sync(live).seconds)
                shutil.rmtree(model_dir)
                durable_copy(source, model_dir)
                with ModelDirectory.open(model_dir) as directory:  # as in a server: open, synced before
                    assert directory.sync(unchanged).bytes_written == 0
                    result = directory.sync(live)
                    undo_bytes = directory.generations()[-1].undo_bytes
                sync_s.append(result.seconds)
                shutil.rmtree(model_dir)
            # memory on another copy: tracing allocations slows the sync down
            durable_copy(source, model_dir)
            with ModelDirectory.open(model_dir) as directory:
                with PeakMemory() as mem:
                    directory.sync(live)
            trained_bytes = sum(p.numel() * p.element_size() for p in params.values())
            scenario = {
                "subset": subset, "lr": lr, "trained_bytes": trained_bytes,
                "values_changed": values_frac, "trained_blocks_changed": blocks_frac,
                "bytes_written": result.bytes_written, "model_bytes": result.model_bytes,
                "journal_bytes": result.journal_bytes, "metadata_bytes": result.metadata_bytes,
                "changed_block_bytes": result.changed_block_bytes, "modes": result.modes,
                "undo_bytes_kept": undo_bytes, "sync_s": statistics.median(sync_s), "sync_best_s": min(sync_s),
                "cold_sync_s": statistics.median(cold_sync_s), "cold_sync_best_s": min(cold_sync_s),
                "cold_time_vs_full_save": statistics.median(cold_sync_s) / save_s,
                "written_vs_changed_blocks": result.bytes_written / result.changed_block_bytes,
                "written_vs_full_save": result.bytes_written / save_bytes,
                "time_vs_full_save": statistics.median(sync_s) / save_s,
                "peak_traced_bytes": mem.traced_peak, "peak_rss_anon_extra_bytes": mem.rss_extra,
            }
            results["scenarios"][f"{subset}@{lr:g}"] = scenario
            shutil.rmtree(model_dir)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in original:
                p.copy_(original[n])

    # no change: a scan of the whole file against the live weights
    # no change: a scan of the whole file against the live weights, interleaved with the
    # memcpy reference so that both see the same load on the machine
    model_dir = work / "unchanged"
    durable_copy(source, model_dir)
    live = model.state_dict()
    scans, copies = [], []
    with ModelDirectory.open(model_dir) as directory:
        first_scan_s = _timed(lambda: directory.sync(live))  # also maps the file
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            assert directory.sync(live).bytes_written == 0
            scans.append(time.perf_counter() - t0)
            copies += memcpy_seconds(model_dir / "model.safetensors", 1)
    results.update(
        first_scan_s=first_scan_s, no_change_scan_s=min(scans), no_change_scan_median_s=statistics.median(scans),
        memcpy_s=min(copies), memcpy_median_s=statistics.median(copies),
        scan_bytes_per_s=file_bytes / min(scans), memcpy_bytes_per_s=file_bytes / min(copies),
        scan_vs_memcpy=min(copies) / min(scans), scan_vs_memcpy_median=statistics.median(copies) / statistics.median(scans))
    scan_rate, copy_rate = results["scan_bytes_per_s"], results["memcpy_bytes_per_s"]
    shutil.rmtree(work)

    q = results["scenarios"]["q_proj@1e-05"]
    a = results["scenarios"]["all_matrices@1e-05"]
    worst_ratio = max(s["written_vs_changed_blocks"] for s in results["scenarios"].values())
    worst_mem = max(max(s["peak_traced_bytes"], s["peak_rss_anon_extra_bytes"]) - s["changed_block_bytes"]
                    for s in results["scenarios"].values())
    figures = [
        ("bytes written / changed 4 KiB blocks (worst scenario)", f"{worst_ratio:.3f}x", "<= 1.15x",
         worst_ratio <= 1.15),
        ("q_proj @1e-5: bytes written / full save", f"{q['written_vs_full_save']:.1%}", "<= 12%",
         q["written_vs_full_save"] <= 0.12),
        ("q_proj @1e-5: sync time / full save time (fsync'd, medians)", f"{q['time_vs_full_save']:.3f}x",
         "<= 0.3x", q["time_vs_full_save"] <= 0.3),
        ("  the same, first sync after opening the directory", f"{q['cold_time_vs_full_save']:.3f}x", "<= 0.3x",
         q["cold_time_vs_full_save"] <= 0.3),
        ("all matrices @1e-5: bytes written / full save", f"{a['written_vs_full_save']:.3f}x", "<= 1.0x",
         a["written_vs_full_save"] <= 1.0),
        ("no-change scan rate / memcpy rate (best of N each)", f"{results['scan_vs_memcpy']:.2f}x", ">= 0.5x",
         results["scan_vs_memcpy"] >= 0.5),
        ("peak extra memory - changed blocks (worst scenario)", f"{worst_mem / MiB:.1f} MiB", "<= 64 MiB",
         worst_mem <= 64 * MiB),
    ]
    results["figures"] = [{"figure": f, "value": v, "target": t, "met": bool(ok)} for f, v, t, ok in figures]

    print(f"default model bf16, {file_bytes / MiB:.1f} MiB, {args.repeats} runs of each timing; full save "
          f"(fsync'd) median {save_s:.3f} s (best {results['full_save_best_s']:.3f})")
    print(f"no-change scan best {results['no_change_scan_s']:.3f} s ({scan_rate / 1e9:.2f} GB/s), median "
          f"{results['no_change_scan_median_s']:.3f} s; memcpy best {results['memcpy_s']:.3f} s "
          f"({copy_rate / 1e9:.2f} GB/s), median {results['memcpy_median_s']:.3f} s; ratio of medians "
          f"{results['scan_vs_memcpy_median']:.2f}; first sync of an open directory {first_scan_s:.3f} s")
    print(f"{'scenario':<22}{'values':>8}{'blocks':>8}{'written MiB':>12}{'changed MiB':>12}{'journal MiB':>12}"
          f"{'/full':>8}{'sync s':>8}{'/save':>7}{'cold s':>8}{'modes':>8}{'traced MiB':>11}{'rss MiB':>9}")
    for name, s in results["scenarios"].items():
        print(f"{name:<22}{s['values_changed']:>8.1%}{s['trained_blocks_changed']:>8.1%}"
              f"{s['bytes_written'] / MiB:>12.2f}{s['changed_block_bytes'] / MiB:>12.2f}"
              f"{s['journal_bytes'] / MiB:>12.2f}{s['written_vs_full_save']:>8.1%}{s['sync_s']:>8.3f}"
              f"{s['time_vs_full_save']:>7.2f}{s['cold_sync_s']:>8.3f}{'/'.join(sorted(set(s['modes'].values()))):>8}"
              f"{s['peak_traced_bytes'] / MiB:>11.1f}{s['peak_rss_anon_extra_bytes'] / MiB:>9.1f}")
    print()
    print(f"{'figure':<56}{'value':>12}{'target':>11}  met")
    for f, v, t, ok in figures:
        print(f"{f:<56}{v:>12}{t:>11}  {'yes' if ok else 'NO'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
