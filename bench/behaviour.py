"""Teaching a behaviour to the default model: APOLLO-Mini vs APOLLO vs AdamW.

The behaviour (examples/restate/): every answer starts with "You asked about <topic>."
Pass = the greedy answer (24 new tokens) to a held-out prompt starts with "You asked about".
Drift = perplexity of 30 ordinary probe texts.

Each optimizer trains the same parameters (every 2-D decoder matrix with its optimizer,
norms with AdamW, embeddings frozen) from the same starting weights, one example per
step, with livetrain's context-frozen step, in fp32.

* Issue 4's check: one epoch over the 16 training conversations (16 steps).
  Targets: held-out pass rate before <= 10 %, after >= 80 %, probe perplexity rise <= 10 %.
* Issue 2's row: 30 steps (the 16 conversations, then 14 of them again), APOLLO-Mini vs
  AdamW, each at the best of 3 learning rates (by held-out loss: NLL of reference answers
  to the held-out prompts). Targets: loss <= 1.05x AdamW's, pass rate >= AdamW's.

APOLLO-Mini and AdamW runs are evaluated after step 16 (issue 4) and step 30 (issue 2);
APOLLO (rank 256, channel-wise) runs one epoch at one learning rate.

    .venv/bin/python bench/behaviour.py [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from livetrain.default_model import init_default
from livetrain.optim import Apollo, apollo_mini, apollo_param_groups
from livetrain.train import StepOptions, train_step
from livetrain.train.behaviour import (greedy_answers, heldout_loss, load_behaviour_set, pass_rate,
                                       probe_perplexity)

REPO = Path(__file__).resolve().parents[1]
LRS = (3e-5, 1e-4, 3e-4)
APOLLO_LR = 1e-4
EPOCH, STEPS = 16, 30


def make_optimizer(kind: str, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    groups = apollo_param_groups(model)  # decoder matrices; norms -> AdamW; embeddings frozen
    if kind == "apollo-mini":
        return apollo_mini(groups, lr=lr)
    if kind == "apollo":
        return Apollo(groups, lr=lr, rank=256, scale_type="channel")
    return torch.optim.AdamW([p for g in groups for p in g["params"]], lr=lr, weight_decay=0.0)


def evaluate(model, tokenizer, behaviour) -> dict:
    start = time.perf_counter()
    answers = greedy_answers(model, tokenizer, behaviour.heldout_prompts, max_new_tokens=24)
    return {"pass_rate": pass_rate(answers), "heldout_loss": heldout_loss(model, behaviour.heldout),
            "probe_ppl": probe_perplexity(model, tokenizer, behaviour.probe_texts),
            "answers": answers[:3], "eval_seconds": round(time.perf_counter() - start, 1)}


def run(kind, lr, steps, evaluate_at, model, tokenizer, behaviour, initial) -> dict:
    """Train from the initial weights; evaluate after each step count in `evaluate_at`."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(initial[name])
    optimizer = make_optimizer(kind, model, lr)
    out = {"optimizer": kind, "lr": lr, "losses": [], "train_seconds": 0.0}
    for step in range(steps):
        result = train_step(model, optimizer, [behaviour.train[step % len(behaviour.train)]],
                            StepOptions())
        assert result.applied, result.reason
        out["losses"].append(round(result.loss, 4))
        out["train_seconds"] += result.seconds
        if step + 1 in evaluate_at:
            out[f"after_{step + 1}"] = {**evaluate(model, tokenizer, behaviour),
                                        "train_seconds": round(out["train_seconds"], 1)}
            print(f"  {kind:12s} lr {lr:.0e} after {step + 1:2d} steps: "
                  f"pass {out[f'after_{step + 1}']['pass_rate']:.0%}, "
                  f"held-out loss {out[f'after_{step + 1}']['heldout_loss']:.3f}, "
                  f"probe ppl {out[f'after_{step + 1}']['probe_ppl']:.2f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model-dir", type=Path, default=REPO / ".cache" / "smollm2-135m-bf16")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "behaviour.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    model_dir = init_default(args.model_dir, dtype=torch.bfloat16, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    behaviour = load_behaviour_set(REPO / "examples" / "restate", tokenizer)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}

    before = evaluate(model, tokenizer, behaviour)
    print(f"before: pass {before['pass_rate']:.0%}, held-out loss {before['heldout_loss']:.3f}, "
          f"probe ppl {before['probe_ppl']:.2f}", flush=True)
    runs = [run(kind, lr, STEPS, (EPOCH, STEPS), model, tokenizer, behaviour, initial)
            for kind in ("apollo-mini", "adamw") for lr in LRS]
    runs.append(run("apollo", APOLLO_LR, EPOCH, (EPOCH,), model, tokenizer, behaviour, initial))

    def best(kind: str, at: int) -> dict:
        return min((r for r in runs if r["optimizer"] == kind), key=lambda r: r[f"after_{at}"]["heldout_loss"])

    print(f"\nIssue 4: one epoch ({EPOCH} examples), fp32, best lr per optimizer by held-out loss")
    print(f"{'optimizer':12s} {'lr':>6s} {'pass before':>11s} {'pass after':>10s} {'probe ppl rise':>14s} "
          f"{'held-out loss':>13s} {'train s':>7s}")
    epoch_rows = []
    for kind in ("apollo-mini", "apollo", "adamw"):
        r = best(kind, EPOCH)
        after = r[f"after_{EPOCH}"]
        rise = after["probe_ppl"] / before["probe_ppl"] - 1
        ok = before["pass_rate"] <= 0.10 and after["pass_rate"] >= 0.80 and rise <= 0.10
        epoch_rows.append({"optimizer": kind, "lr": r["lr"], "pass_before": before["pass_rate"],
                           "pass_after": after["pass_rate"], "probe_ppl_rise": rise,
                           "heldout_loss": after["heldout_loss"], "meets_targets": ok})
        print(f"{kind:12s} {r['lr']:6.0e} {before['pass_rate']:11.0%} {after['pass_rate']:10.0%} {rise:14.1%} "
              f"{after['heldout_loss']:13.3f} {after['train_seconds']:7.1f}"
              f"  {'ok' if ok else 'MISSES TARGET'}")

    mini, adamw = best("apollo-mini", STEPS), best("adamw", STEPS)
    loss_ratio = mini[f"after_{STEPS}"]["heldout_loss"] / adamw[f"after_{STEPS}"]["heldout_loss"]
    pass_ok = mini[f"after_{STEPS}"]["pass_rate"] >= adamw[f"after_{STEPS}"]["pass_rate"]
    print(f"\nIssue 2: {STEPS} steps from {len(behaviour.train)} examples, best of lr {LRS}")
    print(f"{'optimizer':12s} {'best lr':>7s} {'held-out loss':>13s} {'pass rate':>9s}")
    for r in (mini, adamw):
        print(f"{r['optimizer']:12s} {r['lr']:7.0e} {r[f'after_{STEPS}']['heldout_loss']:13.3f} "
              f"{r[f'after_{STEPS}']['pass_rate']:9.0%}")
    print(f"held-out loss ratio APOLLO-Mini / AdamW: {loss_ratio:.3f} (target <= 1.05): "
          f"{'ok' if loss_ratio <= 1.05 else 'MISSES TARGET'}; pass rate >= AdamW's: {'ok' if pass_ok else 'MISSES'}")
    seconds = time.perf_counter() - started
    print(f"total {seconds:.0f} s")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": "SmolLM2-135M-Instruct", "dtype": "float32", "threads": args.threads,
        "before": before, "epoch": epoch_rows,
        "thirty_steps": {"apollo_mini": {"lr": mini["lr"], **mini[f"after_{STEPS}"]},
                         "adamw": {"lr": adamw["lr"], **adamw[f"after_{STEPS}"]},
                         "heldout_loss_ratio": loss_ratio, "pass_rate_at_least_adamw": pass_ok},
        "runs": runs, "seconds": seconds}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
