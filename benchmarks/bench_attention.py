"""Cost of attention capture: all cross-attention layers, all steps, 4 words on both branches,
against the same run without capture, interleaved, median of per-repeat ratios (target ≤ 1.3).
Also checks that the stored maps take no more memory than the estimate made before the run.

    python benchmarks/bench_attention.py              # bundled model and tiny SD
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import write_result

from negprompt.analysis.attention_stats import reduce_layer
from negprompt.attention.capture import CaptureRequest
from negprompt.attention.result import capture, plan_for
from negprompt.session import Session
from negprompt.testing.tiny_sd import build_tiny_sd

CASES = {
    "bundled": dict(
        prompt="a red circle with a sun",
        negative="a hat and striped",
        positive_words=["red", "circle"],
        negative_words=["hat", "striped"],
        size=None,
    ),
    "tiny-sd": dict(
        prompt="a photo of a woman in the street",
        negative="red hat with glasses",
        positive_words=["woman", "street"],
        negative_words=["hat", "glasses"],
        size=64,
    ),
}


def measure(name: str, case: dict, steps: int, batch: int, repeats: int) -> dict:
    session = Session() if name == "bundled" else Session(build_tiny_sd())
    components = session.components
    settings = session.spec(
        case["prompt"],
        case["negative"],
        steps=steps,
        seeds=range(batch),
        size=case["size"],
        scheduler="ddim",
    )
    request = CaptureRequest(words={"positive": case["positive_words"], "negative": case["negative_words"]})
    estimate = plan_for(settings, request, components).memory_bytes()

    def plain():
        session.run(settings)

    stored = []

    def captured():
        result = capture(settings, request, session, trace=False, reducer=reduce_layer)
        stored.append(sum(t.numel() * t.element_size() for t in result.tensors.values()))

    plain()
    captured()
    ratios, times = [], {"plain": [], "capture": []}
    for _ in range(repeats):
        for label, fn in (("plain", plain), ("capture", captured)):
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
        ratios.append(times["capture"][-1] / times["plain"][-1])
    return {
        "steps": steps,
        "images": batch,
        "layers": len(plan_for(settings, request, components).layers),
        "median_seconds": {k: statistics.median(v) for k, v in times.items()},
        "ratio_capture_vs_plain": statistics.median(ratios),
        "memory_estimate_bytes": estimate,
        "memory_stored_bytes": max(stored),
        "stored_within_estimate": max(stored) <= estimate,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/attention.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {name: measure(name, case, args.steps, args.batch, args.repeats) for name, case in CASES.items()}
    for name, r in results.items():
        print(
            f"{name:8s} capture/plain = {r['ratio_capture_vs_plain']:.3f} (target ≤ 1.3), "
            f"{r['layers']} layers, stored {r['memory_stored_bytes'] / 2**20:.2f} MiB "
            f"≤ estimate {r['memory_estimate_bytes'] / 2**20:.2f} MiB: {r['stored_within_estimate']}"
        )
    write_result(results, args.out)


if __name__ == "__main__":
    main()
