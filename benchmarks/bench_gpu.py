"""GPU speed: SD 1.5-, SDXL-, SD3-medium- and FLUX-dev-size models (random weights from their configs), half precision.

For each model, as ratios timed in the same run (see ``bench_sdxl.py`` and ``bench_mmdit.py``):
negprompt's loop with one negative vs diffusers' pipeline, rule (8) vs rule (9) (UNets), capture vs
none; and seconds per step. Needs a CUDA GPU; elsewhere it says so and exits with code 2.

    python benchmarks/bench_gpu.py                     # SD 1.5 at 512², SDXL at 1024², float16
    python benchmarks/bench_gpu.py --models sd3,flux   # SD3-medium and FLUX-dev sizes at 1024²
    python benchmarks/bench_gpu.py --dtype bfloat16 --steps 30 --repeats 5
"""

from __future__ import annotations

import argparse
import sys

import bench_mmdit
import bench_sdxl
import torch
from bench_sdxl import machine
from common import write_result

MODELS = (("sd15", 512), ("sdxl", 1024), ("sd3", 1024), ("flux", 1024))  # preset, image side


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1, help="images per run (seeds)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scheduler", default="euler")
    parser.add_argument("--models", default="sd15,sdxl", help="comma-separated: sd15, sdxl, sd3, flux")
    parser.add_argument("--out", default="benchmarks/results/gpu.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            "bench_gpu.py: no CUDA GPU here (torch.cuda.is_available() is False: no GPU or a CPU-only torch "
            f"{torch.__version__}); run it on a machine with CUDA, or benchmarks/bench_sdxl.py for the CPU ratios",
            file=sys.stderr,
        )
        return 2
    wanted = [m for m in args.models.split(",") if m]
    unknown = sorted(set(wanted) - {name for name, _ in MODELS})
    if unknown:
        print(
            f"bench_gpu.py: unknown model(s) {', '.join(unknown)}; choose from sd15, sdxl, sd3, flux", file=sys.stderr
        )
        return 2
    result = {"settings": vars(args), "machine": machine(), "models": {}}
    for preset, size in MODELS:
        if preset not in wanted:
            continue
        bench = bench_mmdit if preset in ("sd3", "flux") else bench_sdxl
        components = bench.build(preset, "cuda", getattr(torch, args.dtype))
        if bench is bench_mmdit:
            measured = bench.measure(components, size, args.steps, args.batch, args.repeats)
        else:
            measured = bench.measure(components, size, args.steps, args.batch, args.repeats, args.scheduler)
        result["models"][f"{preset}@{size}"] = measured
        print(f"{preset} at {size}² ({args.dtype}, {torch.cuda.get_device_name(0)})")
        bench.report(measured)
        del components
        torch.cuda.empty_cache()
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
