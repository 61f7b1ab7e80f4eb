"""Golden outputs: images and attention numbers recorded before the core was refactored.

Each case renders arrays (float32 pixels, attention tensors, r_t curves, per-word statistics) that
``tests/test_golden.py`` compares with the recorded ones **within the tolerances below** on any
machine, and **bit for bit** on the machine that recorded them (same CPU, kernels, thread count and
library versions: :func:`machine`). Why those tolerances, and what was measured across CPU code
paths: ``tests/golden/README.md``.

    python tests/golden_cases.py --write     # record (only when behaviour is meant to change)
    python tests/golden_cases.py --compare   # the largest difference of every array, in tolerance units

Each case is small enough for CI: tiny SD, SDXL, SD3 and FLUX at 32 px and the bundled model at a few steps.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# NEGPROMPT_GOLDEN_DIR records elsewhere: a refactor's own bit-for-bit reference on the machine at hand
GOLDEN_DIR = Path(os.environ.get("NEGPROMPT_GOLDEN_DIR", Path(__file__).parent / "golden"))
GOLDEN_ARRAYS = GOLDEN_DIR / "goldens.safetensors"
GOLDEN_RECORD = GOLDEN_DIR / "goldens.json"
TINY_PROMPT, TINY_NEGATIVE = "a photo of a woman in the street", "red glasses"
SHAPES_PROMPT = "a red circle with a hat"

# name → (model, options of Session.spec); model "tiny" is the tiny SD of conftest, "shapes" the bundled one.
IMAGE_CASES: dict[str, tuple[str, dict]] = {
    "tiny-sd-ddim": ("tiny", dict(negative=TINY_NEGATIVE, scheduler="ddim", steps=6, seeds=[0, 1])),
    "tiny-sd-default-scale5": ("tiny", dict(negative=TINY_NEGATIVE, steps=5, seeds=[2], scale=5.0)),
    "tiny-cfg-rescale-interval-lms": (
        "tiny",
        dict(rule="cfg", scheduler="lms", steps=6, seeds=[3], rescale=0.7, interval="1:5"),
    ),
    "tiny-dual-window-euler-a": (
        "tiny",
        dict(
            negative=TINY_NEGATIVE, rule="dual", scheduler="euler-a", steps=6, seeds=[4, 5], negative_windows=["0.3:"]
        ),
    ),
    "tiny-weighted-two-negatives-dpm": (
        "tiny",
        dict(
            negative=["red glasses", "a dog"],
            rule="weighted",
            negative_scales=[3.0, None],
            scheduler="dpm++2m",
            steps=6,
            seeds=[6],
        ),
    ),
    "tiny-perp-neg-pndm": ("tiny", dict(negative=["red glasses", "a hat"], rule="perp-neg", steps=5, seeds=[7])),
    "tiny-dng-euler": ("tiny", dict(negative=TINY_NEGATIVE, rule="dng", scheduler="euler", steps=6, seeds=[8])),
    "tiny-apg-momentum-ddim": (
        "tiny",
        dict(
            negative=TINY_NEGATIVE,
            rule="apg",
            scheduler="ddim",
            steps=6,
            seeds=[9],
            rule_settings=dict(eta=0.5, norm_threshold=2.0, momentum=-0.5),
        ),
    ),
    # Prompt editing on the tiny SD; A1111 weights on the bundled model. The tiny SD's last layer norm
    # has no bias, so its hidden states' mean is ~1e-8 (rounding noise) and the weights' mean-restoring
    # ratio is noise over noise: a weight there changes the image by up to 0.12 between CPU code paths.
    "tiny-syntax-unipc": ("tiny", dict(negative="[red:glasses:2]", scheduler="unipc", steps=6, seeds=[10], eta=0.0)),
    "shapes-weights-unipc": ("shapes", dict(negative="[a sun:(a hat:1.3):2]", scheduler="unipc", steps=6, seeds=[3])),
    "tiny-interval-sigma-heun": (
        "tiny",
        dict(negative=TINY_NEGATIVE, scheduler="heun", steps=4, seeds=[11], interval_sigma=(0.5, 5.0)),
    ),
    "shapes-default": ("shapes", dict(negative="a hat", steps=8, seeds=[0, 1])),
    # negatives inside attention (UNet cross-attention; SD3 and FLUX joint attention), SDXL, SD3, FLUX
    "tiny-nag-s1": (
        "tiny",
        dict(negative=TINY_NEGATIVE, rule="nag", scale=1.0, scheduler="ddim", steps=4, seeds=[1, 2]),
    ),
    "tiny-vsf-s3-window": (
        "tiny",
        dict(
            negative=TINY_NEGATIVE, rule="vsf", scale=3.0, scheduler="ddim", steps=4, seeds=[3], negative_windows=["1:"]
        ),
    ),
    "sdxl-sd-euler": ("sdxl", dict(negative=TINY_NEGATIVE, scheduler="euler", steps=4, seeds=[4])),
    "sd3-sd": ("sd3", dict(negative=TINY_NEGATIVE, scale=4.0, steps=4, seeds=[5])),
    "sd3-nag-s1": ("sd3", dict(negative=TINY_NEGATIVE, rule="nag", scale=1.0, steps=4, seeds=[1, 2])),
    "sd3-vsf-s1": ("sd3", dict(negative=TINY_NEGATIVE, rule="vsf", scale=1.0, steps=4, seeds=[6])),
    "flux-true-cfg": ("flux", dict(negative=TINY_NEGATIVE, scale=3.0, steps=4, seeds=[7])),
    "flux-nag-s1-window": (
        "flux",
        dict(negative=TINY_NEGATIVE, rule="nag", steps=4, seeds=[1, 2], negative_windows=["2:"]),
    ),
    "flux-vsf-s1": ("flux", dict(negative=TINY_NEGATIVE, rule="vsf", steps=4, seeds=[8])),
    "shapes-delayed": ("shapes", dict(negative="a hat", steps=8, seeds=[0], negative_windows=["0.25:"])),
}

# attention cases: (model, options, words per branch)
ATTENTION_CASES: dict[str, tuple[str, dict, dict]] = {
    "tiny-attention": (
        "tiny",
        dict(negative=TINY_NEGATIVE, scheduler="ddim", steps=5, seeds=[1, 2], negative_windows=["2:"]),
        {"positive": ["woman", "street"], "negative": ["glasses"]},
    ),
    "shapes-attention": (
        "shapes",
        dict(negative="a hat", steps=6, seeds=[0]),
        {"positive": ["red", "circle", "hat"], "negative": ["hat"]},
    ),
    "tiny-attention-nag": (  # the negative read inside the positive's pass, captured as its branch
        "tiny",
        dict(negative=TINY_NEGATIVE, rule="nag", scale=1.0, scheduler="ddim", steps=4, seeds=[1]),
        {"positive": ["woman"], "negative": ["glasses"]},
    ),
    "sd3-attention": (
        "sd3",
        dict(negative=TINY_NEGATIVE, scale=4.0, steps=4, seeds=[2]),
        {"positive": ["woman", "street"], "negative": ["glasses"]},
    ),
    "flux-attention-nag": (
        "flux",
        dict(negative=TINY_NEGATIVE, rule="nag", steps=4, seeds=[3]),
        {"positive": ["woman", "street"], "negative": ["glasses"]},
    ),
}
MODELS = {"tiny": "tiny_sd", "sdxl": "tiny_sdxl", "sd3": "tiny_sd3", "flux": "tiny_flux"}  # → conftest fixtures
SUMMARY_NUMBERS = ("mass", "frobenius_sum", "centroid_x", "centroid_y", "spread")
SUMMARY_LABELS = ("branch", "word", "step", "image")


@dataclass(frozen=True)
class Tolerance:
    """``|got − want| ≤ relative·|want| + absolute + of_peak·max|want|`` for every element."""

    relative: float = 0.0
    absolute: float = 0.0
    of_peak: float = 0.0
    why: str = ""

    def excess(self, got: np.ndarray, want: np.ndarray) -> float:
        """The largest ``|got − want|`` over its allowance (≤ 1 passes); NaN must meet NaN."""
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        if got.shape != want.shape:
            return float("inf")
        if not np.array_equal(np.isnan(got), np.isnan(want)):
            return float("inf")
        finite = ~np.isnan(want)
        if not finite.any():
            return 0.0
        got, want = got[finite], want[finite]
        allowed = self.relative * np.abs(want) + self.absolute + self.of_peak * np.abs(want).max()
        difference = np.abs(got - want)
        if not allowed.any():
            return 0.0 if not difference.any() else float("inf")
        return float((difference / np.maximum(allowed, np.finfo(np.float64).tiny)).max())


# Measured across CPU code paths (tests/golden/README.md), the worst share of each tolerance used:
# pixels 0.036, maps 0.145, statistics 0.112, positions 0.019.
TOLERANCES: dict[str, Tolerance] = {
    "pixels": Tolerance(absolute=1e-4, why="float images in [0, 1]: 1/40 of a uint8 level"),
    "maps": Tolerance(of_peak=4 * 2.0**-10, why="float16 maps: 4 float16 steps at the map's peak"),
    "statistics": Tolerance(relative=1e-5, of_peak=1e-6, why="float32 sums over layers, heads and tokens"),
    "positions": Tolerance(absolute=1e-4, why="centroids and spreads, in fractions of the image side"),
    "exact": Tolerance(why="booleans (the steps a branch ran): equal"),
}


def tolerance_of(key: str) -> Tolerance:
    """The tolerance that applies to the array ``key`` (``images/…``, ``attention/<case>/…``)."""
    leaf = key.rsplit("/", 1)[-1]
    if key.startswith("images/") or leaf == "pixels":
        return TOLERANCES["pixels"]
    if leaf.startswith("maps."):
        return TOLERANCES["maps"]
    if leaf.startswith("present."):
        return TOLERANCES["exact"]
    if leaf in ("centroid_x", "centroid_y", "spread"):
        return TOLERANCES["positions"]
    return TOLERANCES["statistics"]


def machine() -> dict:
    """What decides the last bits of a CPU result: processor, ATen's kernel set, threads, library versions.

    Two runs with the same fingerprint use the same instructions in the same order, so their outputs
    are bit-identical; any difference here allows only the tolerances above.
    """
    import diffusers
    import transformers

    cpu, flags = platform.processor(), ""
    if Path("/proc/cpuinfo").exists():
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line)
        cpu, flags = info.get("model name\t", cpu).strip(), info.get("flags\t\t", "").strip()
    caches = sorted(str(p.read_text().strip()) for p in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"))
    return {
        "cpu": cpu,
        "cpu_flags": hashlib.sha256(flags.encode()).hexdigest()[:16],
        "caches": caches,
        "machine": platform.machine(),
        "kernels": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
    }


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def build_models() -> dict:
    """The tiny models of :data:`MODELS`, built as conftest builds them (seed 0)."""
    from negprompt.testing.tiny_mmdit import build_tiny_flux, build_tiny_sd3
    from negprompt.testing.tiny_sd import build_tiny_sd, build_tiny_sdxl

    builders = {"tiny": build_tiny_sd, "sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3, "flux": build_tiny_flux}
    return {name: build(seed=0) for name, build in builders.items()}


def _settings(model: str, options: dict, models):
    """Spec and session of a case, through the public API of the version under test; ``models[name]``
    gives the tiny models of :data:`MODELS`."""
    from negprompt.session import Session

    session = Session("shapes" if model == "shapes" else models[model], device="cpu", dtype="float32")
    prompt, size = (SHAPES_PROMPT, None) if model == "shapes" else (TINY_PROMPT, 32)
    return session.spec(prompt, size=size, **options), session


def render_image_case(name: str, models) -> dict[str, np.ndarray]:
    model, options = IMAGE_CASES[name]
    settings, session = _settings(model, options, models)
    return {f"images/{name}": session.run(settings).pixels.astype(np.float32)}


def render_attention_case(name: str, models) -> tuple[dict[str, np.ndarray], dict]:
    """The case's arrays, and its labels that are not numbers (summary rows' keys, the related words)."""
    from negprompt.analysis.attention_stats import reduce_layer, summarize
    from negprompt.analysis.strength import strength_curves
    from negprompt.attention.capture import CaptureRequest
    from negprompt.attention.result import capture

    model, options, words = ATTENTION_CASES[name]
    settings, session = _settings(model, options, models)
    result = capture(settings, CaptureRequest(words=words), session, trace=False, reducer=reduce_layer)
    curves = strength_curves(result, words["negative"][-1])
    rows = summarize(result)
    prefix = f"attention/{name}"
    arrays = {f"{prefix}/pixels": result.generation.pixels.astype(np.float32)}
    arrays |= {f"{prefix}/{key}": value.numpy() for key, value in sorted(result.tensors.items())}
    arrays |= {f"{prefix}/{kind}": curves[kind].numpy() for kind in ("article", "released")}
    arrays |= {f"{prefix}/summary/{k}": np.array([row[k] for row in rows], np.float64) for k in SUMMARY_NUMBERS}
    labels = {"summary": [[row[k] for k in SUMMARY_LABELS] for row in rows], "related": list(curves["related"])}
    return arrays, labels


def render_all(models) -> tuple[dict[str, np.ndarray], dict]:
    arrays, labels = {}, {}
    for name in IMAGE_CASES:
        arrays |= render_image_case(name, models)
    for name in ATTENTION_CASES:
        case_arrays, labels[name] = render_attention_case(name, models)
        arrays |= case_arrays
    return arrays, labels


def load_goldens() -> tuple[dict[str, np.ndarray], dict]:
    """The recorded arrays and the record (machine, digests, labels)."""
    from safetensors.numpy import load_file

    return load_file(str(GOLDEN_ARRAYS)), json.loads(GOLDEN_RECORD.read_text())


def write_goldens(arrays: dict[str, np.ndarray], labels: dict) -> None:
    from safetensors.numpy import save_file

    GOLDEN_DIR.mkdir(exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(GOLDEN_ARRAYS))
    record = {
        "recorded_on": machine(),
        "digests": {key: digest(value) for key, value in sorted(arrays.items())},
        "labels": labels,
        "tolerances": {name: vars(t) for name, t in TOLERANCES.items()},
    }
    GOLDEN_RECORD.write_text(json.dumps(record, indent=1) + "\n")


def compare(arrays: dict[str, np.ndarray], goldens: dict[str, np.ndarray]) -> dict[str, tuple[float, bool]]:
    """Per recorded array: its difference in tolerance units (≤ 1 passes) and whether it is bit-identical."""
    return {
        key: (tolerance_of(key).excess(arrays[key], want), digest(arrays[key]) == digest(want))
        for key, want in goldens.items()
        if key in arrays
    }


if __name__ == "__main__":
    if sys.argv[1:] not in (["--write"], ["--compare"]):
        sys.exit("usage: python tests/golden_cases.py --write | --compare")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    rendered, rendered_labels = render_all(build_models())
    if sys.argv[1] == "--write":
        write_goldens(rendered, rendered_labels)
        print(f"wrote {GOLDEN_ARRAYS} and {GOLDEN_RECORD}")
    else:
        recorded, record = load_goldens()
        results = compare(rendered, recorded)
        for key, (excess, identical) in results.items():
            print(f"{excess:9.3g}  {'identical' if identical else '         '}  {key}")
        for category, tolerance in TOLERANCES.items():
            mine = [excess for key, (excess, _) in results.items() if tolerance_of(key) is tolerance]
            print(f"{category}: {len(mine)} arrays, worst {max(mine, default=0):.3g} of the tolerance")
        worst = max(excess for excess, _ in results.values())
        identical = sum(same_bits for _, same_bits in results.values())
        print(f"bit-identical: {identical} of {len(results)} arrays ({len(recorded)} recorded)")
        same = machine() == record["recorded_on"]
        print(f"worst: {worst:.3g} of the tolerance; {'the' if same else 'not the'} recording machine")
        print("labels equal" if rendered_labels == record["labels"] else "labels DIFFER")
