"""TextEncoder over a tiny umT5 built offline: shapes, padding, truncation, reload, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vidtrain.models.text import TextEncoder, make_tiny_text_encoder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_text_encoder(tmp_path_factory.mktemp("te") / "tiny", d_model=24, num_heads=4)


def test_encode_pads_truncates_and_masks(tiny: Path) -> None:
    te = TextEncoder.from_pretrained(tiny, max_length=12)
    assert te.dim == 24
    emb, mask = te.encode(
        ["a rabbit walks", "people ride bikes down a busy city street on a sunny day again"]
    )
    assert emb.shape == (2, 12, 24) and emb.dtype == torch.float32 and mask.dtype == torch.bool
    assert mask[0].tolist() == [True] * 4 + [False] * 8  # 3 words + </s>
    assert mask[1].all()  # truncated to max_length
    assert torch.all(emb[0, 4:] == 0) and emb[0, :4].abs().sum() > 0
    alone, _ = te.encode(["a rabbit walks"])
    torch.testing.assert_close(alone[0], emb[0], atol=1e-5, rtol=1e-5)  # padding does not leak in


def test_reload_is_identical_and_diffusers_layout(tiny: Path, tmp_path: Path) -> None:
    a, _ = TextEncoder.from_pretrained(tiny, max_length=8).encode(["a cat jumps"])
    b, _ = TextEncoder.from_pretrained(tiny, max_length=8).encode(["a cat jumps"])
    assert torch.equal(a, b)
    again = make_tiny_text_encoder(tmp_path / "pipe" / "text_encoder", d_model=24, num_heads=4)
    (tmp_path / "pipe" / "tokenizer").symlink_to(again)
    c, _ = TextEncoder.from_pretrained(tmp_path / "pipe", max_length=8).encode(["a cat jumps"])
    assert torch.equal(a, c)  # same seed, same weights


def test_errors(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        TextEncoder.from_pretrained(tmp_path / "missing")
    te = TextEncoder.from_pretrained(tiny, max_length=8)
    with pytest.raises(ValueError, match="list of strings"):
        te.encode("one string")
    with pytest.raises(ValueError, match="multiple of num_heads"):
        make_tiny_text_encoder(tmp_path / "bad", d_model=30, num_heads=4)
