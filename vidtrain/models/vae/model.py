"""Causal video VAEs of Wan2.1 and Wan2.2, a temporal frame cache, streaming and range encode.

Shape legend:
    B batch, C channels, T pixel (or intermediate-rate) frames, F latent frames, H, W height, width,
    N = B*T frames folded into the batch, L = H*W positions of one frame.

The network is causal in time. Every temporal operator keeps its left context in a `StreamState`:
    - `CausalConv3d`: the last k-1 input frames (zeros at the start of a clip);
    - temporal downsampling (kernel 3, stride 2): the input frames not yet consumed by a window; the
      first frame of a clip passes through alone, so 1 + 2n frames give 1 + n;
    - temporal upsampling: a causal conv that doubles channels into two output frames; the first
      frame of a clip passes through alone, so 1 + n frames give 1 + 2n.
Wan2.2 (`VAEConfig.residual`, `patch_size` 2) folds 2x2 pixels into channels before the encoder
(and back after the decoder) and wraps each encoder/decoder level in a parameter-free shortcut
(`AvgDown` / `DupUp`, channel folding and duplication); in time these pair frames (1,2),(3,4),...
after a clip's lone first frame, the same grouping as the temporal down/upsampling.
Norms are per position and attention is per frame, so one pass over a whole clip, Wan's schedule
(first frame, then 4 frames per pass) and any split of the frames into passes give the same result.
Chunk-wise use: `stream_encoder(None)` / `stream_decoder(None)` run each `feed` (any number of
latent frames; the first encode feed has 1 + 4k pixel frames, later ones 4k) in one pass with the
caches carried, equal to Wan's one-latent-frame-at-a-time schedule (tests/test_vae_chunkwise.py);
`latents_per_pass="auto"` caps a pass at what fits in memory (`CausalVideoVAE.max_latents_per_pass`).
CPU float32 convolutions go straight to oneDNN (`_onednn`; channels-last for narrow ones):
PyTorch's own dispatch sends convs with few channels or frames to its slow im2col kernel (~10x
slower), which made short passes (Wan's schedule, one sampler chunk) far slower than whole-clip ones.
Nothing is recurrent: each output depends on a bounded window of inputs, which
`CausalVideoVAE.temporal_receptive_field` computes from the modules (`lookback` methods).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

# Published per-channel statistics of Wan2.1's 16-channel latent (diffusers config `latents_mean/std`).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip
# Wan2.2's 48-channel latent statistics (hard-coded in Wan2.2's `Wan2_2_VAE`, diffusers' Wan2.2 config).
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip


@dataclass(frozen=True)
class VAEConfig:
    """Sizes of a Wan-style VAE. Latent statistics default to Wan2.1's (needs z_dim 16).

    `residual` and `patch_size` 2 make it Wan2.2's VAE; `decoder_base_dim` None means `base_dim`.
    """

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = field(default=WAN21_LATENTS_MEAN)
    latents_std: tuple[float, ...] = field(default=WAN21_LATENTS_STD)
    decoder_base_dim: int | None = None
    residual: bool = False
    patch_size: int = 1

    def __post_init__(self) -> None:
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample needs {len(self.dim_mult) - 1} entries, got {self.temporal_downsample}"
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(
                f"VAE latent statistics do not fit z_dim={self.z_dim}: latents_mean/std need z_dim={self.z_dim} "
                f"entries, got {len(self.latents_mean)}/{len(self.latents_std)}"
            )
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")

    @property
    def decoder_dim(self) -> int:
        return self.base_dim if self.decoder_base_dim is None else self.decoder_base_dim


VAE_FLAVORS: dict[str, VAEConfig] = {
    "debug": VAEConfig(base_dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
    "wan2.1": VAEConfig(),
}
# Wan2.2 family ("Wan2.2_VAE.pth": stride (4, 16, 16), z_dim 48), kept apart from the Wan2.1 family.
_WAN22 = {"z_dim": 48, "latents_mean": WAN22_LATENTS_MEAN, "latents_std": WAN22_LATENTS_STD}
_WAN22 |= {"residual": True, "patch_size": 2}
WAN22_VAE_FLAVORS: dict[str, VAEConfig] = {
    "wan2.2-debug": VAEConfig(
        base_dim=8, decoder_base_dim=12, dim_mult=(1, 2, 2, 2), num_res_blocks=1, **_WAN22
    ),
    "wan2.2": VAEConfig(base_dim=160, decoder_base_dim=256, **_WAN22),
}
ALL_VAE_FLAVORS: dict[str, VAEConfig] = {**VAE_FLAVORS, **WAN22_VAE_FLAVORS}


def flavor_config(name: str) -> VAEConfig:
    """The `VAEConfig` of a named flavor (Wan2.1 or Wan2.2 family); ValueError naming the known ones."""
    if name not in ALL_VAE_FLAVORS:
        raise ValueError(f"unknown VAE flavor {name!r}; known: {', '.join(sorted(ALL_VAE_FLAVORS))}")
    return ALL_VAE_FLAVORS[name]


PassSize = int | None | Literal["auto"]
"""Latent frames per network pass: n, None (each call in one pass) or "auto" (what fits in memory)."""

# Live activations of the largest level's size during one pass (block input, norm output, conv
# input with its cached frames, conv output, shortcut): the peak RSS growth of one-pass encodes and
# decodes on CPU (fp32; debug, wan2.1, wan2.2-debug flavors at 64-256 px, 3-8 latent frames) was
# 1.7-5.3 times the level's size; 8 leaves room for allocator slack and cuDNN workspaces.
_LIVE_TENSORS = 8
_MEMORY_FRACTION = 0.5  # of the free device memory, the default budget of an "auto" pass


# Convs with at most this many input channels run channels-last on the oneDNN path (`_onednn`).
# Measured per conv (3x3x3, fp32, 1 thread): channels-last is 10-30% faster, and as accurate as
# NCDHW up to 16 channels; from 24 channels its error against float64 grows (5e-6 at 24, 1e-5 at
# 64-96 against 2-4e-6 for NCDHW) and at 384 channels on 4x4 frames its rounding depends on the
# number of frames of the call (2e-5), which chunk-wise calls must not see. NCDHW gave the same
# bits for any number of frames in every shape tried.
_CHANNELS_LAST_MAX = 16


def _onednn(x: torch.Tensor) -> bool:
    """True where convs call oneDNN directly (`torch.mkldnn_convolution`): CPU float32.

    PyTorch's CPU dispatch picks its im2col `slow_conv3d` when N*C*T*H <= 20480 (few channels or
    frames: the debug VAE, the low-resolution levels, one latent frame per pass), ~10x slower than
    oneDNN at the same shapes. Other devices and dtypes keep PyTorch's choice.
    """
    cpu32 = x.device.type == "cpu" and x.dtype == torch.float32
    return cpu32 and torch.backends.mkldnn.is_available() and bool(torch.backends.mkldnn.enabled)


def _in_layout(x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """x dense in `fmt`, with the canonical strides of that layout (a view when it already is).

    `is_contiguous` ignores the strides of size-1 dims (a one-frame batch sliced from a larger
    one keeps its odd batch stride), and oneDNN then picks other kernels: 1-ulp differences
    between one-frame and chunk-wise calls of the same frames."""
    x = x.contiguous(memory_format=fmt)
    order = list(range(x.dim()))  # dims from outermost to innermost in memory
    if fmt != torch.contiguous_format:
        order = [0, *range(2, x.dim()), 1]
    want, step = [0] * x.dim(), 1
    for d in reversed(order):
        want[d], step = step, step * x.shape[d]
    return x if list(x.stride()) == want else x.as_strided(x.shape, want)


def _check_pass(latents_per_pass: PassSize) -> PassSize:
    """ValueError unless `latents_per_pass` is an int >= 1, None or "auto"; returns it."""
    if latents_per_pass is None or latents_per_pass == "auto":
        return latents_per_pass
    if isinstance(latents_per_pass, bool) or not isinstance(latents_per_pass, int) or latents_per_pass < 1:
        raise ValueError(f"latents_per_pass must be >= 1, None or 'auto', got {latents_per_pass!r}")
    return latents_per_pass


def _silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU of a fresh tensor (a norm's output): in place when no gradient is recorded."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


def _add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b for a fresh `a` (a conv's output): in place (keeps a's layout) when no gradient is recorded."""
    return a + b if torch.is_grad_enabled() else a.add_(b)


class _OneDNNConv:
    """Mixin for nn.Conv2d / nn.Conv3d: the CPU float32 forward calls oneDNN directly (`_onednn`),
    in channels-last layout for narrow convs and NCDHW/NCHW otherwise (`layout`); the output keeps
    that layout. Parameters and state-dict names are unchanged.

    A channels-last weight copy is kept between calls without gradients while the weight is
    unchanged (narrow convs only: small weights)."""

    _weight_cl: tuple[torch.Tensor, int, torch.Tensor] | None = None  # (source, its version, copy)

    def layout(self, x: torch.Tensor) -> torch.memory_format:
        """The memory format this conv runs in for input x (contiguous off the oneDNN path)."""
        if not _onednn(x) or self.in_channels > _CHANNELS_LAST_MAX:
            return torch.contiguous_format
        return torch.channels_last_3d if x.dim() == 5 else torch.channels_last

    def _onednn_weight(self, weight: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
        if fmt == torch.contiguous_format or (torch.is_grad_enabled() and weight.requires_grad):
            return _in_layout(weight, fmt)
        c = self._weight_cl  # the source view keeps its storage alive: a new weight has a new data_ptr
        fresh = c is not None and c[0].data_ptr() == weight.data_ptr() and c[0]._version == c[1]
        if not (fresh and c[0].dtype == weight.dtype and c[0].shape == weight.shape):
            src = weight.detach()  # shares the weight's version counter: an in-place update shows
            c = self._weight_cl = (src, src._version, _in_layout(src, fmt))
        return c[2]

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "zeros" or not _onednn(x):
            return super()._conv_forward(x, weight, bias)
        fmt = self.layout(x)
        x, w = _in_layout(x, fmt), self._onednn_weight(weight, fmt)
        return torch.mkldnn_convolution(x, w, bias, self.padding, self.stride, self.dilation, self.groups)


class Conv2d(_OneDNNConv, nn.Conv2d):
    pass


class Conv3d(_OneDNNConv, nn.Conv3d):
    pass


class StreamState:
    """Temporal caches of one video stream, one slot per module.

    `mid_clip=True` starts a stream in the middle of a clip (used by `encode_range`): the first
    frame is not treated as the clip's lone first frame, and caches start as zeros.
    """

    def __init__(self, mid_clip: bool = False) -> None:
        self.mid_clip = mid_clip
        self.slots: dict[int, object] = {}

    def get(self, module: nn.Module) -> object:
        return self.slots.get(id(module))

    def set(self, module: nn.Module, value: object) -> None:
        self.slots[id(module)] = value


def _per_frame(fn: nn.Module, x_BCTHW: torch.Tensor) -> torch.Tensor:
    """Apply a 2D module to every frame."""
    B, _, T = x_BCTHW.shape[:3]
    x_NCHW = x_BCTHW.transpose(1, 2).flatten(0, 1)
    y_NCHW = fn(x_NCHW)
    return y_NCHW.unflatten(0, (B, T)).transpose(1, 2)  # [B, C', T, H', W']


class CausalConv3d(Conv3d):
    """3D conv, zero-padded symmetrically in space and causally in time through the stream cache."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int, int], **kw: object) -> None:
        k = (kernel,) * 3 if isinstance(kernel, int) else kernel
        super().__init__(c_in, c_out, k, padding=(0, k[1] // 2, k[2] // 2), **kw)
        self.time_pad = k[0] - 1

    def forward(self, x_BCTHW: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        if self.time_pad == 0:
            return super().forward(x_BCTHW)
        prev = state.get(self) if state is not None else None
        onednn = _onednn(x_BCTHW)
        if onednn:  # cached frames, zeros and input in the conv's layout: cat keeps it
            x_BCTHW = _in_layout(x_BCTHW, self.layout(x_BCTHW))
        if prev is None:
            prev = x_BCTHW.new_zeros(*x_BCTHW.shape[:2], self.time_pad, *x_BCTHW.shape[3:])
            prev = _in_layout(prev, self.layout(x_BCTHW)) if onednn else prev
        return self._padded_forward(torch.cat([prev, x_BCTHW], dim=2), state)

    def _padded_forward(self, xp_BCTHW: torch.Tensor, state: StreamState | None) -> torch.Tensor:
        """The conv of input already padded in time (cached frames first); caches its last frames."""
        if state is not None:  # clone: a view would keep the whole padded input alive
            state.set(self, xp_BCTHW[:, :, -self.time_pad :].clone())
        return super().forward(xp_BCTHW)

    def norm_silu_forward(self, norm: RMSNorm, x_BCTHW: torch.Tensor, state: StreamState) -> torch.Tensor:
        """`self(silu(norm(x)), state)`, the same numbers; without gradients on the oneDNN path the
        norm writes straight into the conv's time-padded input, which saves the cat's copy."""
        if torch.is_grad_enabled() or self.time_pad == 0 or not _onednn(x_BCTHW):
            return self(_silu(norm(x_BCTHW)), state)
        B, C, T, H, W = x_BCTHW.shape
        xp = torch.empty(
            (B, C, self.time_pad + T, H, W), dtype=x_BCTHW.dtype, device=x_BCTHW.device,
            memory_format=self.layout(x_BCTHW),
        )  # fmt: skip
        prev = state.get(self)
        if prev is None:
            xp[:, :, : self.time_pad].zero_()
        else:
            xp[:, :, : self.time_pad].copy_(prev)
        F.silu(norm(x_BCTHW, out=xp[:, :, self.time_pad :]), inplace=True)
        return self._padded_forward(xp, state)

    def lookback(self, frames: int) -> int:
        return frames + self.time_pad


class RMSNorm(nn.Module):
    """L2 norm over channels at every position, times sqrt(C) and a learned gain."""

    def __init__(self, dim: int, spatial_dims: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, *([1] * spatial_dims)))
        self.scale = dim**0.5

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """`out`: a tensor of x's shape to write into (float32/float64 without gradients only)."""
        if x.dtype in (torch.float16, torch.bfloat16):
            return F.normalize(x.float(), dim=1).to(x.dtype) * self.scale * self.gamma
        # F.normalize(x) * scale * gamma in two passes over x instead of four: x * (1 / |x|) * (scale * gamma)
        gain = self.gamma * self.scale
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        if torch.is_grad_enabled():
            return x * norm.clamp_min(1e-12).reciprocal() * gain
        return torch.mul(x, norm.clamp_min_(1e-12).reciprocal_(), out=out).mul_(gain)


class ResBlock(nn.Module):
    """norm -> SiLU -> causal conv, twice, plus a (1x1x1 conv) shortcut."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1 = RMSNorm(c_in, 3)
        self.conv1 = CausalConv3d(c_in, c_out, 3)
        self.norm2 = RMSNorm(c_out, 3)
        self.conv2 = CausalConv3d(c_out, c_out, 3)
        self.shortcut = CausalConv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x_BCTHW: torch.Tensor, state: StreamState) -> torch.Tensor:
        h = self.conv1.norm_silu_forward(self.norm1, x_BCTHW, state)
        h = self.conv2.norm_silu_forward(self.norm2, h, state)
        return _add(h, self.shortcut(x_BCTHW))

    def lookback(self, frames: int) -> int:
        return self.conv1.lookback(self.conv2.lookback(frames))


class FrameAttention(nn.Module):
    """Single-head self-attention over the positions of each frame (no mixing across time)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, 2)
        self.to_qkv = Conv2d(dim, dim * 3, 1)
        self.proj = Conv2d(dim, dim, 1)

    def _attend(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        N, C, H, W = x_NCHW.shape
        qkv_N1L3C = self.to_qkv(self.norm(x_NCHW)).flatten(2).transpose(1, 2).unsqueeze(1)
        q, k, v = qkv_N1L3C.chunk(3, dim=-1)  # each [N, 1, L, C]
        o_NCL = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2)
        return self.proj(o_NCL.reshape(N, C, H, W))

    def forward(self, x_BCTHW: torch.Tensor, state: StreamState) -> torch.Tensor:
        return x_BCTHW + _per_frame(self._attend, x_BCTHW)

    def lookback(self, frames: int) -> int:
        return frames


class Resample(nn.Module):
    """Spatial 2x down/up sampling per frame, optionally with 2x temporal down/up sampling.

    modes: "down2d", "down3d" (spatial first, then time), "up2d", "up3d" (time first, then space);
    the up modes halve the channels unless `c_out` is given (Wan2.1 halves, Wan2.2 keeps them).
    """

    def __init__(self, dim: int, mode: str, c_out: int | None = None) -> None:
        super().__init__()
        self.mode = mode
        if mode.startswith("down"):
            self.spatial = Conv2d(dim, dim, 3, stride=2)
        else:
            self.spatial = Conv2d(dim, dim // 2 if c_out is None else c_out, 3, padding=1)
        if mode == "down3d":
            self.time_conv = Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        elif mode == "up3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1))

    def _space(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        if self.mode.startswith("down"):
            return self.spatial(F.pad(x_NCHW, (0, 1, 0, 1)))
        up = F.interpolate(x_NCHW.float(), scale_factor=2.0, mode="nearest-exact").type_as(x_NCHW)
        return self.spatial(up)

    def _time_down(self, x_BCTHW: torch.Tensor, state: StreamState) -> torch.Tensor:
        buf = state.get(self)
        head = x_BCTHW[:, :, :0]
        if buf is None and state.mid_clip:  # stand-in for the unseen frame left of the first window
            buf = torch.cat([torch.zeros_like(x_BCTHW[:, :, :1]), x_BCTHW], dim=2)
        elif buf is None:  # a clip's first frame passes through alone
            head, buf = x_BCTHW[:, :, :1], x_BCTHW
        else:
            buf = torch.cat([buf, x_BCTHW], dim=2)
        n = (buf.shape[2] - 1) // 2  # windows of 3 frames at stride 2 that are complete
        state.set(self, buf[:, :, 2 * n :].clone())
        if n == 0:
            return head
        return torch.cat([head, self.time_conv(buf[:, :, : 2 * n + 1])], dim=2)  # [B, C, T', H, W]

    def _time_up(self, x_BCTHW: torch.Tensor, state: StreamState) -> torch.Tensor:
        head = x_BCTHW[:, :, :0]
        if state.get(self) is None and not state.mid_clip:  # a clip's first frame passes through alone
            head, x_BCTHW = x_BCTHW[:, :, :1], x_BCTHW[:, :, 1:]
        state.set(self, True)
        if x_BCTHW.shape[2] == 0:
            return head
        B, C, T, H, W = x_BCTHW.shape
        y_B2CTHW = self.time_conv(x_BCTHW, state).view(B, 2, C, T, H, W)
        y_BCT2HW = y_B2CTHW.permute(0, 2, 3, 1, 4, 5)  # interleave pairs, in the conv output's layout
        fmt = self.time_conv.layout(x_BCTHW)
        y_BCTHW = torch.empty(
            (B, C, 2 * T, H, W), dtype=y_BCT2HW.dtype, device=y_BCT2HW.device, memory_format=fmt
        )
        y_BCTHW.unflatten(2, (T, 2)).copy_(y_BCT2HW)
        return torch.cat([head, y_BCTHW], dim=2)

    def forward(self, x_BCTHW: torch.Tensor, state: StreamState) -> torch.Tensor:
        if self.mode == "up3d":
            x_BCTHW = self._time_up(x_BCTHW, state)
        x_BCTHW = _per_frame(self._space, x_BCTHW)
        if self.mode == "down3d":
            x_BCTHW = self._time_down(x_BCTHW, state)
        return x_BCTHW

    def lookback(self, frames: int) -> int:
        if self.mode == "down3d":  # output j reads inputs 2j-2 .. 2j
            return 2 * frames + 2
        if self.mode == "up3d":
            raise NotImplementedError("lookback is computed for the encoder only")
        return frames


class AvgDown(nn.Module):
    """Wan2.2's down-level shortcut: fold `ft` frames and `fs` x `fs` pixels into channels, then
    average groups of consecutive channels down to `c_out`. No parameters.

    With ft=2, frames pair as (1,2),(3,4),...; a clip's first frame is paired with a zero frame
    before it (Wan2.2 pads its lone first chunk); an unpaired last frame waits in the stream state.
    """

    def __init__(self, c_in: int, c_out: int, ft: int, fs: int) -> None:
        super().__init__()
        if c_in * ft * fs * fs % c_out:
            raise ValueError(f"AvgDown: {c_in} channels x {ft * fs * fs} do not divide into {c_out} groups")
        self.c_out, self.ft, self.fs = c_out, ft, fs
        self.group = c_in * ft * fs * fs // c_out

    def _fold(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x_BCTHW.shape
        ft, fs = self.ft, self.fs
        x = x_BCTHW.view(B, C, T // ft, ft, H // fs, fs, W // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(B, self.c_out, self.group, T // ft, H // fs, W // fs)  # channels (c, t, dy, dx) grouped
        return x.mean(dim=2)

    def forward(self, x_BCTHW: torch.Tensor, state: StreamState) -> torch.Tensor:
        if self.ft == 1:
            return self._fold(x_BCTHW)
        buf = state.get(self)
        parts = []
        if buf is None and not state.mid_clip and x_BCTHW.shape[2] > 0:  # a clip's lone first frame
            parts.append(self._fold(F.pad(x_BCTHW[:, :, :1], (0, 0, 0, 0, 1, 0))))
            x_BCTHW = x_BCTHW[:, :, 1:]
        elif buf is not None:
            x_BCTHW = torch.cat([buf, x_BCTHW], dim=2)
        n = x_BCTHW.shape[2] - x_BCTHW.shape[2] % 2
        state.set(self, x_BCTHW[:, :, n:].clone())
        parts.append(self._fold(x_BCTHW[:, :, :n]))
        return torch.cat(parts, dim=2)

    def lookback(self, frames: int) -> int:
        return self.ft * frames + self.ft - 1  # output j reads inputs ft*j-(ft-1) .. ft*j


class DupUp(nn.Module):
    """Wan2.2's up-level shortcut: repeat channels and unfold them into `ft` frames and `fs` x `fs`
    pixels. A clip's first frame gives only its last `ft` copy (Wan2.2's first chunk). No parameters."""

    def __init__(self, c_in: int, c_out: int, ft: int, fs: int) -> None:
        super().__init__()
        if c_out * ft * fs * fs % c_in:
            raise ValueError(f"DupUp: {c_out} channels x {ft * fs * fs} are not a multiple of {c_in}")
        self.c_out, self.ft, self.fs = c_out, ft, fs
        self.repeats = c_out * ft * fs * fs // c_in

    def forward(self, x_BCTHW: torch.Tensor, state: StreamState) -> torch.Tensor:
        B, _, T, H, W = x_BCTHW.shape
        ft, fs = self.ft, self.fs
        y = x_BCTHW.repeat_interleave(self.repeats, dim=1).view(B, self.c_out, ft, fs, fs, T, H, W)
        y = y.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(B, self.c_out, T * ft, H * fs, W * fs)
        if T and state.get(self) is None:
            if not state.mid_clip:
                y = y[:, :, ft - 1 :]
            state.set(self, True)
        return y


class ResidualLevel(nn.Module):
    """One Wan2.2 encoder/decoder level: its blocks (res blocks, then a resample) plus a shortcut."""

    def __init__(self, blocks: list[nn.Module], shortcut: AvgDown | DupUp | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.shortcut = shortcut

    def forward(self, x_BCTHW: torch.Tensor, state: StreamState) -> torch.Tensor:
        y = _run(self.blocks, x_BCTHW, state)
        return y if self.shortcut is None else _add(y, self.shortcut(x_BCTHW, state))

    def lookback(self, frames: int) -> int:
        main = _lookback(self.blocks, frames)
        return main if self.shortcut is None else max(main, self.shortcut.lookback(frames))


def patchify(x_BCTHW: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, C*p*p, T, H/p, W/p]; channel c*p*p + dx*p + dy holds pixel (p*y+dy, p*x+dx)."""
    if p == 1:
        return x_BCTHW
    B, C, T, H, W = x_BCTHW.shape
    x = x_BCTHW.view(B, C, T, H // p, p, W // p, p).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(B, C * p * p, T, H // p, W // p)


def unpatchify(x_BCTHW: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of `patchify`."""
    if p == 1:
        return x_BCTHW
    B, C, T, H, W = x_BCTHW.shape
    x = x_BCTHW.view(B, C // (p * p), p, p, T, H, W).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(B, C // (p * p), T, H * p, W * p)


def _run(layers: Sequence[nn.Module], x: torch.Tensor, state: StreamState) -> torch.Tensor:
    for layer in layers:
        x = layer(x, state)
    return x


def _lookback(layers: Sequence[nn.Module], frames: int) -> int:
    for layer in reversed(layers):
        frames = layer.lookback(frames)
    return frames


def _middle(dim: int) -> nn.ModuleList:
    return nn.ModuleList([ResBlock(dim, dim), FrameAttention(dim), ResBlock(dim, dim)])


class Encoder(nn.Module):
    """Pixels [B, 3*p*p, T, H, W] (patchified) -> mean and log-variance [B, 2*z_dim, F, H/8, W/8].

    Wan2.1: `down` is a flat list of blocks; Wan2.2 (`residual`): one `ResidualLevel` per level.
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(3 * cfg.patch_size**2, dims[0], 3)
        last = len(cfg.dim_mult) - 1
        down: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(itertools.pairwise(dims)):
            blocks: list[nn.Module] = [
                ResBlock(c_in if j == 0 else c_out, c_out) for j in range(cfg.num_res_blocks)
            ]
            temporal = i < last and cfg.temporal_downsample[i]
            if i < last:
                blocks.append(Resample(c_out, "down3d" if temporal else "down2d"))
            if cfg.residual:
                down.append(
                    ResidualLevel(blocks, AvgDown(c_in, c_out, 2 if temporal else 1, 2 if i < last else 1))
                )
            else:
                down.extend(blocks)
        self.down = nn.ModuleList(down)
        self.mid = _middle(dims[-1])
        self.norm_out = RMSNorm(dims[-1], 3)
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, 3)

    def forward(self, x_BCTHW: torch.Tensor, state: StreamState) -> torch.Tensor:
        x = self.conv_in(x_BCTHW, state)
        x = _run(self.down, x, state)  # [B, C, F, H/8, W/8]
        x = _run(self.mid, x, state)
        return self.conv_out.norm_silu_forward(self.norm_out, x, state)

    def lookback(self, frames: int) -> int:
        frames = self.conv_out.lookback(frames)
        return self.conv_in.lookback(_lookback([*self.down, *self.mid], frames))


class Decoder(nn.Module):
    """Latents [B, z_dim, F, h, w] -> pixels [B, 3*p*p, 1+4(F-1), 8h, 8w] (patchified, unclamped)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.decoder_dim * m for m in (mult[-1], *mult[::-1])]
        temporal_up = cfg.temporal_downsample[::-1]
        last = len(mult) - 1
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3)
        self.mid = _middle(dims[0])
        up: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(itertools.pairwise(dims)):
            if not cfg.residual:
                c_in = c_in // 2 if i > 0 else c_in  # each Wan2.1 upsampler halved the channels
            blocks: list[nn.Module] = [
                ResBlock(c_in if j == 0 else c_out, c_out) for j in range(cfg.num_res_blocks + 1)
            ]
            temporal = i < last and temporal_up[i]
            if i < last:
                blocks.append(
                    Resample(c_out, "up3d" if temporal else "up2d", c_out if cfg.residual else None)
                )
            if cfg.residual:
                shortcut = DupUp(c_in, c_out, 2 if temporal else 1, 2) if i < last else None
                up.append(ResidualLevel(blocks, shortcut))
            else:
                up.extend(blocks)
        self.up = nn.ModuleList(up)
        self.norm_out = RMSNorm(dims[-1], 3)
        self.conv_out = CausalConv3d(dims[-1], 3 * cfg.patch_size**2, 3)

    def forward(self, z_BCFHW: torch.Tensor, state: StreamState) -> torch.Tensor:
        x = self.conv_in(z_BCFHW, state)
        x = _run(self.mid, x, state)
        x = _run(self.up, x, state)  # [B, C, T, H, W]
        return self.conv_out.norm_silu_forward(self.norm_out, x, state)


class CausalVideoVAE(nn.Module):
    """Wan2.1 / Wan2.2 causal video VAE. `encode`/`decode` work on normalised latents ((mu - mean) / std)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder(config)
        stats_shape = (1, config.z_dim, 1, 1, 1)
        self.register_buffer("latents_mean", torch.tensor(config.latents_mean).view(stats_shape), False)
        self.register_buffer("latents_std", torch.tensor(config.latents_std).view(stats_shape), False)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_flavor(cls, name: str, **overrides: object) -> CausalVideoVAE:
        """Random-initialised VAE of a named size (`ALL_VAE_FLAVORS`); fields may be overridden."""
        return cls(replace(flavor_config(name), **overrides))

    @classmethod
    def from_pretrained(cls, path: str | Path, flavor: str | None = None) -> CausalVideoVAE:
        """Load Wan2.1 or Wan2.2 weights: an original-layout `.pth`/`.safetensors` file (`Wan2.1_VAE.pth`,
        `Wan2.2_VAE.pth`) or a diffusers folder.

        Sizes come from the diffusers `config.json`, or are read off the original state dict
        (or taken from `flavor` when given).
        """
        from vidtrain.models.vae.weights import load_pretrained  # lazy: weights.py imports this module

        return load_pretrained(cls, Path(path), flavor)

    # ---- geometry -----------------------------------------------------------------------------
    @property
    def z_dim(self) -> int:
        return self.config.z_dim

    @property
    def temporal_compression(self) -> int:
        return 2 ** sum(self.config.temporal_downsample)

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.config.dim_mult) - 1) * self.config.patch_size

    def num_latent_frames(self, pixel_frames: int) -> int:
        return 1 + (pixel_frames - 1) // self.temporal_compression

    def check_video(self, video_BCTHW: torch.Tensor) -> None:
        """ValueError unless the video is [B, 3, 1+4k, H, W] with H, W divisible by the spatial stride."""
        tc, sc = self.temporal_compression, self.spatial_compression
        shape = tuple(video_BCTHW.shape)
        if video_BCTHW.dim() != 5 or shape[1] != 3:
            raise ValueError(f"video must be [B, 3, T, H, W], got {shape}")
        if shape[2] < 1 or (shape[2] - 1) % tc:
            raise ValueError(f"video needs 1 + {tc}k frames, got T={shape[2]} (shape {shape})")
        if shape[3] % sc or shape[4] % sc:
            raise ValueError(f"video H and W must be divisible by {sc}, got {shape[3]}x{shape[4]}")

    # ---- latent statistics --------------------------------------------------------------------
    def normalize_latents(self, mu_BCFHW: torch.Tensor) -> torch.Tensor:
        return (mu_BCFHW - self.latents_mean.to(mu_BCFHW)) / self.latents_std.to(mu_BCFHW)

    def denormalize_latents(self, z_BCFHW: torch.Tensor) -> torch.Tensor:
        return z_BCFHW * self.latents_std.to(z_BCFHW) + self.latents_mean.to(z_BCFHW)

    # ---- one pass of the networks -------------------------------------------------------------
    def _encode_pass(self, x_BCTHW: torch.Tensor, state: StreamState) -> torch.Tensor:
        h_BCFHW = self.quant_conv(self.encoder(patchify(x_BCTHW, self.config.patch_size), state))
        return self.normalize_latents(h_BCFHW[:, : self.z_dim]).contiguous()  # out of channels-last

    def _decode_pass(self, z_BCFHW: torch.Tensor, state: StreamState) -> torch.Tensor:
        x_BCTHW = self.decoder(self.post_quant_conv(self.denormalize_latents(z_BCFHW)), state)
        return unpatchify(x_BCTHW, self.config.patch_size).clamp(-1.0, 1.0).contiguous()

    # ---- how many latent frames one pass may hold -------------------------------------------------
    def _level_sizes(self) -> list[tuple[int, float, int]]:
        """(channels, frames per latent frame, spatial divisor vs the pixel frame) of every
        resolution level of the encoder and the decoder: where the activations of a pass live."""
        cfg, tc, p = self.config, self.temporal_compression, self.config.patch_size
        enc_dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        sizes = [(enc_dims[0], float(tc), p)]
        for i, c in enumerate(enc_dims[1:]):
            sizes.append((c, tc / 2 ** sum(cfg.temporal_downsample[:i]), p * 2**i))
        mult, levels = cfg.dim_mult, len(cfg.dim_mult)
        dec_dims = [cfg.decoder_dim * m for m in (mult[-1], *mult[::-1])]
        up = cfg.temporal_downsample[::-1]
        for i, c in enumerate(dec_dims[1:]):
            c_in = dec_dims[i] if (cfg.residual or i == 0) else dec_dims[i] // 2
            sizes.append((max(c, c_in), 2.0 ** sum(up[:i]), p * 2 ** (levels - 1 - i)))
        return sizes

    def pass_memory_bytes(
        self, latent_frames: int, height: int, width: int, batch: int = 1, dtype: torch.dtype | None = None
    ) -> int:
        """Estimated peak activation bytes of one encode or decode pass of `latent_frames` latent
        frames at pixel size height x width (weights not included): `_LIVE_TENSORS` live tensors of
        the largest level, each with its 2 cached frames."""
        elem = torch.finfo(dtype or next(self.parameters()).dtype).bits // 8
        level = max(
            c * (f * latent_frames + 2) * (height // s) * (width // s) for c, f, s in self._level_sizes()
        )
        return int(_LIVE_TENSORS * batch * elem * level)

    def max_latents_per_pass(
        self, height: int, width: int, batch: int = 1, memory_bytes: int | None = None,
        device: torch.device | None = None,
    ) -> int:  # fmt: skip
        """The most latent frames one pass may hold within `memory_bytes` (default: half of the free
        memory of `device`, the VAE's device by default); at least 1."""
        param = next(self.parameters())
        if memory_bytes is None:
            memory_bytes = int(_MEMORY_FRACTION * free_memory_bytes(device or param.device))
        per_frame = self.pass_memory_bytes(2, height, width, batch) - self.pass_memory_bytes(
            1, height, width, batch
        )
        fixed = self.pass_memory_bytes(1, height, width, batch) - per_frame
        return max(1, (memory_bytes - fixed) // max(1, per_frame))

    def _resolve_pass(
        self, latents_per_pass: PassSize, shape_BCTHW: Sequence[int], pixels: bool
    ) -> int | None:
        """`latents_per_pass` as StreamEncoder/StreamDecoder take it ("auto" made a number or None)."""
        if _check_pass(latents_per_pass) != "auto":
            return latents_per_pass
        B, _, T, H, W = shape_BCTHW
        s = 1 if pixels else self.spatial_compression
        frames = self.num_latent_frames(T) if pixels else T
        n = self.max_latents_per_pass(H * s, W * s, B)
        return None if n >= frames else n

    # ---- public encode / decode ---------------------------------------------------------------
    def encode(self, video_BCTHW: torch.Tensor, latents_per_pass: PassSize = 1) -> torch.Tensor:
        """Pixels in [-1, 1], [B,3,1+4k,H,W] -> normalised latent mean [B, z_dim, 1+k, H/s, W/s]
        (s = `spatial_compression`: 8 for Wan2.1, 16 for Wan2.2).

        `latents_per_pass` latent frames are computed per network pass (1 = Wan's schedule: the
        first frame, then 4 frames per pass; None = the whole clip in one pass; "auto" = as many
        as fit in half the free memory, `max_latents_per_pass`). All agree.
        """
        self.check_video(video_BCTHW)
        enc = self.stream_encoder(self._resolve_pass(latents_per_pass, video_BCTHW.shape, pixels=True))
        z = enc.feed(video_BCTHW)
        enc.flush()
        return z

    def decode(self, z_BCFHW: torch.Tensor, latents_per_pass: PassSize = 1) -> torch.Tensor:
        """Normalised latents [B, z_dim, F, h, w] -> pixels in [-1, 1], [B, 3, 1+4(F-1), s*h, s*w]."""
        dec = self.stream_decoder(latents_per_pass)
        return dec.feed(z_BCFHW)

    def stream_encoder(self, latents_per_pass: PassSize = 1) -> StreamEncoder:
        """A chunk-wise encoder (caches carried between `feed` calls); None: one pass per feed."""
        return StreamEncoder(self, latents_per_pass)

    def stream_decoder(self, latents_per_pass: PassSize = 1) -> StreamDecoder:
        """A chunk-wise decoder (caches carried between `feed` calls); None: one pass per feed."""
        return StreamDecoder(self, latents_per_pass)

    # ---- chunk-halo encode --------------------------------------------------------------------
    def temporal_receptive_field(self) -> int:
        """Latent frames of left context that make `encode_range` exact.

        Computed from the encoder's modules: pixel frames a latent frame looks back over, rounded
        up to whole latent chunks (latent j >= 1 covers pixel frames 4j-3 .. 4j).
        """
        tc = self.temporal_compression
        pixel_lookback = self.encoder.lookback(0)
        return max(0, math.ceil((pixel_lookback - (tc - 1)) / tc))

    def pixel_range(self, start: int, end: int, halo: int) -> tuple[int, int]:
        """Pixel frames [p0, p1) that `encode_range(video, start, end, halo)` reads."""
        first = max(0, start - halo)
        tc = self.temporal_compression
        return (0 if first == 0 else tc * first - (tc - 1)), tc * (end - 1) + 1

    def encode_range(
        self, video_BCTHW: torch.Tensor, start: int, end: int, halo: int, latents_per_pass: PassSize = "auto"
    ) -> torch.Tensor:
        """Latent frames [start, end) of `encode(video)`, computed from pixel frames of that range
        plus `halo` latent frames of left context (dropped). Exact when `halo >=
        temporal_receptive_field()` or the halo reaches the clip's first frame; approximate below.
        Passes hold as many latent frames as fit in memory ("auto"; see `encode`).
        """
        self.check_video(video_BCTHW)
        n_lat = self.num_latent_frames(video_BCTHW.shape[2])
        if not 0 <= start < end <= n_lat or halo < 0:
            raise ValueError(f"need 0 <= start < end <= {n_lat} and halo >= 0, got {start}, {end}, {halo}")
        p0, p1 = self.pixel_range(start, end, halo)
        per_pass = self._resolve_pass(latents_per_pass, video_BCTHW[:, :, p0:p1].shape, pixels=True)
        enc = StreamEncoder(self, per_pass, mid_clip=p0 > 0)
        z = enc.feed(video_BCTHW[:, :, p0:p1])
        enc.flush()
        return z[:, :, start - max(0, start - halo) :]


class StreamEncoder:
    """Encodes a video fed in pieces of any size; returns each latent frame once it is complete.

    The first piece starts at the clip's first frame (or, with `mid_clip`, at the first pixel
    frame of a latent chunk). Caches are carried between calls, so the concatenated output equals
    the one-shot `encode`.
    """

    def __init__(self, vae: CausalVideoVAE, latents_per_pass: PassSize = 1, mid_clip: bool = False) -> None:
        _check_pass(latents_per_pass)
        self.vae = vae
        self.latents_per_pass = latents_per_pass
        self.state = StreamState(mid_clip=mid_clip)
        self.started = mid_clip  # a mid-clip stream has no lone first frame
        self.pending: torch.Tensor | None = None

    def _empty(self, like_BCTHW: torch.Tensor) -> torch.Tensor:
        B, _, _, H, W = like_BCTHW.shape
        sc = self.vae.spatial_compression
        return like_BCTHW.new_zeros(B, self.vae.z_dim, 0, H // sc, W // sc)

    def _next_pass(self) -> int:
        """Pixel frames of the next pass out of the pending ones (0: wait for more)."""
        assert self.pending is not None
        n, tc = self.pending.shape[2], self.vae.temporal_compression
        if n == 0:
            return 0
        lead = 0 if self.started else 1  # a clip's first frame is a latent frame of its own
        groups = (n - lead) // tc
        per_pass = self.vae._resolve_pass(self.latents_per_pass, self.pending.shape, pixels=True)
        if per_pass is not None:
            groups = min(groups, per_pass - lead)
        return lead + tc * groups

    def feed(self, frames_BCTHW: torch.Tensor) -> torch.Tensor:
        """Add pixel frames; return the latent frames completed by them ([B, z_dim, F', h, w])."""
        if frames_BCTHW.dim() != 5 or frames_BCTHW.shape[1] != 3:
            raise ValueError(f"frames must be [B, 3, T, H, W], got {tuple(frames_BCTHW.shape)}")
        sc = self.vae.spatial_compression
        if frames_BCTHW.shape[3] % sc or frames_BCTHW.shape[4] % sc:
            raise ValueError(f"frame H and W must be divisible by {sc}, got {tuple(frames_BCTHW.shape)}")
        pending = self.pending
        self.pending = frames_BCTHW if pending is None else torch.cat([pending, frames_BCTHW], dim=2)
        out = [self._empty(frames_BCTHW)]
        while (n := self._next_pass()) > 0:
            x_BCTHW, self.pending = self.pending[:, :, :n], self.pending[:, :, n:]
            out.append(self.vae._encode_pass(x_BCTHW, self.state))
            self.started = True
        return torch.cat(out, dim=2)

    def flush(self) -> None:
        """End the stream; ValueError if frames are left that do not complete a latent frame."""
        left = 0 if self.pending is None else self.pending.shape[2]
        if left:
            tc = self.vae.temporal_compression
            raise ValueError(f"{left} pixel frames left over: a video needs 1 + {tc}k frames")
        self.state = StreamState(mid_clip=self.state.mid_clip)
        self.started, self.pending = self.state.mid_clip, None


class StreamDecoder:
    """Decodes latents fed chunk by chunk (the first chunk starts at latent frame 0)."""

    def __init__(self, vae: CausalVideoVAE, latents_per_pass: PassSize = 1) -> None:
        _check_pass(latents_per_pass)
        self.vae = vae
        self.latents_per_pass = latents_per_pass
        self.state = StreamState()

    def feed(self, z_BCFHW: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, z_dim, F, h, w] -> the pixel frames they complete."""
        if z_BCFHW.dim() != 5 or z_BCFHW.shape[1] != self.vae.z_dim:
            raise ValueError(f"latents must be [B, {self.vae.z_dim}, F, h, w], got {tuple(z_BCFHW.shape)}")
        if z_BCFHW.shape[2] == 0:
            B, _, _, h, w = z_BCFHW.shape
            sc = self.vae.spatial_compression
            return z_BCFHW.new_zeros(B, 3, 0, h * sc, w * sc)
        step = self.vae._resolve_pass(self.latents_per_pass, z_BCFHW.shape, pixels=False) or z_BCFHW.shape[2]
        return torch.cat([self.vae._decode_pass(z, self.state) for z in z_BCFHW.split(step, dim=2)], dim=2)


def free_memory_bytes(device: torch.device | str) -> int:
    """Memory a new allocation may take on `device`: CUDA free + torch's cached-but-unused bytes;
    CPU: the kernel's MemAvailable (Linux), else the free physical pages."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
