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

Long self-rollout tuning (`long_self_rollout`, LongLive 1 / Self-Forcing++): the sampler's
chunk loop (`StreamingSampler.stream`, the rolling KV cache of the run's window and sinks, NVFP4
K/V on a quantized base) stopped after the last supervised window: chunks before a window run
under no_grad and only fill the cache, chunks inside one keep the graph of their exit step,
nothing after the last window is generated. So the graph, and with a window the cache, does not
grow with the rollout. Backward noise initialisation (Self-Forcing++): a window's first chunk is
first generated as the rollout would (the full few-step schedule, no_grad), giving x_roll; it is
then re-noised, x = (1 − σ_k)·x_roll + σ_k·ε (ε: the sample's next sampler draw, σ_k the sigma
of the chunk's exit step k, the last step when no exit is drawn), and one pass at σ_k (with the
graph when supervised) gives the chunk's x0. σ_k rather than the first step's sigma: on a
schedule that starts at timestep 1000 the first sigma is 1, pure noise, which would discard the
rollout.
Image-to-video (`conds[0].image_latent`): chunk 0's frame 0 is pinned to the image at timestep 0
in every pass (the sampler's I2V path), with `stop_after` as without it. Chunk 0 has no rolled-out
history to recover from, and the sampler's re-noising would overwrite the pinned frame: with an
image, backward noise initialisation skips chunk 0 (generated as any pinned chunk 0 is, stopping
at its exit step), the other windows' first chunks are re-noised as usual.

Legend: B batch, C channels, F latent frames, K chunks, H/W latent size, L tokens, P patch vector.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch

from vidtrain.forcing.flow import NUM_TRAIN_TIMESTEPS
from vidtrain.forcing.teacher import build_tf_sequence, noisy_prediction_frames
from vidtrain.models.wan.attention import AttentionContext
from vidtrain.sample.sampler import Conditioning, StreamingSampler
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
    frame_offset: int = 0,
) -> torch.Tensor:
    """Velocity predicted for every frame noised at its own sigma, given the clean video as history.
    `frame_offset`: the clip's first latent frame (a window of a long rollout keeps the RoPE
    positions, and the mask's frame indices, of where it sits)."""
    _, _, f, h, w = x0_BCFHW.shape
    seq = build_tf_sequence(
        x0_BCFHW, noise_BCFHW, sigma_BF.to(x0_BCFHW.device), rule.frames_per_chunk, frame_offset=frame_offset
    )
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


def window_starts(
    num_chunks: int, window_chunks: int, count: int, chunks_per_shot: int, generator: torch.Generator
) -> list[int]:
    """First chunks of `count` non-overlapping windows of `window_chunks` chunks, each inside one
    shot of `chunks_per_shot` chunks, drawn with `generator` (keyed by (seed, step): equal on every
    rank, resume-exact). A draw: a shot per window and an offset inside it (uniform), redrawn when
    windows overlap; after 64 overlapping draws the leftmost feasible placement (deterministic)."""
    shots = num_chunks // chunks_per_shot
    slots = chunks_per_shot - window_chunks + 1
    for _ in range(64):
        picks = torch.randint(shots * slots, (count,), generator=generator).tolist()
        starts = sorted((p // slots) * chunks_per_shot + p % slots for p in picks)
        if all(b - a >= window_chunks for a, b in itertools.pairwise(starts)):
            return starts
    per_shot = chunks_per_shot // window_chunks
    return [(i // per_shot) * chunks_per_shot + (i % per_shot) * window_chunks for i in range(count)]


def long_self_rollout(
    sampler: StreamingSampler,
    conds: list[Conditioning],
    chunks_per_shot: list[int],
    latent_hw: tuple[int, int],
    seeds: list[int],
    starts: list[int],
    window_chunks: int,
    *,
    exits: list[int] | None,
    grad: bool,
    backward_noise_init: bool = False,
    stats: dict | None = None,
) -> list[torch.Tensor]:
    """Each window's latents [B, C, window_chunks*fpc, H, W] of a self-forcing rollout over
    `sum(chunks_per_shot)` chunks (the module docstring): `StreamingSampler.stream` stopped after
    the last window, the windows' first chunks re-noised when `backward_noise_init`. `exits`: one
    exit step per chunk (None: every chunk runs the whole schedule); `grad`: keep the exit step's
    graph in the windows' chunks. `stats` (optional) gets the largest KV cache bytes a chunk
    attended to and the chunks generated. With `conds[0].image_latent` (I2V) chunk 0 is never
    re-noised (module docstring)."""
    inside = {j for s in starts for j in range(s, s + window_chunks)}
    renoise = set(starts) if backward_noise_init else set()
    if conds and conds[0].image_latent is not None:
        renoise.discard(0)
    stop = max(starts) + window_chunks
    total = sum(chunks_per_shot)
    if stop > total:
        raise ValueError(f"windows {starts} of {window_chunks} chunk(s) past the rollout's {total} chunks")
    out: dict[int, torch.Tensor] = {}
    kv_peak = 0
    chunks = sampler.stream(
        conds, chunks_per_shot, latent_hw, seeds, grad_exit=exits, grad_chunks=sorted(inside) if grad else [],
        stop_after=stop, renoise_chunks=renoise,
    )  # fmt: skip
    for ch in chunks:
        kv_peak = max(kv_peak, ch.kv_bytes)
        if ch.index in inside:
            out[ch.index] = ch.x0_BCFHW
    if stats is not None:
        stats.update(kv_bytes_peak=kv_peak, chunks_generated=stop)
    return [torch.cat([out[j] for j in range(s, s + window_chunks)], dim=2) for s in starts]
