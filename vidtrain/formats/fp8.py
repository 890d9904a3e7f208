"""FP8 (E4M3 / E5M2) scaled casts: reference arithmetic in torch, the oracle for every FP8 path.

One scaled cast, as torchao's float8 training computes it (its documented recipes, the numbers
checked against `torchao.float8` in tests/test_fp8.py):

    amax  = max|x| over the scaling group (the whole tensor, or one row / column)
    scale = fp32(F8_MAX / max(fp64(amax), 1e-12))            F8_MAX: 448 (e4m3), 57344 (e5m2)
            rowwise recipe: rounded down to a power of two (exact to invert)
    q     = f8_rne(clamp(fp32(x) * scale, +-F8_MAX))          the stored byte
    x_hat = fp32(q) / scale

A GEMM of two scaled casts is `(q_a @ q_b) / (scale_a * scale_b)` with the product accumulated in
fp32 (`torch._scaled_mm`: FP8 tensor cores on Hopper / Ada, a CPU kernel in torch >= 2.13).

Recipes (torchao's `Float8LinearRecipeName` names) for y = x @ W^T and its two backward GEMMs:
    tensorwise  one scale per tensor; x, W in e4m3, the output gradient dY in e5m2
    rowwise     one scale per row of every GEMM operand along that GEMM's reduction dim (x per
                token, W per output row in the forward; dY per row and W per column for dX;
                dY and x per column, i.e. over tokens, for dW), all e4m3, power-of-two scales

KV blocks (the FP8 KV cache): one scale per (batch, head, chunk block) over tokens and head_dim,
e4m3, not rounded: 1 byte per element plus 4 bytes per (batch, head) of a block.

Non-finite input (tested): an inf makes its group's amax inf and scale 0, a NaN makes them NaN;
either way every element of that group dequantizes to NaN (0/0, NaN), never to a silent number.
An all-zero group has scale 448 / 1e-12 and dequantizes to zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
E4M3_MAX = 448.0
E5M2_MAX = 57344.0
EPS = 1e-12
RECIPES = ("tensorwise", "rowwise")
BYTES_PER_ELEMENT = 1.0  # codes; scales add 4 bytes per scaling group


def f8_max(dtype: torch.dtype) -> float:
    if dtype not in (E4M3, E5M2):
        raise ValueError(f"not an FP8 dtype: {dtype}")
    return E4M3_MAX if dtype == E4M3 else E5M2_MAX


def check_recipe(recipe: str) -> str:
    if recipe not in RECIPES:
        raise ValueError(f"unknown FP8 recipe {recipe!r}; known: {', '.join(RECIPES)}")
    return recipe


def pow2_floor(scale: torch.Tensor) -> torch.Tensor:
    """The largest power of two <= scale (fp32, positive finite scales; inf / 0 stay)."""
    m, e = torch.frexp(scale)  # scale = m * 2^e with m in [0.5, 1)
    return torch.where(torch.isfinite(scale) & (scale > 0), torch.ldexp(torch.ones_like(m), e - 1), scale)


def scale_from_amax(amax: torch.Tensor, dtype: torch.dtype = E4M3, pow2: bool = False) -> torch.Tensor:
    """fp32 scale that maps `amax` onto the format's largest finite value."""
    s = (f8_max(dtype) / torch.clamp(amax.double(), min=EPS)).float()
    return pow2_floor(s) if pow2 else s


def amax(x: torch.Tensor, dims: int | Sequence[int] | None = None) -> torch.Tensor:
    """max|x| over `dims` (None: the whole tensor, 0-dim), keepdim."""
    if dims is None:
        return x.detach().abs().amax()
    return x.detach().abs().amax(dim=dims, keepdim=True)


def cast(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = E4M3) -> torch.Tensor:
    """The stored bytes: f8_rne(clamp(fp32(x) * scale, +-max))."""
    m = f8_max(dtype)
    return (x.float() * scale).clamp(-m, m).to(dtype)


def quantize(
    x: torch.Tensor, dims: int | Sequence[int] | None = None, dtype: torch.dtype = E4M3, pow2: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, fp32 scale) of `x`, one scale per group reduced over `dims` (None: per tensor)."""
    s = scale_from_amax(amax(x, dims), dtype, pow2)
    return cast(x, s, dtype), s


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() / scale).to(dtype)


def fake_quantize(
    x: torch.Tensor, dims: int | Sequence[int] | None = None, dtype: torch.dtype = E4M3, pow2: bool = False
) -> torch.Tensor:
    """quantize -> dequantize, in x's dtype."""
    q, s = quantize(x, dims, dtype, pow2)
    return dequantize(q, s, x.dtype)


def recipe_cast(x: torch.Tensor, recipe: str, reduce_dim: int, grad: bool = False):
    """(codes, scale) of one GEMM operand under `recipe`; `reduce_dim` is the GEMM's reduction
    dim in `x` (rowwise scales are taken along it); `grad` marks the output gradient (e5m2 under
    tensorwise)."""
    check_recipe(recipe)
    if recipe == "tensorwise":
        return quantize(x, None, E5M2 if grad else E4M3)
    return quantize(x, reduce_dim, E4M3, pow2=True)


def scaled_matmul(qa, sa, qb, sb, out_dtype: torch.dtype, acc: torch.dtype = torch.float32) -> torch.Tensor:
    """(qa @ qb) / (sa * sb) for 2D codes qa [M, K] (scale [1, 1] / [] or [M, 1]) and qb [K, N]
    (scale [] or [1, N]); the product accumulated in `acc` (float64 for references)."""
    out = (qa.to(acc) @ qb.to(acc)) / (sa.to(acc) * sb.to(acc))
    return out.to(out_dtype)
