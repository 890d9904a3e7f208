"""NVFP4 QAT: convert, forward equals quantize-once weights + fake-quant activations, STE grads."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vidtrain.formats import nvfp4 as N
from vidtrain.quant import qat


class TinyDiT(nn.Module):
    """Module names shaped like our DiT's."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embedding = nn.Linear(16, 32)
        self.time_embedding = nn.Sequential(nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, 32))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)) for _ in range(2)
        )
        self.odd = nn.Linear(24, 32)  # in_features % 16 != 0: stays high precision
        self.head = nn.Sequential(nn.Linear(32, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch_embedding(x)
        h = h + self.time_embedding(h)
        for blk in self.blocks:
            h = h + blk(h)
        h = h + self.odd(h[..., :24])
        return self.head(h)


def _reference(model: TinyDiT, names: list[str]) -> TinyDiT:
    """Weights quantized once + dequantized; inputs fake-quantized by forward pre-hooks."""
    ref = copy.deepcopy(model)
    for name in names:
        lin = ref.get_submodule(name)
        with torch.no_grad():
            lin.weight.copy_(N.fake_quantize(lin.weight, tile_2d=True))
        lin.register_forward_pre_hook(lambda m, args: (N.fake_quantize_rows(args[0]),))
    return ref


CONVERTED = ["blocks.0.1", "blocks.0.3", "blocks.1.1", "blocks.1.3"]


def test_convert_forward_and_excludes():
    model = TinyDiT()
    keys = list(model.state_dict())
    before = copy.deepcopy(model)
    qat.convert(model)
    got = sorted(n for n, m in model.named_modules() if isinstance(m, qat.NVFP4Linear))
    assert got == CONVERTED
    for name in ("patch_embedding", "time_embedding.0", "time_embedding.2", "odd", "head.0"):
        assert type(model.get_submodule(name)) is nn.Linear
    assert list(model.state_dict()) == keys  # names kept: state dicts load either way
    model.load_state_dict(before.state_dict())
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(model(x), _reference(before, CONVERTED)(x), rtol=0, atol=0)


def test_configurable_exclude_and_registry():
    model = qat.convert(TinyDiT(), exclude=("blocks.0.*",))
    assert isinstance(model.get_submodule("head.0"), qat.NVFP4Linear)
    assert type(model.get_submodule("blocks.0.1")) is nn.Linear
    assert "nvfp4" in qat.QUANTIZERS
    with pytest.raises(ValueError, match="known: nvfp4"):
        qat.convert(TinyDiT(), quantizer="int3")
    with pytest.raises(ValueError):
        qat.NVFP4Linear(24, 32)


def test_te_backend_is_a_clear_error_without_blackwell():
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 10:
        pytest.skip("Blackwell present")
    with pytest.raises(ValueError, match="nvfp4_te"):
        qat.convert(TinyDiT(), quantizer="nvfp4_te")


def test_straight_through_gradients():
    lin = nn.Linear(32, 48)
    q = qat.NVFP4Linear.from_linear(copy.deepcopy(lin))
    x = torch.randn(4, 32, requires_grad=True)
    g = torch.randn(4, 48)
    q(x).backward(g)
    x_hat, w_hat = N.fake_quantize_rows(x.detach()), N.fake_quantize(lin.weight.detach(), tile_2d=True)
    torch.testing.assert_close(x.grad, g @ w_hat)  # dL/dx passes straight through x_hat
    torch.testing.assert_close(q.weight.grad, g.T @ x_hat)  # dL/dW passes straight through w_hat
    torch.testing.assert_close(q.bias.grad, g.sum(0))
    # the STE op alone is the identity in backward
    y = torch.randn(8, 32, requires_grad=True)
    qat.fake_quantize_ste(y).sum().backward()
    assert torch.equal(y.grad, torch.ones_like(y))


def test_export_weights_packed():
    model = qat.convert(TinyDiT())
    out = qat.export_weights(model)
    assert sorted(out) == [f"{n}.weight" for n in CONVERTED]
    w = model.get_submodule("blocks.0.1").weight
    q = out["blocks.0.1.weight"]
    assert q.data.dtype == torch.uint8 and q.data.shape == (64, 16) and q.tile_2d
    assert torch.equal(N.dequantize(q), N.fake_quantize(w.detach(), tile_2d=True))
