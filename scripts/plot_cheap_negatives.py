"""The figure of docs/cheap-negatives.md from scripts/negative_convergence.json: per step, the x̂₀ effect
e_t of the negative's difference (the auto end's signal) and the x̂₀ difference the negative makes against ∅,
where the measured criterion stops, and the removal kept when the negative stops at step k ("hold": the
last difference reused; "drop": no guidance after k).

Usage: python scripts/plot_cheap_negatives.py [scripts/negative_convergence.json] [docs/cheap-negatives.png]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "scripts" / "negative_convergence.json"
    target = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "docs" / "cheap-negatives.png"
    data = json.loads(source.read_text())
    signals = data["signals"]
    steps = [s["step"] for s in signals]
    stop = data["criterion_stops"].get("tau=0.1,m=2")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(steps, [s["effect_max"] for s in signals], "o-", label="e_t = σ_t‖ε_ỹ − ε_y‖ (largest image)")
    left.plot(steps, [s["x0_difference"] for s in signals], "s-", label="x̂₀ difference vs ∅: σ_t(s−1)‖ε_ỹ − ε_∅‖")
    if stop is not None:
        left.axvline(stop - 0.5, color="k", ls="--", label=f"auto end (τ 0.1, m 2): step {stop}")
    left.set_xlabel("step")
    left.set_ylabel("RMS per latent value")
    left.set_yscale("log")
    left.legend(fontsize=7)
    left.set_title("where the negative acts")
    for name, marker in (("hold", "o-"), ("drop", "s--")):
        ks = sorted(data["sweep"][name], key=int)
        right.plot([int(k) for k in ks], [data["sweep"][name][k]["removal"] for k in ks], marker, label=name)
    right.axhline(data["sweep"]["full"]["removal"], color="gray", ls=":", label="full negative")
    if stop is not None:
        right.axvline(stop, color="k", ls="--", label="auto end")
    right.set_xlabel("negative's branch stopped at step k")
    right.set_ylabel(f"removal of {data['negative']!r}")
    right.set_ylim(0, 1.05)
    right.legend(fontsize=7)
    right.set_title(f"removal kept ({len(data['holding'])} images holding it)")
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
