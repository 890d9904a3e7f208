"""NVFP4 quantize / dequantize / fused KV dequantize with one dispatcher over three backends.

backend = "auto"      Triton on CUDA tensors (when triton imports), the torch reference elsewhere
          "torch"     `vidtrain.formats.nvfp4` (any device; the oracle)
          "triton"    compiled Triton kernels (CUDA tensors)
          "interpret" the same kernels under the Triton interpreter (CPU tensors; tests)

All backends produce the same bytes (tests/test_kernels.py checks the interpreter against the
reference; the GPU test checks compiled Triton).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from vidtrain.formats import nvfp4 as ref
from vidtrain.formats.nvfp4 import NVFP4Tensor

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton is a dev/gpu extra
    HAVE_TRITON = False

BACKENDS = ("auto", "torch", "triton", "interpret")
BLOCK_R = 64  # scale blocks (rows of 16) per program


def resolve_backend(backend: str, device: torch.device) -> str:
    """Pick the concrete backend; unknown names and impossible choices are ValueErrors."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown NVFP4 backend {backend!r}; known: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and HAVE_TRITON else "torch"
    if backend in ("triton", "interpret") and not HAVE_TRITON:
        raise ValueError(f"NVFP4 backend {backend!r} needs triton installed")
    if backend == "triton" and device.type != "cuda":
        raise ValueError("NVFP4 backend 'triton' needs CUDA tensors; use 'interpret' on CPU")
    if backend == "interpret" and device.type != "cpu":
        raise ValueError("NVFP4 backend 'interpret' runs on CPU tensors")
    return backend


def _launch(backend: str, name: str, n_rows: int, *args, **meta) -> None:
    from vidtrain.kernels.nvfp4_triton import get_kernels  # lazy: triton is optional (a gpu/dev extra)

    kernel = getattr(get_kernels(backend == "interpret"), name)
    grid = (max(1, math.ceil(n_rows / BLOCK_R)),)
    if backend == "interpret":  # numpy warns on the chain's intended inf / 0 / NaN steps
        with np.errstate(all="ignore"):
            kernel[grid](*args, **meta, BLOCK_R=BLOCK_R)
    else:
        kernel[grid](*args, **meta, BLOCK_R=BLOCK_R)


def _flat_amax(amax: torch.Tensor, scale_shape: torch.Size) -> tuple[torch.Tensor, int]:
    """amax broadcastable to `scale_shape` -> (flat fp32 amax, scale blocks per amax entry).

    When the grouped dims are a leading prefix (per tensor, per batch, per stacked block) the
    blocks of one group are consecutive and the amax stays small; otherwise it is expanded.
    """
    amax = amax.float()
    shape = (1,) * (len(scale_shape) - amax.ndim) + tuple(amax.shape)
    p = max((i + 1 for i, s in enumerate(shape) if s != 1), default=0)
    n_rows = math.prod(scale_shape)
    if all(s == 1 for s in shape[p:]) and tuple(shape[:p]) == tuple(scale_shape[:p]):
        flat = amax.reshape(-1).contiguous()
        return flat, max(1, n_rows // max(1, flat.numel()))
    return amax.expand(scale_shape).contiguous().reshape(-1), 1


def quantize_with_amax(
    x: torch.Tensor,
    amax: torch.Tensor,
    tile_2d: bool = False,
    backend: str = "auto",
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> NVFP4Tensor:
    """NVFP4 with a given amax (broadcastable to the scale shape [..., K/16]).

    `out`: preallocated (packed codes uint8 [..., K/2], E4M3 scales as uint8 [..., K/16]) to
    write into, e.g. a KV cache slot: the Triton kernel writes there and allocates no output;
    the torch reference computes its chain and copies the result in (the same bytes either
    way). The returned tensor views `out`."""
    be = resolve_backend(backend, x.device)
    ref.check_last_dim(x)
    scale_shape = (*x.shape[:-1], x.shape[-1] // ref.BLOCK)
    if out is not None:
        data, scales = out
        want = [((*x.shape[:-1], x.shape[-1] // 2), data), (scale_shape, scales)]
        for shape, t in want:
            if tuple(t.shape) != tuple(shape) or t.dtype != torch.uint8 or t.device != x.device:
                raise ValueError(
                    f"quantize_with_amax out: need uint8 {tuple(shape)} on {x.device}, "
                    f"got {t.dtype} {tuple(t.shape)} on {t.device}"
                )
            if not t.is_contiguous():
                raise ValueError("quantize_with_amax out: the output tensors must be contiguous")
    if be == "torch":
        q = ref.quantize_with_amax(x, amax, tile_2d)
        if out is None:
            return q
        data.copy_(q.data)
        scales.copy_(q.scales.view(torch.uint8))
        return NVFP4Tensor(data, scales.view(torch.float8_e4m3fn), q.amax, x.shape, x.dtype, tile_2d)
    xc = x.detach().contiguous()
    n_rows = math.prod(scale_shape)
    if out is None:
        data = torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=torch.uint8, device=x.device)
        scales = torch.empty(scale_shape, dtype=torch.uint8, device=x.device)
    flat, per = _flat_amax(amax, torch.Size(scale_shape))
    # 16x16 tiles: the tile amax (an exact max) comes from torch, the rest from the kernel
    bamax = ref.tile_amax_2d(xc.float()).contiguous() if tile_2d else flat
    if n_rows:
        _launch(be, "quantize", n_rows, xc, flat, bamax, data, scales, n_rows, per, HAS_BLOCK_AMAX=tile_2d)
    return NVFP4Tensor(data, scales.view(torch.float8_e4m3fn), amax.float(), x.shape, x.dtype, tile_2d)


def abs_amax(x: torch.Tensor, group_dims: Sequence[int] | None = None) -> torch.Tensor:
    """fp32 max|x| per tensor (`group_dims` None) or per index of `group_dims` (keepdim, as
    `vidtrain.formats.nvfp4.group_amax`), with the same bits as `x.abs().float().amax(...)`.

    One read of x (`torch.aminmax`, max|x| = max(max, -min)) instead of abs's full temporary, its
    fp32 copy and a read of that: the amax pass is a third of a bf16 quantize's traffic and was
    the larger part of it. Groups that are not a leading prefix (reduced dims not a contiguous
    trailing block) fall back to the reference. `+ 0.0` turns a -0.0 max (all-zero input) into
    +0.0, as abs gives; NaN propagates.
    """
    xd = x.detach()
    if xd.numel() == 0 or not xd.is_floating_point():
        return ref.group_amax(xd, group_dims) if group_dims is not None else xd.abs().amax().float()
    if group_dims is None:
        lo, hi = torch.aminmax(xd)
        return torch.maximum(hi, -lo).float() + 0.0
    keep = sorted({d % xd.ndim for d in group_dims})
    k = len(keep)
    if keep != list(range(k)) or k == xd.ndim or not xd.is_contiguous():
        return ref.group_amax(xd, group_dims)
    lo, hi = torch.aminmax(xd.reshape(*xd.shape[:k], -1), dim=-1)
    return (torch.maximum(hi, -lo).float() + 0.0).reshape(*xd.shape[:k], *(1,) * (xd.ndim - k))


def quantize(x: torch.Tensor, tile_2d: bool = False, backend: str = "auto") -> NVFP4Tensor:
    """Per-tensor amax NVFP4 (see `vidtrain.formats.nvfp4.quantize`)."""
    ref.check_last_dim(x)
    return quantize_with_amax(x, abs_amax(x), tile_2d, backend)


def quantize_blocks(x: torch.Tensor, group_dims: Sequence[int] = (0,), backend: str = "auto") -> NVFP4Tensor:
    """Per-group amax NVFP4 for KV blocks (see `vidtrain.formats.nvfp4.quantize_blocks`)."""
    ref.check_last_dim(x)
    if x.ndim - 1 in {d % x.ndim for d in group_dims}:
        raise ValueError("group_dims may not include the last (blocked) dim")
    return quantize_with_amax(x, abs_amax(x, group_dims), False, backend)


def dequantize(q: NVFP4Tensor, dtype: torch.dtype = torch.float32, backend: str = "auto") -> torch.Tensor:
    """NVFP4 -> `dtype` (fp32 math, one rounding to `dtype` at the end)."""
    be = resolve_backend(backend, q.device)
    if be == "torch":
        return ref.dequantize(q, dtype)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"NVFP4 dequantize writes float32, bfloat16 or float16, not {dtype}")
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    n_rows = q.scales.numel()
    flat, per = _flat_amax(q.amax, q.scales.shape)
    if n_rows:
        _launch(
            be,
            "dequantize",
            n_rows,
            q.data.contiguous(),
            q.scales.contiguous().view(torch.uint8),
            flat,
            out.view(torch.int16) if dtype == torch.bfloat16 else out,
            n_rows,
            per,
            OUT_BF16=dtype == torch.bfloat16,
        )
    return out


def stack_blocks(blocks: Sequence[NVFP4Tensor]) -> NVFP4Tensor:
    """Stack same-shape NVFP4 blocks along a new leading dim (copies the compressed bytes).

    A KV cache that keeps its blocks in one stacked buffer skips this copy.
    """
    if not blocks:
        raise ValueError("no NVFP4 blocks to stack")
    first = blocks[0]
    if any(b.shape != first.shape for b in blocks):
        raise ValueError("fused KV dequant needs blocks of one shape; group them by shape")
    nd = len(first.shape)

    def _amax(b: NVFP4Tensor) -> torch.Tensor:
        a = b.amax.float()
        return a.reshape((1,) * (nd - a.ndim) + tuple(a.shape))

    return NVFP4Tensor(
        torch.stack([b.data for b in blocks]),
        torch.stack([b.scales.view(torch.uint8) for b in blocks]).view(torch.float8_e4m3fn),
        torch.stack([_amax(b) for b in blocks]),
        torch.Size((len(blocks), *first.shape)),
        first.dtype,
    )


def dequantize_kv_blocks(
    blocks: NVFP4Tensor | Sequence[NVFP4Tensor],
    dtype: torch.dtype = torch.bfloat16,
    backend: str = "auto",
) -> torch.Tensor:
    """Dequantize many KV blocks (e.g. every layer's cached chunks) in one kernel launch.

    `blocks` is a stacked NVFP4Tensor (leading dim = block index, amax per block) or a list of
    same-shape blocks; returns [n_blocks, *block_shape] in `dtype`.
    """
    q = blocks if isinstance(blocks, NVFP4Tensor) else stack_blocks(blocks)
    return dequantize(q, dtype, backend)
