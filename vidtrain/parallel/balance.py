"""Per-rank balance report of a teacher-forcing layout over a sequence-parallel group.

`vidtrain balance --frames 96 --frames-per-chunk 3 --sp 4 --layout balanced [--json]`

Figures per SP rank, each the work that rank does in training (vidtrain.parallel.schedule):
  tokens              tokens the rank holds (clean + noisy)
  loss_tokens         noisy tokens (the loss lives there)
  vae_frames          pixel frames the rank's VAE encode reads, left halo included, under the
                      group's balanced encode plan (training from videos); 0 with latent shards
  attn_pairs_ring     query-key pairs the rank attends under `parallel.sp_impl=ring`: the
                      metadata schedule moves queries from heavy to light ranks
  attn_pairs_ulysses  query-key pairs a rank computes under Ulysses (the default): after the
                      all-to-all every rank attends ALL queries on H/P of the H heads; counted
                      per head like the figure above, that is all pairs / P per rank
Not a figure but reported beside them (`unscheduled`): what the layout alone would give, each
rank attending its own queries (`attn_pairs_own_queries`) and VAE-encoding its own frames with
the halo (`vae_frames_own_span`); the schedules exist because these are uneven.
Pair counts are exact without an L x L mask (`schedule.query_work` groups tokens by frame, chunk,
copy and shot). They count pairs the mask allows (what a block-sparse kernel such as
FlexAttention computes), not the L x L pairs a dense-mask SDPA evaluates.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vidtrain.models.vae.model import CausalVideoVAE
from vidtrain.parallel.layouts import LAYOUTS, layout_frame_span, layout_metas
from vidtrain.parallel.schedule import pixel_frames, query_work, ring_query_schedule, vae_encode_plan
from vidtrain.tokens import MaskRule, TokenMeta
from vidtrain.utils.plots import integer_axis, nonempty, pyplot

# Used only when the VAE module cannot be built: Wan2.1 VAE's encoder receptive field in latent
# frames, as CausalVideoVAE.temporal_receptive_field() computes it for the "wan2.1" flavor.
WAN21_HALO_LATENT_FRAMES = 28
FIGURES = ("tokens", "loss_tokens", "vae_frames", "attn_pairs_ring", "attn_pairs_ulysses")
UNSCHEDULED = ("vae_frames_own_span", "attn_pairs_own_queries")


def vae_halo(flavor: str = "wan2.1") -> int:
    """Left halo (latent frames) that makes the chunk-halo encode exact for a VAE flavor."""
    try:
        with torch.device("meta"):
            return CausalVideoVAE.from_flavor(flavor).temporal_receptive_field()
    except Exception:  # the VAE is optional for this report
        return WAN21_HALO_LATENT_FRAMES


def vae_stride(flavor: str) -> int:
    """Pixels per latent along height and width (8 for Wan2.1's VAE, 16 for Wan2.2's)."""
    with torch.device("meta"):
        return CausalVideoVAE.from_flavor(flavor).spatial_compression


def _summary(per_rank: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    out = {}
    for k, vals in per_rank.items():
        mean = sum(vals) / len(vals)
        out[k] = {"max": max(vals), "mean": mean, "max_over_mean": max(vals) / mean if mean else 1.0}
    return out


def layout_report(
    layout: str,
    frames: int,
    frames_per_chunk: int,
    sp: int,
    lat_h: int,
    lat_w: int,
    halo: int | None = None,
    pre_encoded: bool = False,
    rule: MaskRule | None = None,
) -> dict:
    """Per-rank figures and max/mean for a layout (latent sizes lat_h x lat_w).

    `halo`: VAE left halo in latent frames (None: Wan2.1's exact receptive field);
    `pre_encoded`: latents come from latent shards, so no rank runs the VAE (vae_frames 0);
    `rule`: the training mask (None: teacher forcing with full history; the trainer passes the
    recipe's window and sinks).
    """
    hp, wp = lat_h // 2, lat_w // 2
    halo = vae_halo() if halo is None else halo
    rule = MaskRule("teacher_forcing", frames_per_chunk) if rule is None else rule
    if rule.kind != "teacher_forcing" or rule.frames_per_chunk != frames_per_chunk:
        raise ValueError(
            f"the balance report needs a teacher_forcing rule with {frames_per_chunk} frames per chunk"
        )
    metas = layout_metas(layout, frames, hp, wp, frames_per_chunk, sp)
    global_meta = TokenMeta.cat(metas)
    work = query_work(rule, global_meta, global_meta)
    own = list(torch.split(work, [len(m) for m in metas]))
    total_pairs = float(work.double().sum())
    plan = vae_encode_plan(frames, sp, halo)
    per_rank: dict[str, list[float]] = {
        "tokens": [float(len(m)) for m in metas],
        "loss_tokens": [float(int(m.noisy.sum())) for m in metas],
        "vae_frames": [0.0 if pre_encoded else float(pixel_frames(a, b, halo)) for a, b in plan],
        "attn_pairs_ring": ring_query_schedule(own).load(),
        "attn_pairs_ulysses": [total_pairs / sp] * sp,
    }
    unscheduled = {
        "vae_frames_own_span": [
            0.0 if pre_encoded else float(pixel_frames(*layout_frame_span(layout, frames, r, sp), halo))
            for r in range(sp)
        ],
        "attn_pairs_own_queries": [float(w.double().sum()) for w in own],
    }
    return {
        "layout": layout, "frames": frames, "frames_per_chunk": frames_per_chunk, "sp": sp,
        "latent_hw": [lat_h, lat_w], "tokens_per_frame": hp * wp, "halo_latent_frames": halo,
        "pre_encoded": pre_encoded, "vae_encode_plan": [list(x) for x in plan],
        "mask": {"window_frames": rule.window_frames, "sink_frames": rule.sink_frames, "shot_sink": rule.shot_sink},
        "per_rank": per_rank, "summary": _summary(per_rank),
        "unscheduled": {"per_rank": unscheduled, "summary": _summary(unscheduled)},
    }  # fmt: skip


def format_report(rep: dict) -> str:
    lines = [
        f"layout={rep['layout']} sp={rep['sp']} frames={rep['frames']} fpc={rep['frames_per_chunk']} "
        f"latent={rep['latent_hw'][0]}x{rep['latent_hw'][1]} tokens/frame={rep['tokens_per_frame']} "
        + ("latents pre-encoded (no VAE work)" if rep.get("pre_encoded") else
           f"vae halo={rep['halo_latent_frames']} latent frames"),
        f"{'rank':>8} " + " ".join(f"{k:>22}" for k in FIGURES),
    ]  # fmt: skip
    for r in range(rep["sp"]):
        lines.append(f"{r:>8} " + " ".join(f"{rep['per_rank'][k][r]:>22,.0f}" for k in FIGURES))
    s = rep["summary"]
    lines.append(f"{'max':>8} " + " ".join(f"{s[k]['max']:>22,.0f}" for k in FIGURES))
    lines.append(f"{'mean':>8} " + " ".join(f"{s[k]['mean']:>22,.1f}" for k in FIGURES))
    lines.append(f"{'max/mean':>8} " + " ".join(f"{s[k]['max_over_mean']:>22.3f}" for k in FIGURES))
    u = rep["unscheduled"]["summary"]
    lines.append(
        "vae_frames: balanced encode plan (halo included); attn_pairs_ring: scheduled ring/context "
        "parallel work; attn_pairs_ulysses: all queries x H/P heads per rank"
    )
    lines.append(
        "without the schedules (each rank its own span / own queries) max/mean would be: "
        + ", ".join(f"{k} {u[k]['max_over_mean']:.3f}" for k in UNSCHEDULED)
    )
    return "\n".join(lines)


def plot_rank_figures(figures: dict[str, list[float]], path: Path, title: str = "per-rank balance") -> None:
    """The run folder's balance.png (see `rank_figure`); nothing when no panel has values."""
    fig = rank_figure(figures, title)
    if fig is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    pyplot().close(fig)


def rank_figure(figures: dict[str, list[float]], title: str):
    """Bar chart, one panel per figure, one bar per rank, the mean a labelled line; panels with
    nothing to show (VAE frames when training on latents) are left out."""
    figures = nonempty(figures)
    if not figures:
        return None
    names = list(figures)
    fig, axes = pyplot().subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        vals = figures[name]
        ax.bar(range(len(vals)), vals, color="tab:blue")
        mean = sum(vals) / len(vals)
        ratio = max(vals) / mean if mean else 1.0
        ax.axhline(mean, color="tab:red", lw=1, label=f"mean {mean:,.3g}")
        ax.set_title(f"{name}\nmax/mean {ratio:.3f}", fontsize=9)
        ax.set_xlabel("rank")
        integer_axis(ax, "x")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        prog="vidtrain balance",
        description=__doc__.split("\n")[0],
    )
    p.add_argument("--frames", type=int, required=True, help="latent frames")
    p.add_argument("--frames-per-chunk", type=int, default=3, help="latent frames per chunk")
    p.add_argument("--sp", type=int, required=True, help="sequence-parallel ranks")
    p.add_argument("--layout", choices=LAYOUTS.names(), default="balanced", help="teacher-forcing layout")
    p.add_argument("--height", type=int, default=480, help="pixels")
    p.add_argument("--width", type=int, default=832, help="pixels")
    p.add_argument(
        "--vae", choices=("wan2.1", "wan2.2"), default="wan2.1", help="VAE of the latents (stride, halo)"
    )
    p.add_argument(
        "--halo", type=int, default=None, help="VAE halo in latent frames (None: the VAE's exact one)"
    )
    p.add_argument("--pre-encoded", action="store_true", help="latents from latent shards (no VAE work)")
    p.add_argument("--window-frames", type=int, default=None, help="attention window (model.window_frames)")
    p.add_argument("--sink-frames", type=int, default=0, help="global sink frames (model.sink_frames)")
    p.add_argument("--shot-sink", action="store_true", help="shot sink (model.shot_sink)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = p.parse_args(argv)
    stride = vae_stride(a.vae)
    unit = 2 * stride  # a latent pixel pair per (1, 2, 2) patch
    if a.height % unit or a.width % unit or a.height <= 0 or a.width <= 0:
        raise ValueError(
            f"height and width must be positive multiples of {unit} pixels with the {a.vae} VAE, "
            f"got {a.height}x{a.width}"
        )
    for name, value, low in (
        ("--frames", a.frames, 1),
        ("--frames-per-chunk", a.frames_per_chunk, 1),
        ("--sp", a.sp, 1),
    ):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if a.halo is not None and a.halo < 0:
        raise ValueError(f"--halo must be >= 0 latent frames, got {a.halo}")
    if a.sink_frames < 0:
        raise ValueError(f"--sink-frames must be >= 0, got {a.sink_frames}")
    rule = MaskRule("teacher_forcing", a.frames_per_chunk, a.window_frames, a.sink_frames, a.shot_sink)
    halo = vae_halo(a.vae) if a.halo is None else a.halo
    rep = layout_report(
        a.layout,
        a.frames,
        a.frames_per_chunk,
        a.sp,
        a.height // stride,
        a.width // stride,
        halo,
        a.pre_encoded,
        rule,
    )
    print(json.dumps(rep, indent=1) if a.json else format_report(rep))
    return 0
