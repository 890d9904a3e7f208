"""QAT gradient path (NVIDIA's NVFP4 recipe): stochastic rounding of dY, 16-point RHT on wgrad."""

from __future__ import annotations

import copy
import json
import math

import torch
from torch import nn

from vidtrain.config import load_recipe
from vidtrain.formats import nvfp4 as N
from vidtrain.quant import qat
from vidtrain.quant.qat import NVFP4Linear
from vidtrain.train.trainer import train

MAGS = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def test_counter_noise_is_uniform_and_keyed():
    u = N.counter_uniform((200_000,), seed=3, counter=7)
    assert u.dtype == torch.float32 and u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 3e-3 and abs(u.var().item() - 1 / 12) < 3e-3
    assert torch.equal(u, N.counter_uniform((200_000,), seed=3, counter=7))  # deterministic
    assert not torch.equal(u, N.counter_uniform((200_000,), seed=3, counter=8))
    assert not torch.equal(u, N.counter_uniform((200_000,), seed=4, counter=7))


def test_e2m1_stochastic_picks_a_neighbour_and_is_unbiased():
    v = torch.linspace(-6, 6, 481)
    draws = 4000
    u = N.counter_uniform((draws, v.numel()), seed=0, counter=0)
    q = N.e2m1_decode(N.e2m1_encode_stochastic(v.expand(draws, -1), u))
    a = v.abs()
    lo = MAGS[(a.unsqueeze(-1) >= MAGS).sum(-1) - 1]
    hi = MAGS[torch.clamp((a.unsqueeze(-1) > MAGS).sum(-1), max=7)]
    qa = q.abs()
    assert bool(((qa == lo) | (qa == hi)).all())  # always one of the two neighbours
    assert bool((torch.sign(q) * torch.sign(v) >= 0).all())
    assert bool((q[:, torch.isin(a, MAGS)] == v[torch.isin(a, MAGS)]).all())  # representable: exact
    se = (hi - lo) / 2 / math.sqrt(draws)  # std error bound of the mean
    assert bool(((q.mean(0) - v).abs() <= 5 * se + 1e-6).all())


def test_sr_quantize_unbiased_same_scale_chain():
    x = torch.randn(4, 64) * torch.logspace(-2, 1, 4).unsqueeze(-1)
    rne = N.quantize_blocks(x, (0,))
    draws = 2000
    xs = x.expand(draws, -1, -1)
    sr = N.fake_quantize_rows(xs, N.counter_uniform(xs.shape, seed=1, counter=0))
    # the same scale chain: one element step (s_b * S_dec per block) for SR and RNE
    scale = rne.scales.float().repeat_interleave(16, -1) / N.encode_scale(rne.amax)
    v = x / scale  # the scaled value E2M1 rounds
    grid = (sr / scale).abs()
    assert bool(torch.isin(grid.round(decimals=3), MAGS).all())
    inside = v.abs() <= 6  # the block max can land just above 6 (e4m3 scale rounding): saturates
    assert inside.float().mean() > 0.95
    assert bool((sr[:, ~inside] == N.dequantize(rne)[~inside]).all())  # RNE saturates there too
    err = (sr.mean(0) - x).abs()
    bound = 5 * (2 * scale) / 2 / math.sqrt(draws) + 1e-7  # widest E2M1 gap is 2 steps
    assert bool((err <= bound)[inside].all())
    # RNE's error does not average out; SR's does
    rne_err = (N.dequantize(rne) - x).abs()[inside].mean()
    assert err[inside].mean() < rne_err / 4


def test_rht_is_orthogonal():
    r = qat.hadamard_matrix(5)
    torch.testing.assert_close(r @ r.T, torch.eye(16), rtol=0, atol=1e-6)
    assert not torch.equal(r, qat.hadamard_matrix(6))  # the sign vector follows the seed
    g, x, w = torch.randn(37, 48), torch.randn(37, 32), torch.randn(48, 32)
    kw = dict(stochastic_rounding=False, quantize=False)
    dx0, dw0 = qat.grad_path_matmuls(g, x, w, hadamard=False, **kw)
    dx1, dw1 = qat.grad_path_matmuls(g, x, w, hadamard=True, **kw)
    torch.testing.assert_close(dw1, dw0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw0, g.T @ x)
    assert torch.equal(dx1, dx0) and torch.equal(dx0, g @ w)


def _pair(sr: bool, had: bool):
    torch.manual_seed(0)
    lin = nn.Linear(32, 48)
    q = NVFP4Linear.from_linear(copy.deepcopy(lin))
    q.stochastic_rounding, q.hadamard, q.grad_seed = sr, had, 11
    return lin, q


def test_grad_path_backward_formula_and_forward_unchanged():
    lin, q = _pair(True, False)
    x = torch.randn(2, 20, 32, requires_grad=True)
    g = torch.randn(2, 20, 48)
    y = q(x)
    plain = NVFP4Linear.from_linear(copy.deepcopy(lin))
    assert torch.equal(y, plain(x))  # the forward (the sampler's path) is unchanged
    q.grad_step = 4
    y.backward(g)
    x_hat, w_hat = N.fake_quantize_rows(x.detach()), N.fake_quantize(lin.weight.detach(), tile_2d=True)
    counter = 4 << 20
    g2 = g.reshape(-1, 48)
    gq = N.fake_quantize_rows(g2, N.counter_uniform(g2.shape, 11, 2 * counter))
    torch.testing.assert_close(x.grad.reshape(-1, 32), gq @ w_hat, rtol=0, atol=0)
    gt = nn.functional.pad(g2.T, (0, 8))  # 40 tokens -> 48
    gtq = N.fake_quantize_rows(gt, N.counter_uniform(gt.shape, 11, 2 * counter + 1))
    xt = nn.functional.pad(x_hat.reshape(-1, 32).T, (0, 8))
    torch.testing.assert_close(q.weight.grad, gtq @ xt.T, rtol=0, atol=0)
    torch.testing.assert_close(q.bias.grad, g2.sum(0))
    # the same step and seed draw the same noise; the next call draws new noise
    x.grad = None
    q.grad_step = 4
    q(x).backward(g)
    torch.testing.assert_close(x.grad.reshape(-1, 32), gq @ w_hat, rtol=0, atol=0)
    x.grad = None
    q(x).backward(g)
    assert not torch.equal(x.grad.reshape(-1, 32), gq @ w_hat)


def test_grad_path_gradients_are_unbiased_and_close():
    _, q = _pair(True, True)
    x = torch.randn(64, 32, requires_grad=True)
    g = torch.randn(64, 48)
    _, ref = _pair(False, False)
    xr = x.detach().clone().requires_grad_(True)
    ref(xr).backward(g)
    dws, dxs = [], []
    for step in range(50):
        q.grad_step = step
        x.grad, q.weight.grad = None, None
        q(x).backward(g)
        dws.append(q.weight.grad.clone())
        dxs.append(x.grad.clone())

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    # dX = Q_sr(dY) @ W_hat is unbiased: the mean over draws converges to the STE gradient
    one, mean = rel(dxs[0], xr.grad), rel(torch.stack(dxs).mean(0), xr.grad)
    assert mean < 0.04 and mean < one / 3
    # dW also carries the fixed RNE error of Q(R X_hat^T): close, finite, not noise-free
    assert rel(dws[0], ref.weight.grad) < 0.3 and rel(torch.stack(dws).mean(0), ref.weight.grad) < 0.15
    assert all(torch.isfinite(d).all() for d in dws)


def test_flags_off_is_bit_identical_to_plain_ste():
    lin, q = _pair(False, False)
    ref = NVFP4Linear.from_linear(copy.deepcopy(lin))
    x = torch.randn(5, 32, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    g = torch.randn(5, 48)
    q(x).backward(g)
    ref(xr).backward(g)
    assert torch.equal(x.grad, xr.grad) and torch.equal(q.weight.grad, ref.weight.grad)


def test_trainer_with_both_flags_trains(tmp_path):
    over = [
        f"run.dir={tmp_path}", "method.name=qat", "quant.stochastic_rounding=true", "quant.hadamard=true",
        "train.max_steps=3", "train.ckpt_every=3", "train.progress=false", "train.ema_decay=null",
        "optim.warmup_steps=0", "data.frames=6", "data.height=4", "data.width=4",
        "data.synthetic_samples=4", "data.text_len=4", "log.wandb=disabled", "log.plots=false",
    ]  # fmt: skip
    trainer = train(load_recipe(None, over))
    model = trainer.strategy.unwrap(trainer.model)
    lins = [m for m in model.modules() if isinstance(m, NVFP4Linear)]
    assert len(lins) == 20 and all(m.stochastic_rounding and m.hadamard for m in lins)
    assert len({m.grad_seed for m in lins}) == 20 and all(m.grad_step == 2 for m in lins)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert all(math.isfinite(r["grad_norm"]) for r in rows if "grad_norm" in r)
