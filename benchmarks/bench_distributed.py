"""Sharded studies: 2 processes / 1 process wall time on this machine, the per-row cost, and a simulation.

Runs one study as a plain command (one process, torch on every core; and on one thread) and under
``accelerate launch`` with 2 processes (one thread each), each time from a new process so that start-up counts as a user
sees it, interleaved, ``--repeats`` times; prints the ratio of the medians and the cost per UNet row.
Then simulates the wall time of the article-size study (20 pairs × 10 seeds × 30 steps, the built-in
``shapes`` spec) and of a 10× study (200 pairs) for 1–16 processes, each with a device of the measured
speed: T(N) = start-up + the largest per-process sum of unit costs, units dealt as negprompt.jobs
deals them (largest first, to the least loaded process).

    python benchmarks/bench_distributed.py                # 6 pairs of the shapes study, 3 repeats
    python benchmarks/bench_distributed.py --pairs 2 --repeats 1 --seeds 2   # a quick look
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from common import write_result

from negprompt.jobs import Job, Workers

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "negprompt" / "studies" / "shapes.yaml"
ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(command: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def unit_seconds(folder: Path) -> list[list[float]]:
    """Per process, the seconds of each of its units, from the processes' logs."""
    per_process = []
    for log in sorted((folder / "logs").glob("process-*.log")):
        lines = log.read_text().splitlines()
        per_process.append([float(line.split(" in ")[-1][:-2]) for line in lines if " unit " in line])
    return per_process


def simulate(pairs: int, seeds: int, unit_cost_per_seed: float, startup: float, processes: int) -> float:
    job = Job(Path("unused"), "study", {}, [seeds] * pairs, Workers(0, processes))
    load = [0.0] * processes
    for unit, owner in enumerate(job.owners()):
        load[owner] += job.unit_sizes[unit] * unit_cost_per_seed
    return startup + max(load)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6, help="first pairs of the shapes study (default 6)")
    parser.add_argument("--seeds", type=int, default=10, help="seeds per pair (default 10)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/distributed.json")
    args = parser.parse_args()

    spec = yaml.safe_load(SPEC.read_text())
    spec["name"] = f"shapes-first-{args.pairs}"
    spec["pairs"] = spec["pairs"][: args.pairs]
    spec["seeds"] = spec["seeds"][: args.seeds]
    cores = os.cpu_count() or 1
    times: dict[str, list[float]] = {"one": [], "one_thread": [], "two": []}
    units: list[float] = []
    startups: list[float] = []
    identical: list[bool] = []  # merged 2-process file == the 1-process, 1-thread file
    identical_all_cores: list[bool] = []  # … == the 1-process file on every core (thread count differs)
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
        for repeat in range(args.repeats):
            one, two = Path(tmp) / f"one-{repeat}", Path(tmp) / f"two-{repeat}"
            study = ["-m", "negprompt", "study", str(spec_path), "-q"]
            times["one"].append(timed([sys.executable, *study, "--out", str(one)], cores))
            alone = [sys.executable, *study, "--out", str(Path(tmp) / f"one-thread-{repeat}")]
            times["one_thread"].append(timed(alone, 1))
            launch = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
            launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
            times["two"].append(timed([*launch, *study, "--out", str(two)], 1))
            per_process = unit_seconds(two)
            units += [t for process in per_process for t in process]
            startups.append(times["two"][-1] - max(sum(process) for process in per_process))  # launch, load
            merged = (two / "results.csv").read_bytes()
            identical.append(merged == (Path(tmp) / f"one-thread-{repeat}" / "results.csv").read_bytes())
            identical_all_cores.append(merged == (one / "results.csv").read_bytes())
    steps = spec["steps"]
    rows_per_pair = len(spec["seeds"]) * steps * 2  # two branches (rule (9)) per image and step
    one, two = statistics.median(times["one"]), statistics.median(times["two"])
    one_thread = statistics.median(times["one_thread"])
    unit = statistics.median(units)
    per_seed = unit / len(spec["seeds"])
    startup = statistics.median(startups)
    result = {
        "settings": {**vars(args), "steps": steps},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "cores": cores},
        "median_seconds": {
            "one_process_all_cores": one,
            "one_process_one_thread": one_thread,
            "two_processes_one_thread_each": two,
        },
        "ratio_two_vs_one": two / one,
        "ratio_two_vs_one_thread": two / one_thread,
        "byte_identical_to_one_process_one_thread": all(identical),
        "byte_identical_to_one_process_all_cores": all(identical_all_cores),
        "unit_seconds_median": unit,
        "seconds_per_unet_row": unit / rows_per_pair,
        "startup_seconds_estimate": startup,
        "simulation": {
            name: {str(n): simulate(pairs, 10, per_seed, startup, n) for n in (1, 2, 4, 8, 16)}
            for name, pairs in (("article (20 pairs x 10 seeds)", 20), ("10x (200 pairs x 10 seeds)", 200))
        },
    }
    print(
        f"1 process ({cores} threads): {one:.1f} s   1 process (1 thread): {one_thread:.1f} s   "
        f"2 processes (1 thread each): {two:.1f} s   ratios {two / one:.3f} and {two / one_thread:.3f}"
    )
    print(
        f"per unit (a pair, {len(spec['seeds'])} seeds): {unit:.2f} s   per UNet row: "
        f"{1000 * unit / rows_per_pair:.2f} ms   start-up ≈ {startup:.1f} s"
    )
    print(
        f"merged results.csv byte-identical to 1 process, 1 thread: {all(identical)}; "
        f"to 1 process on {cores} threads: {all(identical_all_cores)} (CPU sums may depend on the thread count)"
    )
    for name, row in result["simulation"].items():
        print(f"simulated {name}: " + "   ".join(f"{n} proc {t:.0f} s" for n, t in row.items()))
    write_result(result, args.out)


if __name__ == "__main__":
    main()
