"""kv2: a 2-bit KV cache format (semantic smoothing + progressive residual quantization).

After Quant VideoGen's observation that the K/V of video tokens cluster (neighbouring patches
and frames look alike), a chunk block's K (or V) is stored as a per-group centroid plus a
2-bit residual; only the formulas are taken from the literature, the layout is ours.

For one block x [..., L, D] (the leading dims, batch and head, are independent: every head is
quantized alone, so a head-sharded sequence-parallel cache stores the same bytes):

1. Grouping. G = min(groups, max(1, L // MIN_GROUP_TOKENS)) centroids start at the tokens
   round(linspace(0, L - 1, G)) (evenly spread over the chunk's frames and positions) and
   `iters` Lloyd iterations follow in fp32: each token to its nearest centroid (squared L2; ties
   to the lower index, torch.argmin), each centroid to the mean of its tokens (an empty group
   keeps its centroid). Deterministic: no random draw.
2. Centroids stored in bf16, c_hat; the token's group index in one byte; r = x - c_hat[idx].
3. Residual stage (`stages` of them, each on what the previous left): per token and block of
   S = min(SCALE_BLOCK, D) channels, sigma = RMS of the residual there; a 2-bit code per element
   on the 4-level Lloyd-Max quantizer of a unit Gaussian, levels +-0.4528 and +-1.5104 (decision
   thresholds 0 and +-0.9816), value = level * sigma_hat. sigma is stored as E4M3 under one fp32
   scale per (leading index, stage), s = max(sigma) / 448 (NVFP4's two-level idea):
   sigma_hat = e4m3(sigma / s) * s. Four codes per byte, element 4i in the low bits.
4. Dequantize: x_hat = c_hat[idx] + sum over stages of level[code] * sigma_hat, in fp32.

Bytes per (leading index): stages * (L*D/4 + L*D/S + 4) + L + 2*G*D. At Wan2.1-1.3B's chunk
block (3 latent frames x 1560 tokens, head dim 128), one stage: 0.140x of bf16; two: 0.265x.
`rtn2_fake_quantize` is the naive 2-bit baseline (round to nearest on min..max per block of
channels, fp16 scale and zero point), for comparison at equal bytes.

Legend: L tokens of the block, D head dim, G groups, S channels per scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vidtrain.formats import fp8

LEVELS = (-1.5104, -0.4528, 0.4528, 1.5104)  # Lloyd-Max, 4 levels, unit Gaussian
THRESHOLDS = (-0.9816, 0.0, 0.9816)  # midpoints between neighbouring levels
GROUPS = 16
MIN_GROUP_TOKENS = 16
ITERS = 4
SCALE_BLOCK = 64
E4M3_MAX = 448.0


@dataclass
class KV2Tensor:
    """A kv2 block: codes uint8 [..., stages, L, D/4], sigma codes (E4M3 bytes) uint8
    [..., stages, L, D/S], per-stage fp32 scale [..., stages, 1, 1], group index uint8 [..., L],
    centroids bf16 [..., G, D]; `shape`/`dtype` of the original."""

    codes: torch.Tensor
    sigma: torch.Tensor
    scale: torch.Tensor
    index: torch.Tensor
    centroids: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for t in (self.codes, self.sigma, self.scale, self.index, self.centroids)
        )


def _check(x: torch.Tensor, groups: int, stages: int) -> int:
    if x.ndim < 2:
        raise ValueError(f"kv2 needs [..., L, D], got shape {tuple(x.shape)}")
    d = x.shape[-1]
    s = min(SCALE_BLOCK, d)
    if d % 4 or d % s:
        raise ValueError(f"kv2 needs the head dim to be a multiple of 4 and of {s}, got {d}")
    if not 1 <= groups <= 256:
        raise ValueError(f"kv2 groups must be in [1, 256] (one byte per token), got {groups}")
    if stages not in (1, 2):
        raise ValueError(f"kv2 stages must be 1 or 2, got {stages}")
    return s


def num_groups(tokens: int, groups: int = GROUPS) -> int:
    return min(groups, max(1, tokens // MIN_GROUP_TOKENS))


def nbytes_per_block(tokens: int, dim: int, groups: int = GROUPS, stages: int = 1) -> int:
    """Bytes of one (leading index's) block of `tokens` x `dim`, all parts counted."""
    s = min(SCALE_BLOCK, dim)
    g = num_groups(tokens, groups)
    return stages * (tokens * dim // 4 + tokens * dim // s + 4) + tokens + 2 * g * dim


def kmeans(x: torch.Tensor, groups: int, iters: int = ITERS) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic Lloyd k-means over the tokens of x [..., L, D] (fp32): (centroids [..., G, D],
    index [..., L] int64), the centroids as after the last update, the index their assignment."""
    x = x.float()
    lead, (n, d) = x.shape[:-2], x.shape[-2:]
    xf = x.reshape(-1, n, d)
    start = torch.linspace(0, n - 1, groups).round().long()
    c = xf[:, start].clone()  # [N, G, D]
    x2 = xf.square().sum(-1, keepdim=True)  # [N, L, 1]
    for _ in range(iters + 1):
        dist = x2 - 2 * xf @ c.transpose(1, 2) + c.square().sum(-1)[:, None]  # [N, L, G]
        idx = torch.argmin(dist, dim=-1)  # ties: the lower index
        if _ == iters:
            break
        onehot = torch.nn.functional.one_hot(idx, groups).to(xf.dtype)  # [N, L, G]
        count = onehot.sum(1)  # [N, G]
        sums = onehot.transpose(1, 2) @ xf  # [N, G, D]
        c = torch.where(count[..., None] > 0, sums / count.clamp_min(1)[..., None], c)
    return c.reshape(*lead, groups, d), idx.reshape(*lead, n)


def _stage(r: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One 2-bit residual stage of r [..., L, D] (fp32): (codes [..., L, D] int64, sigma bytes
    [..., L, D/S], scale [..., 1, 1], the dequantized stage [..., L, D])."""
    blocks = r.unflatten(-1, (-1, s))  # [..., L, D/S, S]
    sigma = blocks.square().mean(-1).sqrt()  # [..., L, D/S]
    scale = (sigma.amax(dim=(-2, -1), keepdim=True) / E4M3_MAX).clamp_min(fp8.EPS)  # [..., 1, 1]
    sig_code = (sigma / scale).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    sig_hat = sig_code.float() * scale  # [..., L, D/S]
    u = blocks / sig_hat.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    codes = torch.bucketize(u.contiguous(), torch.tensor(THRESHOLDS, device=r.device), right=True)  # 0..3
    levels = torch.tensor(LEVELS, device=r.device)
    deq = (levels[codes] * sig_hat[..., None]).flatten(-2)
    return codes.flatten(-2), sig_code.view(torch.uint8), scale, deq


def _pack(codes: torch.Tensor) -> torch.Tensor:
    c = codes.to(torch.uint8)
    return c[..., 0::4] | (c[..., 1::4] << 2) | (c[..., 2::4] << 4) | (c[..., 3::4] << 6)


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    parts = [(packed >> (2 * i)) & 3 for i in range(4)]
    return torch.stack(parts, dim=-1).flatten(-2).long()


def quantize(x: torch.Tensor, groups: int = GROUPS, stages: int = 1, iters: int = ITERS) -> KV2Tensor:
    """kv2 of a block x [..., L, D] (the module docstring); detached."""
    s = _check(x, groups, stages)
    x32 = x.detach().float()
    g = num_groups(x.shape[-2], groups)
    c, idx = kmeans(x32, g, iters)
    c_hat = c.to(torch.bfloat16)
    base = torch.gather(c_hat.float(), -2, idx[..., None].expand(*idx.shape, x.shape[-1]))
    r = x32 - base
    codes, sigmas, scales = [], [], []
    for _ in range(stages):
        code, sig, scale, deq = _stage(r, s)
        codes.append(_pack(code))
        sigmas.append(sig)
        scales.append(scale)
        r = r - deq
    return KV2Tensor(
        torch.stack(codes, -3), torch.stack(sigmas, -3), torch.stack(scales, -3), idx.to(torch.uint8), c_hat,
        x.shape, x.dtype,
    )  # fmt: skip


def dequantize(q: KV2Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x_hat = c_hat[idx] + sum over stages of level[code] * sigma_hat (fp32), cast to `dtype`."""
    d = q.shape[-1]
    s = min(SCALE_BLOCK, d)
    idx = q.index.long()
    out = torch.gather(q.centroids.float(), -2, idx[..., None].expand(*idx.shape, d))
    levels = torch.tensor(LEVELS, device=q.codes.device)
    for i in range(q.codes.shape[-3]):
        code = _unpack(q.codes[..., i, :, :]).unflatten(-1, (-1, s))  # [..., L, D/S, S]
        sig = q.sigma[..., i, :, :].view(torch.float8_e4m3fn).float() * q.scale[..., i, :, :]
        out = out + (levels[code] * sig[..., None]).flatten(-2)
    return out.reshape(q.shape).to(dtype)


def fake_quantize(x: torch.Tensor, groups: int = GROUPS, stages: int = 1) -> torch.Tensor:
    """quantize -> dequantize in x's dtype: what a cached kv2 block reads back as (no gradient)."""
    return dequantize(quantize(x, groups, stages), x.dtype)


def rtn2_fake_quantize(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Naive 2-bit round-to-nearest: per token and block of `block` channels, 4 uniform levels
    from min to max (fp16 scale and zero point, as stored); the baseline kv2 must beat."""
    b = x.detach().float().unflatten(-1, (-1, block))
    lo, hi = b.amin(-1, keepdim=True).half().float(), b.amax(-1, keepdim=True)
    step = ((hi - lo) / 3).half().float()
    code = torch.clamp(torch.round((b - lo) / step.clamp_min(torch.finfo(torch.float32).tiny)), 0, 3)
    return (lo + code * step).flatten(-2).to(x.dtype)


def rtn2_nbytes_per_block(tokens: int, dim: int, block: int = 64) -> int:
    return tokens * dim // 4 + tokens * (dim // block) * 4
