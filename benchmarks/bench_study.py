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
from negprompt.api import load_model, make_settings
from negprompt.sampling.prompts import encode_prompts
from negprompt.sampling.schedulers import make_scheduler


def bare_rate(spec, components, calls: int) -> float:
    """UNet rows per second for plain UNet calls of the study's batch shape."""
    settings, _ = make_settings("a red circle", steps=spec.steps, scheduler=spec.scheduler, model=components)
    batch = 2 * len(spec.seeds)
    side = settings.height // components.latent_factor
    x = torch.randn(batch, components.unet.config.in_channels, side, side)
    context = encode_prompts(components.tokenizer, components.text_encoder, ["a red circle"]).repeat(batch, 1, 1)
    with torch.inference_mode():
        components.unet(x, 500, encoder_hidden_states=context)
        start = time.perf_counter()
        for i in range(calls):
            components.unet(x, 999 - i, encoder_hidden_states=context)
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
    components = load_model(spec.model)
    small = replace(spec, pairs=spec.pairs[: args.pairs], name=spec.name + "-bench")
    probe = make_scheduler(
        make_settings("", steps=spec.steps, scheduler=spec.scheduler, model=components)[0].scheduler,
        components.scheduler,
    )
    probe.set_timesteps(spec.steps)
    calls = len(probe.timesteps)

    bare = bare_rate(spec, components, calls * args.pairs)
    with tempfile.TemporaryDirectory() as folder:
        done = run_study(small, Path(folder) / "s", progress=False)
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
            full = run_study(spec, Path(folder) / "s", progress=False)
        result["full_study_seconds"] = full.seconds
        result["full_study_rows_per_second"] = full.unet_rows / full.seconds
    print(json.dumps(result, indent=1))
    write_result(result, args.out)


if __name__ == "__main__":
    main()
