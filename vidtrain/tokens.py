"""Tokens: patchify, per-token metadata and the attention masks built from it.

A leaf module that models, forcing, parallel layouts and the sampler all import (it imports
nothing of vidtrain).

Masks are computed from per-token metadata (chunk index, clean/noisy, shot, frame), never from
positions in the tensor: a parallel layout is then just a permutation of tokens, and the same
rule serves every layout (DESIGN section 4).

Legend: L tokens, Lq query tokens, Lk key tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenMeta:
    """Per-token integer metadata, each a 1-D tensor of length L (shared across the batch)."""

    frame: torch.Tensor  # latent frame index; the temporal RoPE position is `frame + rope_offset`
    h: torch.Tensor  # patch row (spatial RoPE)
    w: torch.Tensor  # patch column (spatial RoPE)
    chunk: torch.Tensor  # chunk index (frame // frames_per_chunk)
    noisy: torch.Tensor  # bool: noisy copy (teacher forcing) vs clean
    shot: torch.Tensor  # shot index (multi-shot video)
    rope_offset: torch.Tensor  # extra temporal RoPE offset (per-shot offsets), usually 0

    def __len__(self) -> int:
        return int(self.frame.numel())

    def fields(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def index(self, idx: torch.Tensor | slice) -> TokenMeta:
        return TokenMeta(**{k: v[idx] for k, v in self.fields().items()})

    def to(self, device: torch.device | str) -> TokenMeta:
        return TokenMeta(**{k: v.to(device) for k, v in self.fields().items()})

    @staticmethod
    def cat(metas: list[TokenMeta]) -> TokenMeta:
        keys = metas[0].fields().keys()
        return TokenMeta(**{k: torch.cat([getattr(m, k) for m in metas]) for k in keys})

    @property
    def rope_frame(self) -> torch.Tensor:
        return self.frame + self.rope_offset


def grid_meta(
    frames: int,
    hp: int,
    wp: int,
    frames_per_chunk: int,
    *,
    frame_offset: int = 0,
    noisy: bool = False,
    shot: int | torch.Tensor = 0,
    rope_offset: int | torch.Tensor = 0,
    device: torch.device | str = "cpu",
) -> TokenMeta:
    """Metadata of `frames` latent frames of hp x wp patches, tokens in (frame, row, column) order.

    `shot` and `rope_offset` are scalars or per-frame tensors of length `frames`.
    """
    f = torch.arange(frames, device=device) + frame_offset
    per_frame = hp * wp
    frame = f.repeat_interleave(per_frame)
    hh = torch.arange(hp, device=device).repeat_interleave(wp).repeat(frames)
    ww = torch.arange(wp, device=device).repeat(hp * frames)

    def per_token(v: int | torch.Tensor) -> torch.Tensor:
        if isinstance(v, torch.Tensor):
            return v.to(device=device, dtype=torch.long).repeat_interleave(per_frame)
        return torch.full_like(frame, int(v))

    return TokenMeta(
        frame=frame,
        h=hh,
        w=ww,
        chunk=torch.div(frame, frames_per_chunk, rounding_mode="floor"),
        noisy=torch.full(frame.shape, noisy, dtype=torch.bool, device=device),
        shot=per_token(shot),
        rope_offset=per_token(rope_offset),
    )


@dataclass(frozen=True)
class MaskRule:
    """Which key each query may attend to.

    kind:
      - "full": every token sees every token (Wan2.1, bidirectional).
      - "causal": chunk-causal over one copy of the video: chunk(k) <= chunk(q).
      - "teacher_forcing": clean q sees clean k with chunk(k) <= chunk(q); noisy q sees clean k
        with chunk(k) < chunk(q) and noisy k of its own chunk.
    Restrictions on *history* keys (keys of earlier chunks), mirroring the sampler's KV cache:
      - window_frames: only the last W latent frames before the query's chunk stay visible;
      - sink_frames: the first G latent frames of the video stay visible (global sink);
      - shot_sink: the first chunk of the query's shot stays visible (shot sink).
    Keys of the query's own chunk are always visible (within the rule of `kind`).
    """

    kind: str = "full"
    # latent frames per chunk: required by causal and teacher_forcing (the recipe's
    # model.frames_per_chunk, through `MaskRule.of`); full attention has no chunks
    frames_per_chunk: int | None = None
    window_frames: int | None = None
    sink_frames: int = 0
    shot_sink: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("full", "causal", "teacher_forcing"):
            raise ValueError(f"unknown mask kind {self.kind!r}; known: causal, full, teacher_forcing")
        if self.kind != "full" and (self.frames_per_chunk is None or self.frames_per_chunk < 1):
            raise ValueError(
                f"a {self.kind} mask needs frames_per_chunk >= 1 (latent frames per chunk), "
                f"got {self.frames_per_chunk}"
            )
        if self.window_frames is not None and self.window_frames < 0:
            raise ValueError(f"window_frames must be >= 0, got {self.window_frames}")

    @property
    def restricted(self) -> bool:
        return self.window_frames is not None

    @classmethod
    def of(cls, kind: str, cfg) -> MaskRule:
        """The rule of `kind` with the history restrictions of a config that carries
        `frames_per_chunk`, `window_frames`, `sink_frames`, `shot_sink` (the recipe's model
        section, the sampler's config): training, its balance report and sampling agree."""
        return cls(kind, cfg.frames_per_chunk, cfg.window_frames, cfg.sink_frames, cfg.shot_sink)


def _shot_start_chunk(meta_k: TokenMeta, shots_q: torch.Tensor) -> torch.Tensor:
    """First chunk of each query's shot, as seen among the keys (clean keys define shots)."""
    n = int(torch.maximum(meta_k.shot.max(), shots_q.max()).item()) + 1
    big = torch.iinfo(torch.long).max
    start = torch.full((n,), big, dtype=torch.long, device=meta_k.chunk.device)
    start = start.scatter_reduce(0, meta_k.shot, meta_k.chunk, reduce="amin")
    return start[shots_q]


def build_mask(rule: MaskRule, meta_q: TokenMeta, meta_k: TokenMeta) -> torch.Tensor | None:
    """Dense boolean mask [Lq, Lk] (True = may attend), or None for full attention."""
    if rule.kind == "full":
        return None
    cq, ck = meta_q.chunk[:, None], meta_k.chunk[None, :]
    if rule.kind == "causal":
        allowed = ck <= cq
        history = ck < cq
    else:
        nq, nk = meta_q.noisy[:, None], meta_k.noisy[None, :]
        clean_hist = ~nk & (ck < cq)
        own_clean = ~nq & ~nk & (ck == cq)
        own_noisy = nq & nk & (ck == cq)
        allowed = clean_hist | own_clean | own_noisy
        history = clean_hist
    if rule.restricted:
        chunk_start = cq * rule.frames_per_chunk
        fk = meta_k.frame[None, :]
        keep = fk >= chunk_start - rule.window_frames
        keep |= fk < rule.sink_frames
        if rule.shot_sink:
            keep |= ck == _shot_start_chunk(meta_k, meta_q.shot)[:, None]
        allowed = allowed & (~history | keep)
    return allowed


def flex_mask_mod(rule: MaskRule, meta_q: TokenMeta, meta_k: TokenMeta):
    """The rule as a FlexAttention `mask_mod(b, h, q_idx, kv_idx)` reading metadata by index.

    Equals `build_mask` element by element without materialising an [Lq, Lk] tensor, so block
    masks at production lengths (tens of thousands of tokens) stay small.
    """
    cq_all, ck_all = meta_q.chunk, meta_k.chunk
    nq_all, nk_all = meta_q.noisy, meta_k.noisy
    fk_all = meta_k.frame
    shot_start = _shot_start_chunk(meta_k, meta_q.shot) if rule.shot_sink else None

    def mask_mod(b, h, q_idx, kv_idx):
        cq, ck = cq_all[q_idx], ck_all[kv_idx]
        if rule.kind == "causal":
            allowed, history = ck <= cq, ck < cq
        else:
            nq, nk = nq_all[q_idx], nk_all[kv_idx]
            history = ~nk & (ck < cq)
            allowed = history | (~nq & ~nk & (ck == cq)) | (nq & nk & (ck == cq))
        if rule.restricted:
            fk = fk_all[kv_idx]
            keep = (fk >= cq * rule.frames_per_chunk - rule.window_frames) | (fk < rule.sink_frames)
            if shot_start is not None:
                keep = keep | (ck == shot_start[q_idx])
            allowed = allowed & (~history | keep)
        return allowed

    return mask_mod


# ---- patches <-> latents ------------------------------------------------------------------------


def patchify(x_BCFHW: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """[B, C, F, H, W] -> [B, F*H/2*W/2, 4C], tokens in (frame, row, column) order.

    Inputs use the patch embedding's (C, 2, 2) order; outputs (`channels_last`) the head's
    (2, 2, C) order, so targets for a loss in token space use `channels_last=True`.
    """
    b, c, f, h, w = x_BCFHW.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even (patch 1x2x2), got {h}x{w}")
    x = x_BCFHW.reshape(b, c, f, h // 2, 2, w // 2, 2)
    order = (0, 2, 3, 5, 4, 6, 1) if channels_last else (0, 2, 3, 5, 1, 4, 6)
    return x.permute(*order).reshape(b, f * (h // 2) * (w // 2), c * 4)


def unpatchify(x_BLP: torch.Tensor, f: int, h: int, w: int) -> torch.Tensor:
    """Head output [B, L, (2, 2, C)] -> [B, C, F, H, W]."""
    b, c = x_BLP.shape[0], x_BLP.shape[-1] // 4
    x = x_BLP.reshape(b, f, h // 2, w // 2, 2, 2, c)
    return x.permute(0, 6, 1, 2, 4, 3, 5).reshape(b, c, f, h, w)
