"""Per-rank VAE encode time under sequence parallelism: own span + halo vs the balanced encode plan.

  python bench/vae_plan_bench.py [--frames 96 --size 32 --sp 2 4 8] [--json runs/vae_plan_bench.json]

The Wan2.1 VAE architecture (random weights: time does not depend on them), a clip of
1 + 4 * (frames - 1) pixel frames at size x size, the exact halo (28 latent frames). For each P,
every rank's encode is timed one rank after another in this process (the time that rank would
take on a device of its own): "own span" encodes the rank's balanced-layout frames plus the
halo, "planned" the range of `schedule.vae_encode_plan` (what training runs). The lockstep group
waits for its slowest rank, so the max is the figure that matters.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vidtrain.models.vae.model import CausalVideoVAE
from vidtrain.parallel.layouts import rank_frames
from vidtrain.parallel.schedule import pixel_frames, vae_encode_plan


def _time_ranges(vae, video, ranges, halo) -> list[float]:
    out = []
    for a, b in ranges:
        t0 = time.perf_counter()
        if b > a:
            vae.encode_range(video, a, b, halo)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=96, help="latent frames")
    p.add_argument("--size", type=int, default=32, help="pixels (square)")
    p.add_argument("--sp", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--json", default="runs/vae_plan_bench.json")
    a = p.parse_args()
    torch.manual_seed(0)
    vae = CausalVideoVAE.from_flavor("wan2.1").eval()
    halo = vae.temporal_receptive_field()
    video = torch.randn(1, 3, 1 + 4 * (a.frames - 1), a.size, a.size)
    rows = []
    print(f"Wan2.1 VAE, {video.shape[2]} px frames at {a.size}x{a.size}, halo {halo} latent frames, "
          f"{torch.get_num_threads()} threads\n")  # fmt: skip
    print(
        "| P | encode | px frames per rank (max) | time per rank, max (s) | max/mean time | group total (s) |"
    )
    print("|---|---|---|---|---|---|")
    with torch.no_grad():
        for sp in a.sp:
            for name, ranges in (
                ("own span + halo", [rank_frames(a.frames, r, sp) for r in range(sp)]),
                ("planned", vae_encode_plan(a.frames, sp, halo)),
            ):
                times = _time_ranges(vae, video, ranges, halo)
                px = [pixel_frames(x, y, halo) for x, y in ranges]
                mean = sum(times) / len(times)
                row = {"sp": sp, "encode": name, "ranges": ranges, "pixel_frames": px, "seconds": times}
                rows.append(row)
                print(
                    f"| {sp} | {name} | {max(px)} | {max(times):.2f} | {max(times) / mean:.3f} | {sum(times):.1f} |"
                )
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(rows, indent=1))
    print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
