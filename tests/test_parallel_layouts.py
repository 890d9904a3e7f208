"""Layouts, Ulysses argument checks, world/sp mismatch, chunk-halo encode per rank (no spawn)."""

from __future__ import annotations

import pytest
import torch

from vidtrain.forcing.teacher import build_tf_sequence
from vidtrain.models.wan import CausalWanDiT
from vidtrain.parallel import STRATEGIES
from vidtrain.parallel.layouts import check_layout, encode_local_frames, local_tf_sequence
from vidtrain.parallel.mesh import sp_dims
from vidtrain.parallel.ulysses import apply_ulysses
from vidtrain.tokens import MaskRule, build_mask


def _inputs(f=12, hw=4):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 16, f, hw, hw, generator=g)
    return x0, torch.randn(x0.shape, generator=g), torch.rand(1, f // 3, generator=g).repeat_interleave(3, 1)


def test_registry_lists_strategies():
    assert {"none", "ddp", "fsdp", "deepspeed"} <= set(STRATEGIES.names())
    with pytest.raises(ValueError, match="known: ddp, deepspeed, fsdp, none"):
        STRATEGIES.get("horovod")


@pytest.mark.parametrize("layout", ["naive", "balanced"])
@pytest.mark.parametrize("sp", [2, 4])
def test_layout_is_a_permutation_with_the_same_mask(layout, sp):
    x0, noise, sigma = _inputs()
    full = build_tf_sequence(x0, noise, sigma, 3)
    parts = [local_tf_sequence(layout, x0, noise, sigma, 3, r, sp) for r in range(sp)]
    meta = parts[0][1]
    assert all(torch.equal(p[1].frame, meta.frame) for p in parts)
    x = torch.cat([p[0].x_BLP for p in parts], 1)
    # find each gathered token in the single-process sequence by (frame, h, w, noisy)
    key = lambda m: (m.frame * 100 + m.h * 10 + m.w) * 2 + m.noisy.long()  # noqa: E731
    perm = torch.argsort(key(full.meta))[torch.argsort(torch.argsort(key(meta)))]
    torch.testing.assert_close(x, full.x_BLP[:, perm], rtol=0, atol=0)
    rule = MaskRule("teacher_forcing", 3)
    assert torch.equal(build_mask(rule, meta, meta), build_mask(rule, full.meta, full.meta)[perm][:, perm])
    if layout == "balanced":  # every rank holds loss tokens
        assert all(int(p[0].meta.noisy.sum()) == len(p[0].meta) // 2 for p in parts)


def test_frames_must_split_into_whole_chunks_per_rank():
    with pytest.raises(ValueError, match="multiple of 12"):
        check_layout("balanced", 18, 3, 4)
    with pytest.raises(ValueError, match="unknown layout"):
        check_layout("zigzag", 12, 3, 2)


def test_heads_must_divide_by_sp():
    model = CausalWanDiT.from_flavor("debug")  # 4 heads
    with pytest.raises(ValueError, match="4 heads, sp_size=3"):
        apply_ulysses(model, None, 3)


def test_world_must_divide_by_sp():
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by parallel\.sp_size=4"):
        sp_dims(6, 4)
    assert sp_dims(8, 4) == 2


def test_missing_launcher_env_is_clear(monkeypatch):
    from vidtrain.config import Recipe

    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    r = Recipe()
    r.parallel.strategy = "ddp"
    with pytest.raises(ValueError, match="launcher's environment"):
        STRATEGIES.get("ddp")(r).setup()


@pytest.mark.parametrize("layout", ["naive", "balanced"])
def test_encode_local_frames_equals_whole_encode(layout):
    from vidtrain.models.vae.model import CausalVideoVAE

    torch.manual_seed(0)
    vae = CausalVideoVAE.from_flavor("debug").eval()
    sp, fpc, frames = 2, 2, 4
    video = torch.randn(1, 3, 1 + 4 * (frames - 1), 16, 16)
    with torch.no_grad():
        whole = vae.encode(video)
        for r in range(sp):
            z, f0 = encode_local_frames(vae, video, layout, r, sp, fpc)
            torch.testing.assert_close(z, whole[:, :, f0 : f0 + z.shape[2]], rtol=1e-4, atol=1e-5)
