"""Plugins through entry points: CLI commands (``negprompt.commands``) and region finders
(``negprompt.region_finders``), as the bundled shapes world uses them."""

from __future__ import annotations

import ast
import importlib.metadata
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pytest

import negprompt.analysis.regions as regions
from negprompt.analysis.edit import region_source_for
from negprompt.analysis.regions import GROUP, RegionFinder, RegionFinderError, declared_finder, load_finder
from negprompt.errors import NegpromptError
from negprompt.interfaces.cli import COMMANDS_GROUP, build_parser, main

SHAPES_COMMANDS = ("train", "evaluate", "bench-methods", "edit-sweep")


def fake_entry_points(points: dict[str, list[EntryPoint]]):
    real = importlib.metadata.entry_points

    def entry_points(**selection):
        group = selection.get("group")
        return points[group] if group in points else real(**selection)

    return entry_points


def hello_register(commands) -> None:
    hello = commands.add_parser("hello", help="says hello")
    hello.set_defaults(handler=lambda args: print("hello") or 0)


def test_the_shapes_commands_come_from_their_entry_point():
    points = {p.name: p.value for p in importlib.metadata.entry_points(group=COMMANDS_GROUP)}
    assert points["shapes"] == "negprompt.shapes.commands:register"
    choices = build_parser()._subparsers._group_actions[0].choices
    assert set(SHAPES_COMMANDS) <= set(choices)


def test_a_plugin_adds_a_command_and_a_broken_one_is_skipped_with_a_warning(monkeypatch, capsys):
    module = sys.modules[__name__].__name__
    points = [
        EntryPoint("broken", "no_such_module_here:register", COMMANDS_GROUP),
        EntryPoint("hello", f"{module}:hello_register", COMMANDS_GROUP),
    ]
    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points({COMMANDS_GROUP: points}))
    assert main(["hello"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "hello\n" and "commands 'broken'" in captured.err and "not loaded" in captured.err
    # the shapes plugin is not installed here: no such command, one line, exit 2
    assert main(["train", "--out", "x"]) == 2
    assert "invalid choice: 'train'" in capsys.readouterr().err


def test_importing_the_shapes_commands_is_cheap():
    """Module-level imports of negprompt/shapes/commands.py: the standard library and the CLI's options only."""
    path = Path(__file__).resolve().parent.parent / "negprompt" / "shapes" / "commands.py"
    tree = ast.parse(path.read_text())
    top = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    names = {alias.name for node in top if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in top if isinstance(node, ast.ImportFrom)}
    assert names <= {"__future__", "argparse", "pathlib", "negprompt.interfaces.options"}, names


def test_the_bundled_model_declares_the_shapes_finder():
    from negprompt.session import Session
    from negprompt.shapes.regions import ShapesRegions

    bundled = Session().components
    finder = declared_finder(bundled)
    assert isinstance(finder, ShapesRegions) and isinstance(finder, RegionFinder)
    assert region_source_for(bundled, "hat", "auto", (32, 32))[0] == "detector"
    assert region_source_for(bundled, "hat", "attention", (32, 32)) == ("attention", None)
    assert region_source_for(bundled, "cat", "auto", (32, 32)) == ("attention", None)  # a word it does not know
    assert region_source_for(bundled, "hat", "auto", (64, 64)) == ("attention", None)  # not the world's size
    assert region_source_for(bundled, "hat", "auto", (32, 64)) == ("attention", None)  # nor a non-square image
    with pytest.raises(NegpromptError, match=r"only for the bundled world's things \(hat, sun, striped, blurry\)"):
        region_source_for(bundled, "cat", "detector", (32, 32))


def test_in_memory_components_declare_a_finder(tiny_sd):
    from dataclasses import replace

    assert declared_finder(tiny_sd) is None
    assert region_source_for(tiny_sd, "hat", "auto", (32, 32)) == ("attention", None)
    declaring = replace(tiny_sd, declarations={"region_finder": "shapes"})
    assert declared_finder(declaring).covers(declaring, "hat", (32, 32)) is False  # tiny SD has a VAE
    with pytest.raises(RegionFinderError, match="not installed"):
        declared_finder(replace(tiny_sd, declarations={"region_finder": "nowhere"}))


def test_a_finder_from_another_package(monkeypatch):
    class Everywhere:
        domain = "the test world"
        things = ("thing",)

        def covers(self, components, word, size):
            return word in self.things

        def find(self, image, word):
            return np.ones(image.shape[:2], bool), True

    monkeypatch.setattr(sys.modules[__name__], "Everywhere", Everywhere, raising=False)
    points = [EntryPoint("everywhere", f"{__name__}:Everywhere", GROUP)]
    monkeypatch.setattr(regions, "entry_points", fake_entry_points({GROUP: points}))
    with pytest.raises(RegionFinderError, match="not installed.*installed: everywhere"):
        load_finder("shapes")
    region, present = load_finder("everywhere").find(np.zeros((4, 4, 3)), "thing")
    assert present and region.all()


def test_the_sweep_needs_a_region_finder(tiny_sd):
    from negprompt.analysis.sweep import SweepSettings, run_sweep

    settings = SweepSettings((("a photo of a woman", "red glasses"),), (0,), (0,))
    with pytest.raises(RegionFinderError, match="names none"):
        run_sweep(settings, tiny_sd, progress=False)


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "-q"],
        ["evaluate", "--images", "1", "-q"],
        ["bench-methods", "--images", "1", "-q"],
        ["edit-sweep", "--pair", "a red circle->a hat", "-q"],
    ],
)
def test_shapes_commands_check_their_output_folder_first(argv, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code = main([*argv, "--out", str(blocker / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "is a file, not a folder" in err, err
