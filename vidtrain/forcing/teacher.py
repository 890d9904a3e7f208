"""Teacher-forcing sequences: every chunk twice, clean (t=0) and noisy (its chunk's t).

Both copies of a frame share RoPE positions; the mask follows from metadata (vidtrain/tokens.py), so a
sequence-parallel layout only has to choose which tokens each rank holds.

Legend: B batch, C channels, F latent frames, H/W latent size, L tokens, P patch vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vidtrain.forcing.flow import NUM_TRAIN_TIMESTEPS, noise_latents, velocity_target
from vidtrain.tokens import TokenMeta, grid_meta, unpatchify
from vidtrain.tokens import patchify as _patchify


@dataclass
class TFSequence:
    """A teacher-forcing token sequence (or one rank's part of it)."""

    x_BLP: torch.Tensor  # input patch vectors: clean latents, then noisy latents
    t_BL: torch.Tensor  # per-token timestep (0 for clean tokens)
    target_BLP: torch.Tensor  # velocity target in the head's patch order (zeros on clean tokens)
    meta: TokenMeta

    @property
    def loss_mask(self) -> torch.Tensor:
        return self.meta.noisy

    def index(self, idx: torch.Tensor) -> TFSequence:
        return TFSequence(
            self.x_BLP[:, idx], self.t_BL[:, idx], self.target_BLP[:, idx], self.meta.index(idx)
        )

    @staticmethod
    def cat(parts: list[TFSequence]) -> TFSequence:
        return TFSequence(
            torch.cat([p.x_BLP for p in parts], 1),
            torch.cat([p.t_BL for p in parts], 1),
            torch.cat([p.target_BLP for p in parts], 1),
            TokenMeta.cat([p.meta for p in parts]),
        )


def build_tf_sequence(
    x0_BCFHW: torch.Tensor,
    noise_BCFHW: torch.Tensor,
    sigma_BF: torch.Tensor,
    frames_per_chunk: int,
    *,
    frame_offset: int = 0,
    shot_F: torch.Tensor | None = None,
    history_BCFHW: torch.Tensor | None = None,
    noisy_delta_BCFHW: torch.Tensor | None = None,
) -> TFSequence:
    """[clean tokens | noisy tokens] of the given frames (frame indices start at `frame_offset`).

    The whole video gives the single-process sequence; a rank's frame range gives that rank's
    part of the balanced layout (its clean history and its own noisy targets, side by side).

    Error recycling (vidtrain/forcing/error_bank.py): `history_BCFHW` replaces x0 in the clean
    tokens only (None: x0), `noisy_delta_BCFHW` is added to the noised input x_t; the velocity
    targets are always those of x0 and the noise.
    """
    b, _, f, h, w = x0_BCFHW.shape
    if sigma_BF.shape != (b, f):
        raise ValueError(f"sigma must be per frame [{b}, {f}], got {list(sigma_BF.shape)}")
    hp, wp = h // 2, w // 2
    kw = dict(frame_offset=frame_offset, device=x0_BCFHW.device)
    if shot_F is not None:
        kw["shot"] = shot_F
    clean = grid_meta(f, hp, wp, frames_per_chunk, noisy=False, **kw)
    noisy = grid_meta(f, hp, wp, frames_per_chunk, noisy=True, **kw)
    x_t = noise_latents(x0_BCFHW, noise_BCFHW, sigma_BF)
    if noisy_delta_BCFHW is not None:
        x_t = x_t + noisy_delta_BCFHW.to(x_t.device, x_t.dtype)
    hist = x0_BCFHW if history_BCFHW is None else history_BCFHW.to(x0_BCFHW.device, x0_BCFHW.dtype)
    if hist.shape != x0_BCFHW.shape:
        raise ValueError(f"history {list(hist.shape)} must have the shape of x0 {list(x0_BCFHW.shape)}")
    t_noisy_BL = (sigma_BF * NUM_TRAIN_TIMESTEPS).repeat_interleave(hp * wp, dim=1)
    target = _patchify(velocity_target(x0_BCFHW, noise_BCFHW), channels_last=True)
    return TFSequence(
        x_BLP=torch.cat([_patchify(hist), _patchify(x_t)], dim=1),
        t_BL=torch.cat([torch.zeros_like(t_noisy_BL), t_noisy_BL], dim=1),
        target_BLP=torch.cat([torch.zeros_like(target), target], dim=1),
        meta=TokenMeta.cat([clean, noisy]),
    )


def tf_loss_terms(pred_BLP: torch.Tensor, seq: TFSequence) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of squared errors over noisy tokens, number of those elements) — the caller divides,
    after all-reducing the count over a sequence-parallel group. Noisy tokens at timestep 0 are
    image-to-video conditioning (`flow.condition_first_frame`) and carry no loss."""
    m = seq.loss_mask.to(pred_BLP.device)
    err = (pred_BLP.float() - seq.target_BLP.float())[:, m]
    target = seq.t_BL.to(pred_BLP.device)[:, m] > 0  # False: an I2V conditioning frame's tokens
    if not bool(target.all()):
        err = err[target]
    return err.pow(2).sum(), torch.tensor(float(err.numel()), device=pred_BLP.device)


def noisy_prediction_frames(pred_BLP: torch.Tensor, seq: TFSequence, f: int, h: int, w: int) -> torch.Tensor:
    """Predictions of the noisy tokens of a whole (single-process) sequence as [B, C, F, H, W]."""
    idx = torch.nonzero(seq.meta.noisy.to(pred_BLP.device)).squeeze(1)
    order = torch.argsort(seq.meta.frame[seq.meta.noisy].to(pred_BLP.device), stable=True)
    return unpatchify(pred_BLP[:, idx[order]], f, h, w)
