"""q/k reach the attention core in v's dtype (CUDA bf16 autocast keeps rms_norm in fp32).

CPU: the cast is a no-op in fp32 (bit-identical to the uncast computation), and with a norm that
returns fp32 beside a bf16 v (what CUDA autocast does) the core sees one dtype. GPU (marked):
FlexAttention equals dense SDPA under bf16 autocast for the teacher-forcing mask, forward and
backward, on a model with the 1.3B flavor's head dim.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vidtrain.models.wan.attention import AttentionContext, SelfAttention, apply_rope, rope_cos_sin
from vidtrain.tokens import MaskRule, TokenMeta, grid_meta


def _meta(frames: int = 6, h: int = 2, w: int = 2, fpc: int = 3) -> TokenMeta:
    return TokenMeta.cat([grid_meta(frames, h, w, fpc, noisy=n) for n in (False, True)])


class _SpyCore(torch.nn.Module):
    """Records the dtypes it is given; attends with dense SDPA like the default CPU core."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.dtype, ...]] = []

    def forward(self, q, k, v, ctx):
        self.seen.append((q.dtype, k.dtype, v.dtype))
        return F.scaled_dot_product_attention(q, k, v.to(q.dtype), attn_mask=ctx.mask())


def test_fp32_self_attention_is_bit_identical_to_the_uncast_computation():
    torch.manual_seed(0)
    attn = SelfAttention(64, 4, 1e-6)
    meta = _meta()
    x = torch.randn(2, len(meta), 64)
    rope = tuple(r[None, None] for r in rope_cos_sin(meta, 16))
    ctx = AttentionContext(rule=MaskRule("teacher_forcing", 3), meta=meta)
    got = attn(x, rope, ctx)

    def heads(t):
        return t.unflatten(-1, (4, 16)).transpose(1, 2)

    q = apply_rope(heads(attn.norm_q(attn.q(x))), rope)
    k = apply_rope(heads(attn.norm_k(attn.k(x))), rope)
    v = heads(attn.v(x))
    ref = attn.o(F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask()).transpose(1, 2).flatten(2))
    assert got.dtype == torch.float32
    assert torch.equal(got, ref)


def test_fp32_norm_beside_bf16_v_reaches_the_core_as_one_dtype():
    """Emulates CUDA autocast on CPU: bf16 projections, a q/k norm that returns fp32."""

    class FP32Norm(torch.nn.RMSNorm):
        def forward(self, x):
            return super().forward(x.float())

    torch.manual_seed(0)
    attn = SelfAttention(64, 4, 1e-6).bfloat16()
    attn.norm_q, attn.norm_k = FP32Norm(64, eps=1e-6), FP32Norm(64, eps=1e-6)
    attn.core = spy = _SpyCore()
    meta = _meta()
    x = torch.randn(1, len(meta), 64).bfloat16()
    rope = tuple(r[None, None] for r in rope_cos_sin(meta, 16))
    assert attn.norm_q(attn.q(x)).dtype == torch.float32  # the mismatch the cast removes
    out = attn(x, rope, AttentionContext(rule=MaskRule("teacher_forcing", 3), meta=meta))
    assert spy.seen == [(torch.bfloat16,) * 3]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.gpu
def test_flex_equals_dense_sdpa_in_bf16_autocast_teacher_forcing():
    from vidtrain.models.wan import CausalWanDiT

    torch.manual_seed(0)
    dev = torch.device("cuda")
    kw = dict(dim=256, num_heads=2, ffn_dim=512)  # head dim 128, as the 1.3B flavor
    with torch.device(dev):
        flex = CausalWanDiT.from_flavor("debug", "flex", **kw)
        dense = CausalWanDiT.from_flavor("debug", "sdpa", **kw)
    dense.load_state_dict(flex.state_dict())
    # 48 tokens a frame, 576 in [clean | noisy]: not a multiple of flex's 128-token blocks, as
    # the 1.3B training length (65,520) is not
    frames, fpc, h, w = 6, 3, 8, 6
    meta = _meta(frames, h, w, fpc).to(dev)
    p = flex.cfg.in_channels * 4
    x = torch.randn(1, len(meta), p, device=dev)
    t = torch.where(meta.noisy, 500.0, 0.0)[None].to(dev)
    text = torch.randn(1, 16, flex.cfg.text_dim, device=dev)
    rule = MaskRule("teacher_forcing", fpc)
    outs, grads = [], []
    for model in (flex, dense):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, t, text, meta=meta, attn=AttentionContext(rule=rule, meta=meta))
        out.float().square().mean().backward()
        outs.append(out.float())
        grads.append(model.blocks[0].self_attn.q.weight.grad.float())
    for a, b in (outs, grads):
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        rel = (a - b).norm() / b.norm()
        assert rel < 3e-2, f"flex vs dense SDPA relative L2 {rel:.3g}"
