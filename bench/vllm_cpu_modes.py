"""vLLM's CPU serving modes for livetrain, side by side on one model in one run.

Modes: ``plain`` (vLLM alone, no livetrain), ``reload`` (livetrain's default: vLLM's packed
kernels, refreshed from the shared copy after each step), ``zero-copy`` (the trained
layers run F.linear on the shared tensors), serving q_proj's layers, the default
trained modules (q, k, v, o) or every decoder linear from the copy. For each: single-stream and 8-concurrent tokens/s
(64-token completions, eager); in reload mode the refresh times, the time from a
step's end to the first token computed on the new weights, and a stream's speed while
refreshes run HOGWILD or with generation paused around them (consistent updates).

    .venv/bin/python bench/vllm_cpu_modes.py [--model DIR] [--runs 3]

Prints a table and writes bench/results/vllm_cpu_modes.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
NEW_TOKENS = 64
Q_PROJ = r"self_attn\.q_proj"
ALL_LINEARS = r"(self_attn|mlp)\.\w+_proj"
MODES = [("plain", None, None), ("reload", "reload", None), ("zero-copy (q_proj)", "zero-copy", Q_PROJ),
         ("zero-copy (default modules)", "zero-copy", None), ("zero-copy (all linears)", "zero-copy", ALL_LINEARS)]


def throughput(engine, runs: int) -> dict[str, float]:
    async def one() -> int:
        tokens, _ = await engine.complete(PROMPT, NEW_TOKENS, ignore_eos=True)
        return len(tokens)

    async def many(n: int) -> int:
        return sum(await asyncio.gather(*(one() for _ in range(n))))

    engine.run(one())  # warm-up
    single, concurrent = [], []
    for _ in range(runs):
        started = time.perf_counter()
        count = engine.run(one())
        single.append(count / (time.perf_counter() - started))
        started = time.perf_counter()
        count = engine.run(many(8))
        concurrent.append(count / (time.perf_counter() - started))
    return {"single_stream_tok_s": statistics.median(single), "concurrent8_tok_s": statistics.median(concurrent)}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def refresh_times(engine, runs: int) -> dict[str, float]:
    """Refresh after a q_proj step and after a whole-model change; step end -> first token that sees it."""
    layout = engine.served.layout
    q_proj = [name for name in layout.hf_names() if name.endswith("q_proj.weight")]
    subset, whole, visible = [], [], []
    for version in range(runs):
        subset.append(engine.run(engine.served.refresh(q_proj, version)).seconds)
        whole.append(engine.run(engine.served.refresh(layout.hf_names(), version)).seconds)
    for version in range(20):
        started = time.perf_counter()
        engine.run(engine.served.refresh(q_proj, version))
        engine.run(engine.complete(PROMPT, 1))
        visible.append(time.perf_counter() - started)
    return {"refresh_q_proj_s": statistics.median(subset), "refresh_q_proj_params": len(layout.params_to_refresh(q_proj)),
            "refresh_whole_model_s": statistics.median(whole), "refresh_whole_model_params": len(layout.params),
            "step_to_first_token_p50_s": percentile(visible, 0.5), "step_to_first_token_p95_s": percentile(visible, 0.95)}


def stream_during_refreshes(engine, consistent: bool, period_s: float = 0.25) -> float:
    """Single-stream tokens/s while q_proj is refreshed every ``period_s`` (HOGWILD or paused updates)."""
    q_proj = [name for name in engine.served.layout.hf_names() if name.endswith("q_proj.weight")]

    async def measure() -> float:
        stream = asyncio.ensure_future(engine.complete(PROMPT, NEW_TOKENS, ignore_eos=True))
        started = time.perf_counter()
        while not stream.done():
            await engine.served.refresh(q_proj, consistent=consistent)
            await asyncio.sleep(period_s)
        tokens, _ = await stream
        return len(tokens) / (time.perf_counter() - started)

    return engine.run(measure())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="model directory (default: the default model, bf16)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if args.model is None:
        import torch

        from livetrain.default_model import init_default

        args.model = init_default(Path(".cache/smollm2-135m-bf16"), dtype=torch.bfloat16)

    from livetrain.vllm_plugin.inprocess import InProcessEngine
    from livetrain.vllm_plugin.settings import DEFAULT_TRAIN_MODULES

    results = {}
    for label, cpu_mode, modules in MODES:
        started = time.perf_counter()
        engine = InProcessEngine(args.model, cpu_mode=cpu_mode or "reload", plain=cpu_mode is None,
                                 train_modules=modules or DEFAULT_TRAIN_MODULES)
        row = {"startup_s": time.perf_counter() - started}
        try:
            row.update(throughput(engine, args.runs))
            if cpu_mode == "reload":
                row.update(refresh_times(engine, args.runs))
                row["shared_copy_bytes"] = sum(f.stat().st_size for f in engine.shm_dir.glob("*.bin"))
                row["stream_tok_s_refreshing_hogwild"] = stream_during_refreshes(engine, consistent=False)
                row["stream_tok_s_refreshing_consistent"] = stream_during_refreshes(engine, consistent=True)
            if cpu_mode == "zero-copy":
                row["zero_copy_params"] = len(engine.served.zero_copy)
        finally:
            engine.close()
        results[label] = row
        print(label, json.dumps(row), flush=True)

    plain = results["plain"]
    print(f"\n{'mode':<26}{'start s':>9}{'1 stream tok/s':>16}{'ratio':>7}{'8 streams tok/s':>17}{'ratio':>7}")
    for label, row in results.items():
        print(f"{label:<26}{row['startup_s']:>9.1f}{row['single_stream_tok_s']:>16.1f}"
              f"{row['single_stream_tok_s'] / plain['single_stream_tok_s']:>7.2f}{row['concurrent8_tok_s']:>17.1f}"
              f"{row['concurrent8_tok_s'] / plain['concurrent8_tok_s']:>7.2f}")
    reload = results["reload"]
    print(f"\nrefresh (reload mode): {reload['refresh_q_proj_params']} qkv_proj params (q_proj changed) "
          f"{reload['refresh_q_proj_s'] * 1000:.0f} ms; whole model ({reload['refresh_whole_model_params']} params) "
          f"{reload['refresh_whole_model_s'] * 1000:.0f} ms")
    print(f"step end -> first token on the new weights: p50 {reload['step_to_first_token_p50_s'] * 1000:.0f} ms, "
          f"p95 {reload['step_to_first_token_p95_s'] * 1000:.0f} ms")
    print(f"one stream while q_proj refreshes every 0.25 s: HOGWILD {reload['stream_tok_s_refreshing_hogwild']:.1f} "
          f"tok/s, paused (consistent) updates {reload['stream_tok_s_refreshing_consistent']:.1f} tok/s")
    print(f"shared copy: {reload['shared_copy_bytes'] / 2**20:.0f} MiB (beside vLLM's own packed weights)")
    out = Path("bench/results/vllm_cpu_modes.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": str(args.model), "new_tokens": NEW_TOKENS, "cpus": os.cpu_count(),
                               "modes": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
