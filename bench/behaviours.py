"""Teaching power: the behaviours of examples/behaviours/, each taught from its training
examples through the served API, side by side with full fine-tuning of a copy.

For each behaviour, from the default model's untrained weights:

* ``sft``: `livetrain serve` at its defaults (or the flags below); the training examples
  posted to /train as (prompt, wanted answer), SFT, --batch-size examples a step, --epochs
  passes in the file's order;
* ``orpo``: the same server; each example posted as (prompt, wanted answer, the model's
  own greedy answer to that prompt before teaching), ORPO;
* ``adamw``: the reference: a copy fine-tuned offline in plain PyTorch, every parameter,
  torch AdamW (--adamw-lr, no weight decay, gradient clipped to norm 1, fp32 weights, the
  loss on the answer's tokens only), on the same examples in the same order and batches,
  saved in bf16 and served by plain vLLM with the same flags.

Each is evaluated the same way, through vLLM's OpenAI API: greedy chat answers
(--max-tokens) to the held-out prompts, judged by the behaviour's judge; to the
counter-scenario's prompts where there is one, judged by its counter judge; and the
probe texts' mean log-prob per token (vLLM's echoed prompt log-probs): drift is its
change from the untrained model. Between behaviours and configurations the livetrain
server rolls back to generation 0 (the untrained files), and the probe shows it did.

    .venv/bin/python bench/behaviours.py [--configs sft,orpo,adamw] [--behaviours NAME,...]
        [--epochs 2] [--batch-size 1] [--lr LR] [--train-modules REGEX] [--warmup-steps N]
        [--orpo-lambda L]
        [--adamw-lr 5e-5] [--out bench/results/behaviours.json]

Prints a table and writes bench/results/behaviours.json (with every answer).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import httpx
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import add_model_argument, fresh_model_copy, plain_vllm, wait_until_healthy  # noqa: E402
from livetrain.client import TrainingClient  # noqa: E402
from livetrain.default_model import init_default  # noqa: E402
from livetrain.demo import ask  # noqa: E402
from livetrain.options import DEFAULT_TRAIN_MODULES, DEFAULT_WARMUP_STEPS, TrainerOptions  # noqa: E402
from livetrain.serve import LiveServer, ServeOptions  # noqa: E402
from livetrain.train.behaviour import Behaviour, load_behaviours, pass_rate  # noqa: E402
from livetrain.train.data import parse_record  # noqa: E402
from livetrain.train.epochs import batches, run_epochs  # noqa: E402

SUITE = REPO / "examples" / "behaviours"
SERVED_NAME = "behaviours"
VLLM_ARGS = ("--enforce-eager", "--max-model-len", "2048", "--served-model-name", SERVED_NAME)
CONFIGS = ("sft", "orpo", "adamw")
# Targets of issue 24, checked per behaviour on the `sft` configuration (livetrain's defaults).
TARGET_PASS, TARGET_COUNTER_CHANGE, TARGET_TEACH_S = 0.80, -0.10, 120.0


# ---- evaluation (the same for every configuration) ------------------------------------

def answers(base_url: str, prompts: Sequence[str], max_tokens: int) -> list[str]:
    """Greedy chat answers to user turns, all in flight at once."""
    return ask(base_url, [[{"role": "user", "content": p}] for p in prompts], max_tokens, model=SERVED_NAME)


def probe_logprob(base_url: str, texts: Sequence[str]) -> float:
    """Mean log-prob per token of the probe texts (every token after each text's first)."""
    values: list[float] = []
    for text in texts:
        reply = httpx.post(base_url + "/v1/completions", timeout=300, json={
            "model": SERVED_NAME, "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 0})
        reply.raise_for_status()
        values += [v for v in reply.json()["choices"][0]["logprobs"]["token_logprobs"] if v is not None]
    return sum(values) / len(values)


def evaluate(base_url: str, behaviour: Behaviour, max_tokens: int) -> dict[str, Any]:
    """Held-out and counter-scenario pass rates (with the answers) and the probe's log-prob."""
    replies = answers(base_url, behaviour.heldout + behaviour.counter, max_tokens)
    heldout, counter = replies[:len(behaviour.heldout)], replies[len(behaviour.heldout):]
    result = {"heldout_pass": pass_rate(heldout, behaviour.judge), "probe_logp": probe_logprob(base_url, behaviour.probe),
              "heldout_answers": heldout}
    if behaviour.counter_judge is not None:
        result.update(counter_pass=pass_rate(counter, behaviour.counter_judge), counter_answers=counter)
    return result


# ---- livetrain: sft and orpo through /train ----------------------------------------------

def preference_records(behaviour: Behaviour, own_answers: Sequence[str]) -> list[dict]:
    """(prompt, wanted answer, the model's own answer) for each training example."""
    return [{"prompt": record["messages"][:-1], "chosen": record["messages"][-1:],
             "rejected": [{"role": "assistant", "content": own}]}
            for record, own in zip(behaviour.train, own_answers)]


def teach(client: TrainingClient, records: Sequence[dict], epochs: int, batch_size: int,
          options: dict[str, Any]) -> dict[str, Any]:
    """Post the records to /train, batch by batch, epoch by epoch; what it did and how long it took."""
    started = time.perf_counter()
    summary = run_epochs(records, lambda batch: client.train(batch, **options), epochs=epochs,
                         batch_size=batch_size, progress=False)
    return {"teach_s": time.perf_counter() - started, "steps": summary.steps, "applied": summary.applied,
            "refusals": summary.refusals, "first_loss": summary.first_loss, "last_loss": summary.last_loss}


def run_livetrain(args: argparse.Namespace, behaviours: Sequence[Behaviour], configs: Sequence[str],
                  results: dict[str, dict], save: Callable[[], None]) -> None:
    """Every behaviour on one `livetrain serve`, rolled back to the untrained files after each
    configuration; fills ``results[name]["before"]`` and ``results[name][config]``, calling
    ``save`` after each."""
    model_dir = fresh_model_copy(args.model, f"bench-behaviours-{args.port}")
    trainer = TrainerOptions(lr=args.lr, train_modules=args.train_modules, warmup_steps=args.warmup_steps)
    step_options = {} if args.orpo_lambda is None else {"orpo_lambda": args.orpo_lambda}
    options = ServeOptions(model_dir=model_dir, trainer=trainer, port=args.port, vllm_args=VLLM_ARGS)
    with LiveServer(options, say=lambda line: None) as server, \
            TrainingClient(server.base_url, tokenizer=model_dir) as client:
        base_url = server.base_url
        for behaviour in behaviours:
            row = results.setdefault(behaviour.name, {})
            row["before"] = evaluate(base_url, behaviour, args.max_tokens)
            for config in configs:
                if config == "orpo":
                    started = time.perf_counter()
                    own = answers(base_url, [r["messages"][0]["content"] for r in behaviour.train], args.max_tokens)
                    records, own_answers_s = preference_records(behaviour, own), time.perf_counter() - started
                else:
                    records, own_answers_s = behaviour.train, 0.0
                taught = teach(client, records, args.epochs, args.batch_size, step_options)
                after = evaluate(base_url, behaviour, args.max_tokens)
                client.rollback(0)
                row[config] = {**taught, "own_answers_s": own_answers_s, "after": after,
                               "probe_logp_after_rollback": probe_logprob(base_url, behaviour.probe)}
                report(behaviour, config, row["before"], row[config])
                save()


# ---- the reference: full fine-tuning with AdamW, served by plain vLLM ---------------------

def fine_tune_adamw(base_dir: Path, out_dir: Path, records: Sequence[dict], epochs: int, batch_size: int,
                    lr: float) -> dict[str, Any]:
    """Fine-tune every parameter of a copy of ``base_dir`` into ``out_dir`` (bf16 on disk)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.train()
    examples = [parse_record(record, tokenizer) for record in records]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for batch in batches(examples, batch_size) * epochs:
        optimizer.zero_grad(set_to_none=True)
        tokens = sum(len(ex.continuation_ids) for ex in batch)  # token-weighted mean, as livetrain's SFT
        loss_sum = 0.0
        for ex in batch:
            ids = torch.tensor([ex.context_ids + ex.continuation_ids])
            logits = model(input_ids=ids).logits[0, len(ex.context_ids) - 1:-1]  # [T_cont, V]
            loss = F.cross_entropy(logits.float(), torch.tensor(ex.continuation_ids), reduction="sum") / tokens
            loss.backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss_sum)
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.copytree(base_dir, out_dir, ignore=shutil.ignore_patterns(".livetrain*", "*.safetensors"))
    state = model.state_dict()
    with safe_open(base_dir / "model.safetensors", "pt") as stored:  # the tied embedding once
        names = list(stored.keys())
    save_file({name: state[name].to(torch.bfloat16).contiguous() for name in names},
              out_dir / "model.safetensors", metadata={"format": "pt"})
    return {"train_s": time.perf_counter() - started, "steps": len(losses), "applied": len(losses),
            "first_loss": losses[0], "last_loss": losses[-1]}


def evaluate_plain(model_dir: Path, port: int, behaviour: Behaviour, max_tokens: int) -> dict[str, Any]:
    log = model_dir.parent / f"{model_dir.name}-vllm.log"
    with plain_vllm(model_dir, port, log, VLLM_ARGS) as process:
        wait_until_healthy(process, port, log)
        return evaluate(f"http://127.0.0.1:{port}", behaviour, max_tokens)


def run_adamw(args: argparse.Namespace, behaviours: Sequence[Behaviour], results: dict[str, dict],
              save: Callable[[], None]) -> None:
    """Fine-tune and serve a copy per behaviour; fills ``results[name]["adamw"]`` (and
    ``"before"`` from the untrained model, where the livetrain run did not), calling
    ``save`` after each."""
    base_dir = init_default(args.model, dtype=torch.bfloat16)
    work = REPO / ".cache" / f"bench-behaviours-adamw-{args.port}"
    work.mkdir(parents=True, exist_ok=True)
    for behaviour in behaviours:
        row = results.setdefault(behaviour.name, {})
        if "before" not in row:
            row["before"] = evaluate_plain(base_dir, args.port, behaviour, args.max_tokens)
        trained = work / behaviour.name
        tuned = fine_tune_adamw(base_dir, trained, behaviour.train, args.epochs, args.batch_size, args.adamw_lr)
        row["adamw"] = {**tuned, "after": evaluate_plain(trained, args.port, behaviour, args.max_tokens)}
        shutil.rmtree(trained)
        report(behaviour, "adamw", row["before"], row["adamw"])
        save()


# ---- reporting ---------------------------------------------------------------------------

def figures(before: dict, run: dict) -> dict[str, Any]:
    """One table row's numbers: pass rates before and after, counter change, probe drift."""
    after = run["after"]
    row = {"heldout_before": before["heldout_pass"], "heldout_after": after["heldout_pass"],
           "probe_drift": after["probe_logp"] - before["probe_logp"], "steps": run["steps"],
           "applied": run["applied"], "seconds": run.get("teach_s", run.get("train_s"))}
    if "counter_pass" in after:
        row.update(counter_before=before["counter_pass"], counter_after=after["counter_pass"])
    return row


def report(behaviour: Behaviour, config: str, before: dict, run: dict) -> None:
    row = figures(before, run)
    counter = (f", counter {row['counter_before']:.0%} -> {row['counter_after']:.0%}"
               if "counter_after" in row else "")
    print(f"  {behaviour.name:14s} {config:6s} held-out {row['heldout_before']:.0%} -> {row['heldout_after']:.0%}"
          f"{counter}, probe drift {row['probe_drift']:+.3f} nats/token, {row['applied']}/{row['steps']} steps "
          f"applied, {row['seconds']:.0f} s", flush=True)


def print_table(behaviours: Sequence[Behaviour], results: dict[str, dict], configs: Sequence[str]) -> None:
    print(f"\n{'behaviour':14s} {'config':6s} {'held-out':>14s} {'counter':>14s} {'drift':>7s} "
          f"{'steps':>6s} {'seconds':>7s}")
    for behaviour in behaviours:
        row = results[behaviour.name]
        for config in configs:
            f = figures(row["before"], row[config])
            counter = (f"{f['counter_before']:.0%} -> {f['counter_after']:.0%}" if "counter_after" in f else "")
            print(f"{behaviour.name:14s} {config:6s} {f['heldout_before']:>5.0%} -> {f['heldout_after']:>4.0%} "
                  f"{counter:>14s} {f['probe_drift']:+7.3f} {f['applied']:>3d}/{f['steps']:<2d} {f['seconds']:7.0f}")


def target_checks(behaviours: Sequence[Behaviour], results: dict[str, dict]) -> dict[str, dict[str, bool]]:
    """Per behaviour, the issue's targets for livetrain's defaults (``sft``) that this run can check."""
    checks: dict[str, dict[str, bool]] = {}
    for behaviour in behaviours:
        row = results.get(behaviour.name, {})
        if "sft" not in row:
            continue
        sft = figures(row["before"], row["sft"])
        check = {"heldout_pass_at_least_80": sft["heldout_after"] >= TARGET_PASS,
                 "teach_at_most_120_s": sft["seconds"] <= TARGET_TEACH_S}
        if "counter_after" in sft:
            check["counter_change_at_least_minus_10"] = (
                sft["counter_after"] - sft["counter_before"] >= TARGET_COUNTER_CHANGE - 1e-9)
        if "adamw" in row:
            adamw = figures(row["before"], row["adamw"])
            check["heldout_pass_at_least_adamw"] = sft["heldout_after"] >= adamw["heldout_after"]
            check["drift_at_most_adamw"] = abs(sft["probe_drift"]) <= abs(adamw["probe_drift"])
        checks[behaviour.name] = check
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_argument(parser)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--behaviours", help="comma-separated names (default: every folder of the suite)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--lr", type=float, help="livetrain serve's --lr (default: its default)")
    parser.add_argument("--train-modules", default=DEFAULT_TRAIN_MODULES,
                        help="livetrain serve's --train-modules (default: its default)")
    parser.add_argument("--warmup-steps", type=int, default=DEFAULT_WARMUP_STEPS,
                        help=f"livetrain serve's --warmup-steps (default: its default, {DEFAULT_WARMUP_STEPS})")
    parser.add_argument("--orpo-lambda", type=float, help="/train's orpo_lambda (default: the server's)")
    parser.add_argument("--adamw-lr", type=float, default=5e-5, help="the reference's learning rate (default: 5e-5)")
    parser.add_argument("--max-tokens", type=int, default=96, help="new tokens per evaluated answer (default: 96)")
    parser.add_argument("--port", type=int, default=8193,
                        help="the servers' port; it names the work folders under .cache, so runs on "
                             "different ports can go side by side (default: 8193)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "behaviours.json")
    args = parser.parse_args()
    configs = [c for c in CONFIGS if c in args.configs.split(",")]
    behaviours = load_behaviours(SUITE)
    if args.behaviours:
        wanted = args.behaviours.split(",")
        behaviours = [b for b in behaviours if b.name in wanted]
    started = time.perf_counter()
    results: dict[str, dict] = {}

    def save() -> None:
        """What is measured so far, written at once (an interrupted run keeps it)."""
        write_results(args, configs, behaviours, results, time.perf_counter() - started)

    livetrain_configs = [c for c in configs if c != "adamw"]
    if livetrain_configs:
        run_livetrain(args, behaviours, livetrain_configs, results, save)
    if "adamw" in configs:
        run_adamw(args, behaviours, results, save)
    print_table(behaviours, results, configs)
    for name, check in target_checks(behaviours, results).items():
        missed = [k for k, ok in check.items() if not ok]
        print(f"{name:14s} targets (sft): {'all met' if not missed else 'missed: ' + ', '.join(missed)}")
    print(f"total {time.perf_counter() - started:.0f} s\nwrote {args.out}")


def write_results(args: argparse.Namespace, configs: Sequence[str], behaviours: Sequence[Behaviour],
                  results: dict[str, dict], seconds: float) -> None:
    """The JSON of every measured configuration (with the answers) and the targets checked."""
    measured = {}
    for b in behaviours:
        row = results.get(b.name, {})
        if "before" in row:
            measured[b.name] = {"kind": b.kind, **row, "figures": {
                c: figures(row["before"], row[c]) for c in configs if c in row}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": "SmolLM2-135M-Instruct", "configs": configs, "conditions": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "behaviours": measured, "targets": target_checks(behaviours, results),
        "seconds": seconds}, indent=2))


if __name__ == "__main__":
    main()
