"""Flow matching as Wan trains it: x_t = (1-t)·x0 + t·ε, velocity target ε − x0, shifted timesteps.

The one schedule module: the shift, training's per-chunk sigma draws and the few-step schedule
of the sampler and DMD (`step_sigmas`). Timesteps live on the 0..1000 scale the model embeds;
sigma = t / 1000. The defaults (shift, range) are the recipe's (vidtrain/config.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vidtrain.config import NUM_TRAIN_TIMESTEPS, TIMESTEP_SHIFT


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan/SD3 timestep shift: σ' = s·σ / (1 + (s − 1)·σ); s > 1 spends more steps at high noise."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def step_sigmas(timesteps: Sequence[float], shift: float) -> list[float]:
    """Few-step schedule: timesteps on the 0..1000 scale, warped by the shift (the model sees
    t = 1000 * sigma); the sampler's and DMD's steps."""
    t = torch.tensor([float(s) for s in timesteps], dtype=torch.float64) / NUM_TRAIN_TIMESTEPS
    return [float(s) for s in shift_sigma(t, shift)]


def sample_chunk_sigmas(
    batch: int,
    num_chunks: int,
    *,
    shift: float = TIMESTEP_SHIFT,
    min_t: float = 0.0,
    max_t: float = float(NUM_TRAIN_TIMESTEPS),
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Independent shifted sigma per chunk, [B, num_chunks], within [min_t, max_t] / 1000."""
    u = torch.rand(batch, num_chunks, generator=generator, device="cpu").to(device)
    sigma = shift_sigma(u, shift)
    return sigma.clamp(min_t / NUM_TRAIN_TIMESTEPS, max_t / NUM_TRAIN_TIMESTEPS)


def condition_first_frame(sigma_BF: torch.Tensor, conditioned_B: torch.Tensor) -> torch.Tensor:
    """Image-to-video, the Wan2.2 way: the first latent frame of a conditioned sample is the
    encoded image, held clean (sigma 0, so its noisy copy equals its clean one and its tokens
    see timestep 0) and, as a noisy token at t = 0, left out of the loss (`tf_loss_terms`).
    Training draws sigmas > 0 (config.validate: method.forcing.min_timestep > 0 for I2V), so a
    noisy token at t = 0 is a conditioning token."""
    if not bool(conditioned_B.any()):
        return sigma_BF
    out = sigma_BF.clone()
    out[conditioned_B.to(out.device), 0] = 0.0
    return out


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def frames_sigma(chunk_sigma_BK: torch.Tensor, frames_per_chunk: int) -> torch.Tensor:
    """Per-chunk sigmas [B, K] -> per-frame [B, K*frames_per_chunk]."""
    return chunk_sigma_BK.repeat_interleave(frames_per_chunk, dim=1)


def noise_latents(x0_BCFHW: torch.Tensor, noise_BCFHW: torch.Tensor, sigma_BF: torch.Tensor) -> torch.Tensor:
    """Noise each latent frame at its own sigma."""
    s = sigma_BF[:, None, :, None, None].to(x0_BCFHW.dtype)
    return (1 - s) * x0_BCFHW + s * noise_BCFHW


def euler_step(x_t: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One flow-matching Euler step from sigma to sigma_next along the predicted velocity."""
    return x_t + (sigma_next - sigma) * v


def predict_x0(x_t: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """x0 = x_t − σ·v (exact for the linear path)."""
    return x_t - sigma * v
