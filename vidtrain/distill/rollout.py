"""Rollouts and score evaluations for DMD, on latents [B, C, F, H, W].

Self forcing: chunk by chunk, each chunk denoised by the few-step generator from pure noise,
conditioned on the clean chunks it generated before. Between steps the x0 prediction is
re-noised to the next sigma (DMD few-step sampling). Only the step at the chunk's exit index
keeps a graph; history enters detached. Attention is chunk-causal over
[clean history | current noisy chunk], i.e. what the streaming sampler's KV cache holds
(sampler section 8 with no window: "streaming equals the teacher-forced forward").

Training's self-forcing rollouts run through the streaming sampler's chunk loop and KV cache
(`DMD.self_forcing_rollout`, `grad_exit` = one exit step per chunk from `DMD.exit_steps`);
`sample_chunks` recomputes the history each step: the reference, and the teacher's many-step
sampler of bench/dmd_evidence.py.

Teacher forcing (`tf_velocity`): clean copy + noisy copy of every chunk in one token sequence,
exactly the teacher's training input; used for the real/fake scores, the critic loss and the
cheap teacher-forcing rollout.

Legend: B batch, C channels, F latent frames, K chunks, H/W latent size, L tokens, P patch vector.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from vidtrain.forcing.flow import NUM_TRAIN_TIMESTEPS
from vidtrain.forcing.teacher import build_tf_sequence, noisy_prediction_frames
from vidtrain.models.wan.attention import AttentionContext
from vidtrain.tokens import MaskRule

# (clean history [B,C,Fh,H,W], noisy chunk [B,C,fpc,H,W], sigma) -> velocity of the chunk
ChunkVelocity = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def tf_velocity(
    model: torch.nn.Module,
    x0_BCFHW: torch.Tensor,
    noise_BCFHW: torch.Tensor,
    sigma_BF: torch.Tensor,
    text_BST: torch.Tensor,
    rule: MaskRule,
    text_mask_BS: torch.Tensor | None = None,
) -> torch.Tensor:
    """Velocity predicted for every frame noised at its own sigma, given the clean video as history."""
    _, _, f, h, w = x0_BCFHW.shape
    seq = build_tf_sequence(x0_BCFHW, noise_BCFHW, sigma_BF.to(x0_BCFHW.device), rule.frames_per_chunk)
    attn = AttentionContext(rule=rule, meta=seq.meta)
    pred_BLP = model(seq.x_BLP, seq.t_BL, text_BST, meta=seq.meta, attn=attn, context_mask_BS=text_mask_BS)
    return noisy_prediction_frames(pred_BLP, seq, f, h, w)  # [B, C, F, H, W]


def chunk_velocity_fn(
    model: torch.nn.Module, text_BST: torch.Tensor, rule: MaskRule, text_mask_BS: torch.Tensor | None = None
) -> ChunkVelocity:
    """Latent-mode forward of [clean history at t=0 | noisy chunk at sigma], chunk-causal."""

    def velocity(hist: torch.Tensor, x_chunk: torch.Tensor, sigma: float) -> torch.Tensor:
        b, fh, fc = x_chunk.shape[0], hist.shape[2], x_chunk.shape[2]
        x = torch.cat([hist.to(x_chunk.dtype), x_chunk], dim=2)  # [B, C, Fh + fpc, H, W]
        t_BF = torch.cat([torch.zeros(b, fh), torch.full((b, fc), sigma * NUM_TRAIN_TIMESTEPS)], dim=1).to(
            x.device
        )
        v = model(
            x, t_BF, text_BST, rule=rule, frames_per_chunk=rule.frames_per_chunk, context_mask_BS=text_mask_BS
        )
        return v[:, :, fh:]

    return velocity


def cfg_velocity(cond: ChunkVelocity, uncond: ChunkVelocity, scale: float) -> ChunkVelocity:
    def velocity(hist, x_chunk, sigma):
        v_c, v_u = cond(hist, x_chunk, sigma), uncond(hist, x_chunk, sigma)
        return v_u + scale * (v_c - v_u)

    return velocity


def sample_chunks(
    velocity: ChunkVelocity,
    noise_BCFHW: torch.Tensor,
    sigmas: Sequence[float],
    frames_per_chunk: int,
    *,
    mode: str = "x0",
    exit_K: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    grad: bool = False,
) -> torch.Tensor:
    """Chunk-by-chunk generation from noise; returns the clean video [B, C, F, H, W].

    mode "x0": few-step DMD sampling (predict x0, re-noise to the next sigma with fresh noise);
    the chunk stops at `exit_K[k]` (default: the last step), whose x0 is the chunk's output.
    mode "euler": the flow ODE over `sigmas` then down to 0 (the teacher's many-step sampler).
    With `grad`, only the exit step of each chunk builds a graph.
    """
    if mode not in ("x0", "euler"):
        raise ValueError(f"unknown sampling mode {mode!r}; known: euler, x0")
    f = noise_BCFHW.shape[2]
    num_chunks, n = f // frames_per_chunk, len(sigmas)
    out: list[torch.Tensor] = []
    for k in range(num_chunks):
        hist = torch.cat(out, dim=2).detach() if out else noise_BCFHW[:, :, :0]
        x = noise_BCFHW[:, :, k * frames_per_chunk : (k + 1) * frames_per_chunk]
        stop = n - 1 if exit_K is None else int(exit_K[k])
        if mode == "euler":
            with torch.set_grad_enabled(grad):
                for i, s in enumerate(sigmas):
                    nxt = sigmas[i + 1] if i + 1 < n else 0.0
                    x = x + (nxt - s) * velocity(hist, x, s)
            out.append(x)
            continue
        for i in range(stop + 1):
            s = sigmas[i]
            with torch.set_grad_enabled(grad and i == stop):
                x0 = x - s * velocity(hist, x, s)  # x0 = x_t − σ·v
            if i < stop:
                eps = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
                x = (1 - sigmas[i + 1]) * x0.detach() + sigmas[i + 1] * eps
        out.append(x0)
    return torch.cat(out, dim=2)
