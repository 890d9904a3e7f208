"""Drift figures of a long generation, per chunk and per time window (pure torch, latents only).

What `vidtrain eval --drift` measures past the training length:

- latent statistics against the training data: per-channel mean and std of the generated
  latents next to those of reference latent shards (`mean_error`: mean over channels of
  |mu_gen - mu_ref| / std_ref; `std_ratio`: mean over channels of std_gen / std_ref), and the
  Frechet distance between Gaussian fits of *per-token latent vectors* (every latent position
  of every frame is one C-dim sample, C = latent channels) of a time window and of the
  reference: |mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrt(S1 S2));
- frame-to-frame change: mean |z[f+1] - z[f]| over channels and positions, and the
  chunk-boundary ratio: the change across chunk boundaries over the change inside chunks
  (1 = seamless; well above 1 = flicker at every chunk);
- identity retention: cosine similarity of each frame (flattened C x H x W) to the mean of the
  first shot's sink frames (the first `sink_frames` latent frames generated), averaged per chunk
  (1 = frozen video).

Every figure pools the batch (all prompts). Legend: B batch, C channels, F latent frames, H, W
latent height and width, N samples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# -- Gaussian fits and the Frechet distance


class GaussianStats:
    """Running sums of C-dim vectors (float64) -> mean and covariance, bounded memory."""

    def __init__(self, channels: int) -> None:
        self.n = 0
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.outer = torch.zeros(channels, channels, dtype=torch.float64)

    def add(self, x_NC: torch.Tensor) -> None:
        x = x_NC.detach().to("cpu", torch.float64)
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.outer += x.T @ x

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)

    @property
    def cov(self) -> torch.Tensor:
        """The unbiased covariance (zero with fewer than two vectors)."""
        if self.n < 2:
            return torch.zeros_like(self.outer)
        mu = self.mean
        return (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)

    @property
    def std(self) -> torch.Tensor:
        return self.cov.diagonal().clamp_min(0).sqrt()


def gaussian_fit(x_NC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [C], unbiased covariance [C, C]) of N vectors, in float64."""
    s = GaussianStats(x_NC.shape[-1])
    s.add(x_NC)
    return s.mean, s.cov


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    """The square root of a symmetric positive semi-definite matrix (eigh; negative round-off
    eigenvalues clamped to zero)."""
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """Frechet distance of two Gaussians: |mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)).

    Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2), whose argument is symmetric PSD, so both roots
    are eigendecompositions (no scipy)."""
    mu1, mu2, cov1, cov2 = (t.detach().to("cpu", torch.float64) for t in (mu1, mu2, cov1, cov2))
    r1 = _sqrt_psd(cov1)
    m = r1 @ cov2 @ r1
    inner = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()  # Tr sqrt(S1 S2)
    d = (mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * inner
    return max(float(d), 0.0)


def token_vectors(z_BCFHW: torch.Tensor) -> torch.Tensor:
    """Every latent position of every frame as one C-dim vector: [B*F*H*W, C]."""
    return z_BCFHW.movedim(1, -1).reshape(-1, z_BCFHW.shape[1])


# -- frame-to-frame change and seams


def frame_change(z_BCFHW: torch.Tensor) -> torch.Tensor:
    """[F-1]: mean |z[f+1] - z[f]| over batch, channels and positions."""
    z = z_BCFHW.float()
    return (z[:, :, 1:] - z[:, :, :-1]).abs().mean(dim=(0, 1, 3, 4))


def is_boundary(n_changes: int, frames_per_chunk: int) -> torch.Tensor:
    """[F-1] bool: change i (frame i -> i+1) crosses a chunk boundary."""
    return (torch.arange(n_changes) + 1) % frames_per_chunk == 0


def boundary_ratio(change_F: torch.Tensor, frames_per_chunk: int) -> float:
    """Mean change across chunk boundaries / mean change inside chunks (nan without either kind:
    one chunk, or one frame per chunk)."""
    b = is_boundary(change_F.numel(), frames_per_chunk)
    if not b.any() or b.all():
        return math.nan
    within = change_F[~b].mean()
    return float(change_F[b].mean() / within) if float(within) > 0 else math.nan


# -- identity retention


def identity_similarity(z_BCFHW: torch.Tensor, reference_frames: int) -> torch.Tensor:
    """[F]: cosine similarity of each frame (flattened C x H x W, per sample) to the mean of the
    first `reference_frames` frames of its sample, averaged over the batch."""
    if not 1 <= reference_frames <= z_BCFHW.shape[2]:
        raise ValueError(
            f"identity reference of {reference_frames} frame(s) in a {z_BCFHW.shape[2]}-frame video"
        )
    z = z_BCFHW.float().transpose(1, 2).flatten(2)  # [B, F, CHW]
    ref = z[:, :reference_frames].mean(1, keepdim=True)
    return F.cosine_similarity(z, ref.expand_as(z), dim=-1).mean(0)


# -- a whole generation


def _nan_mean(x: torch.Tensor) -> float:
    x = x[torch.isfinite(x)]
    return float(x.mean()) if x.numel() else math.nan


def drift_figures(
    z_BCFHW: torch.Tensor,
    frames_per_chunk: int,
    window_chunks: int,
    reference: GaussianStats,
    identity_frames: int,
) -> dict:
    """Per-chunk and per-window drift figures of a generation against the reference statistics.

    Windows are the consecutive non-overlapping runs of `window_chunks` chunks; a tail shorter
    than a window is left out of the window figures (not of the chunk figures). The change
    figures of chunk k count the changes into each of its frames (so the boundary from chunk
    k-1); chunk k's boundary ratio is that boundary's change over the mean change inside chunks
    k-1 and k (nan for chunk 0)."""
    fpc = frames_per_chunk
    frames = z_BCFHW.shape[2]
    chunks = frames // fpc
    if chunks * fpc != frames:
        raise ValueError(f"{frames} latent frames are not whole chunks of {fpc}")
    windows = chunks // window_chunks
    if windows < 2:
        raise ValueError(
            f"drift needs at least two windows of {window_chunks} chunk(s), got {chunks} chunk(s)"
        )
    z = z_BCFHW.detach().float().cpu()
    ref_mu, ref_cov, ref_std = reference.mean, reference.cov, reference.std
    safe_std = ref_std.clamp_min(1e-12)
    change = frame_change(z)  # [F-1]
    change_in = torch.cat([torch.tensor([math.nan]), change])  # change into frame f
    bound = is_boundary(change.numel(), fpc)
    inner = torch.cat([torch.tensor([False]), ~bound])  # frame f's incoming change is within a chunk
    ident = identity_similarity(z, identity_frames)

    def stats(lo: int, hi: int) -> dict:
        part = z[:, :, lo * fpc : hi * fpc]
        s = GaussianStats(z.shape[1])
        s.add(token_vectors(part))
        mu, std = s.mean, s.std
        return {
            "channel_mean": mu,
            "channel_std": std,
            "mean_error": float(((mu - ref_mu).abs() / safe_std).mean()),
            "std_ratio": float((std / safe_std).mean()),
            "frechet": frechet_distance(mu, s.cov, ref_mu, ref_cov),
            "frame_change": _nan_mean(change_in[lo * fpc : hi * fpc]),
            "identity": float(ident[lo * fpc : hi * fpc].mean()),
        }

    def ratio(lo: int, hi: int) -> float:
        """Boundaries into chunks lo+1..hi-1 over the within-chunk changes of chunks lo..hi-1."""
        sel = slice(lo * fpc, hi * fpc)
        c, inside = change_in[sel], inner[sel]
        at = torch.zeros_like(inside)
        at[fpc::fpc] = True  # first frame of each chunk after the first: a boundary change
        if not at.any() or not inside.any():
            return math.nan
        within = c[inside].mean()
        return float(c[at].mean() / within) if float(within) > 0 else math.nan

    per_chunk = [stats(k, k + 1) for k in range(chunks)]
    per_window = [stats(w * window_chunks, (w + 1) * window_chunks) for w in range(windows)]
    keys = ("mean_error", "std_ratio", "frechet", "frame_change", "identity")
    out = {
        "per_chunk": {k: [c[k] for c in per_chunk] for k in keys},
        "per_window": {k: [w[k] for w in per_window] for k in keys},
    }
    out["per_chunk"]["boundary_ratio"] = [math.nan] + [ratio(k - 1, k + 1) for k in range(1, chunks)]
    out["per_window"]["boundary_ratio"] = [
        ratio(w * window_chunks, (w + 1) * window_chunks) for w in range(windows)
    ]
    for part, rows in (("per_chunk", per_chunk), ("per_window", per_window)):
        out[part]["channel_mean"] = [r["channel_mean"].tolist() for r in rows]
        out[part]["channel_std"] = [r["channel_std"].tolist() for r in rows]
    out["overall_boundary_ratio"] = boundary_ratio(change, fpc)
    return out
