"""Every command of the README's "Command line" block runs, shortened (fewer steps, seeds, images).

Shortening only appends options (argparse keeps the last value given), so the command as printed is
what is parsed first; the study of the built-in spec is replaced by a two-pair spec of the same
model, and the Stable Diffusion path by the tiny SD (with --device cpu where CUDA is absent). The
``negprompt serve`` commands of its "Web page" block load their model and build their limits as
printed, on a free port, with a stand-in for the serving itself (tests/test_web_browser.py serves).
"""

from __future__ import annotations

import re
import shlex
import socket
from pathlib import Path

import pytest
import torch

from negprompt.interfaces.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"
SHORTER = {
    "generate": ["--steps", "8"],
    "attend": ["--steps", "8"],
    "edit": ["--steps", "8", "--seed", "0-1"],
    "edit-sweep": ["--steps", "6", "--seed", "0", "--start-every", "3"],
    "bench-methods": ["--steps", "3", "--images", "1", "--negative", "a hat"],
    "evaluate": ["--steps", "3", "--images", "1"],
    "train": ["--samples", "16", "--batch-size", "8", "--warmup-steps", "1", "--threads", "1"],
    "study": [],
    "report": [],
}
SMALL_STUDY = """\
name: readme
model: shapes
steps: 3
seeds: [0]
pairs:
  - {group: noun, prompt: a red circle, negative: a hat}
  - {group: adjective, prompt: a blue square, negative: striped}
"""


def readme_commands(heading: str = "## Command line") -> list[list[str]]:
    """The ``negprompt …`` commands of the README's block under ``heading``, as argument lists."""
    text = README.read_text()
    block = re.search(re.escape(heading) + r"\s+```bash\n(.*?)```", text, flags=re.S).group(1)
    block = block.replace("\\\n", " ")
    commands = []
    for line in block.splitlines():
        line = line.split(" #")[0].strip()
        for part in filter(None, (p.strip() for p in line.split("&&"))):
            words = shlex.split(part)
            assert words[0] == "negprompt", part
            commands.append(words[1:])
    return commands


def shortened(words: list[str], tiny_sd_dir: Path, spec: Path, stand_ins: dict[str, str] | None = None) -> list[str]:
    """The command with the tiny models in place of real checkpoints (``stand_ins``: placeholder → path,
    also inside ``TOKEN=placeholder``), shortened."""
    stand_ins = {"/path/to/stable-diffusion-v1-5": str(tiny_sd_dir), **(stand_ins or {})}
    for placeholder, path in stand_ins.items():
        words = [w.replace(placeholder, path) for w in words]
    command = words[0]
    if command == "study":
        words = ["study", str(spec), *words[2:]]
    if "--from-png" in words:
        return words
    extra = list(SHORTER[command])
    if any(path in words for path in stand_ins.values()):
        extra += ["--width", "32", "--height", "32"]
        if "cuda" in words and not torch.cuda.is_available():
            extra += ["--device", "cpu"]
    words = list(words)
    for flag, value in zip(extra[::2], extra[1::2]):  # an option the command already gives takes the short value
        if flag in words:
            words[words.index(flag) + 1] = value
        else:
            words += [flag, value]
    return words


def test_the_readme_has_the_commands_we_check():
    commands = {words[0] for words in readme_commands()}
    assert commands == set(SHORTER), commands


def test_every_readme_command_runs(
    tiny_sd_dir, tiny_sdxl_dir, tiny_sd3_dir, tiny_flux_dir, tmp_path, monkeypatch, capsys
):
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "readme-study.yaml"
    spec.write_text(SMALL_STUDY)
    embedding = tmp_path / "easynegative-xl.safetensors"  # the tiny SDXL's widths: 32 and 32
    save_file({"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 32)}, str(embedding))
    stand_ins = {
        "/path/to/stable-diffusion-xl-base-1.0": str(tiny_sdxl_dir),
        "/path/to/easynegative-xl.safetensors": str(embedding),
        "/path/to/stable-diffusion-3-medium-diffusers": str(tiny_sd3_dir),
        "/path/to/FLUX.1-dev": str(tiny_flux_dir),
    }
    for words in readme_commands():
        argv = shortened(words, tiny_sd_dir, spec, stand_ins)
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 0, f"negprompt {shlex.join(argv)} → {code}: {err}"
    assert (tmp_path / "out" / "again.png").exists() and (tmp_path / "study" / "report.md").exists()


@pytest.mark.parametrize(
    "words, expected",
    [
        (["generate", "x", "--steps", "30"], ["generate", "x", "--steps", "8"]),
        (["edit", "x", "--seed", "0-7"], ["edit", "x", "--seed", "0-1", "--steps", "8"]),  # a seed given once
    ],
)
def test_shortening_keeps_the_command_and_gives_its_options_their_short_values(words, expected, tiny_sd_dir, tmp_path):
    assert shortened(words, tiny_sd_dir, tmp_path) == expected


def test_every_readme_serve_command_starts(tiny_sd_dir, monkeypatch, capsys):
    from negprompt.interfaces.web import app

    served = []
    monkeypatch.setattr(app, "serve", lambda session, host, port, limits: served.append((session, host, limits)))
    commands = readme_commands("### Web page")
    assert commands and {words[0] for words in commands} == {"serve"}
    for words in commands:
        argv = [w.replace("/path/to/stable-diffusion-v1-5", str(tiny_sd_dir)) for w in words]
        if "cuda" in argv and not torch.cuda.is_available():
            argv += ["--device", "cpu"]
        with socket.socket() as probe:  # the printed port may be taken on this machine
            probe.bind(("127.0.0.1", 0))
            argv += ["--port", str(probe.getsockname()[1])]
        assert main(argv) == 0, f"negprompt {shlex.join(argv)}: {capsys.readouterr().err}"
    hosts = [host for _, host, _ in served]
    assert hosts == ["127.0.0.1", "127.0.0.1", "0.0.0.0"] and served[2][2].steps == 50
    assert "warning: serving on 0.0.0.0" in capsys.readouterr().err
