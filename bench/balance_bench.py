"""Naive vs balanced teacher-forcing layouts over P = 2, 4, 8 SP ranks: per-rank max/mean.

  python bench/balance_bench.py [--frames 96 --height 480 --width 832] [--json runs/balance_bench.json]

Prints a Markdown table of max/mean over the ranks of one SP group (1.000 = perfectly even) and
writes the full per-rank reports as JSON. Counts come from metadata and the same schedules that
training runs (vidtrain.parallel.balance / .schedule); nothing is timed. Columns:

- tokens, loss tokens: what each rank holds (fixed by the layout).
- attention pairs (query-key pairs the mask allows, per head):
  "ring" is the work of a rank under `parallel.sp_impl=ring` with its metadata schedule (queries
  of heavy ranks attended on light ones); "Ulysses" is the default: after the all-to-all each
  rank attends ALL queries on H/P heads, all pairs / P whatever the layout;
  "own queries, unscheduled" is what ring would cost if every rank attended its own queries.
- VAE pixel frames per rank when training from videos with the exact halo (28 latent frames for
  Wan2.1): "planned" is the balanced encode plan training runs (rank 0 has no left context, so it
  encodes more frames of its own; latents then move to the ranks that hold them); "own span,
  unscheduled" is each rank encoding its own frames plus the halo. Pre-encoded latents
  (data.source=shards): no rank runs the VAE.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vidtrain.parallel.balance import layout_report

COLUMNS = (
    ("summary", "tokens", "tokens"),
    ("summary", "loss_tokens", "loss tokens"),
    ("summary", "attn_pairs_ring", "attn pairs, ring (scheduled)"),
    ("summary", "attn_pairs_ulysses", "attn pairs, Ulysses"),
    ("summary", "vae_frames", "VAE px frames (planned)"),
    ("unscheduled", "attn_pairs_own_queries", "attn pairs, own queries (unscheduled)"),
    ("unscheduled", "vae_frames_own_span", "VAE px frames, own span (unscheduled)"),
)


def _cell(rep: dict, where: str, key: str) -> str:
    s = rep["summary"] if where == "summary" else rep["unscheduled"]["summary"]
    return f"{s[key]['max_over_mean']:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=96)
    p.add_argument("--frames-per-chunk", type=int, default=3)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--json", default="runs/balance_bench.json")
    a = p.parse_args()
    reports = []
    print(f"frames={a.frames} fpc={a.frames_per_chunk} {a.height}x{a.width} px; max/mean over the SP ranks\n")
    head = [label for _, _, label in COLUMNS] + ["max VAE px frames (planned)"]
    print("| P | layout | " + " | ".join(head) + " |")
    print("|---|---|" + "---|" * len(head))
    for sp in (2, 4, 8):
        for layout in ("naive", "balanced"):
            rep = layout_report(layout, a.frames, a.frames_per_chunk, sp, a.height // 8, a.width // 8)
            reports.append(rep)
            cells = [_cell(rep, where, key) for where, key, _ in COLUMNS]
            cells.append(f"{rep['summary']['vae_frames']['max']:.0f}")
            print(f"| {sp} | {layout} | " + " | ".join(cells) + " |")
    print(f"\nVAE halo: {reports[0]['halo_latent_frames']} latent frames (exact chunk-halo encode)")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(reports, indent=1))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
