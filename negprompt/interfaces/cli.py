"""The ``negprompt`` command: its parser (the built-in commands of :mod:`negprompt.interfaces.commands`
and the commands of installed plugins) and :func:`main` with its error handling.

Every error a user can cause ends in one line on stderr, ``negprompt: error: …``, exit code 2,
and no output file; it is found before any long work starts, and ``--help`` and the parser's errors
come without importing torch or diffusers. A failure of the machine during the work (a full disk)
ends in one line ``negprompt: failed: …`` and exit code 1.

Commands are built from :mod:`negprompt.interfaces.options` (shared flags, checks, settings).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from negprompt.errors import NegpromptError, one_line
from negprompt.interfaces.commands import register_builtin_commands
from negprompt.interfaces.options import CommandError, CommandResult

EXIT_USAGE = 2  # the input: a one-line message, nothing written
EXIT_FAILED = 1  # the machine failed during the work (e.g. a full disk): a one-line message
COMMANDS_GROUP = "negprompt.commands"  # entry points: register(subparsers) functions of plugins


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors as one :class:`CommandError` line instead of a usage block."""

    def error(self, message: str):  # type: ignore[override]
        raise CommandError(f"{message} (see {self.prog} --help)")


# ---------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``negprompt``: the built-in commands, then the plugins' (:func:`add_plugin_commands`)."""
    from negprompt.version import __version__

    parser = OneLineParser(prog="negprompt", description="Controllable, explainable negative prompts.")
    parser.add_argument("--version", action="version", version=f"negprompt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_builtin_commands(commands)
    add_plugin_commands(commands)
    return parser


def add_plugin_commands(commands: argparse._SubParsersAction) -> None:
    """Commands of installed packages: each entry point of the group ``negprompt.commands`` names a
    ``register(subparsers)`` function that adds its subcommands, each with a ``handler`` default.

    The bundled shapes world's ``train``, ``evaluate``, ``bench-methods`` and ``edit-sweep`` come this way.
    """
    from importlib.metadata import entry_points

    seen = set()
    for point in sorted(entry_points(group=COMMANDS_GROUP), key=lambda p: (p.name, p.value)):
        if point.name in seen:  # the same distribution found twice on sys.path
            continue
        seen.add(point.name)
        try:
            register = point.load()
        except Exception as error:  # a broken plugin must not take the other commands down
            print(f"negprompt: warning: commands {point.name!r} ({point.value}) not loaded: {error}", file=sys.stderr)
            continue
        register(commands)


# ---------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; prints its warnings once it has succeeded; turns errors into one line and a code."""
    try:
        args = build_parser().parse_args(argv)
        outcome = args.handler(args)
        if not isinstance(outcome, CommandResult):
            return outcome  # a plain exit code
        for warning in outcome.warnings if outcome.code == 0 else ():
            print(f"negprompt: warning: {warning}", file=sys.stderr)
        return outcome.code
    except NegpromptError as error:
        print(f"negprompt: error: {one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("negprompt: interrupted", file=sys.stderr)
        return 130
    except OSError as error:  # the machine, not the input: a full disk, a vanished folder, an I/O error
        where = f": {error.filename}" if error.filename else ""
        print(
            f"negprompt: failed: {error.strerror or error}{where}; no half-written file is kept "
            "(study and train resume where they stopped)",
            file=sys.stderr,
        )
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
