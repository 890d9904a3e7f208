"""Per-rank balance report of a teacher-forcing layout over a sequence-parallel group.

`vidtrain balance --frames 96 --frames-per-chunk 3 --sp 4 --layout balanced [--json]`

Figures per SP rank:
  tokens          tokens the rank holds (clean + noisy)
  loss_tokens     noisy tokens (the loss lives there)
  vae_frames      pixel frames the rank's VAE encode reads, left halo included (chunk-halo encode)
  attn_pairs      query-key pairs the mask allows for the rank's own queries against all keys
                  (the attention work a rank owns under ring / context parallelism; under
                  Ulysses every rank attends all queries of H/P heads, i.e. total/P each)
Pair counts are exact without a dense L x L mask: the mask depends on frame, chunk and copy
only, so it is counted on one token per frame and scaled by tokens_per_frame**2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vidtrain.forcing.meta import MaskRule, TokenMeta, build_mask
from vidtrain.parallel.sequence import layout_metas, naive_frame_span, rank_frames

TEMPORAL_COMPRESSION = 4
# Used only when the VAE module cannot be built: Wan2.1 VAE's encoder receptive field in latent
# frames, as CausalVideoVAE.temporal_receptive_field() computes it for the "wan2.1" flavor.
WAN21_HALO_LATENT_FRAMES = 28
FIGURES = ("tokens", "loss_tokens", "vae_frames", "attn_pairs")


def vae_halo() -> int:
    """Left halo (latent frames) that makes the chunk-halo encode exact for Wan2.1's VAE."""
    try:
        from vidtrain.models.vae.model import CausalVideoVAE

        with torch.device("meta"):
            return CausalVideoVAE.from_flavor("wan2.1").temporal_receptive_field()
    except Exception:  # the VAE is optional for this report
        return WAN21_HALO_LATENT_FRAMES


def pixel_frames(start: int, end: int, halo: int, tc: int = TEMPORAL_COMPRESSION) -> int:
    """Pixel frames read to encode latent frames [start, end) with a left halo (causal VAE)."""
    first = max(0, start - halo)
    p0 = 0 if first == 0 else tc * first - (tc - 1)
    return tc * (end - 1) + 1 - p0


def _frame_level(meta: TokenMeta, tokens_per_frame: int) -> TokenMeta:
    """One token per (frame, copy): keep every tokens_per_frame-th token (tokens come frame by frame)."""
    return meta.index(slice(0, len(meta), tokens_per_frame))


def layout_report(
    layout: str, frames: int, frames_per_chunk: int, sp: int, lat_h: int, lat_w: int, halo: int | None = None
) -> dict:
    """Per-rank figures and max/mean for a layout (latent sizes lat_h x lat_w)."""
    hp, wp = lat_h // 2, lat_w // 2
    tpf = hp * wp
    halo = vae_halo() if halo is None else halo
    rule = MaskRule("teacher_forcing", frames_per_chunk)
    metas = layout_metas(layout, frames, 1, 1, frames_per_chunk, sp)  # one token per frame
    global_meta = TokenMeta.cat(metas)
    per_rank: dict[str, list[float]] = {k: [] for k in FIGURES}
    for r, m in enumerate(metas):
        span = rank_frames(frames, r, sp) if layout == "balanced" else naive_frame_span(frames, r, sp)
        per_rank["tokens"].append(float(len(m) * tpf))
        per_rank["loss_tokens"].append(float(int(m.noisy.sum()) * tpf))
        per_rank["vae_frames"].append(float(pixel_frames(span[0], span[1], halo)))
        per_rank["attn_pairs"].append(float(int(build_mask(rule, m, global_meta).sum()) * tpf * tpf))
    summary = {}
    for k, vals in per_rank.items():
        mean = sum(vals) / len(vals)
        summary[k] = {"max": max(vals), "mean": mean, "max_over_mean": max(vals) / mean if mean else 1.0}
    return {
        "layout": layout, "frames": frames, "frames_per_chunk": frames_per_chunk, "sp": sp,
        "latent_hw": [lat_h, lat_w], "tokens_per_frame": tpf, "halo_latent_frames": halo,
        "per_rank": per_rank, "summary": summary,
    }  # fmt: skip


def format_report(rep: dict) -> str:
    lines = [
        f"layout={rep['layout']} sp={rep['sp']} frames={rep['frames']} fpc={rep['frames_per_chunk']} "
        f"latent={rep['latent_hw'][0]}x{rep['latent_hw'][1]} tokens/frame={rep['tokens_per_frame']} "
        f"vae halo={rep['halo_latent_frames']} latent frames",
        f"{'rank':>6} " + " ".join(f"{k:>16}" for k in FIGURES),
    ]
    for r in range(rep["sp"]):
        lines.append(f"{r:>6} " + " ".join(f"{rep['per_rank'][k][r]:>16,.0f}" for k in FIGURES))
    s = rep["summary"]
    lines.append(f"{'max':>6} " + " ".join(f"{s[k]['max']:>16,.0f}" for k in FIGURES))
    lines.append(f"{'mean':>6} " + " ".join(f"{s[k]['mean']:>16,.1f}" for k in FIGURES))
    lines.append(f"{'max/mean':>6} " + " ".join(f"{s[k]['max_over_mean']:>16.3f}" for k in FIGURES))
    return "\n".join(lines)


def plot_rank_figures(figures: dict[str, list[float]], path: Path) -> None:
    """Bar chart, one panel per figure, one bar per rank (the run folder's balance.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(figures)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False)
    for ax, name in zip(axes[0], names):
        vals = figures[name]
        ax.bar(range(len(vals)), vals, color="tab:blue")
        mean = sum(vals) / len(vals)
        ratio = max(vals) / mean if mean else 1.0
        ax.axhline(mean, color="tab:red", lw=1)
        ax.set_title(f"{name}\nmax/mean {ratio:.3f}", fontsize=9)
        ax.set_xlabel("rank")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vidtrain balance", description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, required=True, help="latent frames")
    p.add_argument("--frames-per-chunk", type=int, default=3)
    p.add_argument("--sp", type=int, required=True, help="sequence-parallel ranks")
    p.add_argument("--layout", choices=("naive", "balanced"), default="balanced")
    p.add_argument("--height", type=int, default=480, help="pixels")
    p.add_argument("--width", type=int, default=832, help="pixels")
    p.add_argument("--halo", type=int, default=None, help="VAE halo in latent frames (default: exact)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = p.parse_args(argv)
    if a.height % 16 or a.width % 16:
        raise ValueError(f"height and width must be multiples of 16 pixels, got {a.height}x{a.width}")
    rep = layout_report(a.layout, a.frames, a.frames_per_chunk, a.sp, a.height // 8, a.width // 8, a.halo)
    print(json.dumps(rep, indent=1) if a.json else format_report(rep))
    return 0
