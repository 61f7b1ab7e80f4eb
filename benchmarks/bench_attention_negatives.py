"""Cost of negatives inside attention (NAG, VSF) at scale 1, as ratios against the plain run at scale 1.

For the bundled model, its guidance-distilled student and a tiny SD: NAG / plain and VSF / plain at
s = 1 (one denoiser pass per step plus the extra attention work), and rule (9) at the model's default
scale / plain at s = 1 for comparison (two passes; one on the distilled model, whose default is s = 1
with the guidance scale as an input, so there rule (9) cannot use the negative). Runs are interleaved; ratios are medians of per-repeat ratios.

    python benchmarks/bench_attention_negatives.py
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from common import write_result

from negprompt.session import Session
from negprompt.testing.tiny_sd import build_tiny_sd

TARGETS = {"nag_vs_plain": "<= 1.35", "vsf_vs_plain": "<= 1.2", "sd_rule_vs_plain": "≈ 2 (two passes)"}
PROMPTS = {
    "bundled": ("a red circle", "a hat"),
    "distilled": ("a red circle", "a hat"),
    "tiny-sd": ("a photo of a cat", "glasses"),
}


def measure(name: str, session: Session, steps: int | None, batch: int, repeats: int, size: int | None) -> dict:
    prompt, negative = PROMPTS[name]
    common = dict(steps=steps, seeds=list(range(batch)), size=size)
    specs = {
        "plain": session.spec(prompt, rule="cfg", scale=1, **common),
        "nag": session.spec(prompt, negative, rule="nag", scale=1, **common),
        "vsf": session.spec(prompt, negative, rule="vsf", scale=1, **common),
        "sd_rule": session.spec(prompt, negative, rule="sd", **common),
    }
    for spec in specs.values():  # warm-up
        session.run(spec)
    times: dict[str, list[float]] = {key: [] for key in specs}
    for _ in range(repeats):
        for key, spec in specs.items():
            start = time.perf_counter()
            session.run(spec)
            times[key].append(time.perf_counter() - start)

    def ratio(a: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times["plain"]))

    return {
        "median_seconds": {key: statistics.median(v) for key, v in times.items()},
        "ratios": {"nag_vs_plain": ratio("nag"), "vsf_vs_plain": ratio("vsf"), "sd_rule_vs_plain": ratio("sd_rule")},
        "scale_of_sd_rule": specs["sd_rule"].guidance.scale,
        "steps": specs["plain"].steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results/attention_negatives.json")
    args = parser.parse_args()
    result = {
        "settings": vars(args),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "targets": TARGETS,
        "models": {},
    }
    for name, session, steps, size in (
        ("bundled", Session("shapes"), None, None),
        ("distilled", Session("shapes-distilled"), None, None),
        ("tiny-sd", Session(build_tiny_sd(seed=0)), 20, 128),
    ):
        measured = measure(name, session, steps, args.batch, args.repeats, size)
        result["models"][name] = measured
        for key, value in measured["ratios"].items():
            print(f"{name:8s} {key:18s} {value:.3f}   (target {TARGETS[key]})")
    write_result(result, args.out)


if __name__ == "__main__":
    main()
