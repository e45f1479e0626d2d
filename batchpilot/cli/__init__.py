"""``batchpilot <command>``: one entry point; each command lives in its own module of this package.

Each command module defines ``add_parser(subparsers)`` and ``run(args) -> int``. Only the CLI sees
the whole run configuration: it maps flags onto the component dataclasses. Bad input raises
``ValueError`` (or ``FileNotFoundError``) anywhere below; here it becomes a one-line error and
exit code 2, with the traceback only under ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("plan", "prepare", "train", "sample", "generate", "serve", "sweep", "fit", "report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchpilot", description="Plan, train and run LLMs around the batch.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"batchpilot.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"batchpilot.cli.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError) as e:
        if args.debug:
            raise
        print(f"batchpilot {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"batchpilot {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
