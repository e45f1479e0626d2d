"""``batchpilot <command>``: one entry point; each command lives in its own module of this package.

Each command module defines ``add_parser(subparsers)`` and ``run(args) -> int``. Only the CLI sees
the whole run configuration: it maps flags onto the component dataclasses. Bad input raises
``ValueError`` (or ``FileNotFoundError``, ``PermissionError``, ...) anywhere below; here every error
becomes one line on stderr and a non-zero exit (2 for bad input and environment faults such as a full
disk or a held lock, 1 for an internal error), with the traceback only under ``--debug``, which may
stand before or after the command name.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from batchpilot.io import LockedError

COMMANDS = ("plan", "prepare", "train", "sample", "generate", "serve", "sweep", "fit", "report")
EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED = 2, 1, 130


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of ``command`` only: a command's module imports what its run needs (train's
    pulls in torch.distributed's tensor and FSDP modules, seconds of start-up that ``generate`` need not pay)."""
    parser = argparse.ArgumentParser(prog="batchpilot", description="Plan, train and run LLMs around the batch.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS if command is None else (command,):
        try:
            module = importlib.import_module(f"batchpilot.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"batchpilot.cli.{name}":
                raise
            continue
        module.add_parser(sub)
    for command_parser in sub.choices.values():
        # SUPPRESS: only a --debug written after the command sets the attribute, so one written before it holds.
        if "--debug" not in command_parser._option_string_actions:
            command_parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                        help="show tracebacks on errors")
    return parser


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def describe_os_error(e: OSError) -> str:
    """An OSError as one line naming the path: disk full, permission, missing file, ..."""
    path = e.filename if e.filename is not None else None
    where = f"{path}: " if path is not None else ""
    if e.errno == errno.ENOSPC:
        return f"{where or 'writing a file: '}no space left on device"
    if e.errno == errno.EDQUOT:
        return f"{where or 'writing a file: '}disk quota exceeded"
    if e.strerror:
        return f"{where}{e.strerror.lower()}"
    return one_line(str(e))


def describe(e: BaseException) -> tuple[str, int]:
    """(one-line message, exit code) for an error that reached the dispatcher."""
    if isinstance(e, OSError):
        # A subclass raised with a message of our own (FileNotFoundError("no run dir ...")) keeps it.
        if e.errno is None and e.args:
            return one_line(str(e.args[0])), EXIT_BAD_INPUT
        return describe_os_error(e), EXIT_BAD_INPUT
    if isinstance(e, UnicodeError):
        return f"not valid UTF-8 text ({one_line(str(e))})", EXIT_BAD_INPUT
    if isinstance(e, (ValueError, LockedError, OverflowError)):
        return one_line(str(e)) or type(e).__name__, EXIT_BAD_INPUT
    if isinstance(e, MemoryError):
        return "out of memory (the input or the requested sizes are too large)", EXIT_BAD_INPUT
    return f"internal error: {type(e).__name__}: {one_line(str(e))} (rerun with --debug for the traceback)", \
        EXIT_INTERNAL


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    named = next((a for a in argv if not a.startswith("-")), None)  # the only option before it is --debug
    parser = build_parser(named if named in COMMANDS else None)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"batchpilot {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # every error ends as one line; the traceback only under --debug
        if args.debug:
            raise
        message, code = describe(e)
        print(f"batchpilot {args.command}: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
