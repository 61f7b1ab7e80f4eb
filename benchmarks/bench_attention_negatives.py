"""Cost of negatives inside attention (NAG, VSF) at scale 1, as ratios against the plain run at scale 1.

For the bundled model, its guidance-distilled student and a tiny SD: NAG / plain and VSF / plain at
s = 1 (one denoiser pass per step plus the extra attention work), and rule (9) at the model's default
scale / plain at s = 1 for comparison (two passes; one on the distilled model, whose default is s = 1
with the guidance scale as an input, so there rule (9) cannot use the negative). Runs are interleaved; ratios are medians of per-repeat ratios.

    python benchmarks/bench_attention_negatives.py
    python benchmarks/bench_attention_negatives.py --install   # NAG's host work: install per run, hand-off per call
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


def install_cost(calls: int = 20) -> dict[str, dict[str, float]]:
    """CPU milliseconds of NAG's host work around the denoiser calls, on an SDXL-size UNet and a FLUX-dev-size
    transformer built on the meta device (no weights: only the module tree matters). docs/gpu-cost.md.

    ``per_call_install``: install and restore of the processors at one call (what every denoiser call did before
    they were installed once per run; :func:`negative_in_attention` still does it for a single call);
    ``per_run_install``: install and restore once for a run (:func:`negative_attention_run`); ``per_call_handoff``:
    what each call of a run now does (:meth:`NegativeAttentionRun.call`: hand the installed processors the call's
    parameters, clear them on exit)."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    from negprompt.guidance.attention_processors import nag_combine
    from negprompt.layers.layout import AttentionLayout

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10), block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )  # fmt: skip
        flux = FluxTransformer2DModel(
            num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
            joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
        )  # fmt: skip
    combine = nag_combine(5.0, 2.5, 0.25)
    result = {}
    for name, model, kind, width in (("sdxl_unet", unet, "cross", 2048), ("flux_dev_transformer", flux, "joint", 4096)):
        negative = {"encoder_hidden_states": torch.zeros(1, 77, width, device="meta")}  # FLUX embeds it once a run
        result[name] = _host_work(model, AttentionLayout(kind=kind), negative, combine, calls)
    return result


def _host_work(model: torch.nn.Module, layout, negative: dict, combine, calls: int) -> dict[str, float]:
    """The three costs of :func:`install_cost` on one model, each a mean of ``calls`` repeats."""
    from negprompt.guidance.attention_processors import negative_attention_run, negative_in_attention

    rows = slice(0, 1)

    def timed(work) -> float:
        start = time.process_time()
        for _ in range(calls):
            work()
        return 1000 * (time.process_time() - start) / calls

    def per_call_install() -> None:
        with negative_in_attention(model, layout, rows, negative, combine):
            pass

    def per_run_install() -> None:
        with negative_attention_run([model], layout):
            pass

    with negative_attention_run([model], layout) as run:

        def handoff() -> None:
            with run.call(model, rows, negative, combine, "negative"):
                pass

        handoff()  # a run's first call embeds the negative (FLUX: context_embedder, once per run)
        handed = timed(handoff)
    return {
        "per_call_install": timed(per_call_install),
        "per_run_install": timed(per_run_install),
        "per_call_handoff": handed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--install", action="store_true", help="only the processors' install cost per call")
    parser.add_argument("--out", default="benchmarks/results/attention_negatives.json")
    args = parser.parse_args()
    if args.install:
        for name, costs in install_cost().items():
            print(
                f"{name:22s} NAG's processors (CPU time): install + restore {costs['per_call_install']:.2f} ms "
                f"(per call before, once per run now: {costs['per_run_install']:.2f} ms); "
                f"per call of a run now {1000 * costs['per_call_handoff']:.1f} µs"
            )
        return
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
