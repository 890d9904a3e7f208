"""CausalWanDiT: the Wan2.1 text-to-video DiT (and Wan2.2-TI2V-5B), driven by token metadata.

Parameter names follow the original Wan checkpoints (Wan2.1 and Wan2.2 name them alike), so their
state dicts load as is; diffusers' layout is mapped in `state_dict.py`.

With no metadata the model is Wan exactly (bidirectional attention over one clip). Wan2.2 TI2V's
per-token timesteps (the clean first frame's tokens at 0) are the per-frame [B, F] or per-token
[B, L] `timestep` of `forward`: time embedding and AdaLN modulation per token, as Wan2.2 computes.
`forward_tokens` takes any token sequence (clean and noisy copies, a rank's slice, a chunk plus
its KV cache) with per-token timesteps and metadata; masks follow from the metadata.

Legend: B batch, C latent channels, F latent frames, H/W latent height/width, L tokens,
P patch vector (C*1*2*2), D model dim, S text tokens, T text dim, U unique timesteps,
G runs of tokens sharing a timestep (frames).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vidtrain.config import FRAMES_PER_CHUNK, QAT_EXCLUDE
from vidtrain.models.wan.attention import AttentionContext, CrossAttention, SelfAttention, rope_cos_sin
from vidtrain.models.wan.config import WanConfig, flavor
from vidtrain.models.wan.state_dict import load_pretrained
from vidtrain.tokens import MaskRule, TokenMeta, grid_meta, patchify, unpatchify


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's timestep embedding: [cos | sin] of t * 10000^(-i/half), computed in float64."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.to(torch.float64)[:, None] * freqs[None, :]
    return torch.cat([args.cos(), args.sin()], dim=1).float()


class LayerNormFP32(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


class WanBlock(nn.Module):
    def __init__(self, cfg: WanConfig, backend: str = "auto") -> None:
        super().__init__()
        d = cfg.dim
        self.norm1 = LayerNormFP32(d, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(d, cfg.num_heads, cfg.eps, backend)
        self.norm3 = LayerNormFP32(d, eps=cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(d, cfg.num_heads, cfg.eps)
        self.norm2 = LayerNormFP32(d, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)

    def forward(self, x_BLD, e_U6D, inv_BG, ctx_BSD, ctx_mask, rope, attn: AttentionContext, cross_kv=None):
        """`inv_BG`: timestep index of each run of L/G consecutive tokens (`timestep_runs`)."""
        b, seq_len, d = x_BLD.shape
        groups = inv_BG.shape[1]

        def runs(t: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, G, L/G, D]
            return t.reshape(b, groups, seq_len // groups, d)

        # one modulation row per run, broadcast over its tokens: [B, G, 1, D] each, never [B, L, 6, D]
        mod = (self.modulation.float() + e_U6D.float())[inv_BG][:, :, None]
        shift, scale, gate, c_shift, c_scale, c_gate = mod.unbind(3)
        # 1. self-attention with AdaLN modulation
        h = (runs(self.norm1(x_BLD)) * (1 + scale) + shift).reshape(b, seq_len, d).type_as(x_BLD)
        y = runs(x_BLD.float()) + runs(self.self_attn(h, rope, attn).float()) * gate
        x_BLD = y.reshape(b, seq_len, d).type_as(x_BLD)
        # 2. cross-attention to text
        x_BLD = x_BLD + self.cross_attn(self.norm3(x_BLD).type_as(x_BLD), ctx_BSD, ctx_mask, cross_kv)
        # 3. feed-forward with AdaLN modulation
        h = (runs(self.norm2(x_BLD)) * (1 + c_scale) + c_shift).reshape(b, seq_len, d).type_as(x_BLD)
        y = runs(x_BLD.float()) + runs(self.ffn(h).float()) * c_gate
        return y.reshape(b, seq_len, d).type_as(x_BLD)


class Head(nn.Module):
    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        self.norm = LayerNormFP32(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x_BLD, e_UD, inv_BG):
        b, seq_len, d = x_BLD.shape
        groups = inv_BG.shape[1]
        shift, scale = (self.modulation.float() + e_UD.float()[:, None, :])[inv_BG][:, :, None].unbind(3)
        h = self.norm(x_BLD).reshape(b, groups, seq_len // groups, d) * (1 + scale) + shift
        return self.head(h.reshape(b, seq_len, d).type_as(x_BLD))


class CausalWanDiT(nn.Module):
    """Wan DiT whose attention follows token metadata (full, chunk-causal, teacher forcing)."""

    # seams, declared as data (vidtrain/models/seams.py): vidtrain.parallel reads these
    _attention_modules = ("SelfAttention",)  # `core` wrapped by sequence parallelism; `num_heads`
    _shard_units = ("WanBlock",)  # FSDP2 shards each block, then the root
    _supports_gradient_checkpointing = True  # `gradient_checkpointing`: recompute blocks in backward
    _quant_exclude = QAT_EXCLUDE  # high precision under NVFP4: embeddings, time layers, head

    def __init__(self, cfg: WanConfig, attn_backend: str = "auto") -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(
            cfg.in_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(WanBlock(cfg, attn_backend) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        for i, block in enumerate(self.blocks):
            block.self_attn.core.layer_idx = i
        self.gradient_checkpointing = False

    @classmethod
    def from_flavor(cls, name: str, attn_backend: str = "auto", **overrides) -> CausalWanDiT:
        return cls(flavor(name).replace(**overrides), attn_backend)

    @classmethod
    def from_pretrained(
        cls, path: str, attn_backend: str = "auto", flavor: str | None = None
    ) -> CausalWanDiT:
        """Load Wan2.1 / Wan2.2 weights: original Wan layout, diffusers folder, or a vidtrain
        checkpoint. With `flavor`, a checkpoint whose configuration differs from the flavor's is
        refused in one line naming the fields that differ."""
        return load_pretrained(cls, path, attn_backend, flavor)

    # ---- patches <-> latents (vidtrain.tokens) ----------------------------------------------------
    patchify = staticmethod(patchify)
    unpatchify = staticmethod(unpatchify)

    # ---- conditioning --------------------------------------------------------------------------
    def embed_time(self, t_BL: torch.Tensor):
        """Embeddings of the distinct timesteps only, and the timestep index of each run of
        tokens that share one (`timestep_runs`: a frame's tokens), [B, G]."""
        uniq, inv_BL = torch.unique(t_BL.float(), return_inverse=True)
        e_UD = self.time_embedding(sinusoidal_embedding(uniq, self.cfg.freq_dim).to(self.dtype))
        e_U6D = self.time_projection(e_UD).unflatten(1, (6, self.cfg.dim))
        return e_UD, e_U6D, inv_BL[:, :: timestep_runs(inv_BL)]

    def embed_text(self, context_BST: torch.Tensor) -> torch.Tensor:
        if context_BST.ndim != 3 or context_BST.shape[-1] != self.cfg.text_dim:
            raise ValueError(
                f"text context must be [B, S, {self.cfg.text_dim}], got {list(context_BST.shape)}"
            )
        return self.text_embedding(context_BST.to(self.dtype))

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    # ---- forward -------------------------------------------------------------------------------
    def forward_tokens(
        self,
        x_BLP: torch.Tensor,
        t_BL: torch.Tensor,
        meta: TokenMeta,
        context_BST: torch.Tensor,
        attn: AttentionContext | None = None,
        context_mask_BS: torch.Tensor | None = None,
        context_BSD: torch.Tensor | None = None,
        cross_kv: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Prediction [B, L, P] for a token sequence of patch vectors with per-token timesteps.

        `meta` describes these (local) tokens: RoPE comes from it. `attn` carries the mask rule
        over the global token order (equal to `meta` unless a parallel strategy gathers the
        sequence). `context_BSD` may hold an already embedded text context (cached per prompt), and
        `cross_kv` each block's cross-attention K/V of it (`block.cross_attn.kv`, cached per prompt).
        """
        if x_BLP.shape[1] == 0:
            raise ValueError("the token sequence is empty: nothing to predict")
        attn = attn if attn is not None else AttentionContext(meta=meta)
        w = self.patch_embedding.weight.flatten(1)  # the (1,2,2) conv is a linear on patch vectors
        x_BLD = F.linear(x_BLP.to(w.dtype), w, self.patch_embedding.bias)
        e_UD, e_U6D, inv_BG = self.embed_time(t_BL)
        if cross_kv is not None and len(cross_kv) != len(self.blocks):
            raise ValueError(f"cross_kv holds {len(cross_kv)} layers, the model has {len(self.blocks)}")
        ctx_BSD = (
            context_BSD if context_BSD is not None or cross_kv is not None else self.embed_text(context_BST)
        )
        rope = tuple(
            r.to(x_BLD.device)[None, None] for r in rope_cos_sin(meta, self.cfg.head_dim, self.cfg.rope_theta)
        )
        for i, block in enumerate(self.blocks):
            args = (
                x_BLD,
                e_U6D,
                inv_BG,
                ctx_BSD,
                context_mask_BS,
                rope,
                attn,
                None if cross_kv is None else cross_kv[i],
            )
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x_BLD = checkpoint(block, *args, use_reentrant=False)
            else:
                x_BLD = block(*args)
        return self.head(x_BLD, e_UD, inv_BG)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context_BST: torch.Tensor,
        *,
        rule: MaskRule | None = None,
        frames_per_chunk: int = FRAMES_PER_CHUNK,
        context_mask_BS: torch.Tensor | None = None,
        meta: TokenMeta | None = None,
        attn: AttentionContext | None = None,
        context_BSD: torch.Tensor | None = None,
        cross_kv: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Prediction shaped like x.

        Latent mode: x is [B, C, F, H, W] and `timestep` is [B], per-frame [B, F] or per-token
        [B, F*H/2*W/2] (tokens in (frame, row, column) order, as diffusers' Wan2.2 TI2V passes
        them). Without `rule` the attention is full (bidirectional), exactly as Wan; pass
        `MaskRule("causal", frames_per_chunk)` for chunk-causal attention over one copy.

        Token mode: x is patch vectors [B, L, P] with per-token timesteps [B, L], `meta` and
        `attn` (see `forward_tokens`); strategies that wrap the model call this mode.
        """
        if x.ndim == 3:
            if meta is None:
                raise ValueError("token input [B, L, P] needs `meta` (token metadata)")
            return self.forward_tokens(
                x, timestep, meta, context_BST, attn, context_mask_BS, context_BSD, cross_kv
            )
        if x.ndim != 5 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"latents must be [B, {self.cfg.in_channels}, F, H, W], got {list(x.shape)}")
        b, _, f, h, w = x.shape
        meta = grid_meta(f, h // 2, w // 2, frames_per_chunk, device=x.device)
        t_BL = expand_timesteps(timestep, b, f, (h // 2) * (w // 2))
        attn = AttentionContext(rule=rule or MaskRule("full"), meta=meta)
        out_BLP = self.forward_tokens(
            self.patchify(x), t_BL, meta, context_BST, attn, context_mask_BS, context_BSD, cross_kv
        )
        return self.unpatchify(out_BLP, f, h, w)


def timestep_runs(inv_BL: torch.Tensor) -> int:
    """Length R of the runs of consecutive tokens that share one timestep in every batch row
    (R divides L; 1 when timesteps vary token by token). Tokens of a frame share its timestep, so
    AdaLN modulation is gathered once per run and broadcast over its R tokens: [B, L/R, 6, D]
    instead of [B, L, 6, D] fp32 per block (at 480x832, R = 1,560 tokens per frame)."""
    seq_len = inv_BL.shape[1]
    starts = torch.nonzero((inv_BL[:, 1:] != inv_BL[:, :-1]).any(0)).squeeze(1) + 1
    r = seq_len
    for s in starts.tolist():
        r = math.gcd(r, s)
        if r == 1:
            break
    return max(r, 1)


def expand_timesteps(timestep: torch.Tensor, b: int, f: int, tokens_per_frame: int) -> torch.Tensor:
    """[B], [B, F] or per-token [B, F*tokens_per_frame] timesteps -> per-token [B, F*tokens_per_frame]
    (with one token per frame the last two are the same shape and mean the same)."""
    t = torch.as_tensor(timestep)
    if t.ndim == 0:
        t = t.expand(b)
    if t.ndim == 1:
        if t.shape[0] != b:
            raise ValueError(f"timestep has {t.shape[0]} entries for a batch of {b}")
        t = t[:, None].expand(b, f)
    if t.shape == (b, f):
        return t.repeat_interleave(tokens_per_frame, dim=1)
    if t.shape == (b, f * tokens_per_frame):
        return t
    raise ValueError(
        f"timestep must be [B], [B, F] or [B, L] = [{b}], [{b}, {f}] or [{b}, {f * tokens_per_frame}], "
        f"got {list(t.shape)}"
    )
