"""Sharded jobs: work split between processes, each with its own shard, merged into the one-process result.

The in-process tests play the processes one after another (``Workers(index, count)`` without a
launcher); the launched tests start 2 CPU processes with ``accelerate launch`` (gloo), as a user would.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import assert_usage_error

from negprompt.interfaces.cli import main
from negprompt.jobs import ONE_PROCESS, Job, JobError, Workers, collect, read_shard

ACCELERATE = str(Path(sys.executable).parent / "accelerate")

MINI_STUDY = """\
name: mini
model: shapes
scheduler: default
steps: 6
scale: 5
seeds: [0, 1, 2]
pairs:
  - {group: noun, prompt: a red circle, negative: a hat}
  - {group: noun, prompt: a blue square, negative: a sun}
  - {group: adjective, prompt: a green triangle, negative: striped}
  - {group: noun, prompt: a purple circle, negative: a hat}
  - {group: adjective, prompt: a red square, negative: blurry}
"""


def toy_job(folder: Path, workers: Workers = ONE_PROCESS, sizes=(3, 1, 2, 2, 1), note: str = "a") -> Job:
    return Job(folder, "toy", {"note": note}, list(sizes), workers)


def toy_unit(unit: int) -> dict:
    return {"unit": unit, "value": unit * 0.1, "flag": unit % 2 == 0, "missing": None}


# ---------------------------------------------------------------- in one process


def test_processes_in_turn_give_the_one_process_payloads(tmp_path):
    alone = toy_job(tmp_path / "one").run(toy_unit, progress=False)
    assert alone == [toy_unit(u) for u in range(5)]
    computed = []
    second = toy_job(tmp_path / "two", Workers(1, 2)).run(lambda u: computed.append(u) or toy_unit(u), progress=False)
    assert second is None  # only the main process merges
    merged = toy_job(tmp_path / "two", Workers(0, 2)).run(lambda u: computed.append(u) or toy_unit(u), progress=False)
    assert merged == alone and sorted(computed) == list(range(5))  # every unit once
    shards = sorted((tmp_path / "two" / "shards").iterdir())
    assert [p.name for p in shards] == ["process-0-of-2.jsonl", "process-1-of-2.jsonl"]
    assert (tmp_path / "two" / "logs" / "process-1.log").read_text().count("unit ") == len(read_shard(shards[1], None))


def test_units_are_dealt_by_size():
    owners = toy_job(Path("unused"), Workers(0, 2), sizes=(25, 5, 25, 5)).owners()
    assert owners == [0, 0, 1, 1]  # 30 images each, not 50 against 10 (every other unit)
    assert toy_job(Path("unused"), Workers(0, 3), sizes=(1,) * 7).owners() == [0, 1, 2, 0, 1, 2, 0]


def test_a_torn_unit_is_dropped_and_redone_once(tmp_path):
    folder = tmp_path / "job"
    toy_job(folder).run(toy_unit, progress=False)
    shard = folder / "shards" / "process-0-of-1.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    shard.write_text("".join(lines[:3]) + lines[3][:9])  # units 0 and 1 whole, unit 2 torn by a kill
    computed = []
    again = toy_job(folder).run(lambda u: computed.append(u) or toy_unit(u), progress=False)
    assert computed == [2, 3, 4] and again == [toy_unit(u) for u in range(5)]
    assert sorted(read_shard(shard, None)) == [0, 1, 2, 3, 4]


def test_a_relaunch_with_another_process_count_computes_only_what_is_missing(tmp_path):
    folder = tmp_path / "job"
    toy_job(folder, Workers(1, 2)).run(toy_unit, progress=False)  # process 0 of 2 never ran
    computed = []
    merged = toy_job(folder, Workers(0, 1)).run(lambda u: computed.append(u) or toy_unit(u), progress=False)
    assert merged == [toy_unit(u) for u in range(5)]
    assert sorted(computed) == [u for u, owner in enumerate(toy_job(folder, Workers(0, 2)).owners()) if owner == 0]


def test_another_job_and_foreign_shards_are_refused(tmp_path):
    toy_job(tmp_path / "a").run(toy_unit, progress=False)
    with pytest.raises(JobError, match="holds a job with other settings"):
        toy_job(tmp_path / "a", note="b").run(toy_unit, progress=False)
    toy_job(tmp_path / "b", note="b").run(toy_unit, progress=False)
    shutil.copy(tmp_path / "b" / "shards" / "process-0-of-1.jsonl", tmp_path / "a" / "shards" / "process-0-of-2.jsonl")
    with pytest.raises(JobError, match="holds units of another job"):
        collect(tmp_path / "a")


def test_merge_command_refusals(tmp_path, capsys):
    assert_usage_error(main(["merge", str(tmp_path)]), capsys, "holds no job (job.json)")
    toy_job(tmp_path / "t", Workers(1, 2)).run(toy_unit, progress=False)
    assert_usage_error(main(["merge", str(tmp_path / "t")]), capsys, "units are not done yet")
    toy_job(tmp_path / "u").run(toy_unit, progress=False)
    assert_usage_error(main(["merge", str(tmp_path / "u")]), capsys, "no installed command 'toy' can merge")


# ---------------------------------------------------------------- launched as 2 CPU processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*argv: str, processes: int = 2, **popen) -> subprocess.Popen:
    command = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*command, "-m", "negprompt", *argv], env=env, **popen)


def alone(*argv: str) -> int:
    """The plain one-process command, in this process, with the launched processes' thread count (CPU
    sums depend on it; ``accelerate launch`` runs one thread per process)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(list(argv))
    finally:
        torch.set_num_threads(threads)


def outputs(folder: Path) -> dict[str, bytes]:
    """Every result file, without the job's own bookkeeping (job.json, shards/, logs/)."""
    skip = {"job.json", "shards", "logs"}
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name not in skip}


def test_an_evaluation_on_two_processes_merges_to_the_one_process_table(tmp_path):
    argv = ["evaluate", "--images", "1", "--steps", "3", "-q"]
    assert alone(*argv, "--out", str(tmp_path / "one")) == 0
    assert launch(*argv, "--out", str(tmp_path / "two"), stdout=subprocess.DEVNULL).wait(timeout=300) == 0
    assert outputs(tmp_path / "two") == outputs(tmp_path / "one")  # evaluation.md and .json, byte for byte
    assert all(len(read_shard(p, None)) for p in (tmp_path / "two" / "shards").iterdir())  # both worked


def test_a_process_killed_mid_run_and_a_relaunch_give_the_same_result(tmp_path):
    spec = tmp_path / "six.yaml"  # 6 pairs of 2 seeds × 15 steps: 3 units a process, a few seconds each
    pairs = MINI_STUDY.split("pairs:\n")[1] + "  - {group: noun, prompt: a green square, negative: a sun}\n"
    head = MINI_STUDY.split("pairs:\n")[0].replace("steps: 6", "steps: 15").replace("[0, 1, 2]", "[0, 1]")
    spec.write_text(head + "pairs:\n" + pairs)
    assert alone("study", str(spec), "--out", str(tmp_path / "one"), "-q") == 0
    out = tmp_path / "two"
    run = launch("study", str(spec), "--out", str(out), "-q", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards, deadline = out / "shards", time.monotonic() + 240
    while time.monotonic() < deadline and not any(len(read_shard(p, None)) for p in shards.glob("*.jsonl")):
        time.sleep(0.1)
    workers = [p for p in psutil.Process(run.pid).children(recursive=True) if "study" in " ".join(p.cmdline())]
    assert len(workers) == 2, [p.cmdline() for p in workers]
    done = {int(p.name.split("-")[1]): len(read_shard(p, None)) for p in shards.glob("*.jsonl")}
    slower = min(workers, key=lambda p: done.get(int(p.environ()["RANK"]), 0))
    os.kill(slower.pid, signal.SIGKILL)  # mid-unit: it has not finished its 3 units
    assert run.wait(timeout=120) != 0  # the launcher stops the job
    assert not (out / "results.csv").exists()
    assert launch("study", str(spec), "--out", str(out), "-q").wait(timeout=300) == 0
    assert outputs(out) == outputs(tmp_path / "one")
    units = [u for p in shards.glob("*.jsonl") for u in read_shard(p, None)]
    assert sorted(units) == list(range(6))  # every unit once


def readme_launch_block() -> list[list[str]]:
    """The commands of the README's accelerate block, as argument lists."""
    from test_readme_commands import README

    block = re.search(r"## Studies on several processes.*?```bash\n(.*?)```", README.read_text(), flags=re.S).group(1)
    return [shlex.split(line.split(" #")[0]) for line in block.splitlines() if line.strip()]


def launched_command(words: list[str]) -> str:
    return words[words.index("-m") + 2]


def test_the_readme_launch_block_is_what_we_run():
    commands = readme_launch_block()
    assert {launched_command(w) for w in commands if w[0] == "accelerate"} == {"study", "bench-methods", "edit-sweep"}
    assert [w for w in commands if w[0] != "accelerate"] == [["negprompt", "merge", "study-2/"]]


@pytest.mark.parametrize("command", ["study", "bench-methods", "edit-sweep"])
def test_the_readme_launch_commands_run(command, tmp_path):
    """The README's accelerate block, shortened as the "Command line" block is (tests/test_readme_commands.py),
    with this machine as MAIN_NODE: both node commands run at once, as on two nodes. The study's
    processes give the one-process file byte for byte, and the README's ``merge`` writes it again."""
    from test_readme_commands import SHORTER, SMALL_STUDY

    spec = tmp_path / "small.yaml"
    spec.write_text(SMALL_STUDY)
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launched = []
    for words in readme_launch_block():
        if words[0] != "accelerate" or launched_command(words) != command:
            continue
        words = [{"MAIN_NODE": "127.0.0.1", "29500": port}.get(w, w) for w in words]
        assert words[:2] == ["accelerate", "launch"] and "-m" in words, words
        if command == "study":
            words[words.index("study") + 1] = str(spec)
        if "--main_process_port" not in words:
            words[2:2] = ["--main_process_port", str(free_port())]
        words = [ACCELERATE, *words[1:], *SHORTER[command]]
        launched.append(subprocess.Popen(words, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True))
    assert launched
    for run in launched:  # the two nodes' commands run together
        assert run.wait(timeout=300) == 0, run.stderr.read()[-2000:]
    if command == "bench-methods":
        assert (tmp_path / "methods-4" / "methods.md").exists()
    if command == "edit-sweep":
        assert (tmp_path / "shared" / "sweep" / "sweep.csv").exists()
    if command != "study":
        return
    two = tmp_path / "study-2"
    assert alone("study", str(spec), "--out", str(tmp_path / "one"), "-q") == 0
    assert outputs(two) == outputs(tmp_path / "one")  # results.csv and spec.json, byte for byte
    assert [len(read_shard(p, None)) for p in sorted((two / "shards").iterdir())] == [1, 1]  # both worked
    (two / "results.csv").unlink()
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert main(["merge", "study-2/"]) == 0  # the README's merge: the outputs again, from the shards alone
    finally:
        os.chdir(cwd)
    assert outputs(two) == outputs(tmp_path / "one")
