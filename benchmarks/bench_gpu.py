"""GPU speed: SD 1.5-, SDXL-, SD3-medium- and FLUX-dev-size models (random weights from their configs), half precision.

For each model, as ratios timed in the same run (interleaved, medians of per-repeat ratios): negprompt's loop
with one negative vs diffusers' pipeline (SD3: CFG s = 5; FLUX: true CFG s = 4 with embedded guidance 3.5; UNets:
CFG s = 5), capture of two words on both branches vs none, NAG and VSF at s = 1 vs the plain run at s = 1 (one
pass a step); and per run: seconds per step, the share of the run spent inside the denoiser (CUDA events around
its forward, in a separate untimed pass) and the peak GPU memory. Every preset decodes with a full-size VAE at
the real latent factor 8 (SD3 and FLUX at 1024²: 4 096 image tokens) and, for SD3 and FLUX, T5 at its real
length (256, 512 tokens) so that the negative's extra keys have their real proportion. Needs a CUDA GPU;
elsewhere it says so and exits with code 2, except with ``--tiny``.

    python benchmarks/bench_gpu.py                     # --quick (default): the four models, 10 steps, 2 repeats;
                                                       # about 6 minutes on one H100 or H200
    python benchmarks/bench_gpu.py --full              # 20 steps, 3 repeats (about twice as long)
    python benchmarks/bench_gpu.py --models sd3,flux   # some of them
    python benchmarks/bench_gpu.py --tiny --device cpu # every preset's code path on tiny models at 64², one step
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from typing import Any

import torch
from bench_sdxl import machine
from common import interleaved, median_ratio, write_result

from negprompt.analysis.attention_stats import reduce_layer
from negprompt.attention.capture import CaptureRequest
from negprompt.attention.result import capture
from negprompt.models.components import Components
from negprompt.session import Session

MODELS = {"sd15": 512, "sdxl": 1024, "sd3": 1024, "flux": 1024}  # preset → image side
PROMPT, NEGATIVE = "a photo of a cat", "red glasses"
SCALES = {"sd15": 5.0, "sdxl": 5.0, "sd3": 5.0, "flux": 4.0}  # the run with one negative: CFG, or FLUX's true CFG
T5_LENGTH = {"sd3": 256, "flux": 512}  # the pipelines' max_sequence_length
TARGETS = {
    "ours_vs_diffusers": "<= 1.00",
    "capture_vs_none": "<= 1.3",
    "nag_vs_plain": "<= 1.15 (UNets), <= 1.25 (MMDiTs)",
    "vsf_vs_plain": "<= 1.15 (UNets), <= 1.25 (MMDiTs)",
}
MODES = {"quick": (10, 2), "full": (20, 3), "tiny": (1, 1)}  # steps, repeats


# ---------------------------------------------------------------- the models


def build(preset: str, tiny: bool) -> Components:
    """The preset's components on the CPU in float32: real sizes, or (``tiny``) the tiny model of the same family;
    with a VAE at the real latent factor 8 (:func:`vae_at_factor_8`) and, at real sizes, T5 at its real length."""
    from negprompt.testing.tiny_mmdit import build_t5_tokenizer, build_tiny_flux, build_tiny_sd3
    from negprompt.testing.tiny_sd import build_tiny_sd, build_tiny_sdxl

    if preset == "sd15":
        components = build_tiny_sd(seed=0, unet_preset="tiny" if tiny else "sd15")
    elif preset == "sdxl":
        components = build_tiny_sdxl(seed=0, unet_preset="tiny" if tiny else "sdxl")
    elif preset == "sd3":
        components = build_tiny_sd3(seed=0, preset="tiny" if tiny else "sd3-medium")
    else:
        components = build_tiny_flux(seed=0, preset="tiny" if tiny else "flux-dev")
    changes: dict[str, Any] = {"vae": vae_at_factor_8(components.vae, tiny)}
    if preset in T5_LENGTH and not tiny:
        changes["tokenizer_3" if preset == "sd3" else "tokenizer_2"] = build_t5_tokenizer(max_length=T5_LENGTH[preset])
    return replace(components, **changes)


def vae_at_factor_8(vae: Any, tiny: bool) -> Any:
    """An ``AutoencoderKL`` with ``vae``'s latent channels, scaling, shift and quant convolutions, and 4 levels:
    8 pixels per latent cell as in the real models; full width (128–512 channels), or 16 channels (``tiny``)."""
    from diffusers import AutoencoderKL

    config = vae.config
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16,) * 4 if tiny else (128, 256, 512, 512),
        layers_per_block=1 if tiny else 2,
        latent_channels=config.latent_channels,
        norm_num_groups=8 if tiny else 32,
        sample_size=64 if tiny else 1024,
        scaling_factor=config.scaling_factor,
        shift_factor=config.shift_factor,
        use_quant_conv=config.use_quant_conv,
        use_post_quant_conv=config.use_post_quant_conv,
        force_upcast=config.force_upcast,
    ).eval()


def image_tokens(components: Components, size: int) -> int:
    """The denoiser's image tokens (MMDiTs: patches) or latent cells (UNets) at ``size``²."""
    family = components.family
    cells = (size // family.latent_factor(components)) ** 2
    if components.transformer is None:
        return cells
    patch = getattr(components.transformer.config, "patch_size", 1) or 1
    return cells // (patch * patch) // (4 if family.name == "flux" else 1)  # FLUX packs 2×2 latent cells


# ---------------------------------------------------------------- the runs


def runs(preset: str, components: Components, size: int, steps: int) -> dict[str, Any]:
    """The runs timed against each other, each a function of no arguments."""
    from negprompt.models.stable_diffusion_3 import text_length
    from negprompt.testing.peers import diffusers_pipeline

    session = Session(components)
    seeds = [0]
    common = dict(steps=steps, seeds=seeds, size=size)
    spec = session.spec(PROMPT, NEGATIVE, scale=SCALES[preset], **common)
    pipe = diffusers_pipeline(components)
    options: dict[str, Any] = dict(guidance_scale=SCALES[preset])
    if preset in T5_LENGTH:
        t5 = components.tokenizer_3 if preset == "sd3" else components.tokenizer_2
        options = dict(max_sequence_length=text_length(components, t5, T5_LENGTH[preset]), guidance_scale=5.0)
    if preset == "flux":
        options.update(true_cfg_scale=SCALES[preset], guidance_scale=spec.embedded_guidance)

    def theirs() -> None:
        generator = [torch.Generator().manual_seed(s) for s in seeds]
        pipe([PROMPT], negative_prompt=[NEGATIVE], num_inference_steps=steps, height=size, width=size,
             generator=generator, output_type="np", **options)  # fmt: skip

    request = CaptureRequest(words={"positive": ["cat"], "negative": ["glasses"]})
    at_one = {name: session.spec(PROMPT, NEGATIVE, rule=name, scale=1.0, **common) for name in ("nag", "vsf")}
    plain = session.spec(PROMPT, rule="cfg", scale=1.0, **common)
    return {
        "ours": lambda: session.run(spec),
        "diffusers": theirs,
        "capture": lambda: capture(spec, request, session, trace=False, reducer=reduce_layer),
        "plain": lambda: session.run(plain),
        "nag": lambda: session.run(at_one["nag"]),
        "vsf": lambda: session.run(at_one["vsf"]),
    }


class DenoiserTimer:
    """Seconds inside the denoiser's forward during a run: CUDA events around each call (no sync in the run), or
    the host clock on the CPU; hooks removed by :meth:`close`."""

    def __init__(self, denoiser: Any) -> None:
        self.cuda = next(denoiser.parameters()).device.type == "cuda"
        self.spans: list[tuple[Any, Any]] = []
        self.hooks = [denoiser.register_forward_pre_hook(self._start), denoiser.register_forward_hook(self._end)]

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _start(self, module: Any, args: Any) -> None:
        self.spans.append((self._now(), None))

    def _end(self, module: Any, args: Any, output: Any) -> None:
        self.spans[-1] = (self.spans[-1][0], self._now())

    def seconds(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(start.elapsed_time(end) for start, end in self.spans) / 1000
        return sum(end - start for start, end in self.spans)

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()


def profile(components: Components, run: Any) -> dict[str, float]:
    """One untimed-by-the-ratios run: its seconds, the share inside the denoiser, the peak GPU memory (GiB)."""
    from common import timed

    cuda = torch.cuda.is_available() and components.family is not None and _device(components).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timer = DenoiserTimer(components.unet if components.transformer is None else components.transformer)
    try:
        with torch.no_grad():
            seconds = timed(run)
        inside = timer.seconds()
    finally:
        timer.close()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    return {"seconds": seconds, "inside_denoiser_share": inside / seconds, "peak_gib": peak}


def _device(components: Components) -> torch.device:
    denoiser = components.unet if components.transformer is None else components.transformer
    return next(denoiser.parameters()).device


def measure(preset: str, components: Components, size: int, steps: int, repeats: int) -> dict:
    """Median seconds, per-step seconds, the ratios, and each run's inside share and peak memory."""
    variants = runs(preset, components, size, steps)
    times = interleaved(variants, repeats)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "image_tokens": image_tokens(components, size),
        "latent_factor": components.family.latent_factor(components),
        "median_seconds": medians,
        "seconds_per_step": {name: value / steps for name, value in medians.items()},
        "ratios": {
            "ours_vs_diffusers": median_ratio(times, "ours", "diffusers"),
            "capture_vs_none": median_ratio(times, "capture", "ours"),
            "nag_vs_plain": median_ratio(times, "nag", "plain"),
            "vsf_vs_plain": median_ratio(times, "vsf", "plain"),
        },
        "profile": {name: profile(components, run) for name, run in variants.items()},
        "targets": TARGETS,
    }


def report(name: str, measured: dict) -> None:
    print(f"{name}: {measured['image_tokens']} image tokens, latent factor {measured['latent_factor']}")
    for key, value in measured["ratios"].items():
        print(f"  {key:18s} {value:.3f}   (target {TARGETS[key]})")
    for key, seconds in measured["median_seconds"].items():
        p = measured["profile"][key]
        print(
            f"  {key:10s} {seconds:7.3f} s  {measured['seconds_per_step'][key]:.4f} s/step  "
            f"inside the denoiser {p['inside_denoiser_share']:.0%}  peak {p['peak_gib']:.1f} GiB"
        )


# ---------------------------------------------------------------- main


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sd15,sdxl,sd3,flux", help="comma-separated: sd15, sdxl, sd3, flux")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="10 steps, 2 repeats (the default)")
    mode.add_argument("--full", action="store_true", help="20 steps, 3 repeats")
    mode.add_argument("--tiny", action="store_true", help="tiny models of each family, 1 step, 1 repeat")
    parser.add_argument("--steps", type=int, help="overrides the mode's")
    parser.add_argument("--repeats", type=int, help="overrides the mode's")
    parser.add_argument("--size", type=int, help="image side (default: each model's; --tiny: 64)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                        help="auto: float16 for UNets, bfloat16 for SD3 and FLUX")  # fmt: skip
    parser.add_argument("--device", default="cuda", help="cuda, or cpu with --tiny")
    parser.add_argument("--out", default="benchmarks/results/gpu.json")
    return parser.parse_args(argv)


def check(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments or the machine, in one line; None if nothing."""
    unknown = sorted(set(args.models.split(",")) - set(MODELS) - {""})
    if unknown:
        return f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}"
    if args.device == "cuda" and not torch.cuda.is_available():
        return (
            "no CUDA GPU here (torch.cuda.is_available() is False: no GPU or a CPU-only torch "
            f"{torch.__version__}); run it on a machine with CUDA, --tiny --device cpu for the code paths, "
            "or benchmarks/bench_sdxl.py for the CPU ratios"
        )
    if args.device != "cuda" and not args.tiny:
        return f"--device {args.device} runs only with --tiny (real sizes need a CUDA GPU)"
    if args.size is not None and args.size % 16:
        return f"--size must be a multiple of 16 (8 pixels a latent cell, 2×2 patches), got {args.size}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    problem = check(args)
    if problem is not None:
        print(f"bench_gpu.py: {problem}", file=sys.stderr)
        return 2
    mode = "tiny" if args.tiny else "full" if args.full else "quick"
    steps, repeats = args.steps or MODES[mode][0], args.repeats or MODES[mode][1]
    result: dict[str, Any] = {"settings": {**vars(args), "mode": mode}, "machine": machine(), "models": {}}
    start = time.perf_counter()
    for preset in [m for m in MODELS if m in args.models.split(",")]:
        size = args.size or (64 if args.tiny else MODELS[preset])
        dtype = args.dtype if args.dtype != "auto" else "bfloat16" if preset in ("sd3", "flux") else "float16"
        dtype = "float32" if args.device == "cpu" else dtype
        components = build(preset, args.tiny).to(args.device, None if dtype == "float32" else getattr(torch, dtype))
        measured = measure(preset, components, size, steps, repeats)
        result["models"][f"{preset}@{size}"] = {"dtype": dtype, **measured}
        report(f"{preset} at {size}² ({dtype}, {args.device}, {steps} steps)", measured)
        print(f"  ({time.perf_counter() - start:.0f} s so far)")
        write_result(result, args.out)  # after each model: a run cut short keeps what it measured
        del components
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
