"""`negprompt edit` against three separate generations (no negative, full negative, windowed
negative) of the same prompt and seeds: the batched edit shares the steps before the window and
needs fewer UNet rows. Prints the time ratio (target < 1) and the row ratio.

The edit's time includes its measures (region, removal, locality). With ``--region attention`` it
also records the negative word's attention maps, which the three plain generations do not; the
default ``auto`` uses the detectors on the bundled model and attention elsewhere.

Two edits are timed: the default (one UNet call per generation and step, 2 × seeds rows, so that
each generation's images equal those it gives alone), and the same with ``--rows-per-call`` set to
``2 × seeds`` (before each generation got its own calls, this split one 6 × seeds-row call per step
into the separate generations' size; now it changes nothing but the bookkeeping, and the two
should time alike).

    python benchmarks/bench_edit.py [--model shapes] [--window 0.25:] [--region auto]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from common import write_result

from negprompt.analysis.edit import run_edit
from negprompt.guidance.plan import Term
from negprompt.guidance.windows import Window
from negprompt.session import Session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompt", default="a red circle")
    parser.add_argument("--negative", default="a hat")
    parser.add_argument("--window", default="0.25:")
    parser.add_argument("--region", default="auto", help="region source of the edit: auto, attention, detector")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/edit.json")
    args = parser.parse_args()
    session = Session(args.model)
    window = Window.parse(args.window)
    seeds = list(range(args.seeds))

    def batched(max_rows=None):
        return run_edit(
            args.prompt, args.negative, window, seeds, model=session, region=args.region, max_rows_per_call=max_rows
        )

    chunk = 2 * len(seeds)

    def separate():
        rows = 0
        for negative in (None, [Term(args.negative)], [Term(args.negative, None, window)]):
            settings = session.spec(args.prompt, negative, rule="cfg" if negative is None else "sd", seeds=seeds)
            rows += session.run(settings).unet_batch_rows
        return rows

    region_source = batched().region_source
    chunked = region_source == "detector"
    if chunked:
        batched(chunk)
    separate()
    ratios, ratios_chunked, rows_batched, rows_separate = [], [], 0, 0
    for _ in range(args.repeats):
        start = time.perf_counter()
        rows_batched = batched().unet_batch_rows
        middle = time.perf_counter()
        rows_separate = separate()
        end = time.perf_counter()
        ratios.append((middle - start) / (end - middle))
        if chunked:
            start = time.perf_counter()
            batched(chunk)
            ratios_chunked.append((time.perf_counter() - start) / (end - middle))
    result = {
        "time_ratio_edit_vs_three_generations": statistics.median(ratios),
        "time_ratio_edit_chunked_vs_three_generations": statistics.median(ratios_chunked) if chunked else None,
        "rows_per_call_chunked": chunk if chunked else None,
        "unet_rows_edit": rows_batched,
        "unet_rows_three_generations": rows_separate,
        "time_ratios": [round(r, 4) for r in ratios],
        "time_ratios_chunked": [round(r, 4) for r in ratios_chunked],
        "region_source": region_source,
        "window": args.window,
        "seeds": args.seeds,
    }
    print(json.dumps(result, indent=1))
    write_result(result, args.out)


if __name__ == "__main__":
    main()
