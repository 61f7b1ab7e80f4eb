"""Cost of a negprompt guider inside a diffusers modular pipeline: the tiny SDXL's modular pipeline with
negprompt's rule (9) guider (``NegativePromptGuidance``, a negative with its window) against the same
pipeline with diffusers' ``ClassifierFreeGuidance`` and the same negative, interleaved, median of the
per-repeat ratios (target ≤ 1.02, CPU). Both evaluate two branches a step; the ratio is the guider's overhead.

    python benchmarks/bench_guiders.py            # 64 px, 20 steps, 7 repeats
    python benchmarks/bench_guiders.py --quick    # 32 px, 3 steps, 2 repeats (a smoke run)
"""

from __future__ import annotations

import argparse
import platform

import torch
from common import interleaved, median_ratio, write_result

from negprompt.integrations.diffusers_guiders import (
    NegativePromptGuidance,
    with_null_conditioning,
    without_progress_bars,
)
from negprompt.testing.tiny_sd import build_tiny_sdxl

TARGET = 1.02
PROMPT, NEGATIVE = "a red circle with a hat", "a hat"


def modular_sdxl(components):
    """The tiny SDXL's modular pipeline (with the null conditioning block), no progress bar."""
    from diffusers.modular_pipelines.stable_diffusion_xl import StableDiffusionXLAutoBlocks

    pipe = without_progress_bars(with_null_conditioning(StableDiffusionXLAutoBlocks())).init_pipeline()
    pipe.update_components(
        unet=components.unet,
        vae=components.vae,
        text_encoder=components.text_encoder,
        text_encoder_2=components.text_encoder_2,
        tokenizer=components.tokenizer,
        tokenizer_2=components.tokenizer_2,
        scheduler=components.scheduler,
    )
    return pipe


def measure(size: int, steps: int, repeats: int, scale: float = 5.0) -> dict:
    from diffusers.guiders import ClassifierFreeGuidance

    pipe = modular_sdxl(build_tiny_sdxl(seed=0))
    guiders = {
        "diffusers CFG": ClassifierFreeGuidance(guidance_scale=scale),
        "negprompt guider": NegativePromptGuidance(guidance_scale=scale, negative_window="0:"),
    }

    def run(name: str):
        def call() -> None:
            pipe.update_components(guider=guiders[name])
            pipe(
                prompt=PROMPT,
                negative_prompt=NEGATIVE,
                generator=torch.Generator().manual_seed(0),
                num_inference_steps=steps,
                height=size,
                width=size,
                output="images",
                output_type="np",
            )

        return call

    times = interleaved({name: run(name) for name in guiders}, repeats)
    return {
        "median_seconds": {name: sorted(t)[len(t) // 2] for name, t in times.items()},
        "ratio": median_ratio(times, "negprompt guider", "diffusers CFG"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="32 px, 3 steps, 2 repeats: a smoke run")
    parser.add_argument("--out", default="benchmarks/results/guiders.json")
    args = parser.parse_args()
    size, steps, repeats = (32, 3, 2) if args.quick else (args.size, args.steps, args.repeats)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "guiders are experimental" at every guider built
    result = measure(size, steps, repeats)
    result.update(
        target=TARGET,
        settings={"size": size, "steps": steps, "repeats": repeats, "quick": args.quick, "model": "tiny SDXL"},
        machine={"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
    )
    seconds = result["median_seconds"]
    print(
        f"negprompt guider / diffusers CFG: {result['ratio']:.3f} (target ≤ {TARGET}; "
        f"{seconds['negprompt guider']:.3f} s vs {seconds['diffusers CFG']:.3f} s a run, median of {repeats})"
    )
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
