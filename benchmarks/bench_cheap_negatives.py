"""Cheap negatives in one run (docs/cheap-negatives.md): rule (9) with the negative's window ending at auto
against the full negative on the bundled model (wall time, removal), and true CFG on tiny FLUX with the
negative computed every K-th step (denoiser rows against full).

Targets (issue 31): auto / full wall time ≤ 0.8 at equal removal (± 2 points); FLUX rows ≤ 0.65 of full.
Removal here: share of the images holding the negative's thing without a negative (the detectors say so)
that lose it. Times are the median of interleaved repeats (`common.interleaved`).

    OMP_NUM_THREADS=1 python benchmarks/bench_cheap_negatives.py            # 200 prompts, 3 repeats
    OMP_NUM_THREADS=1 python benchmarks/bench_cheap_negatives.py --quick    # smoke: tiny FLUX + 4 images
    OMP_NUM_THREADS=1 python benchmarks/bench_cheap_negatives.py --faster-cache --holding-from scripts/negative_reuse.json

    OMP_NUM_THREADS=1 python benchmarks/bench_cheap_negatives.py --methods-table docs/methods/new-rows

``--methods-table OUT``: bench-methods' table (``negprompt.shapes.methods``, same prompts, seeds and measures)
for the rows added since the committed table (the guiders and the cheap negatives) beside their anchors (no
negative, ``sd``, ``dual s⁻ = s``), when the whole table is too long to rerun; units are kept in
runs/bench-methods-units/ (git-ignored; ``--units DIR`` elsewhere) so that an interrupted run resumes. ``--model``,
``--scale``: as bench-methods'. ``--steps N`` (``--methods-table`` and ``--faster-cache``; default the model's): a
shorter schedule, for a quick check of the modes (``--images 3 --steps 4``), not for the tables.

``--faster-cache``: rule (9) with the negative every K-th step (Δ held) against diffusers' FasterCache
(``diffusers.hooks.apply_faster_cache``, CFG-Cache: the first half of the batch, here the negative's rows,
approximated from the second by the last computed difference split into low and high frequencies) on the
bundled UNet, on the images of bench-methods' prompts and seeds holding the thing. FasterCache's hook splits
every positional tensor in halves, so a forward pre-hook hands it the timestep as one value per row (our
loop, like diffusers' pipelines, passes a 0-d tensor, on which it fails); its attention caches match no
UNet layer (their patterns start at ``transformer_blocks``), so only CFG-Cache acts. Removal, unreadable
images, colour and shape kept, pixels changed against the full negative, UNet rows per image.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import interleaved, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLUX_K = 4  # K = 3 gives (1 + 1/3)/2 ≈ 0.67 of the rows over a long schedule; K = 4 ≈ 0.62


def bundled(images: int, repeats: int, negative: str) -> dict:
    import numpy as np

    from negprompt.api import to_uint8
    from negprompt.guidance.plan import Term
    from negprompt.guidance.windows import Window
    from negprompt.session import Session
    from negprompt.shapes.detectors import detect
    from negprompt.shapes.evaluation import Row, row_prompts

    word = negative.split()[-1]
    session = Session("shapes")
    prompts, _ = row_prompts(Row("bench", "a {color} {shape}"), images)
    plain = session.run(session.spec(tuple(prompts), None, rule="cfg", seeds=range(images)))
    holding = [i for i, image in enumerate(plain.pixels) if getattr(detect(to_uint8(image)), word)]
    if not holding:
        return {"images": images, "holding": 0}
    texts = tuple(prompts[i] for i in holding)
    specs = {
        name: session.spec(texts, [Term(negative, None, window)], rule="sd", seeds=holding)
        for name, window in (("full", Window()), ("auto", Window(0, "auto")))
    }
    results = {name: session.run(spec) for name, spec in specs.items()}
    removal = {
        name: float(np.mean([not getattr(detect(to_uint8(p)), word) for p in g.pixels])) for name, g in results.items()
    }
    times = interleaved({name: (lambda s=spec: session.run(s)) for name, spec in specs.items()}, repeats)
    median = {name: float(np.median(t)) for name, t in times.items()}
    return {
        "images": images,
        "holding": len(holding),
        "removal": removal,
        "rows": {name: g.unet_batch_rows for name, g in results.items()},
        "auto_stop": results["auto"].negative_stops,
        "seconds": median,
        "wall_ratio": median["auto"] / median["full"],
        "removal_points": 100 * (removal["auto"] - removal["full"]),
    }


def flux(steps: int) -> dict:
    from negprompt.guidance.plan import Guidance, Term
    from negprompt.guidance.windows import Window
    from negprompt.sampling.loop import Group, encode_groups, sample_groups
    from negprompt.sampling.schedulers import make_scheduler
    from negprompt.testing.tiny_mmdit import build_tiny_flux

    components = build_tiny_flux(seed=0)
    rows = {}
    for name, window in (("full", Window()), (f"every {FLUX_K}", Window(0, None, FLUX_K))):
        guidance = Guidance("sd", Term("a photo of a cat"), (Term("a red hat", None, window),), 4.0)
        groups = [Group(guidance, (0, 1))]
        scheduler = make_scheduler("default", components.scheduler)
        conditioning = encode_groups(components, groups, scheduler, steps, 32, 48)
        output = sample_groups(
            components,
            groups,
            make_scheduler("default", components.scheduler),
            steps,
            32,
            48,
            conditioning=conditioning,
            embedded_guidance=3.5,
        )
        rows[name] = output.unet_batch_rows
    return {"steps": steps, "rows": rows, "rows_ratio": rows[f"every {FLUX_K}"] / rows["full"]}


def read_holders(
    session, prompts: list[str], images: int, word: str, holding_from: str | None, steps: int | None = None
) -> list[int]:
    """bench-methods' images (seed = index) whose plain version (``steps`` steps; None: the model's) holds
    ``word``: from a JSON of ``scripts/negative_convergence.py`` (key ``holding``) when given, else from the
    plain images."""
    import json

    from negprompt.api import to_uint8
    from negprompt.shapes.detectors import detect

    if holding_from:
        data = json.loads(Path(holding_from).read_text())
        if data["images"] != images or data["negative"].split()[-1] != word:
            raise SystemExit(f"{holding_from}: made for {data['images']} images of {data['negative']!r}")
        return list(data["holding"])
    holding = []
    for first in range(0, images, 50):
        seeds = range(first, min(images, first + 50))
        spec = session.spec(tuple(prompts[i] for i in seeds), None, rule="cfg", seeds=seeds, steps=steps)
        plain = session.run(spec)
        holding += [i for i, image in zip(seeds, plain.pixels) if getattr(detect(to_uint8(image)), word) is True]
    return holding


def faster_cache_run(session, spec, every: int, timesteps: tuple[int, int]) -> tuple:
    """``spec`` (rule sd, rows [negative, positive]) with diffusers' FasterCache on the UNet: the negative's
    rows computed every ``every``-th call inside ``timesteps`` (exclusive bounds), approximated between.
    Returns the generation and the UNet rows computed (counted at the UNet's first layer)."""
    import torch
    from diffusers.hooks import FasterCacheConfig, HookRegistry, apply_faster_cache

    unet = session.components.unet
    now = {"t": 1000.0}
    rows = [0]

    def per_row_timestep(module, args, kwargs):  # FasterCache halves every positional tensor: t as (B,)
        latents, t = args[0], args[1]
        now["t"] = float(t)
        return (latents, t.reshape(1).expand(latents.shape[0]), *args[2:]), kwargs

    def count(module, args):
        rows[0] += args[0].shape[0]

    config = FasterCacheConfig(
        spatial_attention_block_skip_range=2,  # matches no UNet layer: only CFG-Cache acts
        unconditional_batch_skip_range=every,
        unconditional_batch_timestep_skip_range=timesteps,
        current_timestep_callback=lambda: now["t"],
        tensor_format="BCHW",
    )
    handles = [
        unet.register_forward_pre_hook(per_row_timestep, with_kwargs=True),
        unet.conv_in.register_forward_pre_hook(count),
    ]
    apply_faster_cache(unet, config)
    try:
        with torch.no_grad():
            generation = session.run(spec)
    finally:
        registry = HookRegistry.check_if_exists_or_initialize(unet)
        for name in list(registry.hooks):
            registry.remove_hook(name, recurse=True)
        for handle in handles:
            handle.remove()
    return generation, rows[0]


def faster_cache(images: int, negative: str, holding_from: str | None, steps: int | None = None) -> dict:
    """Rule (9): full negative, every K-th step (ours, Δ held) and FasterCache's CFG-Cache, on the images
    holding ``negative``'s thing (``steps``: None for the model's schedule)."""
    import numpy as np

    from negprompt.analysis.locality import changed_pixels
    from negprompt.api import to_uint8
    from negprompt.guidance.economy import computed_rows
    from negprompt.guidance.plan import Term
    from negprompt.guidance.windows import Window
    from negprompt.session import Session
    from negprompt.shapes.detectors import detect
    from negprompt.shapes.evaluation import Row, row_prompts

    word = negative.split()[-1]
    session = Session("shapes")
    prompts, named = row_prompts(Row("bench", "a {color} {shape}"), images)
    holding = read_holders(session, prompts, images, word, holding_from, steps)
    if not holding:
        print(f"none of {images} plain images holds {word}: nothing to compare", flush=True)
        return {"images": images, "negative": negative, "holding": [], "table": {}}
    texts = tuple(prompts[i] for i in holding)

    def spec(window: Window):
        return session.spec(texts, [Term(negative, None, window)], rule="sd", seeds=holding, steps=steps)

    runs = {}
    for name, window in (
        ("full", Window()),
        ("ours auto end", Window(0, "auto")),
        ("ours every 2", Window(0, None, 2)),
        ("ours every 3", Window(0, None, 3)),
    ):
        generation = session.run(spec(window))
        rows = computed_rows(generation.spec.guidance, generation.num_steps, generation.negative_stops)
        runs[name] = (generation, rows * len(holding))
    for every, timesteps, label in (
        (2, (-1, 1001), "all steps"),
        (3, (-1, 1001), "all steps"),
        (5, (-1, 641), "defaults"),
    ):
        runs[f"FasterCache every {every}, {label}"] = faster_cache_run(session, spec(Window()), every, timesteps)
    reference = runs["full"][0].pixels
    table = {}
    for name, (generation, rows) in runs.items():
        reads = [detect(to_uint8(image)) for image in generation.pixels]
        readable = [f for f in reads if not f.unreadable(word)]
        table[name] = {
            "images": len(reads),
            "unreadable": sum(any(f.unreadable(a) for a in (word, "color", "shape")) for f in reads),
            "removed": sum(not getattr(f, word) for f in readable),
            "kept": sum(f.color == c and f.shape == s for f, (c, s) in zip(reads, [named[i] for i in holding])),
            "changed_vs_full": float(
                np.mean([changed_pixels(a, b).mean() for a, b in zip(reference, generation.pixels)])
            ),
            "rows_per_image": rows / len(holding),
        }
        print(name, table[name], flush=True)
    result = {"images": images, "negative": negative, "holding": holding, "table": table}
    return result if steps is None else {**result, "steps": steps}


ANCHORS = ("none (cfg)", "sd", "dual s⁻ = s")


def new_methods() -> list:
    """bench-methods' anchors and the rows added since its committed table: the guiders and the cheap
    negatives (a window ending at auto or with a period)."""
    from negprompt.shapes.methods import METHODS

    return [
        m for m in METHODS if m.name in ANCHORS or m.rule == "guider" or (m.window is not None and m.window.economical)
    ]


def methods_table(
    out: str,
    images: int,
    negative: str,
    model: str,
    scale: float | None,
    steps: int | None = None,
    units: str | None = None,
) -> list[Path]:
    """bench-methods' measures and table of :func:`new_methods` into ``out``; units cached under ``units``
    (default runs/bench-methods-units/, git-ignored), so that a run resumes. ``steps``: None for the model's."""
    import json
    import time

    from negprompt.session import Session
    from negprompt.shapes.methods import BenchSettings, bench_unit, summarize_bench, write_results

    settings = BenchSettings((negative,), images, steps=steps, scale=scale)
    settings.check()
    methods = new_methods()
    session = Session(model)
    name = f"{model}-scale-{scale or 'default'}-{images}" + ("" if steps is None else f"-steps-{steps}")
    cache = (Path(units) if units else ROOT / "runs" / "bench-methods-units") / name  # the default is git-ignored
    cache.mkdir(parents=True, exist_ok=True)
    payloads = []
    for u, (n, start, stop) in enumerate(settings.units()):
        path = cache / f"unit-{u:03d}.json"
        if not path.exists():
            began = time.perf_counter()
            payload = bench_unit(settings, session, n, start, stop, methods)
            path.write_text(json.dumps(payload))
            print(f"unit {u}: images {start}–{stop - 1}, {time.perf_counter() - began:.0f} s", flush=True)
        payloads.append(json.loads(path.read_text()))
    shown = {"model": model, "images per cell": images, "steps": steps or "default", "scheduler": "default"}
    shown["scale"] = scale or "default"
    shown["rows"] = "added since the committed table, with anchors (benchmarks/bench_cheap_negatives.py)"
    return write_results(summarize_bench(settings, payloads, methods), out, shown)


def check(args: argparse.Namespace) -> str | None:
    """What is wrong with the options, before any model loads (None: nothing)."""
    from negprompt.shapes.regions import WORLD_THINGS

    if args.images < 1:
        return f"--images {args.images}: give a whole number of images, 1 or more"
    words = args.negative.split()
    if not words or words[-1] not in WORLD_THINGS:
        return f"--negative {args.negative!r}: the detectors read the world's things: {', '.join(WORLD_THINGS)}"
    if args.steps is not None and not (args.methods_table or args.faster_cache):
        return "--steps applies to --methods-table and --faster-cache only (the cost benchmark has --quick)"
    if args.steps is not None and not 1 <= args.steps <= 1000:
        return f"--steps {args.steps}: give a whole number of steps in 1–1000"
    if args.steps is not None and args.holding_from:
        return "--holding-from reads holders found at the model's steps: leave out --steps, or --holding-from"
    if args.units and not args.methods_table:
        return "--units applies to --methods-table only"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 4 images, 1 repeat, 8 FLUX steps")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--negative", default="a hat")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cheap_negatives.json"))
    parser.add_argument("--faster-cache", action="store_true", help="ours every K against diffusers' FasterCache")
    parser.add_argument("--holding-from", default=None, help="--faster-cache: the holders from this JSON")
    parser.add_argument("--methods-table", metavar="OUT", default=None, help="bench-methods' new rows into OUT")
    parser.add_argument("--model", default="shapes", help="--methods-table: shapes or shapes-distilled")
    parser.add_argument("--scale", type=float, default=None, help="--methods-table: CFG scale (default: model's)")
    parser.add_argument("--steps", type=int, default=None, help="--methods-table, --faster-cache: (default: model's)")
    parser.add_argument("--units", default=None, help="--methods-table: unit cache (default runs/bench-methods-units)")
    args = parser.parse_args(argv)
    problem = check(args)
    if problem is not None:
        print(f"negprompt: error: {problem}", file=sys.stderr)
        return 2
    if args.methods_table:
        paths = methods_table(
            args.methods_table, args.images, args.negative, args.model, args.scale, args.steps, args.units
        )
        for path in paths:
            print(f"wrote {path}")
        return 0
    if args.faster_cache:
        out = args.out.replace("cheap_negatives.json", "cheap_negatives_faster_cache.json")
        write_result(faster_cache(args.images, args.negative, args.holding_from, args.steps), out)
        return 0
    images, repeats, steps = (4, 1, 8) if args.quick else (args.images, args.repeats, 20)
    result = {"quick": args.quick, "flux": flux(steps)}
    print(f"flux true CFG rows ratio (every {FLUX_K} / full): {result['flux']['rows_ratio']:.3f} (target ≤ 0.65)")
    result["bundled"] = bundled(images, repeats, args.negative)
    b = result["bundled"]
    if b["holding"]:
        print(
            f"bundled rule (9), auto end / full wall time: {b['wall_ratio']:.3f} (target ≤ 0.8); removal "
            f"{b['removal']['auto']:.0%} vs {b['removal']['full']:.0%} on {b['holding']} images holding "
            f"{args.negative!r}; stop {b['auto_stop']}"
        )
    else:
        print(f"bundled: none of {images} plain images holds {args.negative!r}; no ratio")
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
