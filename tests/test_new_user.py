"""What a new user meets first (issue 33): ``--version``, a bare ``generate``, "replaced" when a file is
replaced, printed paths, ``study --help``, sizes the model was not trained at, and a README whose links
and commands work as printed after its setup."""

from __future__ import annotations

import re
import shlex
import sys
from importlib import metadata
from pathlib import Path

import pytest
from helpers import assert_usage_error

from negprompt.interfaces.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").rglob("*.md"))
SMALL_STUDY = """\
name: first
model: shapes
steps: 3
seeds: [0]
pairs:
  - {group: noun, prompt: a red circle, negative: a hat}
"""


def test_version_names_the_installed_package(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out == f"negprompt {metadata.version('negprompt')}\n"


@pytest.mark.parametrize("argv", [["generate"], ["generate", "--steps", "2", "-q"], ["generate", "-n", "a hat"]])
def test_a_generate_without_a_prompt_asks_for_one_and_writes_nothing(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert_usage_error(main(argv), capsys, "give a prompt, e.g. negprompt generate 'a red circle'")
    assert list(tmp_path.iterdir()) == []  # no ./negprompt.png


def test_an_empty_prompt_still_draws_unconditionally(tmp_path, capsys):
    out = tmp_path / "free.png"
    assert main(["generate", "", "--steps", "2", "-q", "--out", str(out)]) == 0
    assert out.exists() and capsys.readouterr().out == f"wrote {out}\n"


def test_a_size_far_from_the_trained_one_is_drawn_with_a_warning(tmp_path, capsys):
    assert (
        main(["generate", "a red circle", "--width", "64", "--steps", "2", "-q", "--out", str(tmp_path / "w.png")]) == 0
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("negprompt: warning: 64×32 is 2× the area of the size this model was trained at (32×32")
    assert "drawn anyway (--size 32 draws at the trained size)" in err and len(err.splitlines()) == 1, err
    assert main(["generate", "a red circle", "--steps", "2", "-q", "--out", str(tmp_path / "t.png")]) == 0
    assert capsys.readouterr().err == ""  # the trained size: no word


def test_demo_says_replaced_when_it_replaces_its_files(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "2", "-q", "--out", str(out)]) == 0
    first = capsys.readouterr().out.splitlines()
    assert first[0].startswith(f"wrote {out / 'demo.png'} ") and first[1] == f"wrote {out / 'demo.json'}", first
    assert main(["demo", "--steps", "2", "-q", "--out", str(out)]) == 0
    again = capsys.readouterr().out.splitlines()
    assert again[0].startswith(f"replaced {out / 'demo.png'} ") and again[1] == f"replaced {out / 'demo.json'}"


def test_a_study_folder_given_with_a_slash_prints_its_table_without_a_double_slash(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "first.yaml").write_text(SMALL_STUDY)
    assert main(["study", "first.yaml", "--out", "study/", "-q"]) == 0
    out = capsys.readouterr().out
    assert "in study/results.csv" in out and "//" not in out, out


def test_study_help_lists_every_built_in_spec(capsys):
    with pytest.raises(SystemExit):
        main(["study", "--help"])
    text = re.sub(r"\s+", "", capsys.readouterr().out)  # argparse wraps lines, also at hyphens
    names = sorted(path.stem for path in (ROOT / "negprompt" / "studies").glob("*.yaml"))
    assert len(names) >= 5 and "abuilt-inone:" + ",".join(names) + "options:" in text, text


# ---------------------------------------------------------------- the README and docs/


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def anchors(markdown: Path) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings (lower case, punctuation dropped, spaces as -)."""
    text = re.sub(r"```.*?```", "", markdown.read_text(), flags=re.S)
    found, seen = set(), {}
    for heading in re.findall(r"^#+\s+(.*?)\s*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


@pytest.mark.parametrize("markdown", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(markdown):
    text = re.sub(r"```.*?```", "", markdown.read_text(), flags=re.S)  # code is not a link
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: …
            continue
        path, _, anchor = target.partition("#")
        destination = markdown.parent / path if path else markdown
        if not destination.exists():
            broken.append(target)
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(target)
    assert not broken, f"{markdown.relative_to(ROOT)}: {broken}"


def test_the_readme_setup_leaves_a_shell_where_its_commands_run_as_printed():
    """``negprompt …`` and ``accelerate launch …`` lines run as printed once the setup's venv is active,
    which the README's first block does; the venv holds both programs."""
    first = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1).splitlines()
    assert first[0].startswith("bash scripts/setup.sh") and first[-1].startswith("source .venv/bin/activate"), first
    launch = README.read_text().split("## Studies on several processes")[1].split("```")[0]
    assert "source\n.venv/bin/activate" in launch or "source .venv/bin/activate" in launch
    bin_folder = Path(sys.executable).parent
    assert (bin_folder / "negprompt").exists() and (bin_folder / "accelerate").exists()


def train_commands(text: str) -> list[list[str]]:
    """The ``negprompt train …`` commands in ``text`` (code blocks and inline code, lines joined)."""
    text = text.replace("\\\n", " ")
    found = re.findall(r"negprompt train [^`#\n]*(?:\n(?!\n)[^`#\n]*)*", text)
    return [shlex.split(" ".join(command.split())) for command in found]


def without_out(words: list[str]) -> list[str]:
    index = words.index("--out")
    return words[:index] + words[index + 2 :]


def test_the_readme_train_commands_are_the_documented_runs():
    """Each ``train`` line of the README's command block is a run docs/training.md documents and times
    (the same options; the folder may differ)."""
    block = re.search(r"## Command line\s+```bash\n(.*?)```", README.read_text(), flags=re.S).group(1)
    printed = [without_out(words) for words in train_commands(block)]
    documented = [without_out(words) for words in train_commands((ROOT / "docs" / "training.md").read_text())]
    assert len(printed) == 2 and all(words in documented for words in printed), (printed, documented)


def test_a_repeated_seed_option_is_refused_instead_of_dropping_the_first(tmp_path, capsys):
    out = tmp_path / "x.png"
    argv = ["generate", "a red circle", "--seed", "1", "--seed", "2", "--out", str(out)]
    assert_usage_error(main(argv), capsys, "--seed given twice; give every value in one")
    assert not out.exists()
