"""The bundled model on a GPU against the 2-core CPU: where a run's seconds go, for one prepared device call.

The target (issue "GPU cost", item 4): the same command at least 5 × faster on CUDA than on 2 CPU cores, and
``negprompt demo --device cuda`` under 5 s wall. On an H200 it was slower than on the CPU (20 s against 14 s), and
what a tiny UNet costs on a GPU is mostly not arithmetic: start-up (importing torch, starting CUDA, reading the
CUDA libraries from disk on a fresh machine), the first call of each kernel, Python work per layer, waits for the
device. This script measures each of those, in one run:

1. **The commands as printed**, each a fresh process timed by the wall clock, on the device and on the CPU held to
   2 cores (``OMP_NUM_THREADS=2``, and ``sched_setaffinity`` to 2 cores where the machine has more): ``negprompt demo``
   and ``negprompt generate "a red circle" --negative "a hat" --seed 0-7``, each ``--repeats`` times (the first run
   on a fresh machine reads the libraries from disk: reported apart).
2. **One process's phases** on ``--device``, synchronised at each boundary: importing torch and negprompt, starting
   the device, loading the model, the demo's runs the first time (every kernel's first call), the same runs again
   (warm), and warm again with ``torch.backends.cudnn.benchmark`` on; for the warm run, the seconds inside the UNet's
   forward (CUDA events, no sync in the run) and the UNet calls.

    python benchmarks/bench_bundled_device.py                       # on a CUDA machine: both parts, ~2 minutes
    python benchmarks/bench_bundled_device.py --device cpu --steps 2 --repeats 1 --commands generate   # its code paths
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()  # before torch: the import is one of the phases
COMMANDS = {
    "demo": ["demo", "-q", "--out", "{out}/demo"],
    "generate": ["generate", "a red circle", "--negative", "a hat", "--seed", "0-7", "--out", "{out}/generate.png"],
}
TARGETS = {"speed-up over 2 CPU cores": ">= 5", "demo on the device, warm machine (s)": "< 5"}


def command_line(name: str, device: str, steps: int | None, out: str) -> list[str]:
    """``python -m negprompt <command> …`` on ``device`` (``--steps`` when given)."""
    args = [a.replace("{out}", out) for a in COMMANDS[name]]
    args += ["--device", device] + ([] if steps is None else ["--steps", str(steps)])
    if name == "generate":
        args.append("-q")
    return [sys.executable, "-m", "negprompt", *args]


def two_cores() -> None:
    """In the child before ``exec``: at most 2 CPU cores (the README's machine)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) > 2:
        os.sched_setaffinity(0, cores[:2])


def wall_seconds(argv: list[str], cpu_only: bool) -> float:
    """Seconds a fresh process takes to run ``argv``; raises with its last lines if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"} if cpu_only else dict(os.environ)
    start = time.perf_counter()
    done = subprocess.run(
        argv, env=env, capture_output=True, text=True, preexec_fn=two_cores if cpu_only else None, check=False
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])
        raise RuntimeError(f"{' '.join(argv[2:])} failed ({done.returncode}):\n{tail}")
    return seconds


def commands(device: str, names: list[str], steps: int | None, repeats: int) -> dict[str, Any]:
    """Part 1: each command's wall seconds on ``device`` and on 2 CPU cores, the first run apart from the rest."""
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as out:
        for name in names:
            seconds = {
                where: [wall_seconds(command_line(name, where, steps, out), where == "cpu") for _ in range(repeats)]
                for where in dict.fromkeys([device, "cpu"])
            }
            warm = {where: statistics.median(s[1:] or s) for where, s in seconds.items()}
            result[name] = {
                "seconds": seconds,
                "warm_median": warm,
                "speed_up": warm["cpu"] / warm[device],
                "argv": command_line(name, device, steps, "OUT")[1:],
            }
            print(
                f"{name:9s} {device}: first {seconds[device][0]:6.2f} s, warm {warm[device]:6.2f} s   "
                f"cpu (2 cores): warm {warm['cpu']:6.2f} s   speed-up {result[name]['speed_up']:.2f}"
            )
    return result


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def phases(device: str, steps: int | None) -> dict[str, Any]:
    """Part 2: one process's phases on ``device`` (seconds), each ended by a device synchronisation."""
    marks: dict[str, float] = {}
    last = STARTED

    def mark(name: str) -> None:
        nonlocal last
        synchronize(device)
        now = time.perf_counter()
        marks[name] = now - last
        last = now

    import torch

    mark("import torch")
    from negprompt.interfaces.demo import demo_specs
    from negprompt.session import Session

    mark("import negprompt (diffusers, transformers with it)")
    torch.zeros(1, device=device).add_(1)
    mark("start the device (context, first kernel)")
    session = Session(None, device=device)
    mark("load the bundled model")
    settings = demo_specs(session, steps=steps)
    session.run_together(settings)
    mark("the demo's runs, first time (every kernel's first call)")
    timer = UNetTimer(session)
    session.run_together(settings)
    mark("the demo's runs, warm")
    inside, calls = timer.finish()
    torch.backends.cudnn.benchmark = True
    session.run_together(settings)
    mark("warm, cudnn.benchmark on (first call: its search)")
    session.run_together(settings)
    mark("warm, cudnn.benchmark on, searched")
    torch.backends.cudnn.benchmark = False
    warm = marks["the demo's runs, warm"]
    return {
        "seconds": marks,
        "warm_run": {"unet_calls": calls, "inside_unet_share": inside / warm, "seconds_per_unet_call": warm / calls},
    }


class UNetTimer:
    """Seconds inside the UNet's forward over the next runs (CUDA events, no sync in the run; host clock on a CPU),
    and how many calls."""

    def __init__(self, session: Any) -> None:
        import torch

        with session.exclusive() as components:
            self.unet = components.denoiser
        self.cuda = next(self.unet.parameters()).device.type == "cuda"
        self.event = (lambda: _recorded(torch.cuda.Event(enable_timing=True))) if self.cuda else time.perf_counter
        self.spans: list[list[Any]] = []
        self.hooks = [
            self.unet.register_forward_pre_hook(lambda *_: self.spans.append([self.event()])),
            self.unet.register_forward_hook(lambda *_: self.spans[-1].append(self.event())),
        ]

    def finish(self) -> tuple[float, int]:
        for hook in self.hooks:
            hook.remove()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self.spans) / 1000, len(self.spans)
        return sum(b - a for a, b in self.spans), len(self.spans)


def _recorded(event: Any) -> Any:
    event.record()
    return event


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (the default), or cpu to run the code paths")
    parser.add_argument("--commands", default="demo,generate", help="comma-separated: demo, generate")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per command and device (default 3)")
    parser.add_argument("--steps", type=int, help="steps (default: the model's, 20)")
    parser.add_argument("--skip-commands", action="store_true", help="part 2 only")
    parser.add_argument("--out", default="benchmarks/results/bundled_device.json")
    return parser.parse_args(argv)


def check(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments or the machine, in one line; None if nothing."""
    unknown = sorted(set(args.commands.split(",")) - set(COMMANDS))
    if unknown:
        return f"unknown command(s) {', '.join(unknown)}; choose from {', '.join(COMMANDS)}"
    if args.device not in ("cuda", "cpu"):
        return f"--device must be cuda or cpu, got {args.device!r}"
    if args.repeats < 1:
        return f"--repeats must be at least 1, got {args.repeats}"
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU here (torch.cuda.is_available() is False); run it on a CUDA machine, or --device cpu"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    problem = check(args)
    if problem is not None:
        print(f"bench_bundled_device.py: {problem}", file=sys.stderr)
        return 2
    result: dict[str, Any] = {"settings": vars(args), "targets": TARGETS}
    result["phases"] = phases(args.device, args.steps)  # first: importing is one of its phases
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_sdxl import machine
    from common import write_result

    result["machine"] = machine()
    for name, seconds in result["phases"]["seconds"].items():
        print(f"{seconds:7.2f} s  {name}")
    warm = result["phases"]["warm_run"]
    print(
        f"warm run: {warm['unet_calls']} UNet calls, {warm['seconds_per_unet_call'] * 1000:.1f} ms each, "
        f"{warm['inside_unet_share']:.0%} inside the UNet's forward"
    )
    if not args.skip_commands:
        result["commands"] = commands(args.device, args.commands.split(","), args.steps, args.repeats)
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
