"""Study throughput: UNet evaluations per second of `negprompt study` against bare UNet calls.

The bare rate calls the same UNet on the same batch shape (2 branches × seeds images) with the same
number of calls, nothing else; the study adds prompt encoding, scheduler steps, attention capture
and r_t. The ratio bare/study is the overhead (target ≤ 1.2). With --full, the whole built-in study
(20 pairs × 10 seeds × 30 steps) is timed as well (target ≤ 15 minutes on 2 cores).

    python benchmarks/bench_study.py [--pairs 4] [--full]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import write_result

from negprompt.analysis.spec import load_spec
from negprompt.analysis.study import run_study
from negprompt.models.conditioning import denoiser_inputs
from negprompt.session import Session


def bare_rate(spec, session: Session, calls: int) -> float:
    """UNet rows per second for plain UNet calls of the study's batch shape."""
    components = session.components
    settings = session.spec("a red circle", steps=spec.steps, scheduler=spec.scheduler)
    batch = 2 * len(spec.seeds)
    side = settings.height // components.latent_factor
    x = torch.randn(batch, components.latent_channels, side, side)
    inputs = denoiser_inputs([session.encode(["a red circle"])["a red circle"]] * batch)
    with torch.inference_mode():
        components.unet(x, 500, **inputs)
        start = time.perf_counter()
        for i in range(calls):
            components.unet(x, 999 - i, **inputs)
        seconds = time.perf_counter() - start
    return batch * calls / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="shapes")
    parser.add_argument("--pairs", type=int, default=4, help="pairs of the spec timed for the rate")
    parser.add_argument("--full", action="store_true", help="also time the whole spec")
    parser.add_argument("--out", default="benchmarks/results/study.json")
    args = parser.parse_args()
    spec = load_spec(args.spec)
    session = Session(spec.model)
    small = replace(spec, pairs=spec.pairs[: args.pairs], name=spec.name + "-bench")
    calls = session.denoiser_calls(spec.scheduler, spec.steps)

    bare = bare_rate(spec, session, calls * args.pairs)
    with tempfile.TemporaryDirectory() as folder:
        done = run_study(small, Path(folder) / "s", progress=False, session=session)
    study_rate = done.unet_rows / done.seconds
    result = {
        "spec": spec.name,
        "pairs_timed": args.pairs,
        "seeds": len(spec.seeds),
        "unet_calls_per_pair": calls,
        "bare_unet_rows_per_second": bare,
        "study_unet_rows_per_second": study_rate,
        "overhead_ratio": bare / study_rate,
        "threads": torch.get_num_threads(),
    }
    if args.full:
        with tempfile.TemporaryDirectory() as folder:
            full = run_study(spec, Path(folder) / "s", progress=False, session=session)
        result["full_study_seconds"] = full.seconds
        result["full_study_rows_per_second"] = full.unet_rows / full.seconds
    print(json.dumps(result, indent=1))
    write_result(result, args.out)


if __name__ == "__main__":
    main()
