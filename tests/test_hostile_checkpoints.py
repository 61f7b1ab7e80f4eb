"""Hostile training checkpoints, output paths and temporaries left by a kill (issue 33, in part).

Every hostile input is made here, from a good one: a truncated, pickled or foreign checkpoint, one with NaN
weights or an edited state.json, an output through a loop of symbolic links or with too long a name, a PNG
killed mid-write. Each ends in one line and exit code 2 (or ``failed:`` and 1 for a full disk), with no
traceback, nothing good replaced and nothing left behind. The training tests build the bundled architecture
but train one step or none. Hostile job folders and study tables are in test_hostile_jobs.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_usage_error
from test_hostile_jobs import no_temporaries, replace_with_folder

from negprompt.files import write_atomically
from negprompt.interfaces.cli import main

# ---------------------------------------------------------------- training checkpoints


TRAIN = ["--samples", "16", "--batch-size", "8", "-q"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint at step 0 of what ``train --out X --samples 16 --batch-size 8`` trains, and a log line."""
    from negprompt.shapes.training import LOG_FILE, TrainConfig, Trainer

    folder = tmp_path_factory.mktemp("train") / "run"
    Trainer(TrainConfig(samples=16, batch_size=8), folder).save_checkpoint()
    (folder / LOG_FILE).write_text('{"step": 0, "note": "before"}\n')
    return folder


def damaged(folder: Path, name: str, data: bytes) -> None:
    (folder / name).write_bytes(data)


def state_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "state.safetensors"))


def save_tensors(folder: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(folder / "state.safetensors"))


def nan_in(tensors: dict, key: str) -> dict:
    return {**tensors, key: torch.full_like(tensors[key], float("nan"))}


def edit_meta(edit) -> callable:
    def change(folder: Path) -> None:
        meta = json.loads((folder / "state.json").read_text())
        edit(meta)
        (folder / "state.json").write_text(json.dumps(meta))

    return change


HOSTILE_CHECKPOINTS = {
    "state truncated": (
        lambda f: damaged(f, "state.safetensors", (f / "state.safetensors").read_bytes()[:1000]),
        "state.safetensors is not a safetensors checkpoint",
    ),
    "state empty": (lambda f: damaged(f, "state.safetensors", b""), "is not a safetensors checkpoint"),
    "state a pickle": (
        lambda f: torch.save({"model.unet.conv_in.weight": torch.zeros(2)}, f / "state.safetensors"),
        "is not a safetensors checkpoint",
    ),
    "state of another program": (
        lambda f: save_tensors(f, {"weight": torch.zeros(2, 2)}),
        "is not a checkpoint of this model: ",
    ),
    "state with a wrong shape": (
        lambda f: save_tensors(f, {**state_tensors(f), "model.unet.conv_in.bias": torch.zeros(3)}),
        "model.unet.conv_in.bias has shape (3,)",
    ),
    "state without its RNG": (
        lambda f: save_tensors(f, {k: v for k, v in state_tensors(f).items() if k != "rng.torch"}),
        "tensors missing (first rng.torch)",
    ),
    "state with NaN weights": (
        lambda f: save_tensors(f, nan_in(state_tensors(f), "ema.unet.conv_in.bias")),
        "ema.unet.conv_in.bias holds values that are not finite",
    ),
    "state missing": (lambda f: (f / "state.safetensors").unlink(), "holds state.json but no state.safetensors"),
    "state a folder": (replace_with_folder("state.safetensors"), "state.safetensors is a folder"),
    "meta not UTF-8": (lambda f: damaged(f, "state.json", b"\xff\xfe"), "state.json is not the JSON training writes"),
    "meta a list": (lambda f: damaged(f, "state.json", b"[1]"), "holds no step number"),
    "meta step text": (edit_meta(lambda m: m.update(step="7")), "holds no step number"),
    "meta step a fraction": (edit_meta(lambda m: m.update(step=1.5)), "holds no step number"),
    "meta step beyond the run": (edit_meta(lambda m: m.update(step=10**30)), "is beyond its run's 2 steps"),
    "meta config a list": (edit_meta(lambda m: m.update(config=[1])), "holds no training config"),
    "meta config with an unknown field": (
        edit_meta(lambda m: m["config"].update(bogus=1)),
        "its config is not a training config",
    ),
    "meta samples text": (edit_meta(lambda m: m["config"].update(samples="many")), "not a training config"),
    "meta history text": (edit_meta(lambda m: m.update(history="x")), "holds no training config and history"),
    "meta a folder": (replace_with_folder("state.json"), "state.json is a folder"),
    "log a folder": (replace_with_folder("train_log.jsonl"), "train_log.jsonl is a folder"),
    "model a file": (lambda f: (f / "model").write_text("x"), "is not a folder"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_CHECKPOINTS))
def test_train_refuses_a_damaged_checkpoint_and_leaves_the_log_alone(case, checkpoint, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(checkpoint, folder)
    edit, message = HOSTILE_CHECKPOINTS[case]
    edit(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    # --lr differs from the checkpoint's: a resume would log "config changed" — never before the check
    assert_usage_error(main(["train", "--out", str(folder), *TRAIN, "--lr", "1e-3"]), capsys, message)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    assert no_temporaries(folder)


def test_a_good_checkpoint_resumes_and_logs_the_change_after_its_check(checkpoint, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(checkpoint, folder)
    from negprompt.shapes.training import TrainConfig, Trainer

    trainer = Trainer(TrainConfig(samples=16, batch_size=8, learning_rate=1e-3), folder)
    trainer.load_checkpoint()
    log = (folder / "train_log.jsonl").read_text().splitlines()
    assert json.loads(log[-1])["event"] == "config changed" and len(log) == 2


def test_train_on_a_full_disk_fails_in_one_line_and_resumes(tmp_path, monkeypatch, capsys):
    """A full disk in the checkpoint (safetensors reports it as its own error) and in the export:
    ``failed:`` in one line, exit 1, no temporary left; the next run goes on."""
    from safetensors import SafetensorError

    import negprompt.shapes.training as training

    folder = tmp_path / "run"
    real_save, real_export = training.save_file, training.save_components

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(training, "save_file", full)
    assert main(["train", "--out", str(folder), *TRAIN]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("negprompt: failed: No space left on device") and len(err.splitlines()) == 1, err
    assert not (folder / "state.json").exists() and no_temporaries(folder)
    monkeypatch.setattr(training, "save_file", real_save)
    monkeypatch.setattr(training, "save_components", full)
    assert main(["train", "--out", str(folder), *TRAIN]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("negprompt: failed: No space left on device") and len(err.splitlines()) == 1, err
    assert (folder / "state.json").exists() and not (folder / "model").exists() and no_temporaries(folder)
    monkeypatch.setattr(training, "save_components", real_export)
    assert main(["train", "--out", str(folder), *TRAIN]) == 0
    assert "resuming at step 2 of 2" in capsys.readouterr().out
    assert (folder / "model" / "model_index.json").exists() and no_temporaries(folder)


def test_an_interrupted_train_keeps_its_checkpoint_and_resumes(tmp_path):
    """Ctrl-C (SIGINT) ends the step in progress, writes its checkpoint and stops (exit 130); the run says
    its cost before it starts and measured after its first steps."""
    folder = tmp_path / "run"
    argv = [sys.executable, "-m", "negprompt", "train", "--out", str(folder), "--samples", "200", "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen([*argv, "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first = run.stdout.readline()
    assert first.startswith("train: 100 steps of 2 examples to go (200 samples); about "), first
    measured = run.stdout.readline()  # after the first steps: the cost measured on this machine
    assert "s a step over the first 3: about" in measured, measured
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    step = json.loads((folder / "state.json").read_text())["step"]
    assert 3 <= step < 100 and f"stopped at step {step} of 100 with its checkpoint" in out, out
    assert not (folder / "model").exists() and no_temporaries(folder)
    from negprompt.shapes.training import TrainConfig, Trainer

    trainer = Trainer(TrainConfig(samples=200, batch_size=2), folder)
    trainer.load_checkpoint()  # the whole checkpoint, checked: the same command resumes from it
    assert trainer.step == step


def test_checkpoints_come_every_few_minutes_as_well(tmp_path):
    from test_shapes_model import tiny_config

    from negprompt.shapes.training import Trainer

    saved = []
    trainer = Trainer(tiny_config(samples=32, checkpoint_every=1000), tmp_path)
    trainer.run(progress=False, on_checkpoint=lambda t: saved.append(t.step), checkpoint_seconds=0.0)
    assert saved == [1, 2, 3, 4]  # every step here (0 s apart), and the last
    saved.clear()
    Trainer(tiny_config(samples=32, checkpoint_every=1000), tmp_path / "b").run(
        progress=False, on_checkpoint=lambda t: saved.append(t.step), checkpoint_seconds=None
    )
    assert saved == [4]


def test_an_exported_model_follows_the_umask_and_replaces_the_old_one_whole(tmp_path):
    from test_shapes_model import tiny_config

    from negprompt.shapes.training import Trainer

    trainer = Trainer(tiny_config(samples=8), tmp_path / "run")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "old-file").write_text("from an older export")
    mask = os.umask(0o027)
    try:
        folder = trainer.export(tmp_path / "model")
    finally:
        os.umask(mask)
    modes = {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in folder.rglob("*")}
    weights = [name for name in modes if name.endswith(".safetensors")]
    assert len(weights) == 2 and all(modes[name] == 0o640 for name in weights), modes  # safetensors wrote 0600
    assert all(mode == (0o750 if (folder / name).is_dir() else 0o640) for name, mode in modes.items()), modes
    assert folder.stat().st_mode & 0o777 == 0o750
    assert not (folder / "old-file").exists() and no_temporaries(tmp_path)


# ---------------------------------------------------------------- paths


def test_outputs_through_a_loop_of_links_or_too_long_are_user_errors(tmp_path, capsys):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    long_name = "x" * 300
    cases = [
        (["generate", "a red circle", "--out", str(tmp_path / "loop" / "x.png")], "loop of symbolic links"),
        (["generate", "a red circle", "--out", str(tmp_path / f"{long_name}.png")], "give a name of at most"),
        (["generate", "a red circle", "--out", str(tmp_path / ("y" * 245 + ".png"))], "less what its temporary adds"),
        (["study", "shapes", "--out", str(tmp_path / "loop" / "s")], "loop of symbolic links"),
        (["train", "--out", str(tmp_path / long_name)], "give a name of at most"),
        (["demo", "--out", str(tmp_path / "loop")], "loop of symbolic links"),
        (["evaluate", "--out", str(tmp_path / "/".join(["d" * 200] * 25))], "the path is"),
        (["merge", str(tmp_path / long_name)], "file name too long"),
        (["report", str(tmp_path / "loop")], "too many levels of symbolic links"),
    ]
    for argv, message in cases:
        assert_usage_error(main(argv), capsys, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop"]


# ---------------------------------------------------------------- temporaries left by a kill


def test_a_png_killed_mid_write_leaves_a_temporary_the_next_run_removes(tmp_path, capsys):
    """kill -9 while a PNG is written leaves ``.out.png.XXXXXXXX.tmp``; the next run of the command removes
    it (and only temporaries of its own names that no live writer holds: never another file)."""
    out = tmp_path / "out.png"
    writer = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from negprompt.files import write_atomically\n"
        "def write_one(final, temporary):\n"
        "    temporary.write_bytes(b'half a PNG')\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
        "write_atomically([Path(sys.argv[1])], write_one)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", writer, str(out)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "writing\n"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".out.png.") and left[0].endswith(".tmp"), left
    users = [".out.png.notes.tmp", ".out.png.abcdefgh.tmp.bak", ".other.png.abcdefgh.tmp", "out.png.abcdefgh.tmp"]
    for name in users:
        (tmp_path / name).write_text("the user's")
    live = tmp_path / ".out.png.zz99zz99.tmp"  # another process writing out.png right now
    live.write_text("in progress")
    holder = os.open(live, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        assert main(["generate", "a red circle", "--steps", "2", "-q", "--out", str(out)]) == 0
    finally:
        os.close(holder)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*users, live.name, "out.png"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the live writer's lock is gone now: the next write of out.png removes its temporary
    write_atomically([out], lambda final, temporary: temporary.write_bytes(out.read_bytes()))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*users, "out.png"])
