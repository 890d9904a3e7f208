"""Teacher-forcing KV fake-quant: clean-history K/V exactly as the sampler's NVFP4 KV cache holds them.

The sampler stores each chunk's K/V [B, H, Lc, D] as `nvfp4.quantize_blocks(block,
group_dims=(0, 1))`: one amax per (batch, head, chunk), 16-element scale blocks along head_dim.
A chunk being denoised (noisy queries) sees the dequantized cache of earlier chunks plus its
own fresh K/V; the t=0 pass that writes chunk c sees the cache of chunks < c plus its OWN fresh
(unquantized) K/V. `KVFakeQuantHook` reproduces both inside one teacher-forced forward: keys are

    [fake-quantized clean K/V (clean tokens only) | the unquantized K/V of every token]

and the mask sends every history key (clean, chunk(k) < chunk(q)) to the first part and every
own-chunk key to the second, keeping the mask rule's window and sink restrictions untouched.

Chunks are grouped by token metadata, never by position, so any layout (a permutation) gives the
same numbers. The amax runs over tokens and head_dim only, per head: under Ulysses sequence
parallelism (all tokens, a shard of heads) it is unchanged by the head split.

The same hook serves the FP8 KV cache (`kv_format="fp8"`): e4m3 with one fp32 scale per
(batch, head, chunk) from the same grouped amax (`vidtrain.formats.fp8`, torch arithmetic on
every device), as `vidtrain.sample.kv_cache` stores kv_dtype "fp8".

NVFP4's block-scale rule (`scale_rule`, the recipe's `quant.kv_scale_rule`): "amax" or "mse" (per
16 elements the E4M3 scale of least squared error among 8 candidates, `nvfp4.mse_block_scales`),
as the sampler's `KVCache(scale_rule=)` writes; "mse" is the torch reference on every `backend`
(the search has no Triton kernel), so its bytes are the cache's on every device.

Legend: B batch, H heads, L tokens, Lc clean tokens, D head dim, N chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vidtrain.formats import fp8, kv2, nvfp4

# `vidtrain.kernels` backends, resolved (a recipe's quant.backend maps to one of them in
# vidtrain.quant.convert.BACKENDS; "interpret" runs the Triton kernels on CPU, for tests)
KERNEL_BACKENDS = ("torch", "triton", "interpret")
KV_FORMATS = ("nvfp4", "fp8", "kv2")


def fake_quantize_kv_grouped(
    x_BHLD: torch.Tensor,
    group_L: torch.Tensor,
    n_groups: int,
    backend: str = "torch",
    kv_format: str = "nvfp4",
    scale_rule: str = "amax",
) -> torch.Tensor:
    """Fake-quantize K or V with one amax per (batch, head, group) (no gradient; see STE below).

    `group_L[i]` in [0, n_groups) is the chunk of token i. Each token's codes and block scales
    depend only on its own 16 values and its group's amax, so this equals quantizing every
    chunk's tokens gathered as one block with `nvfp4.quantize_blocks(block, group_dims=(0, 1),
    scale_rule=scale_rule)` (the "mse" search is per 16-element block too).
    """
    if kv_format == "kv2":  # each group's tokens (in order) as one block, as the kv2 cache stores a chunk
        out = torch.empty_like(x_BHLD)
        group = group_L.to(x_BHLD.device)
        for g in range(n_groups):
            idx = torch.nonzero(group == g).squeeze(1)
            if idx.numel():
                out[:, :, idx] = kv2.fake_quantize(x_BHLD.detach().index_select(2, idx))
        return out
    b, h, length, _ = x_BHLD.shape
    a_BHL = x_BHLD.detach().abs().float().amax(dim=-1)
    g_BHL = group_L.to(x_BHLD.device).expand(b, h, length)
    amax_BHN = a_BHL.new_zeros(b, h, n_groups).scatter_reduce(2, g_BHL, a_BHL, "amax", include_self=False)
    amax_BHL1 = amax_BHN.gather(2, g_BHL).unsqueeze(-1)  # broadcasts against [B, H, L, D/16]
    if kv_format == "fp8":  # e4m3, one scale per (batch, head, group): the FP8 cache's bytes
        scale_BHL1 = fp8.scale_from_amax(amax_BHL1)
        return fp8.dequantize(fp8.cast(x_BHLD, scale_BHL1), scale_BHL1, x_BHLD.dtype)
    if backend == "torch" or scale_rule != "amax":
        q = nvfp4.quantize_with_amax(x_BHLD, amax_BHL1, scale_rule=scale_rule)
        return nvfp4.dequantize(q, x_BHLD.dtype)
    from vidtrain import kernels  # lazy: the compiled (Triton) kernels only off the torch path

    q = kernels.quantize_with_amax(x_BHLD, amax_BHL1, backend=backend)
    return kernels.dequantize(q, x_BHLD.dtype, backend=backend)


class _GroupedKVSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group_L, n_groups, backend, kv_format, scale_rule):
        return fake_quantize_kv_grouped(x, group_L, n_groups, backend, kv_format, scale_rule)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None, None


@dataclass
class _Plan:
    """Per-forward (shared by all layers): which tokens are clean, their chunk groups, the mask."""

    clean_idx: torch.Tensor  # [Lc] positions of clean tokens in the core's token order
    group: torch.Tensor  # [Lc] chunk group of each clean token, 0..n_groups-1
    n_groups: int
    mask: torch.Tensor  # [L, Lc + L]: history keys -> quantized part, own-chunk keys -> fresh part


def _make_plan(ctx) -> _Plan | None:
    mask = ctx.mask()
    if mask is None:  # full attention: there is no history to quantize
        return None
    meta = ctx.meta
    dev = mask.device
    noisy, chunk = meta.noisy.to(dev), meta.chunk.to(dev)
    clean_idx = torch.nonzero(~noisy).squeeze(1)
    _, group = torch.unique(chunk[clean_idx], return_inverse=True)
    history = mask & (chunk[None, :] < chunk[:, None]) & ~noisy[None, :]  # [L, L]
    ext = torch.cat([history[:, clean_idx], mask & ~history], dim=1)
    return _Plan(clean_idx, group, int(group.max()) + 1 if group.numel() else 0, ext)


class KVFakeQuantHook:
    """`AttentionContext.kv_hook` for teacher forcing (and the chunk-causal rule) with NVFP4 history.

    One instance per forward pass (the plan is built from the first layer's context and reused).
    `backend`: "torch" (emulation, any device), "triton" (CUDA) or "interpret" (Triton on CPU);
    `kv_format`: "nvfp4", "fp8" (the FP8 cache's e4m3 casts, torch arithmetic whatever `backend`)
    or "kv2" (the 2-bit cache's blocks: each chunk's clean tokens quantized together, torch);
    `scale_rule`: NVFP4's block-scale rule, "amax" or "mse" (as `KVCache(scale_rule=)`).
    """

    def __init__(self, backend: str = "torch", kv_format: str = "nvfp4", scale_rule: str = "amax") -> None:
        if backend not in KERNEL_BACKENDS:
            raise ValueError(
                f"unknown KV fake-quant backend {backend!r}; known: {', '.join(KERNEL_BACKENDS)}"
            )
        if kv_format not in KV_FORMATS:
            raise ValueError(f"unknown KV fake-quant format {kv_format!r}; known: {', '.join(KV_FORMATS)}")
        nvfp4.check_scale_rule(scale_rule)
        if scale_rule != "amax" and kv_format != "nvfp4":
            raise ValueError(f"KV scale rule {scale_rule!r} is NVFP4's; {kv_format} has no block scales")
        self.backend, self.kv_format, self.scale_rule = backend, kv_format, scale_rule
        self._ctx = None
        self._plan: _Plan | None = None

    def plan(self, ctx) -> _Plan | None:
        if self._ctx is not ctx:
            self._ctx, self._plan = ctx, _make_plan(ctx)
        return self._plan

    def __call__(self, layer_idx: int, q_BHLD, k_BHLD, v_BHLD, ctx):
        p = self.plan(ctx)
        if p is None or p.clean_idx.numel() == 0:
            return k_BHLD, v_BHLD, ctx.mask()
        idx = p.clean_idx.to(k_BHLD.device)

        def history(x_BHLD: torch.Tensor) -> torch.Tensor:
            x_BHLcD = x_BHLD.index_select(2, idx)
            return _GroupedKVSTE.apply(
                x_BHLcD, p.group, p.n_groups, self.backend, self.kv_format, self.scale_rule
            )

        k = torch.cat([history(k_BHLD), k_BHLD], dim=2)  # [B, H, Lc + L, D]
        v = torch.cat([history(v_BHLD), v_BHLD], dim=2)
        return k, v, p.mask
