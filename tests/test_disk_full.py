"""A disk that fills up during ``study`` and ``train``: one line, exit 1, and the next run resumes with
nothing lost or duplicated. The full disk is simulated: writes under the output folder fail with
ENOSPC once a byte budget is spent, after writing the part that fits (as a real full disk does)."""

from __future__ import annotations

import builtins
import errno
import io
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import negprompt.shapes.training as training_module
from negprompt.analysis.study import RESULTS_FILE
from negprompt.interfaces.cli import main
from negprompt.shapes.training import LOG_FILE, Trainer


class _Budget:
    def __init__(self, folder: Path, space: int) -> None:
        self.folder, self.space = folder.resolve(), space

    def covers(self, path) -> bool:
        try:
            return Path(path).resolve().is_relative_to(self.folder)
        except (TypeError, ValueError):
            return False

    def take(self, size: int, name) -> int:
        """How much of ``size`` bytes fits; raises nothing (the caller writes the part, then fails)."""
        fits = max(0, min(size, self.space))
        self.space -= fits
        return fits


class _FillingFile:
    def __init__(self, handle, budget: _Budget, name) -> None:
        self._handle, self._budget, self._name = handle, budget, name

    def write(self, data):
        fits = self._budget.take(len(data), self._name)
        self._handle.write(data[:fits])
        if fits < len(data):
            self._handle.flush()
            raise OSError(errno.ENOSPC, "No space left on device", str(self._name))
        return len(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()

    def __getattr__(self, name):
        return getattr(self._handle, name)


@contextmanager
def full_disk(folder: Path, space: int, monkeypatch):
    """Writes under ``folder`` (open/Path.write_text and safetensors files) get ``space`` bytes in all."""
    budget = _Budget(folder, space)
    real_open, real_save = io.open, training_module.save_file

    def opening(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if any(m in mode for m in "wax") and budget.covers(file):
            return _FillingFile(handle, budget, file)
        return handle

    def saving(tensors, filename, *args, **kwargs):
        real_save(tensors, filename, *args, **kwargs)
        size = Path(filename).stat().st_size
        fits = budget.take(size, filename)
        if fits < size:
            with real_open(filename, "r+b") as handle:
                handle.truncate(fits)
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    with monkeypatch.context() as patch:
        patch.setattr(builtins, "open", opening)
        patch.setattr(io, "open", opening)
        patch.setattr(training_module, "save_file", saving)
        yield


def assert_failed_in_one_line(code: int, capsys) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert err.startswith("negprompt: failed: No space left on device") and len(err.splitlines()) == 1, err


STUDY = """name: disk
model: MODEL
scheduler: ddim
steps: 3
scale: 5
size: 32
map_size: 8
seeds: [1, 2]
pairs:
  - {group: noun, prompt: a photo of a woman with glasses, negative: glasses}
  - {group: adjective, prompt: a woman in the street, negative: blurry}
  - {group: noun, prompt: a photo of a cat, negative: a woman}
"""


def test_study_on_a_filling_disk_resumes_with_nothing_lost_or_duplicated(tiny_sd_dir, tmp_path, monkeypatch, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(STUDY.replace("MODEL", str(tiny_sd_dir)))
    assert main(["study", str(spec), "-q", "--out", str(tmp_path / "straight")]) == 0
    straight = (tmp_path / "straight" / RESULTS_FILE).read_text()
    spec_size = (tmp_path / "straight" / "spec.json").stat().st_size
    capsys.readouterr()
    # The disk fills while writing the spec, in the first pair's rows, between pairs, in the last pair.
    for space in (spec_size // 2, spec_size + 100, spec_size + len(straight) // 3, spec_size + len(straight) - 5):
        out = tmp_path / f"space-{space}"
        with full_disk(out if out.exists() else tmp_path, space, monkeypatch):
            assert_failed_in_one_line(main(["study", str(spec), "-q", "--out", str(out)]), capsys)
        assert main(["study", str(spec), "-q", "--out", str(out)]) == 0, capsys.readouterr().err
        resumed = (out / RESULTS_FILE).read_text()
        assert sorted(resumed.splitlines()) == sorted(straight.splitlines()), space  # nothing lost, none twice


def test_training_on_a_filling_disk_resumes_with_nothing_lost_or_duplicated(tmp_path, monkeypatch):
    from test_shapes_model import tiny_config

    straight = Trainer(tiny_config(), tmp_path / "straight")
    straight.run(progress=False)
    log_size = (tmp_path / "straight" / LOG_FILE).stat().st_size
    # Checkpoints every 3 steps: the disk fills before the first one, inside the second, near the end.
    for space in (log_size // 4, 60_000, 150_000):
        out = tmp_path / f"space-{space}"
        with full_disk(tmp_path, space, monkeypatch), pytest.raises(OSError, match="No space left"):
            Trainer(tiny_config(), out).run(progress=False)
        resumed = Trainer(tiny_config(), out)
        if (out / training_module.META_FILE).exists():
            resumed.load_checkpoint()
        resumed.run(progress=False)
        for key, value in straight.unet.state_dict().items():
            assert torch.equal(value, resumed.unet.state_dict()[key]), (space, key)
        for key, value in straight.ema.items():
            assert torch.equal(value, resumed.ema[key]), (space, key)
        steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (out / LOG_FILE).read_text().splitlines()]
        assert steps == list(range(1, 9)), (space, steps)
