"""Loop speed on SD3 and FLUX components, as ratios against diffusers' pipelines timed in the same run.

(a) negprompt's run with one negative vs diffusers' pipeline on the same components, prompts encoded
and images decoded by both: SD3 with rule (9) at s = 5 vs ``StableDiffusion3Pipeline`` with
``negative_prompt``; FLUX with true CFG (rule sd, s = 4) and embedded guidance 3.5 vs ``FluxPipeline``
with ``true_cfg_scale`` and ``negative_prompt``;
(c) the same run while capturing the joint-attention maps of two words on both branches vs without;
(d) NAG and (f) VSF at s = 1 (one pass, the negative's text stream beside it) vs the plain run at s = 1;
FLUX only: (e) true CFG (two passes) vs the plain run at s = 1.

Runs are interleaved (ours, theirs, …) so background load hits all alike; each ratio is the median of
per-repeat ratios. Random weights built from configs: speed does not depend on the weights.

    python benchmarks/bench_mmdit.py                       # tiny SD3 and FLUX, CPU
    python benchmarks/bench_gpu.py --models sd3,flux       # SD3-medium and FLUX-dev sizes on a GPU
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_sdxl import machine
from common import interleaved, median_ratio, write_result

from negprompt.analysis.attention_stats import reduce_layer
from negprompt.attention.capture import CaptureRequest
from negprompt.attention.result import capture
from negprompt.models.components import Components
from negprompt.models.stable_diffusion_3 import text_length
from negprompt.session import Session
from negprompt.testing.peers import diffusers_pipeline

PROMPT, NEGATIVE = "a photo of a cat", "red glasses"
TARGETS = {"a_ours_vs_diffusers": "<= 1.00", "c_capture_vs_none": "<= 1.3"}
IN_ATTENTION_TARGETS = {"d_nag_vs_plain": "<= 1.35", "f_vsf_vs_plain": "<= 1.2"}
FLUX_TARGETS = {"e_true_cfg_vs_plain": "≈ 2 (two passes)"}
SCALES = {"stable-diffusion-3": 5.0, "flux": 4.0}  # SD3's CFG scale; FLUX's true-CFG scale


def build(preset: str, device: str, dtype: torch.dtype) -> Components:
    """``tiny-sd3``/``tiny-flux`` (CPU-sized) or ``sd3``/``flux`` (SD3-medium's and FLUX-dev's transformer sizes)."""
    from negprompt.testing.tiny_mmdit import build_tiny_flux, build_tiny_sd3

    if preset in ("tiny-sd3", "sd3"):
        components = build_tiny_sd3(seed=0, preset="tiny" if preset == "tiny-sd3" else "sd3-medium")
    elif preset in ("tiny-flux", "flux"):
        components = build_tiny_flux(seed=0, preset="tiny" if preset == "tiny-flux" else "flux-dev")
    else:
        raise ValueError(f"unknown preset {preset!r}; choose tiny-sd3, tiny-flux, sd3 or flux")
    return components.to(device, None if dtype == torch.float32 else dtype)


def measure(components: Components, size: int, steps: int, batch: int, repeats: int) -> dict:
    """Median seconds per run and per step of each variant, and the ratios (a) and (c)."""
    family = components.family
    scale = SCALES[family.name]
    session = Session(components)
    seeds = list(range(batch))
    spec = session.spec(PROMPT, NEGATIVE, steps=steps, seeds=seeds, size=size, scale=scale)
    request = CaptureRequest(words={"positive": ["cat"], "negative": ["glasses"]})
    pipe = diffusers_pipeline(components)
    t5 = components.tokenizer_2 if family.name == "flux" else components.tokenizer_3
    options = dict(max_sequence_length=text_length(components, t5, family.default_text_length))
    if family.name == "flux":
        options.update(true_cfg_scale=scale, guidance_scale=spec.embedded_guidance)
    else:
        options.update(guidance_scale=scale)

    def theirs() -> None:
        pipe(
            [PROMPT] * batch,
            negative_prompt=[NEGATIVE] * batch,
            num_inference_steps=steps,
            height=size,
            width=size,
            generator=[torch.Generator().manual_seed(s) for s in seeds],
            output_type="np",
            **options,
        )

    runs = {
        "ours": lambda: session.run(spec),
        "diffusers": theirs,
        "ours_capture": lambda: capture(spec, request, session, trace=False, reducer=reduce_layer),
    }
    flux = family.name == "flux"
    common = dict(steps=steps, seeds=seeds, size=size, scale=1.0)
    plain, nag = session.spec(PROMPT, rule="cfg", **common), session.spec(PROMPT, NEGATIVE, rule="nag", **common)
    vsf = session.spec(PROMPT, NEGATIVE, rule="vsf", **common)
    runs.update(plain=lambda: session.run(plain), nag=lambda: session.run(nag), vsf=lambda: session.run(vsf))
    times = interleaved(runs, repeats)

    def ratio(a: str, b: str) -> float:
        return median_ratio(times, a, b)

    medians = {name: statistics.median(values) for name, values in times.items()}
    ratios = {"a_ours_vs_diffusers": ratio("ours", "diffusers"), "c_capture_vs_none": ratio("ours_capture", "ours")}
    ratios.update(d_nag_vs_plain=ratio("nag", "plain"), f_vsf_vs_plain=ratio("vsf", "plain"))
    if flux:
        ratios.update(e_true_cfg_vs_plain=ratio("ours", "plain"))
    return {
        "median_seconds": medians,
        "seconds_per_step": {name: value / steps for name, value in medians.items()},
        "ratios": ratios,
        "targets": {**TARGETS, **IN_ATTENTION_TARGETS, **(FLUX_TARGETS if flux else {})},
    }


def report(result: dict) -> None:
    for name, value in result["ratios"].items():
        print(f"{name:24s} {value:.3f}   (target {result['targets'][name]})")
    for name, value in result["median_seconds"].items():
        print(f"  median {name:16s} {value:.3f} s  ({result['seconds_per_step'][name]:.4f} s/step)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-sd3,tiny-flux", help="comma-separated presets")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2, help="images per run (seeds)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--out", default="benchmarks/results/mmdit.json")
    args = parser.parse_args()
    result = {"settings": vars(args), "machine": machine(), "models": {}}
    for preset in [m for m in args.models.split(",") if m]:
        components = build(preset, args.device, getattr(torch, args.dtype))
        measured = measure(components, args.size, args.steps, args.batch, args.repeats)
        result["models"][preset] = measured
        print(f"{preset} at {args.size}² ({args.dtype}, {args.device})")
        report(measured)
    write_result(result, args.out)


if __name__ == "__main__":
    main()
