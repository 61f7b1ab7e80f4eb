"""``negprompt attend``: cross-attention maps of a run, drawn as a heat-map timeline.

A video model's run (Wan) is captured per latent frame. It writes ``video.mp4`` (or ``.webp``), ``video_frames/``
and ``video.json`` in place of ``image.png``; one timeline per latent frame, ``timeline_frame_000.png`` … (or the
one of ``--frame K``), in place of ``timeline.png``; and ``strength.json``: r_t of each negative word per kept step
and latent frame. One figure per frame rather than one strip of all frames: a timeline is already words × steps,
and Wan's 81 frames make 21 latent frames — one strip would be 21 times as tall, while same-sized figures, one
per frame, can be flipped through like the clip, each cell in the same place.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from negprompt.interfaces.options import (
    CommandError,
    CommandResult,
    add_overwrite_option,
    add_prompt_options,
    check_prompt_args,
    folder_outputs,
    non_negative_int,
    positive_int,
    positive_number,
    run_settings_from_args,
    seed_list,
    session_from_args,
    unused_negative_warnings,
)
from negprompt.limits import MAX_CAPTURE_MIB

ORDER = 20  # its place in negprompt --help


def word_list(text: str) -> list[str]:
    """Comma-separated words (empty items dropped)."""
    return [w.strip() for w in text.split(",") if w.strip()]


def memory_limit(text: str) -> float:
    """MiB a capture may store: above 0 and at most ``MAX_CAPTURE_MIB`` (``negprompt.limits``)."""
    value = positive_number(text)
    if value > MAX_CAPTURE_MIB:
        raise argparse.ArgumentTypeError(f"{text!r} MiB is beyond any machine's memory; give at most {MAX_CAPTURE_MIB}")
    return value


def step_list(text: str) -> list[int]:
    """Steps, written as seeds are: ``0-9`` or ``0,5,10``."""
    return seed_list(text)


def words_to_map(args: argparse.Namespace, settings, tokenizer) -> dict[str, list[str]]:
    """Branch → the words whose maps are kept: --words / --negative-words, else every word of the branch's
    first prompt. Words for a branch the run lacks are an error."""
    from negprompt.attention.tokens import tokenize_words

    terms = settings.guidance.terms
    words = {}
    for branch, given in (("positive", args.words), ("negative", args.negative_words)):
        if branch not in terms:
            if given:
                raise CommandError(
                    f"--{'negative-' if branch == 'negative' else ''}words given but the run has no {branch} prompt"
                )
            continue
        first_prompt = terms[branch].prompts_for(1)[0]
        all_words = tokenize_words(tokenizer, first_prompt).words
        words[branch] = given if given is not None else list(dict.fromkeys(all_words))
    return words


def command_attend(args: argparse.Namespace) -> CommandResult:
    """Runs with attention capture; writes the image, the timeline, the maps and their summary (a video model's:
    the clip, a timeline per latent frame or --frame's, the maps, their summary and r_t per frame)."""
    from negprompt.analysis.attention_stats import reduce_layer
    from negprompt.attention.capture import CaptureRequest
    from negprompt.attention.result import capture, plan_for

    check_prompt_args(args)
    existed = folder_outputs(args)
    session = session_from_args(args)
    settings = session.spec_from(run_settings_from_args(args))
    warnings = unused_negative_warnings(session, settings)
    layout = session.components.attention_layout
    if layout.kind == "unread":  # before its prompts are split into words with a tokenizer capture may not read
        raise CommandError(f"negprompt cannot yet capture the attention of {layout.family or 'this model'}")
    check_frame_option(args.frame, latent_frames(settings, session.components), layout.family)
    request = CaptureRequest(
        words=words_to_map(args, settings, session.components.tokenizer),
        layers=args.layers,
        steps=args.capture_steps,
        average_layers=not args.per_layer,
        size=args.map_size,
        memory_limit_mb=args.memory_limit,
    )
    if not 0 <= args.image < len(settings.seeds):
        raise CommandError(f"--image {args.image} is outside the batch of {len(settings.seeds)} image(s)")
    plan = plan_for(settings, request, session)
    print(f"capture will store {plan.memory_bytes() / 2**20:.2f} MiB (limit {args.memory_limit:g} MiB)")
    result = capture(settings, request, session, trace=True, progress=not args.quiet, reducer=reduce_layer)
    if result.frames is not None:
        warnings += write_video_attend_outputs(args, result, session.components, existed)
    else:
        write_attend_outputs(args, result, session.components, existed)
    return CommandResult(0, warnings)


def write_attend_outputs(args: argparse.Namespace, result, components, existed: list[Path]) -> None:
    """Writes image.png, timeline.png, the maps and summary.json into --out, and says what it wrote."""
    from negprompt.analysis.attention_stats import summarize
    from negprompt.attention.figures import timeline
    from negprompt.files import write_atomically, write_json
    from negprompt.interfaces.outputs import report_written
    from negprompt.interfaces.png import save_generation

    out = Path(args.out)
    figure = timeline(result, components, image=args.image, columns=args.columns)
    written = save_generation(result.generation, out / "image.png")
    written += write_atomically([out / "timeline.png"], lambda final, tmp: figure.save(tmp, format="PNG"))
    written += list(result.save(out))
    summary = summarize(result)
    written.append(write_json(out / "summary.json", summary, indent=1))
    for line in report_written(written, existed):
        print(line)


def write_video_attend_outputs(args: argparse.Namespace, result, components, existed: list[Path]) -> tuple[str, ...]:
    """A video's outputs (see the module's docstring) into --out; says what it wrote and returns warnings (r_t
    that could not be computed). Every figure and r_t is made before the first file is written."""
    from negprompt.analysis.attention_stats import summarize
    from negprompt.attention.figures import timeline
    from negprompt.files import write_atomically, write_json
    from negprompt.interfaces.outputs import report_written
    from negprompt.interfaces.video import save_video_generation

    out = Path(args.out)
    shown = range(result.frames) if args.frame is None else [args.frame]
    digits = max(3, len(str(result.frames - 1)))
    decoded: dict = {}  # each shown step's x̂₀ decoded once for all frames' figures
    figures = {
        out / f"timeline_frame_{f:0{digits}d}.png": timeline(
            result, components, image=args.image, columns=args.columns, frame=f, decoded=decoded
        )
        for f in shown
    }
    strength, warnings = strength_per_frame(result)
    summary = summarize(result)
    lines, note = save_video_generation(result.generation, out / "video.png")
    written = write_atomically(list(figures), lambda final, tmp: figures[final].save(tmp, format="PNG"))
    written += list(result.save(out))
    written.append(write_json(out / "summary.json", summary, indent=1))
    if strength is not None:
        written.append(write_json(out / "strength.json", strength, indent=1))
    for line in [*lines, *report_written(written, existed)]:
        print(line)
    return (note,) * bool(note) + warnings


def strength_per_frame(result) -> tuple[dict | None, tuple[str, ...]]:
    """r_t of each captured negative word of a video's capture, for ``strength.json``: per image, kept step and
    latent frame (``per_frame``, [image][step][frame]) and of the whole video (``video``, [image][step]), under
    both definitions (:mod:`negprompt.analysis.strength`), null where the negative branch was off. None (and a
    warning) where no r_t can be computed; None alone where no negative word was captured."""
    from negprompt.analysis.strength import strength_curves, strength_over_frames
    from negprompt.errors import NegpromptError

    negative_words = result.index["words"].get("negative", [])
    if not negative_words:
        return None, ()
    words = {}
    try:
        for word in negative_words:
            per_frame, video = strength_over_frames(result, word), strength_curves(result, word)
            words[word] = {
                "related": per_frame["related"],
                "per_frame": {d: json_numbers(per_frame[d].permute(1, 0, 2)) for d in ("article", "released")},
                "video": {d: json_numbers(video[d].T) for d in ("article", "released")},
            }
    except NegpromptError as error:
        return None, (f"strength.json not written: {error}",)
    record = {
        "steps": result.index["steps"],
        "latent_frames": result.frames,
        "layout": "per_frame: [image][step][frame]; video: [image][step]; null where the negative branch was off",
        "words": words,
    }
    return record, ()


def json_numbers(values) -> list:
    """A tensor as nested lists of floats, NaN as None (JSON has no NaN)."""
    return [json_numbers(v) if v.ndim else (None if math.isnan(float(v)) else float(v)) for v in values]


def latent_frames(settings, components) -> int | None:
    """The latent frames F′ of a video model's run (its family's latent shape (C, F′, h, w)); None for images."""
    if not components.attention_layout.frames:
        return None
    return components.family.latent_shape(components, settings.height, settings.width, settings.frames)[1]


def check_frame_option(frame: int | None, frames: int | None, family: str | None) -> None:
    """--frame must name a latent frame of a video model's run; an image model takes none."""
    if frame is None:
        return
    if frames is None:
        raise CommandError(f"--frame {frame} given, but {family or 'this model'} makes images; leave --frame out")
    if frame >= frames:
        raise CommandError(
            f"--frame {frame} is outside the run's {frames} latent frames: give 0–{frames - 1}, or leave --frame out "
            "for one timeline per latent frame"
        )


def register(commands: argparse._SubParsersAction) -> None:
    """Adds ``attend``."""
    attend = commands.add_parser("attend", help="capture cross-attention maps and draw the heat-map timeline")
    add_prompt_options(attend)
    attend.add_argument("--out", default="attend", help="output folder (default attend/ in the current folder)")
    attend.add_argument(
        "--words", type=word_list, default=None, help="positive words to map, comma-separated (default: all)"
    )
    attend.add_argument("--negative-words", type=word_list, default=None, help="negative words to map (default: all)")
    attend.add_argument(
        "--layers",
        type=word_list,
        default=None,
        help="layers: map sides in latent pixels (16) or module paths/prefixes, comma-separated (default: all "
        "cross-attention layers)",
    )
    attend.add_argument(
        "--capture-steps", type=step_list, default=None, help="steps to keep: 0-9 or 0,5,10 (default all)"
    )
    attend.add_argument("--per-layer", action="store_true", help="keep each layer's maps (default: mean over layers)")
    attend.add_argument(
        "--map-size", type=positive_int, default=None, help="side of stored maps (default: largest layer's)"
    )
    attend.add_argument(
        "--memory-limit", type=memory_limit, default=1024.0, help="MiB the capture may store (default 1024 MiB)"
    )
    attend.add_argument(
        "--image",
        type=non_negative_int,
        default=0,
        help="which image (or video) of the batch the timeline shows, from 0 (default 0)",
    )
    attend.add_argument("--columns", type=positive_int, default=10, help="steps shown in the timeline (default 10)")
    attend.add_argument(
        "--frame",
        type=non_negative_int,
        default=None,
        metavar="K",
        help="video models: the latent frame whose timeline is drawn, from 0 (default: one timeline per latent frame)",
    )
    add_overwrite_option(attend)
    attend.set_defaults(handler=command_attend)
