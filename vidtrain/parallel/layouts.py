"""Teacher-forcing layouts: which tokens of the sequence each rank of an SP group holds.

A layout is a permutation of the single-process sequence (DESIGN sections 4-5):
  naive     the single-process [all clean | all noisy] sequence cut into P contiguous pieces;
  balanced  rank r holds frames [r*F/P, (r+1)*F/P) in both copies, clean then noisy.
Global order = concatenation of the ranks' local sequences; masks follow from metadata.
A rank reads only the clean latents of its frame span (`Layout.frame_span`); when training from
videos the latents are lazy and the group encodes the clip once by the balanced encode plan
(vae_plan.py), and each rank noises its span with the group's shared noise and timesteps.

The teacher-forcing method calls `LAYOUTS.get(recipe.parallel.layout).tf_sequence(..., mesh)`.
A new layout is a `Layout` subclass whose instance is registered in `LAYOUTS` (from its own
module, imported by vidtrain/plugins.py).

Legend: B batch, C channels, F latent frames, H/W latent size, L tokens, P patch vector,
hp/wp token grid, P SP ranks.
"""

from __future__ import annotations

import torch

from vidtrain.forcing.teacher import TFSequence, build_tf_sequence
from vidtrain.parallel.mesh import Mesh
from vidtrain.parallel.vae_plan import gather_planned_latents
from vidtrain.registry import Registry
from vidtrain.tokens import TokenMeta, grid_meta

LAYOUTS: Registry[Layout] = Registry("layout")


def take_frames(x0_BCFHW, f0: int, f1: int) -> torch.Tensor:
    """Latent frames [f0, f1) of a latent tensor, or of a lazy source (`.frames(f0, f1)`, e.g.
    vidtrain.data.videos.VideoLatents, which VAE-encodes just those frames)."""
    if isinstance(x0_BCFHW, torch.Tensor):
        return x0_BCFHW[:, :, f0:f1]
    return x0_BCFHW.frames(f0, f1)


class Layout:
    """Which tokens of the teacher-forcing sequence each SP rank holds (subclasses: the layouts)."""

    name = ""

    def check(self, frames: int, frames_per_chunk: int, sp_size: int) -> None:
        """Every rank must hold whole chunks."""
        if frames % (sp_size * frames_per_chunk):
            raise ValueError(
                f"{frames} latent frames do not split over sp_size={sp_size} ranks in whole chunks of "
                f"{frames_per_chunk} frames: frames must be a multiple of {sp_size * frames_per_chunk}"
            )

    def metas(self, frames: int, hp: int, wp: int, frames_per_chunk: int, sp_size: int) -> list[TokenMeta]:
        """Per-rank token metadata; their concatenation is the global order."""
        raise NotImplementedError

    def frame_span(self, frames: int, sp_rank: int, sp_size: int) -> tuple[int, int]:
        """Latent frames [f0, f1) whose tokens (clean or noisy) a rank holds: the only clean
        latents it needs, and so the only frames it encodes when training from videos."""
        raise NotImplementedError

    def cut(self, seq: TFSequence, frames: int, sp_rank: int, sp_size: int) -> TFSequence:
        """The rank's tokens of its span's [clean | noisy] sequence (all of them by default)."""
        return seq

    def frame_spans(self, frames: int, sp_size: int) -> list[tuple[int, int]]:
        return [self.frame_span(frames, r, sp_size) for r in range(sp_size)]

    def local_sequence(
        self,
        x0_BCFHW,
        noise_BCFHW,
        sigma_BF,
        frames_per_chunk: int,
        sp_rank: int,
        sp_size: int,
        group=None,
        *,
        history_delta_BCFHW: torch.Tensor | None = None,
        noisy_delta_BCFHW: torch.Tensor | None = None,
    ) -> tuple[TFSequence, TokenMeta]:
        """This rank's part of the teacher-forcing sequence and the global metadata.

        `x0_BCFHW` is a latent tensor or a lazy source (`take_frames`): only the rank's frame span
        is read. A lazy source with the SP `group` given is encoded by the group's balanced plan
        (`vae_plan.gather_planned_latents`); without a group each rank encodes its own span.
        The deltas (error recycling, whole-video tensors like the noise, equal on every rank of
        the group) are cut to the span: `history_delta` enters the clean tokens only, as
        x0 + delta, `noisy_delta` the noised input (`build_tf_sequence`).
        """
        _, _, f, h, w = x0_BCFHW.shape
        self.check(f, frames_per_chunk, sp_size)
        metas = self.metas(f, h // 2, w // 2, frames_per_chunk, sp_size)
        f0, f1 = self.frame_span(f, sp_rank, sp_size)
        if group is not None and sp_size > 1 and not isinstance(x0_BCFHW, torch.Tensor):
            x0_local = gather_planned_latents(x0_BCFHW, self.frame_spans(f, sp_size), sp_rank, group)
        else:
            x0_local = take_frames(x0_BCFHW, f0, f1)
        seq = build_tf_sequence(
            x0_local,
            noise_BCFHW[:, :, f0:f1],
            sigma_BF[:, f0:f1],
            frames_per_chunk,
            frame_offset=f0,
            **_recycled(x0_local, f0, f1, history_delta_BCFHW, noisy_delta_BCFHW),
        )
        return self.cut(seq, f, sp_rank, sp_size), TokenMeta.cat(metas)

    def tf_sequence(
        self,
        x0_BCFHW,
        noise_BCFHW: torch.Tensor,
        sigma_BF: torch.Tensor,
        frames_per_chunk: int,
        mesh: Mesh,
        *,
        history_delta_BCFHW: torch.Tensor | None = None,
        noisy_delta_BCFHW: torch.Tensor | None = None,
    ) -> tuple[TFSequence, TokenMeta]:
        """The seam a method calls: this rank's part of the sequence on `mesh`, and the global
        token metadata (one process, or an SP group of one: the whole sequence).

        `x0_BCFHW` is a latent tensor [B, C, F, H, W] or a lazy source of latent frames (videos
        encoded on demand, `take_frames`): a rank reads only the frames its part holds. The
        optional deltas are error recycling's (see `local_sequence`); None leaves the sequence
        exactly as without them.
        """
        if mesh.sp_size == 1:
            f = x0_BCFHW.shape[2]
            x0 = take_frames(x0_BCFHW, 0, f)
            extra = _recycled(x0, 0, f, history_delta_BCFHW, noisy_delta_BCFHW)
            seq = build_tf_sequence(x0, noise_BCFHW, sigma_BF, frames_per_chunk, **extra)
            return seq, seq.meta
        return self.local_sequence(
            x0_BCFHW, noise_BCFHW, sigma_BF, frames_per_chunk, mesh.sp_rank, mesh.sp_size, mesh.sp_group,
            history_delta_BCFHW=history_delta_BCFHW, noisy_delta_BCFHW=noisy_delta_BCFHW,
        )  # fmt: skip


def _recycled(x0_local: torch.Tensor, f0: int, f1: int, history=None, noisy=None) -> dict:
    """`build_tf_sequence`'s error-recycling arguments for frames [f0, f1): the clean history
    x0 + delta and the noisy input's delta (none given: no arguments, the plain sequence)."""
    out = {}
    if history is not None:
        out["history_BCFHW"] = x0_local + history[:, :, f0:f1].to(x0_local.device, x0_local.dtype)
    if noisy is not None:
        out["noisy_delta_BCFHW"] = noisy[:, :, f0:f1]
    return out


def rank_frames(frames: int, sp_rank: int, sp_size: int) -> tuple[int, int]:
    """Frame range [f0, f1) that a rank holds in the balanced layout (and encodes with the VAE)."""
    per = frames // sp_size
    return sp_rank * per, (sp_rank + 1) * per


def naive_frame_span(frames: int, sp_rank: int, sp_size: int) -> tuple[int, int]:
    """Latent frames [f0, f1) whose tokens (clean or noisy) land on a rank in the naive layout."""
    total = 2 * frames
    a, b = sp_rank * total // sp_size, (sp_rank + 1) * total // sp_size  # in "frame copies"
    spans = [(max(a, 0), min(b, frames)), (max(a, frames) - frames, min(b, total) - frames)]
    spans = [(s, e) for s, e in spans if e > s]
    return min(s for s, _ in spans), max(e for _, e in spans)


class Naive(Layout):
    """The single-process [all clean | all noisy] sequence cut into P contiguous pieces."""

    name = "naive"

    def metas(self, frames: int, hp: int, wp: int, frames_per_chunk: int, sp_size: int) -> list[TokenMeta]:
        full = TokenMeta.cat([
            grid_meta(frames, hp, wp, frames_per_chunk, noisy=False),
            grid_meta(frames, hp, wp, frames_per_chunk, noisy=True),
        ])  # fmt: skip
        piece = len(full) // sp_size
        return [full.index(slice(r * piece, (r + 1) * piece)) for r in range(sp_size)]

    def frame_span(self, frames: int, sp_rank: int, sp_size: int) -> tuple[int, int]:
        return naive_frame_span(frames, sp_rank, sp_size)

    def cut(self, seq: TFSequence, frames: int, sp_rank: int, sp_size: int) -> TFSequence:
        """The span's [clean | noisy] sequence cut to the rank's piece of the global
        [all clean | all noisy] (pieces are whole frame copies since F divides by P * fpc)."""
        f = frames
        a, b = sp_rank * 2 * f // sp_size, (sp_rank + 1) * 2 * f // sp_size  # frame copies [a, b)
        copy = seq.meta.frame + seq.meta.noisy.long() * f  # clean frame i -> i, noisy -> f + i
        return seq.index(torch.nonzero((copy >= a) & (copy < b)).squeeze(1))


class Balanced(Layout):
    """Rank r holds frames [r*F/P, (r+1)*F/P) in both copies, clean then noisy."""

    name = "balanced"

    def metas(self, frames: int, hp: int, wp: int, frames_per_chunk: int, sp_size: int) -> list[TokenMeta]:
        out = []
        for r in range(sp_size):
            f0, f1 = rank_frames(frames, r, sp_size)
            kw = dict(frame_offset=f0)
            out.append(
                TokenMeta.cat([
                    grid_meta(f1 - f0, hp, wp, frames_per_chunk, noisy=False, **kw),
                    grid_meta(f1 - f0, hp, wp, frames_per_chunk, noisy=True, **kw),
                ])
            )  # fmt: skip
        return out

    def frame_span(self, frames: int, sp_rank: int, sp_size: int) -> tuple[int, int]:
        return rank_frames(frames, sp_rank, sp_size)


LAYOUTS.add("naive", Naive())
LAYOUTS.add("balanced", Balanced())


# ---- by name (the recipe's parallel.layout) ---------------------------------------------------


def check_layout(layout: str, frames: int, frames_per_chunk: int, sp_size: int) -> None:
    """A known layout (an unknown name lists the known ones) whose ranks hold whole chunks."""
    LAYOUTS.get(layout).check(frames, frames_per_chunk, sp_size)


def layout_metas(
    layout: str, frames: int, hp: int, wp: int, frames_per_chunk: int, sp_size: int
) -> list[TokenMeta]:
    """Per-rank token metadata of a layout; their concatenation is the global order."""
    check_layout(layout, frames, frames_per_chunk, sp_size)
    return LAYOUTS.get(layout).metas(frames, hp, wp, frames_per_chunk, sp_size)


def layout_frame_span(layout: str, frames: int, sp_rank: int, sp_size: int) -> tuple[int, int]:
    """Latent frames [f0, f1) whose tokens (clean or noisy) a rank holds in `layout`."""
    return LAYOUTS.get(layout).frame_span(frames, sp_rank, sp_size)


def local_tf_sequence(
    layout: str,
    x0_BCFHW,
    noise_BCFHW: torch.Tensor,
    sigma_BF: torch.Tensor,
    frames_per_chunk: int,
    sp_rank: int,
    sp_size: int,
    group=None,
    **deltas,
) -> tuple[TFSequence, TokenMeta]:
    """`Layout.local_sequence` of the layout named `layout` (`deltas`: its error-recycling keywords)."""
    return LAYOUTS.get(layout).local_sequence(
        x0_BCFHW, noise_BCFHW, sigma_BF, frames_per_chunk, sp_rank, sp_size, group, **deltas
    )


def encode_local_frames(
    vae,
    video_BCTHW: torch.Tensor,
    layout: str,
    sp_rank: int,
    sp_size: int,
    frames_per_chunk: int,
    halo: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Latents this rank needs, encoded from its own pixel frames plus a left halo.

    Returns (latents [B, C, f1-f0, h, w], f0) for the rank's `frame_span`. Balanced: only the
    rank's frame range. Naive: a rank's piece of [clean | noisy] may cover any frames, so it
    encodes the frames its piece touches. `halo` defaults to the VAE's temporal receptive field
    (exact encode).
    """
    frames = vae.num_latent_frames(video_BCTHW.shape[2])
    check_layout(layout, frames, frames_per_chunk, sp_size)
    f0, f1 = layout_frame_span(layout, frames, sp_rank, sp_size)
    halo = vae.temporal_receptive_field() if halo is None else halo
    return vae.encode_range(video_BCTHW, f0, f1, halo), f0
