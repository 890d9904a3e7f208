"""Naive vs balanced teacher-forcing layouts over P = 2, 4, 8 SP ranks: per-rank max/mean.

  python bench/balance_bench.py [--frames 96 --height 480 --width 832] [--json runs/balance_bench.json]

Prints a Markdown table (max/mean over ranks of tokens, loss tokens, VAE pixel frames encoded
with the exact halo, attention pairs of the rank's own queries) and writes the full reports as JSON.
Counts come from metadata (vidtrain.parallel.balance); nothing is timed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vidtrain.parallel.balance import FIGURES, layout_report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=96)
    p.add_argument("--frames-per-chunk", type=int, default=3)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--json", default="runs/balance_bench.json")
    a = p.parse_args()
    reports = []
    print(f"frames={a.frames} fpc={a.frames_per_chunk} {a.height}x{a.width} px\n")
    print("| P | layout | " + " | ".join(f"{k} max/mean" for k in FIGURES) + " | max vae_frames |")
    print("|---|---|" + "---|" * (len(FIGURES) + 1))
    for sp in (2, 4, 8):
        for layout in ("naive", "balanced"):
            rep = layout_report(layout, a.frames, a.frames_per_chunk, sp, a.height // 8, a.width // 8)
            reports.append(rep)
            s = rep["summary"]
            cells = " | ".join(f"{s[k]['max_over_mean']:.3f}" for k in FIGURES)
            print(f"| {sp} | {layout} | {cells} | {s['vae_frames']['max']:.0f} |")
    print(f"\nVAE halo: {reports[0]['halo_latent_frames']} latent frames (exact chunk-halo encode)")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(reports, indent=1))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
