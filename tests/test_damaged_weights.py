"""Every weight file of the bundled model, truncated or corrupted in turn: one line, exit 2, no output."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import assert_usage_error

from negprompt.interfaces.cli import main
from negprompt.models.loading import BUNDLED_PATH

WEIGHTS = sorted(p.relative_to(BUNDLED_PATH) for p in BUNDLED_PATH.rglob("*.safetensors"))


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "header cut":
        path.write_bytes(data[:4])
    elif how == "body cut":
        path.write_bytes(data[: len(data) // 2])
    else:  # the header's JSON overwritten
        path.write_bytes(data[:8] + b"{" * 64 + data[72:])


def test_the_bundled_model_has_weights_to_damage():
    assert {p.parts[0] for p in WEIGHTS} == {"unet", "text_encoder"}


@pytest.mark.parametrize("how", ["header cut", "body cut", "header garbled"])
@pytest.mark.parametrize("weights", WEIGHTS, ids=str)
def test_damaged_weights_are_one_line(weights, how, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(BUNDLED_PATH, model)
    damage(model / weights, how)
    out = tmp_path / "out.png"
    code = main(["generate", "a red circle", "--model", str(model), "--steps", "2", "-q", "--out", str(out)])
    assert_usage_error(code, capsys, f"cannot load {weights.parts[0]}", out)
