"""`negprompt edit` against three separate generations (no negative, full negative, windowed
negative) of the same prompt and seeds: the batched edit shares the steps before the window and
needs fewer UNet rows. Prints the time ratio (target < 1) and the row ratio.

The edit's time includes its measures (region, removal, locality). With ``--region attention`` it
also records the negative word's attention maps, which the three plain generations do not; the
default ``auto`` uses the detectors on the bundled model and attention elsewhere.

    python benchmarks/bench_edit.py [--model shapes] [--window 0.25:] [--region auto]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from common import write_result

from negprompt.analysis.edit import run_edit
from negprompt.api import load_model, make_settings, run
from negprompt.guidance.plan import Term
from negprompt.guidance.windows import Window


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
    components = load_model(args.model)
    window = Window.parse(args.window)
    seeds = list(range(args.seeds))

    def batched():
        return run_edit(args.prompt, args.negative, window, seeds, model=components, region=args.region)

    def separate():
        rows = 0
        for negative in (None, [Term(args.negative)], [Term(args.negative, None, window)]):
            settings, _ = make_settings(
                args.prompt, negative, rule="cfg" if negative is None else "sd", seeds=seeds, model=components
            )
            rows += run(settings, components).unet_batch_rows
        return rows

    batched()
    separate()
    region_source = batched().region_source
    ratios, rows_batched, rows_separate = [], 0, 0
    for _ in range(args.repeats):
        start = time.perf_counter()
        rows_batched = batched().unet_batch_rows
        middle = time.perf_counter()
        rows_separate = separate()
        end = time.perf_counter()
        ratios.append((middle - start) / (end - middle))
    result = {
        "time_ratio_edit_vs_three_generations": statistics.median(ratios),
        "unet_rows_edit": rows_batched,
        "unet_rows_three_generations": rows_separate,
        "time_ratios": [round(r, 4) for r in ratios],
        "region_source": region_source,
        "window": args.window,
        "seeds": args.seeds,
    }
    print(json.dumps(result, indent=1))
    write_result(result, args.out)


if __name__ == "__main__":
    main()
