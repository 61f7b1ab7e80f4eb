"""Loop speed on the newer families (Chroma, FLUX.2 [klein], Qwen-Image, Z-Image), as ratios against each family's
diffusers pipeline timed in the same run.

For each family: negprompt's run with one negative, at the pipeline's own guidance form, vs diffusers' pipeline on
the same components with the same negative, prompts encoded and images decoded by both:

- Chroma: rule sd at s = 4 vs ``ChromaPipeline(guidance_scale=4, negative_prompt=…)``;
- FLUX.2 [klein] (base, not distilled): rule sd at s = 4 vs ``Flux2KleinPipeline(guidance_scale=4,
  negative_prompt_embeds=…)``, the pipeline's own ``encode_prompt`` of the negative timed inside its run;
- Qwen-Image: rule token-renorm at s = 4 vs ``QwenImagePipeline(true_cfg_scale=4, negative_prompt=…)``;
- Z-Image: rule sd at s = 5 vs ``ZImagePipeline(guidance_scale=4, negative_prompt=…)`` (its g is our s − 1).

Runs are interleaved (ours, theirs, …) so that background load hits both alike; each ratio is the median of
per-repeat ratios. Random weights built from configs (tiny models): speed does not depend on the weights.

    python benchmarks/bench_families.py            # all four, tiny, CPU
    python benchmarks/bench_families.py --quick    # fewer steps and repeats
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import torch
from bench_sdxl import machine
from common import interleaved, median_ratio, write_result

from negprompt.models.components import Components
from negprompt.session import Session

PROMPT, NEGATIVE = "a photo of a cat with glasses", "a red hat"
TARGET = "<= 1.00"


def chroma() -> tuple[Components, Callable[[Components], Any], dict, dict]:
    from negprompt.testing.tiny_chroma import build_tiny_chroma, chroma_pipeline

    components = build_tiny_chroma(seed=0)
    length = int(components.tokenizer.model_max_length)
    return (
        components,
        chroma_pipeline,
        {"rule": "sd", "scale": 4.0},
        {
            "guidance_scale": 4.0,
            "negative_prompt": NEGATIVE,
            "max_sequence_length": length,
        },
    )


def flux2_klein() -> tuple[Components, Callable[[Components], Any], dict, dict]:
    from negprompt.testing.tiny_flux2_klein import build_tiny_flux2_klein, flux2_klein_pipeline

    components = build_tiny_flux2_klein(seed=0)
    length = components.family.text_length(components)
    return (
        components,
        flux2_klein_pipeline,
        {"rule": "sd", "scale": 4.0},
        {
            "guidance_scale": 4.0,
            "negative_text": NEGATIVE,  # encoded by the pipeline's own encode_prompt inside the timed run
            "max_sequence_length": length,
        },
    )


def qwen_image() -> tuple[Components, Callable[[Components], Any], dict, dict]:
    from negprompt.testing.tiny_qwen_image import build_tiny_qwen_image, qwen_image_pipeline

    components = build_tiny_qwen_image(seed=0)
    return (
        components,
        qwen_image_pipeline,
        {"rule": "token-renorm", "scale": 4.0},
        {
            "true_cfg_scale": 4.0,
            "negative_prompt": NEGATIVE,
        },
    )


def z_image() -> tuple[Components, Callable[[Components], Any], dict, dict]:
    from negprompt.testing.tiny_z_image import build_tiny_z_image, z_image_pipeline

    components = build_tiny_z_image(seed=0)
    return (
        components,
        z_image_pipeline,
        {"rule": "sd", "scale": 5.0},
        {
            "guidance_scale": 4.0,
            "negative_prompt": NEGATIVE,
        },
    )


FAMILIES = {"chroma": chroma, "flux2-klein": flux2_klein, "qwen-image": qwen_image, "z-image": z_image}


def measure(name: str, size: int, steps: int, batch: int, repeats: int) -> dict:
    """Median seconds of ours and of the pipeline, and their ratio."""
    components, make_pipeline, our_options, their_options = FAMILIES[name]()
    session = Session(components)
    seeds = list(range(batch))
    spec = session.spec(PROMPT, NEGATIVE, steps=steps, seeds=seeds, size=size, **our_options)
    pipe = make_pipeline(components)
    options = dict(their_options)
    negative_text = options.pop("negative_text", None)
    if "negative_prompt" in options:
        options["negative_prompt"] = [options["negative_prompt"]] * batch

    def theirs() -> None:
        extra = dict(options)
        if negative_text is not None:  # FLUX.2 [klein] takes a negative only as embeddings
            length = options["max_sequence_length"]
            extra["negative_prompt_embeds"] = pipe.encode_prompt([negative_text] * batch, max_sequence_length=length)[0]
        pipe(
            prompt=[PROMPT] * batch,  # by name: FLUX.2 [klein]'s first argument is an image
            num_inference_steps=steps,
            height=size,
            width=size,
            generator=[torch.Generator().manual_seed(s) for s in seeds],
            output_type="np",
            **extra,
        )

    times = interleaved({"ours": lambda: session.run(spec), "diffusers": theirs}, repeats)
    medians = {run: statistics.median(values) for run, values in times.items()}
    return {
        "median_seconds": medians,
        "ratios": {"ours_vs_diffusers": median_ratio(times, "ours", "diffusers")},
        "targets": {"ours_vs_diffusers": TARGET},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated: " + ", ".join(FAMILIES))
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2, help="images per run (seeds)")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--quick", action="store_true", help="8 steps, 5 repeats")
    parser.add_argument("--out", default="benchmarks/results/families.json")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 8, 5
    unknown = [f for f in args.families.split(",") if f and f not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    result = {"settings": vars(args), "machine": machine(), "families": {}}
    for name in [f for f in args.families.split(",") if f]:
        measured = measure(name, args.size, args.steps, args.batch, args.repeats)
        result["families"][name] = measured
        ratio = measured["ratios"]["ours_vs_diffusers"]
        seconds = measured["median_seconds"]
        print(
            f"{name:12s} ours / diffusers {ratio:.3f} (target {TARGET})   "
            f"ours {seconds['ours']:.3f} s, diffusers {seconds['diffusers']:.3f} s"
        )
    write_result(result, args.out)


if __name__ == "__main__":
    main()
