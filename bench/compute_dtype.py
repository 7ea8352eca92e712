"""Training steps on the bf16 default model: computed in bf16 vs in fp32 (`Float32Compute`).

The served weights are bf16 and the trainer steps on them in place. Both variants train
the same bf16 parameters with APOLLO-Mini: the worker's default modules (attention q, k,
v, o) or every decoder matrix (`--modules all`). The "bf16" variant computes in bf16
(LIVETRAIN_FLOAT32_COMPUTE=0); "fp32" computes in fp32 (=1), what livetrain chooses on a
CPU without AVX512-BF16 or AMX. Steps: a context of --context tokens seen for the first
time (miss), then again (context-cache hit), continuation --continuation tokens.

Step times: median of --reps after one warm-up, variants interleaved. Peak memory: each
variant runs one miss step in a fresh subprocess; the figure is the rise of the process's
peak resident set over its resident set before the step.

    .venv/bin/python bench/compute_dtype.py [--reps 3] [--modules attention|all]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import add_model_argument  # noqa: E402
from livetrain.default_model import init_default  # noqa: E402
from livetrain.optim import apollo_mini  # noqa: E402
from livetrain.train import ContextCache, SFTExample, train_step  # noqa: E402
from livetrain.train.compute_dtype import ENV  # noqa: E402
from livetrain.options import DEFAULT_TRAIN_MODULES  # noqa: E402

MODULES = {"attention": DEFAULT_TRAIN_MODULES, "all": r"(self_attn|mlp)\."}
VARIANTS = {"bf16": "0", "fp32": "1"}


def load(model_arg: Path, modules: str, threads: int):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model_dir = init_default(model_arg, dtype=torch.bfloat16, progress=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(bool(re.search(MODULES[modules], name)) and p.dim() == 2)
        if p.requires_grad:
            params.append(p)
    return model, apollo_mini(params, lr=1e-5)


def example(seed: int, context: int, continuation: int, vocab: int) -> SFTExample:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, vocab, (context + continuation,), generator=g).tolist()
    return SFTExample(tuple(ids[:context]), tuple(ids[context:]))


def _vm(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def memory_child(args: argparse.Namespace) -> None:
    model, optimizer = load(args.model, args.modules, args.threads)
    ex = example(0, args.context, args.continuation, model.config.vocab_size)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _vm("VmRSS")
    assert train_step(model, optimizer, [ex]).applied
    print(json.dumps({"peak_delta_bytes": _vm("VmHWM") - before}))


def peak_memory(variant: str, args: argparse.Namespace) -> int:
    command = [sys.executable, __file__, "--memory-child", "--model", str(args.model), "--modules", args.modules,
               "--threads", str(args.threads), "--context", str(args.context),
               "--continuation", str(args.continuation)]
    out = subprocess.run(command, check=True, capture_output=True, text=True,
                         env={**os.environ, ENV: VARIANTS[variant]}).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_delta_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_argument(parser)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modules", choices=sorted(MODULES), default="attention")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--continuation", type=int, default=64)
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "compute_dtype.json")
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args)
        return

    model, optimizer = load(args.model, args.modules, args.threads)
    vocab = model.config.vocab_size
    caches = {v: ContextCache(max_age_steps=None) for v in VARIANTS}
    times: dict[str, list[float]] = {f"{v} {k}": [] for v in VARIANTS for k in ("miss", "hit")}
    for rep in range(args.reps + 1):  # rep 0 warms up and fills the context caches
        for variant, setting in VARIANTS.items():
            os.environ[ENV] = setting
            seen = example(1000, args.context, args.continuation, vocab)
            miss = train_step(model, optimizer, [example(rep, args.context, args.continuation, vocab)])
            hit = train_step(model, optimizer, [seen], context_cache=caches[variant])
            assert miss.applied and hit.applied and hit.cache_hits == (rep > 0)
            if rep:
                times[f"{variant} miss"].append(miss.seconds)
                times[f"{variant} hit"].append(hit.seconds)
            print(f"rep {rep} {variant}: miss {miss.seconds:.2f} s, hit {hit.seconds:.2f} s", flush=True)
    median = {k: statistics.median(v) for k, v in times.items()}
    memory = {v: peak_memory(v, args) for v in VARIANTS}

    cpu = (f"AVX512-BF16 {torch.cpu._is_avx512_bf16_supported()}, AMX {torch.cpu._is_amx_tile_supported()}, "
           f"capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"\nSmolLM2-135M-Instruct, bf16 weights, {args.modules} modules trained, {args.threads} threads, "
          f"median of {args.reps}; CPU: {cpu}")
    rows = [(f"step time, context {args.context} + continuation {args.continuation} (miss)",
             median["fp32 miss"], median["bf16 miss"], "s"),
            ("step time, context-cache hit", median["fp32 hit"], median["bf16 hit"], "s"),
            ("peak memory of a miss step", memory["fp32"], memory["bf16"], "bytes")]
    print(f"{'figure':58s} {'fp32 compute':>13s} {'bf16 compute':>13s} {'ratio':>6s}")
    figures = []
    for name, fp32, bf16, unit in rows:
        fmt = (lambda x: f"{x:.2f} s") if unit == "s" else (lambda x: f"{x / 2**20:.0f} MiB")
        print(f"{name:58s} {fmt(fp32):>13s} {fmt(bf16):>13s} {fp32 / bf16:6.2f}")
        figures.append({"figure": name, "fp32_compute": fp32, "bf16_compute": bf16, "unit": unit,
                        "ratio": fp32 / bf16})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": "SmolLM2-135M-Instruct", "weights": "bfloat16", "cpu": cpu,
                                    "modules": args.modules, "threads": args.threads, "reps": args.reps,
                                    "context": args.context, "continuation": args.continuation,
                                    "times": times, "peak_memory_bytes": memory, "figures": figures}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
