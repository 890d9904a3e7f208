"""Naive vs balanced teacher-forcing layouts over P = 2, 4, 8 SP ranks: per-rank max/mean.

  python bench/balance_bench.py [--frames 96 --height 480 --width 832] [--json runs/balance_bench.json]

Prints a Markdown table of max/mean over the ranks of one SP group (1.000 = perfectly even) and
writes the full per-rank reports as JSON. Counts come from metadata (vidtrain.parallel.balance);
nothing is timed. Columns:

- tokens, loss tokens: what each rank holds.
- attention pairs, two figures, both counting query-key pairs the mask allows (per head):
  "own queries" is the work of a rank under ring / context-parallel attention (each rank attends
  its own queries against all keys). "Ulysses computed" is what vidtrain actually runs: after the
  all-to-all each rank attends ALL queries on H/P heads, so it computes all pairs / P whatever
  the layout. Under Ulysses the layout balances tokens and loss, not attention (already even).
- VAE pixel frames per rank, two cases. Pre-encoded latents (data.source=shards): no rank runs
  the VAE, 0 each. Training from videos with the exact halo (data.vae_halo unset): each rank
  encodes its latent frames plus a left halo of the encoder's receptive field (28 latent frames
  for Wan2.1), dropped afterwards.

Why the exact halo cannot be even for rank 0: the encoder is causal, and the halo is left
context. Rank 0's frames start at the clip's first frame, where there is no context to read
(the causal convolutions see zero padding there, as in the single-pass encode), so rank 0 reads
only its own frames, ranks that start less than one halo after the clip's start read from its
first frame (a partial halo), and the others read their frames plus a full 28 latent frames
(~112 pixel frames) of someone else's. With 96 latent frames over P = 8 ranks a rank owns 12
latent frames (~48 pixel frames): per rank 45, 93, 141, then 160 pixel frames, so the halo is
most of the work of ranks 1..7. Giving rank 0
more frames to compensate would unbalance tokens, loss tokens and attention, which cost far more
than the VAE encode; and a smaller halo makes the latents approximate (its error is reported
by bench/vae_bench.py). The halo is redundant work: the sum over ranks exceeds one whole-clip
encode.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vidtrain.parallel.balance import layout_report

COLUMNS = (
    ("tokens", "tokens"),
    ("loss_tokens", "loss tokens"),
    ("attn_pairs_own_queries", "attn pairs, own queries (ring/CP)"),
    ("attn_pairs_ulysses", "attn pairs computed (Ulysses)"),
    ("vae_frames", "VAE px frames, exact halo"),
)


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
    head = [label for _, label in COLUMNS] + ["max VAE px frames, exact halo", "VAE px frames, pre-encoded"]
    print("| P | layout | " + " | ".join(head) + " |")
    print("|---|---|" + "---|" * len(head))
    for sp in (2, 4, 8):
        for layout in ("naive", "balanced"):
            args = (layout, a.frames, a.frames_per_chunk, sp, a.height // 8, a.width // 8)
            rep, pre = layout_report(*args), layout_report(*args, pre_encoded=True)
            reports += [rep, pre]
            s = rep["summary"]
            cells = [f"{s[k]['max_over_mean']:.3f}" for k, _ in COLUMNS]
            cells += [f"{s['vae_frames']['max']:.0f}", f"{pre['summary']['vae_frames']['max']:.0f} per rank"]
            print(f"| {sp} | {layout} | " + " | ".join(cells) + " |")
    print(f"\nVAE halo: {reports[0]['halo_latent_frames']} latent frames (exact chunk-halo encode)")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(reports, indent=1))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
