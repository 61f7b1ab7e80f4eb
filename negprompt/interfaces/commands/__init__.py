"""The built-in commands of ``negprompt``, one module each (``study`` also holds ``merge`` and ``report``).

Every module of this package is a command module: its ``register(subparsers)`` adds its subcommands,
as a plugin's does (entry-point group ``negprompt.commands``), and its ``ORDER`` places them in
``negprompt --help``; its handlers import torch and the model code after their own checks. Adding a
built-in command is adding its module.
"""

from __future__ import annotations

import argparse
import pkgutil
from importlib import import_module

LAST = 1000  # the ORDER of a module that gives none


def register_builtin_commands(commands: argparse._SubParsersAction) -> None:
    """Adds the built-in commands, in the order of their modules' ``ORDER`` (then by name)."""
    modules = [import_module(f"{__name__}.{info.name}") for info in pkgutil.iter_modules(__path__)]
    for module in sorted(modules, key=lambda module: (getattr(module, "ORDER", LAST), module.__name__)):
        module.register(commands)
