"""The shapes world's commands: ``train``, ``evaluate``, ``bench-methods`` and ``edit-sweep``.

Registered as the entry point ``shapes`` of the group ``negprompt.commands`` (``pyproject.toml``):
:func:`negprompt.interfaces.cli.build_parser` calls :func:`register` with its subcommands, built from the
shared options of :mod:`negprompt.interfaces.options`. Importing this module stays cheap (argparse and
those options): each handler imports what it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from negprompt.interfaces.options import (
    CommandError,
    add_device_options,
    add_model_options,
    add_quiet_option,
    finite_number,
    non_negative_int,
    number,
    number_range,
    positive_int,
    positive_number,
    seed_list,
    session_from_args,
)

# ---------------------------------------------------------------- train


def command_train(args: argparse.Namespace) -> int:
    """Trains (or resumes) into --out; says what the run costs before it starts, then measured after its
    first steps; a checkpoint every 250 steps, every 5 minutes and at Ctrl-C."""
    from negprompt.interfaces.outputs import check_destination

    check_destination(args.out, folder=True)  # before the heavy imports: a bad path answers at once
    low, high = number_range(args.guidance_range, "--guidance-range", "1:10")
    import torch
    from tqdm.auto import tqdm

    from negprompt.shapes.model import ShapesModelConfig
    from negprompt.shapes.training import (
        META_FILE,
        MODEL_FOLDER,
        TrainConfig,
        Trainer,
        check_training_folder,
        duration,
    )

    check_training_folder(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    init_from, init_sha256 = None, None
    if args.init_from is not None:
        from negprompt.models.loading import resolve_model_path
        from negprompt.shapes.training import weights_sha256

        init_from = resolve_model_path(args.init_from)
        init_sha256 = weights_sha256(init_from)
    distill_from, distill_sha256, model = None, None, ShapesModelConfig()
    if args.distill_from is not None:
        from negprompt.models.loading import resolve_model_path
        from negprompt.shapes.training import weights_sha256

        distill_from = resolve_model_path(args.distill_from)
        distill_sha256 = weights_sha256(distill_from)
        model = ShapesModelConfig(guidance_embedding_dim=args.guidance_dim)
    config = TrainConfig(
        seed=args.seed,
        samples=args.samples,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        thing_weight=args.thing_weight,
        init_from=None if init_from is None else str(init_from),
        init_sha256=init_sha256,
        world=args.world,
        distill_from=None if distill_from is None else str(distill_from),
        distill_sha256=distill_sha256,
        guidance_min=low,
        guidance_max=high,
        frames=args.frames,
        model=model,
    )
    out = Path(args.out)
    trainer = Trainer(config, out)
    if (out / META_FILE).exists():
        trainer.load_checkpoint()
    left = max(0, config.total_steps - trainer.step)
    per_example = VIDEO_FRAME_COST * config.frames if config.frames else 1.0  # in images' cost
    low_cost, high_cost = (left * seconds * config.batch_size * per_example / 32 for seconds in REFERENCE_STEP_SECONDS)
    print(
        f"train: {left} step{'s' if left != 1 else ''} of {config.batch_size} {'clips' if config.frames else 'examples'} to go"
        + (
            f" (resuming at step {trainer.step} of {config.total_steps})"
            if trainer.step
            else f" ({config.samples} samples)"
        )
        + (
            f"; about {duration(low_cost)}–{duration(high_cost)} on 2 CPU cores (docs/training.md)"
            f"; a checkpoint every {config.checkpoint_every} steps, 5 min and at Ctrl-C: the same command resumes"
            if left
            else ""
        ),
        flush=True,
    )
    trainer.run(
        progress=not args.quiet,
        max_seconds=args.max_minutes * 60 if args.max_minutes else None,
        say=lambda text: tqdm.write(f"train: {text}"),
    )
    if trainer.interrupted:
        print(
            f"train: stopped at step {trainer.step} of {config.total_steps} with its checkpoint; the same command resumes"
        )
        return 130
    model_dir = trainer.export(out / MODEL_FOLDER)
    print(f"step {trainer.step} of {config.total_steps}; wrote the EMA model to {model_dir}")
    return 0


# The cost of one training step of 32 examples on the 2-core machine of docs/training.md: 0.82 s (the
# world-v2 fine-tune, 2 threads) to 2.45 s (the first 160 000 samples, the cores shared at times).
REFERENCE_STEP_SECONDS = (0.82, 2.45)
# A clip's frame costs the video model this many images' worth of the image model's step (its temporal
# layers): 3.1 s of CPU a step of 2 clips × 9 frames against 1.94 s a step of 32 images, one core each
# (docs/video-ground-truth.md).
VIDEO_FRAME_COST = 2.9


# ---------------------------------------------------------------- edit-sweep


def command_edit_sweep(args: argparse.Namespace) -> int:
    from negprompt.interfaces.outputs import check_destination

    pairs = []
    for item in args.pair:
        if "->" not in item:
            raise CommandError(f"--pair {item!r} must look like 'PROMPT->NEGATIVE', e.g. 'a red circle->a hat'")
        prompt, negative = (part.strip() for part in item.split("->", 1))
        pairs.append((prompt, negative))
    check_destination(args.out, folder=True)  # before the heavy imports: a bad path answers at once
    from negprompt.analysis.sweep import SweepSettings, check_sweep_settings, sweep_unit, sweep_units
    from negprompt.jobs import current_workers
    from negprompt.shapes.regions import ShapesRegions

    workers = current_workers(args.device)  # before the model: each process gets its own GPU
    session = session_from_args(args)
    calls = session.denoiser_calls(args.scheduler, args.steps)
    starts = tuple(range(0, calls, args.start_every))
    settings = SweepSettings(
        tuple(pairs),
        tuple(args.seed or range(100)),
        starts,
        tuple(args.early or (3, 5)),
        args.steps,
        args.scheduler,
        args.scale,
        args.tau,
    )
    check_sweep_settings(settings, calls)
    units, finder = sweep_units(settings), ShapesRegions()
    run_as_job(
        args,
        "edit-sweep",
        {"sweep": settings.to_json()},
        session,
        workers,
        [len(seeds) for _, seeds in units],
        lambda u, report: sweep_unit(settings, session, finder, *units[u], report=report),
        finish_edit_sweep,
        check_edit_sweep_unit,
    )
    return 0


def finish_edit_sweep(out_dir: Path, record: dict, payloads: list) -> list[Path]:
    """The sweep's merge: its table, summary and plot from the units' rows."""
    from negprompt.analysis.sweep import summarize_sweep, write_sweep

    rows = [row for payload in payloads for row in payload]
    return write_sweep(rows, summarize_sweep(rows), out_dir)


SWEEP_ROW = {
    "prompt": str,
    "negative": str,
    "word": str,
    "seed": int,
    "plain_present": (bool, None),
    "variant": str,
    "start": int,
    "present": (bool, None),
    "ssim_outside": float,
    "psnr_outside": float,
    "changed_outside": float,
}


def check_edit_sweep_unit(record: dict, unit: int, payload) -> None:
    """An edit-sweep unit as its shard holds it: one row per seed of the unit and variant (the plain
    image, each start and early window, the automatic start), of the unit's pair."""
    from negprompt.jobs import PayloadError, check_shape

    sweep = record["settings"]["sweep"]
    seeds, batch = sweep["seeds"], sweep["batch"]
    chunks = [seeds[i : i + batch] for i in range(0, len(seeds), batch)]
    pair, chunk = sweep["pairs"][unit // len(chunks)], chunks[unit % len(chunks)]
    check_shape(payload, [SWEEP_ROW])
    variants = 2 + len(sweep["starts"]) + len(sweep["early_ends"])
    if len(payload) != len(chunk) * variants:
        raise PayloadError(
            f"{len(payload)} rows, not {len(chunk) * variants} ({len(chunk)} seeds × {variants} variants)"
        )
    for index, row in enumerate(payload):
        if [row["prompt"], row["negative"]] != list(pair) or row["seed"] not in chunk:
            raise PayloadError(f"row {index} is not of this unit's pair {pair[0]!r} → {pair[1]!r} and seeds")


def run_as_job(
    args: argparse.Namespace,
    command: str,
    settings: dict,
    session,
    workers,
    unit_sizes: list[int],
    compute,
    finish,
    check=None,
) -> bool:
    """Runs the command's units as a job in ``--out`` (:mod:`negprompt.jobs`) on this process's share
    (``workers``); on the main process ``finish`` writes the outputs, named here. False on the others.
    ``compute(unit, report)``: a unit's payload; ``report`` is :meth:`Job.report` (the bar moves within it).
    ``check``: the command's :data:`negprompt.jobs.PayloadCheck`, run on every unit read from a shard.

    The job's settings add what the results depend on beyond the command's own: model, dtype, device kind."""
    from negprompt.interfaces.outputs import report_written
    from negprompt.jobs import Job

    identity = {"model": session.model, "dtype": session.dtype, "device": session.device.split(":")[0]}
    job = Job(Path(args.out), command, {**settings, **identity}, unit_sizes, workers)
    payloads = job.run(lambda unit: compute(unit, job.report), progress=not args.quiet, check=check)
    if payloads is None:
        return False
    out = Path(args.out)
    existed = [path for path in out.iterdir() if path.is_file()]
    for line in report_written(finish(out, job.to_json(), payloads), existed):
        print(line)
    return True


# ---------------------------------------------------------------- bench-methods


def command_bench_methods(args: argparse.Namespace) -> int:
    from negprompt.interfaces.outputs import check_destination

    check_destination(args.out, folder=True)  # before the heavy imports: a bad path answers at once
    from negprompt.jobs import current_workers
    from negprompt.shapes.methods import BenchSettings, bench_unit

    settings = BenchSettings(
        tuple(args.negative or BenchSettings.negatives), args.images, args.steps, args.scheduler, args.scale
    )
    settings.check()
    workers = current_workers(args.device)  # before the model: each process gets its own GPU
    session = session_from_args(args)
    units = settings.units()
    run_as_job(
        args,
        "bench-methods",
        {"bench": settings.to_json(), "shown_model": args.model or "shapes"},
        session,
        workers,
        [stop - start for _, start, stop in units],
        lambda u, report: bench_unit(settings, session, *units[u], report=report),
        finish_bench_methods,
        check_bench_methods_unit,
    )
    return 0


def finish_bench_methods(out_dir: Path, record: dict, payloads: list) -> list[Path]:
    """The benchmark's merge: its table, summary and plot from the units' measures."""
    from negprompt.shapes.methods import BenchSettings, summarize_bench, write_results

    settings = BenchSettings.from_json(record["settings"]["bench"])
    shown = {
        "model": record["settings"]["shown_model"],
        "images per cell": settings.images,
        "steps": settings.steps or "default",
        "scheduler": settings.scheduler or "default",
        "scale": settings.scale or "default",
    }
    return write_results(summarize_bench(settings, payloads), out_dir, shown)


def check_bench_methods_unit(record: dict, unit: int, payload) -> None:
    """A bench-methods unit as its shard holds it: every method's measures of the unit's images and
    the UNet rows it needed."""
    from negprompt.jobs import PayloadError, check_shape
    from negprompt.shapes.methods import METHODS, THINGS, BenchSettings

    settings = BenchSettings.from_json(record["settings"]["bench"])
    _, start, stop = settings.units()[unit]
    measure = {"color_ok": (bool, None), "shape_ok": (bool, None), **dict.fromkeys(THINGS, (bool, None))}
    measure["changed_outside"] = float
    names = [method.name for method in METHODS]
    check_shape(payload, {"measures": dict.fromkeys(names, [measure]), "unet_rows": dict.fromkeys(names, int)})
    for name in names:
        if len(payload["measures"][name]) != stop - start:
            raise PayloadError(
                f"{name!r} has {len(payload['measures'][name])} measures, not {stop - start} (images {start}–{stop - 1})"
            )


# ---------------------------------------------------------------- evaluate


def command_evaluate(args: argparse.Namespace) -> int:
    from negprompt.interfaces.outputs import check_destination

    check_destination(args.out, folder=True)  # before the heavy imports: a bad path answers at once
    import time

    from negprompt.jobs import current_workers
    from negprompt.shapes.evaluation import ROWS, evaluation_unit, evaluation_units

    workers = current_workers(args.device)  # before the model: each process gets its own GPU
    session = session_from_args(args)
    started = time.monotonic()
    units = evaluation_units(args.images)
    settings = {
        "images": args.images,
        "steps": args.steps,
        "scheduler": args.scheduler,
        "scale": args.scale,
        "batches": [list(unit) for unit in units],
    }
    finished = run_as_job(
        args,
        "evaluate",
        settings,
        session,
        workers,
        [stop - start for _, start, stop in units],
        lambda u, report: evaluation_unit(
            session, ROWS[units[u][0]], args.images, *units[u][1:], args.steps, args.scheduler, args.scale, report
        ),
        finish_evaluate,
        check_evaluate_unit,
    )
    if finished:
        print(f"{time.monotonic() - started:.0f} s on this process")
    return 0


def finish_evaluate(out_dir: Path, record: dict, payloads: list) -> list[Path]:
    """The evaluation's merge: the table (Markdown, printed too, and JSON) from the images' detector reads."""
    from negprompt.shapes.evaluation import ROWS, evaluation_table, to_markdown, write_table

    settings = record["settings"]
    units = [tuple(unit) for unit in settings["batches"]]
    table = evaluation_table(settings["model"], settings["images"], ROWS, units, payloads)
    print(to_markdown(table))
    return list(write_table(table, out_dir))


def check_evaluate_unit(record: dict, unit: int, payload) -> None:
    """An evaluate unit as its shard holds it: what the detectors read in each of the unit's images,
    and the sampler settings used."""
    from negprompt.jobs import PayloadError, check_shape
    from negprompt.shapes.evaluation import ATTRIBUTES

    _, start, stop = record["settings"]["batches"][unit]
    used = {"steps": int, "scheduler": str, "scale": float}
    check_shape(payload, {"reads": [dict.fromkeys(ATTRIBUTES, (bool, None))], "settings": used})
    if len(payload["reads"]) != stop - start:
        raise PayloadError(f"{len(payload['reads'])} reads, not {stop - start} (images {start}–{stop - 1})")


# ---------------------------------------------------------------- registration


def register(commands: argparse._SubParsersAction) -> None:
    """Adds ``edit-sweep``, ``bench-methods``, ``evaluate`` and ``train`` to the ``negprompt`` command."""
    sweep = commands.add_parser("edit-sweep", help="removal vs locality for every start step (bundled model)")
    sweep.add_argument("--pair", action="append", required=True, help="'PROMPT->NEGATIVE' (repeatable)")
    sweep.add_argument("--seed", type=seed_list, default=None, help="seeds (default 0-99)")
    sweep.add_argument(
        "--start-every", type=positive_int, default=2, help="try every k-th start step, in steps (default 2)"
    )
    sweep.add_argument(
        "--early",
        type=positive_int,
        action="append",
        default=None,
        help="end step of an early-only window [0, END) to probe, repeatable (default: none)",
    )
    add_model_options(sweep)
    sweep.add_argument(
        "--tau",
        type=finite_number,
        default=0.02,
        help="automatic start: map-motion threshold, mean absolute change of the maps per step (default 0.02)",
    )
    sweep.add_argument("--out", default="edit-sweep", help="output folder (default edit-sweep/)")
    add_quiet_option(sweep)
    add_device_options(sweep)
    sweep.set_defaults(handler=command_edit_sweep, finish=finish_edit_sweep, check_payload=check_edit_sweep_unit)

    bench = commands.add_parser("bench-methods", help="rank negative-prompt rules against ground truth (bundled model)")
    bench.add_argument(
        "--negative",
        action="append",
        default=None,
        help="a negative of the world (default: a hat, a sun, striped, blurry)",
    )
    bench.add_argument("--images", type=positive_int, default=200, help="images per cell (default 200)")
    add_model_options(bench)
    bench.add_argument("--out", default="bench-methods", help="output folder (default bench-methods/)")
    add_quiet_option(bench)
    add_device_options(bench)
    bench.set_defaults(
        handler=command_bench_methods, finish=finish_bench_methods, check_payload=check_bench_methods_unit
    )

    evaluate = commands.add_parser("evaluate", help="score a shapes-world model against ground truth")
    evaluate.add_argument(
        "--out", default="evaluation", help="output folder for evaluation.md and .json (default evaluation/)"
    )
    evaluate.add_argument("--images", type=positive_int, default=200, help="images per row (default 200)")
    add_model_options(evaluate)
    add_quiet_option(evaluate)
    add_device_options(evaluate)
    evaluate.set_defaults(handler=command_evaluate, finish=finish_evaluate, check_payload=check_evaluate_unit)

    train = commands.add_parser("train", help="train the shapes-world model (resumes from --out)")
    train.add_argument("--out", required=True, help="training folder (checkpoints, log, exported model)")
    train.add_argument(
        "--samples", type=positive_int, default=160_000, help="training examples in all (default 160000)"
    )
    train.add_argument("--batch-size", type=positive_int, default=32, help="examples per step (default 32)")
    train.add_argument("--lr", type=number, default=8e-4, help="peak learning rate (default 8e-4)")
    train.add_argument("--seed", type=non_negative_int, default=0, help="seed of weights and data (default 0)")
    train.add_argument(
        "--thing-weight",
        type=number,
        default=1.0,
        help="loss weight of hat/sun/stripe pixels, × the plain loss (default 1: plain loss)",
    )
    train.add_argument(
        "--warmup-steps",
        type=non_negative_int,
        default=300,
        help="linear learning-rate warm-up, in optimizer steps (default 300)",
    )
    train.add_argument(
        "--init-from",
        default=None,
        help="fine-tune: start from this exported model ('shapes' = the bundled one) (default: random weights)",
    )
    train.add_argument(
        "--world",
        choices=("v1", "v2", "v3"),
        default="v1",
        help="version of the shapes world the examples come from: v1 (first training), v2 (sun always "
        "top right, present things named with probability 0.8, nouns in either order) or v3 (as v2, named "
        "with probability 0.65): the fine-tunes that keep things apart (default v1)",
    )
    train.add_argument(
        "--distill-from",
        default=None,
        help="guidance distillation: a student taking the guidance scale as an input learns this exported "
        "model's CFG output in one pass ('shapes' = the bundled one) (default: no distillation)",
    )
    train.add_argument(
        "--guidance-range",
        default="1:10",
        metavar="LO:HI",
        help="with --distill-from: the guidance scales w the student learns, uniform (default 1:10)",
    )
    train.add_argument(
        "--guidance-dim",
        type=positive_int,
        default=64,
        help="with --distill-from: width of the student's guidance embedding (default 64)",
    )
    train.add_argument(
        "--frames",
        type=non_negative_int,
        default=0,
        help="train the tiny video model on clips of this many frames, 4k + 1 (5, 9, 17, …); with --init-from, "
        "from an image model's weights (docs/video-ground-truth.md) (default 0: the image model)",
    )
    train.add_argument(
        "--max-minutes",
        type=positive_number,
        default=None,
        help="stop (resumably) after this many minutes (default: run to the end)",
    )
    train.add_argument(
        "--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's, one per core)"
    )
    add_quiet_option(train)
    train.set_defaults(handler=command_train)
