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


def tiny_sd_files(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("how", ["header cut", "body cut", "header garbled", "emptied"])
def test_every_file_of_a_stable_diffusion_directory_damaged_in_turn(how, tiny_sd_dir, tmp_path, capsys):
    """Weights (UNet, VAE, text encoder), configs and tokenizer files of an SD directory: each damaged
    file gives one line and exit 2, or (a file the run does not need) a normal run."""
    files = tiny_sd_files(tiny_sd_dir)
    assert {p.parts[0] for p in files if p.suffix == ".safetensors"} == {"unet", "vae", "text_encoder"}
    for relative in files:
        model = tmp_path / f"model-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tiny_sd_dir, model)
        target = model / relative
        if how == "emptied":
            target.write_bytes(b"")
        else:
            damage(target, how)
        out = tmp_path / f"{relative.name}.png"
        argv = ["generate", "a photo of a cat", "--model", str(model), "--steps", "2", "--size", "32", "-q"]
        code = main(argv + ["--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert code in (0, 2), (relative, err)
        if code == 2:
            assert err.startswith("negprompt: error: ") and len(err.splitlines()) == 1, (relative, err)
            assert not out.exists()
        else:
            assert out.exists() and relative.suffix != ".safetensors", (relative, err)
