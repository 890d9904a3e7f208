"""Attention for the Wan DiT: RoPE from token metadata, a swappable attention core, backends.

The model never knows about process groups. Sequence parallelism replaces each self-attention's
`core` module from outside (see vidtrain.parallel); the KV cache of the sampler and the KV
fake-quant of QAT enter through `AttentionContext.kv_hook`.

Legend: B batch, H heads, L tokens, D head dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vidtrain.tokens import MaskRule, TokenMeta, build_mask, flex_mask_mod

# (layer_idx, q, k, v, ctx) -> (k, v, mask): lets a KV cache prepend history or QAT fake-quantize.
KVHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, "AttentionContext"], tuple]


@dataclass
class AttentionContext:
    """What self-attention needs beyond q/k/v: the mask rule over the *global* token order.

    `meta` describes the whole sequence in the order the attention core sees it (after a
    sequence-parallel gather this is the concatenation of all ranks' local tokens).
    `plans` holds per-forward plans of the cores' wrappers, built by the first layer and shared
    by all (ring attention's query schedule under "ring"); a new context starts empty.
    """

    rule: MaskRule = field(default_factory=MaskRule)
    meta: TokenMeta | None = None
    kv_hook: KVHook | None = None
    plans: dict[str, object] = field(default_factory=dict)
    _mask: torch.Tensor | None = None
    _mask_built: bool = False
    _block_mask: object = None

    def mask(self) -> torch.Tensor | None:
        """Dense [L, L] boolean mask, built once per forward and shared by all layers."""
        if not self._mask_built:
            if self.rule.kind != "full" and self.meta is None:
                raise ValueError(f"mask rule {self.rule.kind!r} needs token metadata")
            self._mask = None if self.rule.kind == "full" else build_mask(self.rule, self.meta, self.meta)
            self._mask_built = True
        return self._mask

    def block_mask(self, device: torch.device):
        """FlexAttention block mask from metadata (no dense [L, L] tensor), built once per forward."""
        if self._block_mask is None:
            from torch.nn.attention.flex_attention import create_block_mask

            meta = self.meta.to(device)
            n = len(meta)
            mod = flex_mask_mod(self.rule, meta, meta)
            # compiled on GPU: the mask_mod is evaluated block by block, never as a dense [L, L]
            compiled = torch.device(device).type == "cuda"
            self._block_mask = create_block_mask(mod, None, None, n, n, device=str(device), _compile=compiled)
        return self._block_mask


_compiled_flex = None


def flex_attention(q_BHLD, k_BHLD, v_BHLD, block_mask):
    """FlexAttention; compiled on GPU (fused kernel), eager elsewhere (forward only on CPU)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention as flex

    if q_BHLD.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex, dynamic=False)
        return _compiled_flex(q_BHLD, k_BHLD, v_BHLD, block_mask=block_mask)
    return flex(q_BHLD, k_BHLD, v_BHLD, block_mask=block_mask)


def _flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def sdpa(q_BHLD: torch.Tensor, k_BHLD: torch.Tensor, v_BHLD: torch.Tensor, mask: torch.Tensor | None):
    """Scaled dot-product attention with an optional boolean mask [Lq, Lk] (True = attend)."""
    if mask is not None:
        mask = mask.to(q_BHLD.device)
    return F.scaled_dot_product_attention(q_BHLD, k_BHLD, v_BHLD, attn_mask=mask)


class AttentionCore(nn.Module):
    """Local attention over whatever q/k/v it is given. Parallel strategies wrap or replace it."""

    def __init__(self, backend: str = "auto") -> None:
        super().__init__()
        if backend not in ("auto", "sdpa", "flash", "flex"):
            raise ValueError(f"unknown attention backend {backend!r}; known: auto, flash, flex, sdpa")
        self.backend = backend
        self.layer_idx = -1

    def forward(self, q_BHLD, k_BHLD, v_BHLD, ctx: AttentionContext) -> torch.Tensor:
        """auto: flash-attn for full attention on GPU when installed; FlexAttention block masks
        for masked attention on GPU (memory stays linear in length); dense SDPA masks on CPU
        (FlexAttention has no backward on CPU)."""
        use_flex = self.backend == "flex" or (self.backend == "auto" and q_BHLD.is_cuda)
        if use_flex and ctx.kv_hook is None and ctx.rule.kind != "full":
            return flex_attention(q_BHLD, k_BHLD, v_BHLD, ctx.block_mask(q_BHLD.device))
        mask = ctx.mask()
        if ctx.kv_hook is not None:
            k_BHLD, v_BHLD, mask = ctx.kv_hook(self.layer_idx, q_BHLD, k_BHLD, v_BHLD, ctx)
        use_flash = self.backend == "flash" or (self.backend == "auto" and _flash_attn_available())
        if use_flash and mask is None and q_BHLD.dtype in (torch.float16, torch.bfloat16):
            from flash_attn import flash_attn_func

            out = flash_attn_func(q_BHLD.transpose(1, 2), k_BHLD.transpose(1, 2), v_BHLD.transpose(1, 2))
            return out.transpose(1, 2)
        return sdpa(q_BHLD, k_BHLD, v_BHLD, mask)


# --------------------------------------------------------------------------------------------
# 3D RoPE (Wan): head dim split into temporal / row / column parts, pairs interleaved.


def rope_dims(head_dim: int) -> tuple[int, int, int]:
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_cos_sin(meta: TokenMeta, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [L, head_dim/2] for each token from its (frame + offset, row, column)."""
    angles = []
    for pos, dim in zip((meta.rope_frame, meta.h, meta.w), rope_dims(head_dim)):
        inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)
        angles.append(pos.to(torch.float64)[:, None] * inv[None, :])
    ang = torch.cat(angles, dim=1)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x_BHLD: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    cos, sin = cos_sin
    x = x_BHLD.float().unflatten(-1, (-1, 2))
    x1, x2 = x[..., 0], x[..., 1]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).type_as(x_BHLD)


class SelfAttention(nn.Module):
    """Wan self-attention: q/k RMSNorm across heads, 3D RoPE, metadata-driven mask."""

    def __init__(self, dim: int, num_heads: int, eps: float, backend: str = "auto") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.core = AttentionCore(backend)

    def forward(self, x_BLD, rope, ctx: AttentionContext) -> torch.Tensor:
        heads = lambda t: t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # noqa: E731
        q_BHLD = apply_rope(heads(self.norm_q(self.q(x_BLD))), rope)
        k_BHLD = apply_rope(heads(self.norm_k(self.k(x_BLD))), rope)
        v_BHLD = heads(self.v(x_BLD))
        # CUDA bf16 autocast runs rms_norm in fp32 (and RoPE keeps its input's dtype), so q/k
        # would reach the core as fp32 beside a bf16 v: FlexAttention rejects mixed dtypes and
        # SDPA would run QK^T in fp32. One dtype, v's (the linear's autocast dtype); `.to` is a
        # no-op (the same tensor) when the dtypes already agree, as in fp32 on CPU.
        q_BHLD, k_BHLD = q_BHLD.to(v_BHLD.dtype), k_BHLD.to(v_BHLD.dtype)
        out_BHLD = self.core(q_BHLD, k_BHLD, v_BHLD, ctx)
        return self.o(out_BHLD.transpose(1, 2).flatten(2))


class CrossAttention(nn.Module):
    """Queries from video tokens, keys/values from text; no positions, no mask but padding."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)

    def _heads(self, t_BLD: torch.Tensor) -> torch.Tensor:
        return t_BLD.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # [B, H, L, D]

    def kv(self, ctx_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H, S, D] of the text: fixed per prompt, so a sampler may cache them."""
        return self._heads(self.norm_k(self.k(ctx_BSD))), self._heads(self.v(ctx_BSD))

    def forward(self, x_BLD, ctx_BSD, ctx_mask_BS: torch.Tensor | None = None, kv: tuple | None = None):
        """`kv`: this layer's `self.kv(ctx_BSD)` computed beforehand (then `ctx_BSD` is unused)."""
        q = self._heads(self.norm_q(self.q(x_BLD)))
        k, v = kv if kv is not None else self.kv(ctx_BSD)
        mask = None if ctx_mask_BS is None else ctx_mask_BS[:, None, None, :].bool()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(out.transpose(1, 2).flatten(2))
