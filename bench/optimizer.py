"""Optimizer benchmark: livetrain's APOLLO / APOLLO-Mini side by side with the authors'
`apollo-torch`, torch AdamW and torch SGD, on the default model in fp32.

All 2-D weights of the decoder layers are trained; the gradient comes from one backward
pass over a ~256-token chat example and is reused for every step. Timings interleave the
optimizers round by round (so a burst of load elsewhere hits all of them) and report
medians after warm-up steps.

    .venv/bin/python bench/optimizer.py [--rounds 11] [--threads 2]

Prints a table and writes bench/results/optimizer.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from livetrain.default_model import init_default
from livetrain.optim import Apollo, apollo_mini, apollo_param_groups

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / ".cache" / "smollm2-135m-fp32"
RESULTS = REPO / "bench" / "results" / "optimizer.json"
LR = 1e-5
CONVERSATION = [
    {"role": "system", "content": "You are a concise assistant for a small bakery."},
    {"role": "user", "content": "We bake sourdough, rye and brioche every morning. Our oven "
     "holds twelve loaves at a time and each bake takes forty minutes plus twenty minutes "
     "to load and unload. We open at seven. How early do we have to start if we need "
     "thirty sourdough, twenty-four rye and twelve brioche ready by opening time?"},
    {"role": "assistant", "content": "You need 66 loaves, which is six oven loads of twelve "
     "(the last one only half full). Each load takes forty minutes of baking plus twenty "
     "minutes of loading and unloading, so one hour per load and six hours in total. To be "
     "ready at seven you have to fire the first load at one in the morning. If you can load "
     "the next batch while the previous one cools on the rack, you save about ten minutes "
     "per load, so starting at two in the morning would be enough. Bake the brioche last: "
     "it is best when it is still warm at opening, and the rye, which needs to rest before "
     "slicing, should go in first."},
]

# name -> (figure, target, numerator row, denominator row, quantity)
FIGURES = [
    ("state bytes: livetrain APOLLO-Mini / torch AdamW", 0.01,
     "livetrain APOLLO-Mini", "torch AdamW", "state_bytes"),
    ("step(): livetrain APOLLO-Mini / apollo-torch APOLLO-Mini", 0.8,
     "livetrain APOLLO-Mini", "apollo-torch APOLLO-Mini", "step_ms"),
    ("step(): livetrain APOLLO-Mini / torch SGD", 3.0,
     "livetrain APOLLO-Mini", "torch SGD", "step_ms"),
    ("step(): livetrain APOLLO r256 / apollo-torch APOLLO r256", 0.8,
     "livetrain APOLLO r256", "apollo-torch APOLLO r256", "step_ms"),
]


def gradient_example(model_dir: Path) -> tuple[torch.nn.Module, list[torch.nn.Parameter], int]:
    """The model with gradients on every decoder 2-D weight (the rest frozen)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trained = apollo_param_groups(model, other="frozen", embeddings="frozen")[0]["params"]
    ids = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                        return_tensors="pt")["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    return model, trained, ids.shape[1]


def optimizers(params: list[torch.nn.Parameter]) -> dict[str, torch.optim.Optimizer]:
    from apollo_torch import APOLLOAdamW

    def theirs(rank: int, scale_type: str, scale: float) -> torch.optim.Optimizer:
        return APOLLOAdamW([{"params": params, "rank": rank, "proj": "random",
                             "scale_type": scale_type, "scale": scale, "update_proj_gap": 200,
                             "proj_type": "std"}], lr=LR)

    return {
        "torch SGD": torch.optim.SGD(params, lr=LR),
        "torch AdamW": torch.optim.AdamW(params, lr=LR),
        "livetrain APOLLO-Mini": apollo_mini(params, lr=LR),
        "apollo-torch APOLLO-Mini": theirs(1, "tensor", 128.0),  # the paper's α = √128
        "livetrain APOLLO r256": Apollo(params, lr=LR, rank=256, scale_type="channel"),
        "apollo-torch APOLLO r256": theirs(256, "channel", 1.0),
    }


def tensor_bytes(value: object) -> int:
    """Bytes of the tensors in an optimizer's per-parameter state (projector objects included)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if hasattr(value, "__dict__"):  # apollo-torch keeps a projector object per weight
        return sum(tensor_bytes(v) for v in vars(value).values())
    return 0


def state_bytes(opt: torch.optim.Optimizer) -> tuple[int, int]:
    """(bytes of the state, bytes of projections held outside it: livetrain's cache)."""
    state = sum(tensor_bytes(s) for s in opt.state.values())
    cache = getattr(opt, "_projections", {})
    return state, sum(tensor_bytes(matrix) for _, matrix in cache.values())


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall ms, CPU ms of this process). CPU time is less sensitive to other processes
    taking the cores; wall time is what the figures use."""
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - start) * 1000, (time.process_time() - start_cpu) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=11, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per optimizer")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    load_before = os.getloadavg()
    model, params, tokens = gradient_example(init_default(MODEL_DIR, dtype=torch.float32,
                                                          progress=False))
    opts = optimizers(params)
    rows: dict[str, dict[str, float]] = {}
    for name, opt in opts.items():
        first, _ = timed(opt.step)  # creates the state (and the projections)
        for _ in range(args.warmup - 1):
            opt.step()
        state, projections = state_bytes(opt)
        rows[name] = {"first_step_ms": first, "state_bytes": state + projections,
                      "saved_state_bytes": state, "projection_cache_bytes": projections}
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in opts}
    for _ in range(args.rounds):
        for name, opt in opts.items():
            samples[name].append(timed(opt.step))
    for name, pairs in samples.items():
        times = [wall for wall, _ in pairs]
        rows[name].update(step_ms=statistics.median(times), step_ms_min=min(times),
                          step_ms_max=max(times),
                          step_cpu_ms=statistics.median(cpu for _, cpu in pairs))

    figures = []
    for figure, target, numerator, denominator, quantity in FIGURES:
        ratio = rows[numerator][quantity] / rows[denominator][quantity]
        # For timings, also the ratio of the fastest steps: the least disturbed by load.
        fastest = quantity + "_min" if quantity == "step_ms" else quantity
        figures.append({"figure": figure, "ratio": ratio, "target": target, "met": ratio <= target,
                        "ratio_of_fastest": rows[numerator][fastest] / rows[denominator][fastest]})

    print(f"default model fp32, {len(params)} decoder weights "
          f"({sum(p.numel() for p in params) / 1e6:.1f}M values), {tokens}-token example, "
          f"{args.threads} threads, median of {args.rounds} steps")
    print(f"{'optimizer':28} {'step ms':>9} {'min':>7} {'max':>7} {'cpu ms':>8} {'first':>8} "
          f"{'state MB':>10}")
    for name, row in rows.items():
        print(f"{name:28} {row['step_ms']:9.1f} {row['step_ms_min']:7.1f} "
              f"{row['step_ms_max']:7.1f} {row['step_cpu_ms']:8.1f} {row['first_step_ms']:8.1f} "
              f"{row['state_bytes'] / 1e6:10.2f}")
    print()
    for f in figures:
        print(f"{f['figure']:60} {f['ratio']:8.4f}  target <= {f['target']:<5} "
              f"{'met' if f['met'] else 'NOT MET':8} (fastest steps: {f['ratio_of_fastest']:.4f})")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "model": "SmolLM2-135M-Instruct (fp32)", "trained_weights": len(params),
        "trained_values": sum(p.numel() for p in params), "example_tokens": tokens,
        "threads": args.threads, "rounds": args.rounds, "warmup": args.warmup,
        "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "optimizers": rows, "figures": figures,
    }, indent=2) + "\n")
    print(f"\nwrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
