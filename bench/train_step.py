"""Context-frozen training step vs full backprop, and a shared-context ORPO step vs TRL's.

The default model (SmolLM2-135M-Instruct) in fp32, torch.set_num_threads(2). Every
variant trains the same parameters with the same optimizer (APOLLO-Mini on every 2-D
decoder matrix, AdamW on norms, embeddings frozen), gradient clipped to norm 1.

* labels:  full backprop of context + continuation the standard Hugging Face way: the
           context's labels set to -100 (masked), `model(input_ids, labels=...).loss`;
           logits for every position.
* full:    the same full backprop with logits computed only where the loss needs them
           (`logits_to_keep`): a stronger reference than the standard one.
* frozen:  livetrain's `train_step` (context under no_grad, continuation with grad).
* hit:     `train_step` with the context's state already in a `ContextCache`.
* hit, dense gradients / frozen, dense gradients (for comparison, no target): the same
           steps with every weight gradient formed densely, as before livetrain kept short
           batches' gradients as their factors (`livetrain.optim.grad_factors`).
* ORPO:    `train_step(loss="orpo")` (the context runs once, both answers reuse it) vs
           TRL's ORPOTrainer (`trl.experimental.orpo`) on the same tokenized example.

Step times: median of --reps runs after one warm-up, variants interleaved so that load
from other processes hits them alike; the process keeps freed memory for reuse
(`retain_freed_memory`, as livetrain's training processes do), for every variant alike.
Peak memory: each variant runs one step in a fresh subprocess; the figure is the rise of
the process's peak resident set (VmHWM, reset via /proc/self/clear_refs just before the
step) over its resident set before the step.

    .venv/bin/python bench/train_step.py [--reps 3] [--threads 2]
TRL is a benchmark-only dependency: .venv/bin/pip install trl==1.16.0
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from livetrain.default_model import init_default
from livetrain.optim import apollo_mini, apollo_param_groups, grad_factors
from livetrain.train import ContextCache, PreferenceExample, SFTExample, StepOptions, train_step
from livetrain.train.host_memory import retain_freed_memory
from livetrain.train.losses import token_logprobs

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / ".cache" / "smollm2-135m-bf16"
CONTEXT, CONTINUATION = 1024, 64
ORPO_PROMPT, ORPO_ANSWER = 512, 64
LR = 1e-5


def load_model(threads: int) -> tuple[torch.nn.Module, AutoTokenizer]:
    torch.set_num_threads(threads)
    model_dir = init_default(MODEL_DIR, dtype=torch.bfloat16, progress=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return apollo_mini(apollo_param_groups(model), lr=LR)


def sft_example(seed: int = 0) -> SFTExample:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 40000, (CONTEXT + CONTINUATION,), generator=g).tolist()
    return SFTExample(tuple(ids[:CONTEXT]), tuple(ids[CONTEXT:]))


@contextlib.contextmanager
def dense_gradients():
    """Within it, `train_step` forms every weight gradient densely (no factored gradients)."""
    saved = grad_factors.MAX_SIZE_FRACTION
    grad_factors.MAX_SIZE_FRACTION = 0.0
    try:
        yield
    finally:
        grad_factors.MAX_SIZE_FRACTION = saved


def full_backprop_step(model, optimizer, example: SFTExample, standard: bool = False) -> float:
    """A reference: one forward/backward over context + continuation, the context masked.

    standard: Hugging Face's masked labels (logits for every position); else logits only
    for the positions that predict the continuation.
    """
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    ids = torch.tensor(example.context_ids + example.continuation_ids)
    n = len(example.continuation_ids)
    if standard:
        labels = ids.clone()
        labels[:-n] = -100
        loss = model(input_ids=ids[None], labels=labels[None]).loss
    else:
        logits = model(input_ids=ids[None], logits_to_keep=n + 1).logits[0, :-1]
        loss = -token_logprobs(logits, ids[-n:]).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


# --- peak memory, one variant per fresh process ------------------------------------------

def _vm(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def memory_child(variant: str, threads: int) -> None:
    model, _ = load_model(threads)
    optimizer = make_optimizer(model)
    example = sft_example()
    gc.collect()
    retain_freed_memory()  # after loading: memory freed while loading is not reused by the step
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _vm("VmRSS")
    if variant in ("full", "labels"):
        full_backprop_step(model, optimizer, example, standard=variant == "labels")
    else:
        with dense_gradients() if variant == "frozen-dense" else contextlib.nullcontext():
            result = train_step(model, optimizer, [example],
                                StepOptions(measure_update=variant == "frozen-update-norm"))
        assert result.applied, result.reason
    print(json.dumps({"variant": variant, "peak_delta_bytes": _vm("VmHWM") - before}))


def peak_memory(variant: str, threads: int) -> int:
    out = subprocess.run([sys.executable, __file__, "--memory-child", variant, "--threads", str(threads)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_delta_bytes"]


# --- TRL's ORPO trainer on the same example ------------------------------------------------

def orpo_example(tokenizer) -> dict[str, str]:
    """Strings that tokenize to about ORPO_PROMPT / ORPO_ANSWER tokens (plain words)."""
    words = [t for t, i in tokenizer.get_vocab().items() if t.startswith("Ġ") and t[1:].isalpha() and i > 1000]
    g = torch.Generator().manual_seed(1)

    def text(n: int) -> str:
        return "".join(words[i] for i in torch.randint(len(words), (n,), generator=g).tolist()).replace("Ġ", " ")

    return {"prompt": text(ORPO_PROMPT), "chosen": text(ORPO_ANSWER), "rejected": text(ORPO_ANSWER)}


def trl_orpo(model, tokenizer, reps: int, gradient_checkpointing: bool) -> tuple[list[float], PreferenceExample]:
    """Step times of TRL's ORPOTrainer, and the example exactly as TRL tokenized it.

    TRL's ORPO config turns gradient checkpointing on by default; without it TRL is faster.
    It also turns bf16 mixed precision on by default: off here, so that TRL computes in
    fp32 like every other variant.
    """
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    row = orpo_example(tokenizer)
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as out:
        config = ORPOConfig(output_dir=out, per_device_train_batch_size=1, max_steps=reps + 1, learning_rate=LR,
                            beta=0.1, max_length=2 * ORPO_PROMPT, max_completion_length=4 * ORPO_ANSWER,
                            max_grad_norm=1.0, report_to=[], save_strategy="no", logging_strategy="no",
                            use_cpu=True, bf16=False, dataloader_num_workers=0, disable_tqdm=True,
                            gradient_checkpointing=gradient_checkpointing)
        trainer = ORPOTrainer(model=model, args=config, processing_class=tokenizer,
                              train_dataset=Dataset.from_list([row] * (reps + 1)),
                              optimizers=(make_optimizer(model), None), callbacks=[StepTimer()])
        tokenized = trainer.train_dataset[0]
        trainer.train()
    model.gradient_checkpointing_disable()  # it would turn the model's cache off
    prompt = tuple(tokenized["prompt_input_ids"])
    strip = len(prompt)
    example = PreferenceExample(prompt, tuple(tokenized["chosen_input_ids"][strip:]),
                                tuple(tokenized["rejected_input_ids"][strip:]))
    return times[1:], example


# --- the benchmark ------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (on a CPU shared with other jobs, 1 gives steadier figures)")
    parser.add_argument("--memory-child", choices=["labels", "full", "frozen", "frozen-update-norm", "frozen-dense"])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train_step.json")
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.threads)
        return

    model, tokenizer = load_model(args.threads)
    retain_freed_memory()  # as livetrain's training processes do; every variant runs with it
    optimizer = make_optimizer(model)
    example = sft_example()
    cache = ContextCache(max_age_steps=None)
    dense_cache = ContextCache(max_age_steps=None)

    # TRL first: it also yields the exact tokenized ORPO example both sides train on.
    trl_times, pair = trl_orpo(model, tokenizer, args.reps, gradient_checkpointing=True)
    trl_plain_times, _ = trl_orpo(model, tokenizer, args.reps, gradient_checkpointing=False)

    times: dict[str, list[float]] = {"labels": [], "full": [], "frozen": [], "hit": [], "orpo": [],
                                     "hit-dense": []}
    for rep in range(args.reps + 1):  # rep 0 warms up (and fills the context caches)
        step = {"labels": full_backprop_step(model, optimizer, example, standard=True),
                "full": full_backprop_step(model, optimizer, example),
                "frozen": train_step(model, optimizer, [example]),
                "hit": train_step(model, optimizer, [example], context_cache=cache),
                "orpo": train_step(model, optimizer, [pair], StepOptions(loss="orpo"))}
        with dense_gradients():
            step["hit-dense"] = train_step(model, optimizer, [example], context_cache=dense_cache)
        for name in ("hit", "hit-dense"):
            assert step[name].cache_hits == (rep > 0), "expected a context-cache hit after the first step"
        step = {name: r if isinstance(r, float) else r.seconds for name, r in step.items()}
        if rep:
            for name, seconds in step.items():
                times[name].append(seconds)
        print(f"rep {rep}: " + ", ".join(f"{k} {v:.2f}s" for k, v in step.items()), flush=True)
    median = {k: statistics.median(v) for k, v in times.items()}
    median["trl_orpo"] = statistics.median(trl_times)
    median["trl_orpo_plain"] = statistics.median(trl_plain_times)

    memory = {v: peak_memory(v, args.threads)
              for v in ("labels", "full", "frozen", "frozen-update-norm", "frozen-dense")}

    rows = []
    for ref, ref_name in (("labels", "full backprop, HF masked labels"), ("full", "full backprop, logits kept")):
        rows += [
            (f"step time, context-frozen vs {ref_name} (ctx {CONTEXT}, cont {CONTINUATION})",
             median["frozen"], median[ref], "s", 0.4),
            (f"peak memory of that step vs {ref_name}", memory["frozen"], memory[ref], "bytes", 0.45),
            (f"same, update norm measured (measure_update=True) vs {ref_name}",
             memory["frozen-update-norm"], memory[ref], "bytes", 0.45),
            (f"step time, context-cache hit vs {ref_name}", median["hit"], median[ref], "s", 0.1),
        ]
    rows += [
        (f"ORPO step, livetrain vs TRL ORPOTrainer (ctx {len(pair.context_ids)}, "
         f"chosen {len(pair.chosen_ids)}, rejected {len(pair.rejected_ids)})",
         median["orpo"], median["trl_orpo"], "s", 0.3),
        ("ORPO step, same, TRL without gradient checkpointing (faster than its default)",
         median["orpo"], median["trl_orpo_plain"], "s", 0.3),
        ("step time, context-cache hit, factored vs dense gradients", median["hit"], median["hit-dense"], "s", None),
        ("peak memory of the context-frozen step, factored vs dense gradients",
         memory["frozen"], memory["frozen-dense"], "bytes", None),
    ]
    print(f"\nSmolLM2-135M-Instruct, fp32, {args.threads} threads, median of {args.reps}")
    print(f"{'figure':88s} {'livetrain':>10s} {'reference':>10s} {'ratio':>6s} {'target':>7s}")
    results = []
    for name, ours, ref, unit, target in rows:
        ratio = ours / ref
        fmt = (lambda x: f"{x:.2f} s") if unit == "s" else (lambda x: f"{x / 2**30:.2f} GiB")
        verdict = "" if target is None else "  ok" if ratio <= target else "  MISSES TARGET"
        print(f"{name:88s} {fmt(ours):>10s} {fmt(ref):>10s} {ratio:6.2f} "
              f"{'' if target is None else '<= ' + str(target):>7s}{verdict}")
        results.append({"figure": name, "livetrain": ours, "reference": ref, "unit": unit, "ratio": ratio,
                        "target": target, "meets_target": None if target is None else ratio <= target})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": "SmolLM2-135M-Instruct", "dtype": "float32", "threads": args.threads,
                                    "reps": args.reps, "times": times, "trl_orpo_times": trl_times,
                                    "trl_orpo_no_checkpointing_times": trl_plain_times,
                                    "peak_memory_bytes": memory, "figures": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
