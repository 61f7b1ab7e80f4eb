"""Where does the negative act on the bundled model? Signals per step against removal when it stops there.

1. Plain images (no negative) of bench-methods' prompts ("a {color} {shape}", seed = index) pick the
   images that hold the negative's thing (the detectors say so).
2. On those, rule ``dual`` with s⁻ = s − 1 (equal to ``sd``, eq. 9, step by step, and it evaluates ∅ too)
   gives per step: Δ_t = ε_ỹ − ε_y (d_t = −Δ_t of the issue), e_t = σ_t‖Δ_t‖ (the auto end's signal),
   the cosine between consecutive d_t, the
   relative change c_t = ‖Δ_t − Δ_{t−1}‖/‖Δ_t‖, the relative norm ‖Δ_t‖/‖ε_y‖, r_t = ‖ε_ỹ − ε_∅‖/‖ε_y − ε_∅‖
   and the x̂₀ difference the negative makes, σ_t(s − 1)‖ε_ỹ − ε_∅‖ (RMS per latent value).
3. Rule ``sd`` with the negative's branch stopped at step k, two ways: "hold" (the last Δ reused to the
   end: the auto end's stand-in, one row a step after k) and "drop" (guidance interval 0:k, ε̂ = ε_y after
   k, also one row). Removal (share of the thing-holding images without it), colour and shape kept,
   and the pixels changed against the full negative's image.
4. Offline, where the criterion c_t < τ for m computed steps in a row would stop, for a grid of (τ, m).

5. ``--reuse``: instead of 1–4, hold against extrapolate (``economy.REUSE``) for the negative computed
   every K-th step under rules ``sd`` and ``dual`` (s⁻ = s, as bench-methods' rows), on bench-methods' prompts
   and seeds: removal on the images whose plain version holds the thing, the images the detectors could not
   read, colour and shape kept, pixels changed against the same rule's full negative, rows per image.

Usage: OMP_NUM_THREADS=1 python scripts/negative_convergence.py [--images 200] [--negative "a hat"]
       OMP_NUM_THREADS=1 python scripts/negative_convergence.py --reuse [--images 200] [--every 2 3 4] [--steps N]
Writes scripts/negative_convergence.json (--reuse: scripts/negative_reuse.json; or --out).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from negprompt.analysis.locality import changed_pixels
from negprompt.api import to_uint8
from negprompt.guidance import economy
from negprompt.guidance.plan import Term
from negprompt.guidance.windows import Window
from negprompt.sampling.schedule import alpha_bar_of
from negprompt.sampling.schedulers import make_scheduler
from negprompt.session import Session
from negprompt.shapes.detectors import detect
from negprompt.shapes.evaluation import Row, row_prompts
from negprompt.shapes.regions import WORLD_THINGS

FULL = Window()
STOPS = (1, 2, 3, 4, 5, 6, 8, 10, 14)
GRID = [(tau, m) for tau in (0.05, 0.1, 0.15, 0.2, 0.3) for m in (1, 2, 3)]


def found(pixels: np.ndarray, word: str) -> list[dict]:
    out = []
    for image in pixels:
        f = detect(to_uint8(image))
        out.append({"thing": bool(getattr(f, word)), "color": f.color, "shape": f.shape})
    return out


def judge(pixels: np.ndarray, word: str, named: list, reference: np.ndarray) -> dict:
    rows = found(pixels, word)
    return {
        "removal": float(np.mean([not r["thing"] for r in rows])),
        "kept": float(np.mean([r["color"] == c and r["shape"] == s for r, (c, s) in zip(rows, named)])),
        "changed_vs_full": float(np.mean([changed_pixels(a, b).mean() for a, b in zip(reference, pixels)])),
    }


def stop_at(k: int):
    """A stand-in for the criterion that ends the negative after step k − 1 (it has seen k effects)."""
    return lambda effects, *args, **kwargs: len(effects) >= k


def plain_holders(
    session: Session, prompts: list[str], images: int, word: str, steps: int | None = None
) -> tuple[list[int], int]:
    """The images (seed = index) whose plain version (``steps`` steps; None: the model's) the detectors read
    as holding ``word``, and how many plain images they could not read for it."""
    holding, unreadable = [], 0
    for first in range(0, images, 50):
        seeds = range(first, min(images, first + 50))
        spec = session.spec(tuple(prompts[i] for i in seeds), None, rule="cfg", seeds=seeds, steps=steps)
        plain = session.run(spec)
        for i, image in zip(seeds, plain.pixels):
            f = detect(to_uint8(image))
            if f.unreadable(word):
                unreadable += 1
            elif getattr(f, word):
                holding.append(i)
    return holding, unreadable


def judge_read(pixels: np.ndarray, word: str, named: list, reference: np.ndarray) -> dict:
    """Removal counted on the readable images (the thing gone), the images unreadable for the thing,
    colour or shape, colour and shape kept, and the share of pixels changed against ``reference``."""
    reads = [detect(to_uint8(image)) for image in pixels]
    bad = [any(f.unreadable(a) for a in (word, "color", "shape")) for f in reads]
    readable = [f for f in reads if not f.unreadable(word)]
    return {
        "images": len(reads),
        "unreadable": int(sum(bad)),
        "removed": int(sum(not getattr(f, word) for f in readable)),
        "removal": float(np.mean([not getattr(f, word) for f in readable])) if readable else float("nan"),
        "kept": int(sum(f.color == c and f.shape == s for f, (c, s) in zip(reads, named))),
        "changed_vs_full": float(np.mean([changed_pixels(a, b).mean() for a, b in zip(reference, pixels)])),
    }


def compare_reuse(args: argparse.Namespace) -> dict:
    """Hold against extrapolate for the negative every K-th step (rules sd and dual s⁻ = s) on the images
    of bench-methods' prompts and seeds that hold the negative's thing without it."""
    word = args.negative.split()[-1]
    session = Session(args.model)
    scale = float(session.defaults["scale"])
    prompts, named = row_prompts(Row("bench", "a {color} {shape}"), args.images)
    start = time.perf_counter()
    holding, plain_unreadable = plain_holders(session, prompts, args.images, word, args.steps)
    print(f"{len(holding)} of {args.images} plain images hold {word} ({plain_unreadable} unreadable)", flush=True)
    texts, kept_named = tuple(prompts[i] for i in holding), [named[i] for i in holding]
    rules = {"sd": None, "dual": scale}  # s⁻: sd takes the scale; dual's s⁻ = s as in bench-methods
    windows = {"full": FULL, **{f"every {k}": Window(0, None, k) for k in args.every}}
    results: dict = {}
    for reuse in ("hold", "extrapolate"):
        economy.REUSE = reuse
        try:
            names = [(rule, w) for rule in rules for w in windows if reuse == "hold" or w != "full"]
            specs = [
                session.spec(
                    texts,
                    [Term(args.negative, rules[r], windows[w])],
                    rule=r,
                    seeds=holding,
                    scale=scale,
                    steps=args.steps,
                )
                for r, w in names
            ]
            for (rule, w), spec, generation in zip(names, specs, session.run_together(specs)):
                rows = economy.computed_rows(spec.guidance, generation.num_steps, generation.negative_stops)
                results.setdefault(rule, {})[f"{w}, {reuse}" if w != "full" else "full"] = (generation, rows)
        finally:
            economy.REUSE = "hold"
    table = {
        rule: {
            name: {**judge_read(g.pixels, word, kept_named, runs["full"][0].pixels), "rows_per_image": rows}
            for name, (g, rows) in runs.items()
        }
        for rule, runs in results.items()
    }
    steps = {} if args.steps is None else {"steps": args.steps}  # a shorter schedule: only where asked
    return {
        "model": args.model,
        "negative": args.negative,
        "images": args.images,
        **steps,
        "plain_unreadable": plain_unreadable,
        "holding": holding,
        "scale": scale,
        "every": list(args.every),
        "table": table,
        "seconds": time.perf_counter() - start,
        "command": f"OMP_NUM_THREADS=1 python scripts/negative_convergence.py --reuse --images {args.images} "
        f'--negative "{args.negative}" --model {args.model} --every {" ".join(map(str, args.every))}'
        + ("" if args.steps is None else f" --steps {args.steps}"),
    }


def write_reuse(args: argparse.Namespace) -> None:
    """``--reuse``: :func:`compare_reuse` written to --out (default scripts/negative_reuse.json) and printed."""
    result = compare_reuse(args)
    out = Path(args.out or Path(__file__).with_name("negative_reuse.json"))
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["table"], indent=1))


def plain_holding(session: Session, prompts: list[str], images: int, word: str) -> list[int]:
    """Step 1: the images (seed = index) whose plain version the detectors read as holding ``word``."""
    holding = []
    for first in range(0, images, 50):
        seeds = range(first, min(images, first + 50))
        plain = session.run(session.spec(tuple(prompts[i] for i in seeds), None, rule="cfg", seeds=seeds))
        holding += [i for i, r in zip(seeds, found(plain.pixels, word)) if r["thing"]]
    return holding


def signal_row(info, scheduler, scale: float, previous: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
    """Step 2 for one traced step (predictions (B, C, h, w) per branch): its signals, and Δ_t for the next."""
    p = info.predictions
    d = p["positive"] - p["negative"]
    delta = -d
    alpha_bar = alpha_bar_of(scheduler, info.timestep)
    sigma = ((1 - alpha_bar) / alpha_bar) ** 0.5
    row = {
        "step": info.step,
        "sigma": sigma,
        "relative_norm": float((delta.flatten(1).norm(dim=1) / p["positive"].flatten(1).norm(dim=1)).mean()),
        "r_t": float(
            (
                (p["negative"] - p["unconditional"]).flatten(1).norm(dim=1)
                / (p["positive"] - p["unconditional"]).flatten(1).norm(dim=1)
            ).mean()
        ),
        "x0_difference": float(sigma * (scale - 1) * (p["negative"] - p["unconditional"]).pow(2).mean().sqrt()),
        "effect_max": float(economy.clean_effect(delta, sigma).max()),
        "effect_mean": float(economy.clean_effect(delta, sigma).mean()),
    }
    if previous is not None:
        change = economy.relative_change(delta, previous, 1)
        row["change_max"] = float(change.max())
        row["change_mean"] = float(change.mean())
        row["cosine"] = float(torch.nn.functional.cosine_similarity(d.flatten(1), -previous.flatten(1)).mean())
    return row, delta


def step_signals(session: Session, traced, scale: float) -> list[dict]:
    """Step 2: the signals of every step of a traced ``dual`` run (one row per step)."""
    scheduler = make_scheduler(traced.spec.scheduler, session.components.scheduler)
    scheduler.set_timesteps(traced.spec.steps)
    signals, previous = [], None
    for info in traced.trace:
        row, previous = signal_row(info, scheduler, scale, previous)
        signals.append(row)
    return signals


def stop_sweep(session: Session, spec, word: str, named: list, full: np.ndarray, timing: dict) -> dict:
    """Step 3: removal with the negative's branch stopped at each of :data:`STOPS`, dropped (guidance
    interval 0:k) and held (the auto end's stand-in forced to stop at k); ``spec(rule, window, interval)``
    makes a run's spec, ``full`` is the full negative's images, ``timing`` gets the drop sweep's seconds."""
    sweep = {"hold": {}, "drop": {}}
    start = time.perf_counter()
    drops = session.run_together([spec("sd", interval=Window(0, k)) for k in STOPS])
    timing["drop_sweep"] = time.perf_counter() - start
    for k, generation in zip(STOPS, drops):
        sweep["drop"][k] = judge(generation.pixels, word, named, full)
    original = economy.has_converged
    try:
        for k in STOPS:
            economy.has_converged = stop_at(k)
            start = time.perf_counter()
            generation = session.run(spec("sd", Window(0, "auto")))
            sweep["hold"][k] = {
                **judge(generation.pixels, word, named, full),
                "rows": generation.unet_batch_rows,
                "seconds": time.perf_counter() - start,
            }
            print("hold", k, sweep["hold"][k], flush=True)
    finally:
        economy.has_converged = original
    sweep["full"] = judge(full, word, named, full)
    return sweep


def criterion_stops(signals: list[dict]) -> dict:
    """Step 4: where the criterion would stop (steps seen; None: never) for each (τ, m) of :data:`GRID`."""
    effects = [s["effect_max"] for s in signals]
    criterion = {}
    for tau, m in GRID:
        stop = next((i + 1 for i in range(len(effects)) if economy.has_converged(effects[: i + 1], tau, m)), None)
        criterion[f"tau={tau},m={m}"] = stop
    return criterion


def convergence(args: argparse.Namespace) -> dict:
    """Steps 1–4 (the module's docstring) on ``args.images`` of bench-methods' prompts and seeds."""
    word = args.negative.split()[-1]
    session = Session(args.model)
    scale = float(session.defaults["scale"])
    prompts, named = row_prompts(Row("bench", "a {color} {shape}"), args.images)
    timing = {}
    start = time.perf_counter()
    holding = plain_holding(session, prompts, args.images, word)
    timing["plain"] = time.perf_counter() - start
    print(f"{len(holding)} of {args.images} plain images hold {word}", flush=True)
    texts, kept_named = tuple(prompts[i] for i in holding), [named[i] for i in holding]

    def spec(rule: str, window: Window = FULL, interval: Window | None = None):
        return session.spec(
            texts, [Term(args.negative, None, window)], rule=rule, seeds=holding, scale=scale, interval=interval
        )

    start = time.perf_counter()
    traced = session.run(spec("dual"), trace=True)
    timing["traced"] = time.perf_counter() - start
    signals = step_signals(session, traced, scale)
    print(json.dumps(signals, indent=0), flush=True)
    sweep = stop_sweep(session, spec, word, kept_named, traced.pixels, timing)
    return {
        "model": args.model,
        "negative": args.negative,
        "images": args.images,
        "holding": holding,
        "scale": scale,
        "steps": traced.num_steps,
        "signals": signals,
        "sweep": sweep,
        "criterion_stops": criterion_stops(signals),
        "timing_s": timing,
        "command": f"OMP_NUM_THREADS=1 python scripts/negative_convergence.py --images {args.images} "
        f'--negative "{args.negative}" --model {args.model}',
    }


def write_convergence(args: argparse.Namespace) -> None:
    """Steps 1–4: :func:`convergence` written to --out (default scripts/negative_convergence.json), its
    sweep and criterion stops printed."""
    result = convergence(args)
    Path(args.out or Path(__file__).with_suffix(".json")).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"sweep": result["sweep"], "criterion_stops": result["criterion_stops"]}, indent=1))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--negative", default="a hat")
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--out", default=None, help="output JSON (default scripts/negative_convergence.json)")
    parser.add_argument("--reuse", action="store_true", help="hold against extrapolate (scripts/negative_reuse.json)")
    parser.add_argument("--every", type=int, nargs="+", default=[2, 3, 4], help="--reuse: the periods K")
    parser.add_argument("--steps", type=int, default=None, help="--reuse: sampling steps (default: the model's)")
    return parser.parse_args(argv)


def check(args: argparse.Namespace) -> str | None:
    """What is wrong with the options, before any model loads (None: nothing)."""
    if args.images < 1:
        return f"--images {args.images}: give a whole number of images, 1 or more"
    words = args.negative.split()
    if not words or words[-1] not in WORLD_THINGS:
        return f"--negative {args.negative!r}: the detectors read the world's things: {', '.join(WORLD_THINGS)}"
    if args.steps is not None and not args.reuse:
        return "--steps applies to --reuse only (the convergence sweep stops at steps up to 14 of the model's)"
    if args.steps is not None and not 1 <= args.steps <= 1000:
        return f"--steps {args.steps}: give a whole number of steps in 1–1000"
    if any(k < 1 for k in args.every):
        return f"--every {' '.join(map(str, args.every))}: give periods K of 1 or more"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = check(args)
    if problem is not None:
        print(f"negprompt: error: {problem}", file=sys.stderr)
        return 2
    if args.reuse:
        write_reuse(args)
    else:
        write_convergence(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
