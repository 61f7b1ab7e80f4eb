"""How fast the command line answers when nothing needs a model: ``--help`` and usage errors.

Each case runs ``negprompt`` as a new process (as a user would) several times, interleaved with its
peers: the bare interpreter (``python -c pass``, the floor no command can beat) and the import the
command line made before it was made light (``import negprompt.api``: torch, diffusers, the model
code). Prints the median wall time per case, its ratio to the old import, and whether it is ≤ 1 s.

    python benchmarks/bench_cli.py [--repeats 7] [--out benchmarks/results/cli.json]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import write_result

BESIDE = Path(sys.executable).with_name("negprompt")  # the script of this interpreter's environment
NEGPROMPT = str(BESIDE) if BESIDE.exists() else shutil.which("negprompt") or "negprompt"
CASES = {
    "negprompt --help": [NEGPROMPT, "--help"],
    "negprompt generate --help": [NEGPROMPT, "generate", "--help"],
    "usage error (unknown flag)": [NEGPROMPT, "generate", "a red circle", "--stepz", "3"],
    "usage error (rule option of another rule)": [NEGPROMPT, "generate", "a red circle", "--dng-lambda", "3"],
    "usage error (prompt weight 9)": [NEGPROMPT, "generate", "a (hat:9)"],
}
PEERS = {
    "python -c pass (floor)": [sys.executable, "-c", "pass"],
    "import negprompt.api (what the CLI imported before)": [sys.executable, "-c", "import negprompt.api"],
}


def seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results/cli.json")
    args = parser.parse_args()
    everything = {**CASES, **PEERS}
    for command in everything.values():  # warm the file cache once
        seconds(command)
    times: dict[str, list[float]] = {name: [] for name in everything}
    for _ in range(args.repeats):
        for name, command in everything.items():
            times[name].append(seconds(command))
    medians = {name: statistics.median(values) for name, values in times.items()}
    old = medians["import negprompt.api (what the CLI imported before)"]
    print(f"{'case':55s} {'median s':>9s} {'/ old import':>13s}  ≤ 1 s")
    for name, value in medians.items():
        verdict = ("yes" if value <= 1.0 else "NO") if name in CASES else ""
        print(f"{name:55s} {value:9.3f} {value / old:13.3f}  {verdict}")
    write_result(
        {
            "median_seconds": {k: round(v, 4) for k, v in medians.items()},
            "ratio_to_old_import": {k: round(medians[k] / old, 4) for k in CASES},
            "all_within_1s": all(medians[k] <= 1.0 for k in CASES),
            "repeats": args.repeats,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
