"""FP8 (issue 17 item 4): scaled casts, the FP8 training linears (emulated and torchao's), the
quantization record, post-training FP8 for sampling, and the FP8 KV cache against teacher forcing.

Legend: B batch, H heads, L tokens, D head dim, T tokens of a linear's input.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from test_sample_stream import TWO, _cond, _sample, _stream_pred, _tf_noisy_pred
from torch import nn

from vidtrain.config import ConfigError, load_recipe
from vidtrain.formats import fp8 as F8
from vidtrain.lora import roles as lora
from vidtrain.models.wan import CausalWanDiT
from vidtrain.quant.convert import convert_for_recipe
from vidtrain.quant.fp8 import FP8Linear, FP8StoredLinear, convert_fp8, is_fp8_linear
from vidtrain.quant.kv import KVFakeQuantHook, fake_quantize_kv_grouped
from vidtrain.quant.qat import QUANT_RECORD, apply_quant_record, ptq_fp8, write_quant_record
from vidtrain.sample.kv_cache import fp8_dequantize, fp8_quantize_block
from vidtrain.sample.sampler import SamplerConfig
from vidtrain.sample.settings import run_settings
from vidtrain.train.qat_method import QAT

CPU = torch.device("cpu")
RECIPES = ("tensorwise", "rowwise")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ---- the float64 reference of the scaled-cast arithmetic (written independently of formats/fp8)


def _ref_cast(x: torch.Tensor, dim, dtype, pow2: bool):
    """(codes, scale in float64) with the recipe's amax groups: dim None per tensor, else per
    slice reduced along `dim`."""
    a = x.double().abs()
    amax = a.max() if dim is None else a.amax(dim=dim, keepdim=True)
    fmax = torch.finfo(dtype).max
    scale = (fmax / amax.clamp(min=1e-12)).float()
    if pow2:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    q = (x.float() * scale).clamp(-fmax, fmax).to(dtype)
    return q, scale.double()


def _ref_gemm(a, a_dim, b, b_dim, recipe, a_grad=False):
    """a @ b with each operand scaled-cast along its reduction dim (rowwise) or per tensor, the
    product in float64."""
    pow2 = recipe == "rowwise"
    da = F8.E5M2 if (a_grad and recipe == "tensorwise") else F8.E4M3
    qa, sa = _ref_cast(a, None if recipe == "tensorwise" else a_dim, da, pow2)
    qb, sb = _ref_cast(b, None if recipe == "tensorwise" else b_dim, F8.E4M3, pow2)
    return (qa.double() / sa) @ (qb.double() / sb)


def _ref_linear(x2, w, g2, recipe):
    y = _ref_gemm(x2, 1, w.T, 0, recipe)  # reduction over in_features
    dx = _ref_gemm(g2, 1, w, 0, recipe, a_grad=True)  # over out_features
    dw = _ref_gemm(g2.T, 1, x2, 0, recipe, a_grad=True)  # over tokens
    return y, dx, dw


def test_scales_and_casts():
    x = torch.tensor([[0.0, 1.0, -3.0], [0.5, 0.25, 100.0]])
    q, s = F8.quantize(x)
    assert s.item() == pytest.approx(448.0 / 100.0)
    assert F8.dequantize(q, s).abs().max().item() == pytest.approx(100.0)
    _, s_row = F8.quantize(x, -1, pow2=True)
    assert s_row.flatten().tolist() == [128.0, 4.0]  # 448/3 -> 128, 448/100 -> 4
    assert F8.scale_from_amax(torch.tensor(0.0)).item() == pytest.approx(448.0 / 1e-12, rel=1e-6)
    _, s5 = F8.quantize(x, None, F8.E5M2)
    assert s5.item() == pytest.approx(57344.0 / 100.0)
    with pytest.raises(ValueError, match="recipe"):
        F8.check_recipe("mxfp8")
    bad = torch.tensor([[1.0, float("inf")], [2.0, float("nan")], [0.0, 0.0], [1.0, -2.0]])
    out = F8.fake_quantize(bad, -1)
    assert out[:2].isnan().all() and torch.equal(out[2], torch.zeros(2)) and torch.equal(out[3], bad[3])


@pytest.mark.parametrize("recipe", RECIPES)
def test_fp8_linear_equals_float64_reference(recipe):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=True)
    mod = FP8Linear.from_linear(lin, recipe)
    x = torch.randn(2, 40, 64, requires_grad=True)
    y = mod(x)
    g = torch.randn_like(y)
    y.backward(g)
    ry, rdx, rdw = _ref_linear(x.detach().reshape(-1, 64), lin.weight.detach(), g.reshape(-1, 48), recipe)
    ry = ry + lin.bias.detach().double()
    assert _rel(y.reshape(-1, 48), ry) < 1e-6
    assert _rel(x.grad.reshape(-1, 64), rdx) < 1e-6
    assert _rel(lin.weight.grad, rdw) < 1e-6
    assert torch.allclose(lin.bias.grad, g.sum((0, 1)), rtol=1e-6, atol=1e-6)
    # and the quantization is really there
    assert _rel(y.detach(), (x @ lin.weight.T + lin.bias).detach()) > 1e-3
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the emulated GEMMs stay fp32 under autocast
        assert torch.equal(mod(x), y)


def _torchao_linear(lin: nn.Linear, recipe: str) -> nn.Module:
    holder = nn.Sequential(copy.deepcopy(lin))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_fp8(holder, (), recipe, "torchao")
    assert type(holder[0]).__name__ == "Float8Linear" and is_fp8_linear(holder[0])
    return holder


# torchao computes a rowwise GEMM's output in bf16 even for fp32 inputs (a workaround in its
# float8 ops), and adds the bias in the output dtype: those outputs agree to bf16 rounding
TOL_TORCHAO = {
    ("tensorwise", torch.float32): (1e-5, 1e-5),  # (forward, gradients)
    ("rowwise", torch.float32): (1e-2, 1e-2),
    ("tensorwise", torch.bfloat16): (1e-2, 1e-2),
    ("rowwise", torch.bfloat16): (1e-2, 1e-2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_fp8_linear_matches_torchao(recipe, dtype):
    torch.manual_seed(0)
    lin = nn.Linear(64, 32).to(dtype)
    ours, theirs = FP8Linear.from_linear(copy.deepcopy(lin), recipe), _torchao_linear(lin, recipe)
    x = torch.randn(3, 32, 64, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    tol_y, tol_g = TOL_TORCHAO[(recipe, dtype)]
    assert y1.dtype == y2.dtype == dtype
    assert _rel(y1, y2) < tol_y
    assert _rel(x1.grad, x2.grad) < tol_g
    assert _rel(ours.weight.grad, theirs[0].weight.grad) < tol_g
    assert _rel(ours.bias.grad, theirs[0].bias.grad) < 1e-2


@pytest.mark.parametrize("recipe", RECIPES)
def test_stored_linear_equals_training_forward(recipe):
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(2, 16, 64)
    stored = FP8StoredLinear(lin, recipe, "emulate")
    assert stored.weight_fp8.dtype == torch.float8_e4m3fn
    assert stored.weight_scale.shape == (() if recipe == "tensorwise" else (32, 1))
    assert stored.nbytes() == 64 * 32 + 4 * stored.weight_scale.numel()
    with torch.no_grad():
        want = FP8Linear.from_linear(lin, recipe)(x)
        assert torch.equal(stored(x), want)
        # torch._scaled_mm (FP8 GEMM, fp32 accumulation; a CPU kernel in torch >= 2.13)
        assert _rel(FP8StoredLinear(lin, recipe, "scaled_mm")(x), want) < 1e-5


# ---- a model: conversion, record, PTQ -----------------------------------------------------------


def _model(seed: int = 0) -> CausalWanDiT:
    torch.manual_seed(seed)
    return CausalWanDiT.from_flavor("debug", attn_backend="sdpa").eval()


def _forward(model, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 3, 4, 4, generator=g)
    text = torch.randn(1, 4, model.cfg.text_dim, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([500.0]), text, frames_per_chunk=3)


def _fp8_quant(*extra):
    return load_recipe(None, ["method.name=qat", "quant.format=fp8", *extra]).quant


@pytest.mark.parametrize("backend", ["emulate", "torchao"])
def test_convert_for_recipe_fp8(backend):
    model = _model()
    keys = set(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kb = convert_for_recipe(model, _fp8_quant(f"quant.backend={backend}"), CPU)
    assert kb == "torch"
    names = [n for n, m in model.named_modules() if is_fp8_linear(m)]
    assert len(names) == 2 * 10  # per block: self q,k,v,o + cross q,k,v,o + ffn.0, ffn.2 (as NVFP4)
    assert not any(n.startswith(("time_", "text_embedding", "head")) for n in names)  # the exclude seam
    assert set(model.state_dict()) == keys  # parameter names kept
    assert _rel(_forward(model), _forward(_model())) > 1e-3


@pytest.mark.parametrize(
    "extra,match",
    [
        (["quant.backend=triton"], "NVFP4 backend"),
        (["quant.stochastic_rounding=true"], "gradient path"),
    ],
)
def test_bad_fp8_settings_are_clear_errors(extra, match):
    with pytest.raises(ValueError, match=match):
        convert_for_recipe(_model(), _fp8_quant(*extra), CPU)
    with pytest.raises(ValueError, match="FP8 backend"):  # and the other way round
        convert_for_recipe(_model(), load_recipe(None, ["quant.backend=torchao"]).quant, CPU)
    with pytest.raises(ConfigError, match=r"quant\.format"):
        load_recipe(None, ["quant.format=mxfp4"])
    with pytest.raises(ConfigError, match=r"quant\.fp8_recipe"):
        load_recipe(None, ["quant.fp8_recipe=blockwise"])


@pytest.mark.parametrize("recipe", RECIPES)
def test_quant_record_rebuilds_the_fp8_model(tmp_path, recipe):
    trained = _model()
    convert_for_recipe(trained, _fp8_quant(f"quant.fp8_recipe={recipe}"), CPU)
    write_quant_record(trained, tmp_path)
    record = json.loads((tmp_path / QUANT_RECORD).read_text())
    assert record["format"] == "fp8" and record["recipe"] == recipe and len(record["linears"]) == 20
    rebuilt = _model()
    assert apply_quant_record(rebuilt, tmp_path)
    assert all(m.recipe == recipe for m in rebuilt.modules() if isinstance(m, FP8Linear))
    assert torch.equal(_forward(rebuilt), _forward(trained))
    # post-training FP8 of the same checkpoint stores exactly the linears it trained
    stored = _model()
    got_recipe, n, _ = ptq_fp8(stored, tmp_path)
    assert (got_recipe, n) == (recipe, 20)
    assert torch.equal(_forward(stored), _forward(trained))
    with pytest.raises(ValueError, match="differs"):
        ptq_fp8(_model(), tmp_path, "rowwise" if recipe == "tensorwise" else "tensorwise")


def test_ptq_fp8_of_a_high_precision_checkpoint(tmp_path):
    model, plain = _model(), _model()
    params = sum(
        m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear) and "blocks" in n
    )
    recipe, n, nbytes = ptq_fp8(model, tmp_path)  # no record: every linear FP8 takes
    assert (recipe, n) == ("tensorwise", 20)
    assert nbytes == params + 4 * n  # one e4m3 byte per weight + one fp32 scale per linear
    assert sum(isinstance(m, FP8StoredLinear) for m in model.modules()) == 20
    err = (_forward(model) - _forward(plain)).norm() / _forward(plain).norm()
    assert 1e-4 < err < 0.1


def test_lora_on_an_fp8_base_stays_high_precision():
    model = _model()
    convert_for_recipe(model, _fp8_quant(), CPU)
    peft_model = lora.add_roles(model, 4, 4.0, ["q", "ffn.0"])
    wrapped = next(m for n, m in peft_model.named_modules() if n.endswith("blocks.0.self_attn.q"))
    assert isinstance(wrapped.base_layer, FP8Linear)  # the base linear in FP8
    assert all(p.dtype == torch.float32 for p in lora.adapter_params(peft_model, lora.GENERATOR).values())


# ---- KV: fake-quant hook = FP8 cache -------------------------------------------------------------


def test_fp8_kv_grouped_equals_block_quantization():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 16) * torch.linspace(0.1, 10, 12)[:, None]
    group = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
    got = fake_quantize_kv_grouped(x, group, 3, kv_format="fp8")
    want = torch.cat(
        [fp8_dequantize(fp8_quantize_block(x[:, :, 4 * i : 4 * i + 4]), x.dtype) for i in range(3)], 2
    )
    assert torch.equal(got, want)
    assert 0 < _rel(got, x) < 0.07  # e4m3: 3 mantissa bits


@pytest.fixture(scope="module")
def stream_model():
    torch.manual_seed(0)
    return CausalWanDiT.from_flavor("debug", attn_backend="sdpa").eval()


def test_fp8_cache_equals_teacher_forcing_with_fp8_fake_quant_history(stream_model):
    model = stream_model
    cfg = SamplerConfig(kv_cache="fp8", window_frames=4, sink_frames=2, timesteps=TWO)
    res = _sample(model, cfg)
    for step in (0, 1):
        tf = _tf_noisy_pred(model, res, cfg, step, _cond(model), hook=KVFakeQuantHook(kv_format="fp8"))
        torch.testing.assert_close(_stream_pred(res, step), tf, rtol=1e-4, atol=1e-4)
    plain = _tf_noisy_pred(model, res, cfg, 1, _cond(model))
    assert (plain - _stream_pred(res, 1)).abs().max() > 1e-5  # the quantization is really there


def test_fp8_cache_bytes(stream_model):
    model = stream_model
    res = {
        k: _sample(model, SamplerConfig(kv_cache=k, window_frames=6, timesteps=TWO)) for k in ("bf16", "fp8")
    }
    bf16, f8 = max(res["bf16"].kv_bytes_per_chunk), max(res["fp8"].kv_bytes_per_chunk)
    # per layer and block: K and V codes (1 byte each) + one fp32 scale per (batch, head)
    block_elems = 3 * 4 * (model.cfg.dim // model.cfg.num_heads)  # a block's tokens x head dim
    assert f8 == bf16 / 2 + 4 * (bf16 / 2) / block_elems
    # bytes per element: 1 + 4 / (tokens x head dim) (here 12 x 16: 1.021; 1.3B at 480x832, a
    # 3-frame block of 4680 tokens x 128: 1.000007), i.e. 0.5x bf16 plus the scales
    assert f8 / bf16 == pytest.approx(0.5 + 2 / block_elems)
    a, b = res["bf16"].latents_BCFHW, res["fp8"].latents_BCFHW
    assert (a - b).norm() / a.norm() < 0.1


def test_fp8_runs_sample_with_the_fp8_cache(tmp_path):
    recipe = load_recipe(None, ["method.name=qat", "quant.format=fp8"])
    assert run_settings(recipe)["kv_cache"].value == "fp8"
    assert QAT(recipe).kv_hook(None).kv_format == "fp8"
    nv = load_recipe(None, ["method.name=qat"])
    assert run_settings(nv)["kv_cache"].value == "nvfp4" and QAT(nv).kv_hook(None).kv_format == "nvfp4"
