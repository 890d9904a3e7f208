"""The NVFP4 KV cache's "mse" block-scale rule (`--kv-scale-rule amax|mse`, issue 19 item 1).

Golden properties: per 16-element block the "mse" scale's squared error is <= the amax rule's
(random, heavy-tailed, zeros, tiny values), the layout and bytes are the amax rule's, the amax
rule is the chain bit for bit, the choice is the argmin over the candidate codes (ties to
amax) and deterministic, and `dequantize` reads an "mse" block unchanged. Then the plumbing:
the KV cache, QAT's history fake-quant (streaming = teacher forcing), the CLI flag, the
recipe key and the run resolution.
"""

from __future__ import annotations

import pytest
import torch
from test_sample_stream import _tf_noisy_pred  # the teacher-forced reference of the stream tests

from vidtrain.config import ConfigError, load_recipe
from vidtrain.formats import nvfp4 as N
from vidtrain.models.wan import CausalWanDiT
from vidtrain.quant.kv import KVFakeQuantHook, fake_quantize_kv_grouped
from vidtrain.sample.kv_cache import KVCache, nvfp4_quantize_into
from vidtrain.sample.sampler import SamplerConfig, StreamingSampler, debug_text_context
from vidtrain.tokens import MaskRule


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (2, 3, 40, 64)  # [B, H, Lc, D]
    t3 = torch.distributions.StudentT(torch.tensor(3.0)).sample(shape)
    t1 = torch.distributions.StudentT(torch.tensor(1.2)).sample(shape)
    mixed = (
        torch.randn(shape, generator=g) * torch.rand(1, 3, 40, 4, generator=g).repeat_interleave(16, -1) * 30
    )
    mixed[:, :, ::5] = 0.0  # whole zero blocks next to large ones
    return {
        "gauss": torch.randn(shape, generator=g),
        "student_t3": t3,
        "student_t1.2": t1,
        "mixed_scales": mixed,
        "zeros": torch.zeros(shape),
        "tiny": torch.randn(shape, generator=g) * 1e-38,  # fp32 subnormal amax region
        "tiny_blocks": torch.randn(shape, generator=g)
        * torch.where(torch.rand(shape, generator=g) < 0.01, 1e3, 1e-6),
        "bf16": torch.randn(shape, generator=g).to(torch.bfloat16),
    }


def _block_err(q: N.NVFP4Tensor, x: torch.Tensor) -> torch.Tensor:
    return ((N.dequantize(q, torch.float32) - x.float()) ** 2).unflatten(-1, (-1, N.BLOCK)).sum(-1)


@pytest.mark.parametrize("name", list(_inputs()))
def test_mse_never_worse_than_amax_on_any_block(name):
    x = _inputs()[name]
    qa = N.quantize_blocks(x, (0, 1))
    qm = N.quantize_blocks(x, (0, 1), scale_rule="mse")
    ea, em = _block_err(qa, x), _block_err(qm, x)
    assert (em <= ea).all()
    if name in ("zeros",):
        assert torch.equal(qm.scales.view(torch.uint8), qa.scales.view(torch.uint8))
    elif name != "tiny":
        assert em.sum() < ea.sum()  # a real gain
        if name != "tiny_blocks":  # (there most blocks are tiny next to the group amax)
            assert (em < ea).float().mean() > 0.2  # on many blocks
    # same layout and bytes: only scale bytes (and the codes of blocks they moved) differ
    assert qm.data.shape == qa.data.shape and qm.scales.shape == qa.scales.shape
    assert qm.data.dtype == qa.data.dtype and qm.scales.dtype == qa.scales.dtype == torch.float8_e4m3fn
    assert qm.nbytes() == qa.nbytes() and torch.equal(qm.amax, qa.amax)
    same = (qm.scales.view(torch.uint8) == qa.scales.view(torch.uint8)).repeat_interleave(N.BLOCK // 2, -1)
    assert torch.equal(qm.data[same], qa.data[same])


def test_amax_rule_is_the_chain_bit_for_bit():
    x = _inputs()["mixed_scales"]
    default = N.quantize_blocks(x, (0, 1))
    explicit = N.quantize_blocks(x, (0, 1), scale_rule="amax")
    assert torch.equal(default.data, explicit.data) and torch.equal(
        default.scales.view(torch.uint8), explicit.scales.view(torch.uint8)
    )
    # the chain of the module docstring, written out step by step
    x32 = x.float()
    amax = x32.abs().amax(dim=(2, 3), keepdim=True)
    s_enc = torch.where(amax == 0, torch.ones_like(amax), torch.clamp(2688.0 / amax, max=N.FLT_MAX))
    s_dec = 1.0 / s_enc
    xb = x32.unflatten(-1, (-1, 16))
    s_b = torch.clamp(xb.abs().amax(-1) * (s_enc / 6.0), -448, 448).to(torch.float8_e4m3fn)
    enc = torch.clamp(1.0 / (s_b.float() * s_dec), max=N.FLT_MAX)
    code = N.e2m1_encode(torch.clamp(xb * enc.unsqueeze(-1), -6, 6)).flatten(-2)
    assert torch.equal(default.scales.view(torch.uint8), s_b.view(torch.uint8))
    assert torch.equal(default.data, N.pack_codes(code))


def test_mse_is_the_argmin_over_the_candidate_codes_ties_to_amax():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 24, 32, generator=g) * torch.rand(1, 2, 24, 1, generator=g) * 5
    qa = N.quantize_blocks(x, (0, 1))
    c0 = qa.scales.view(torch.uint8).to(torch.int16)
    errs = []
    for off in N.MSE_CODE_OFFSETS:  # each candidate through the plain chain and the dequantizer
        s = (c0 + off).clamp(0, N.E4M3_MAX_CODE).to(torch.uint8).view(torch.float8_e4m3fn)
        s_dec = 1.0 / N.encode_scale(qa.amax)
        enc = torch.clamp(1.0 / (s.float() * s_dec), max=N.FLT_MAX)
        xb = x.unflatten(-1, (-1, 16))
        code = N.e2m1_encode(torch.clamp(xb * enc.unsqueeze(-1), -6, 6)).flatten(-2)
        q = N.NVFP4Tensor(N.pack_codes(code), s, qa.amax, x.shape, x.dtype)
        errs.append((_block_err(q, x), s.view(torch.uint8)))
    err = torch.stack([e for e, _ in errs])
    first_min = (err == err.min(0).values).int().argmax(0)  # the first candidate of least error
    want = torch.stack([s for _, s in errs]).gather(0, first_min[None])[0]
    qm = N.quantize_blocks(x, (0, 1), scale_rule="mse")
    assert torch.equal(qm.scales.view(torch.uint8), want)
    assert N.MSE_CODE_OFFSETS[0] == 0  # the amax code is tried first: it wins every tie


def test_mse_keeps_exact_blocks_and_is_deterministic_and_blockwise():
    # a block exactly representable under the amax scale has error 0: its scale stays
    vals = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0] * 2)
    x = torch.stack([vals, -vals.flip(0)])[None, None] * 0.875  # [1, 1, 2, 16]: S_enc = 512
    qa, qm = N.quantize_blocks(x, (0, 1)), N.quantize_blocks(x, (0, 1), scale_rule="mse")
    assert torch.equal(qm.scales.view(torch.uint8), qa.scales.view(torch.uint8))
    assert torch.equal(N.dequantize(qm), x)
    y = _inputs()["student_t3"]
    a, b = (
        N.quantize_blocks(y, (0, 1), scale_rule="mse"),
        N.quantize_blocks(y.clone(), (0, 1), scale_rule="mse"),
    )
    assert torch.equal(a.data, b.data) and torch.equal(a.scales.view(torch.uint8), b.scales.view(torch.uint8))
    # each block's choice depends on its 16 values and its group's amax only: reordering tokens
    perm = torch.randperm(y.shape[2], generator=torch.Generator().manual_seed(3))
    c = N.quantize_blocks(y[:, :, perm], (0, 1), scale_rule="mse")
    assert torch.equal(c.scales.view(torch.uint8), a.scales.view(torch.uint8)[:, :, perm])


def test_dequantize_reads_an_mse_block_unchanged():
    x = _inputs()["gauss"]
    q = N.quantize_blocks(x, (0, 1), scale_rule="mse")
    vals = N.e2m1_decode(N.unpack_codes(q.data)).unflatten(-1, (-1, 16))
    want = ((vals * q.scales.float().unsqueeze(-1)) * (1.0 / N.encode_scale(q.amax)).unsqueeze(-1)).flatten(
        -2
    )
    assert torch.equal(N.dequantize(q), want)
    assert torch.equal(N.fake_quantize_kv(x, (0, 1), scale_rule="mse"), want)


def test_non_finite_input_as_the_amax_rule():
    x = torch.randn(1, 1, 4, 32)
    x[0, 0, 0, 3] = float("nan")
    qm = N.quantize_blocks(x, (0, 1), scale_rule="mse")
    assert N.dequantize(qm).isnan().all()  # NaN stays loud
    y = torch.randn(1, 1, 4, 32)
    y[0, 0, 1, 0] = float("inf")
    qa, qm = N.quantize_blocks(y, (0, 1)), N.quantize_blocks(y, (0, 1), scale_rule="mse")
    assert torch.equal(N.dequantize(qm)[0, 0, 1, :16], N.dequantize(qa)[0, 0, 1, :16])  # the inf block


def test_rule_errors_and_chunked_history():
    x = torch.randn(2, 2, 8, 32)
    with pytest.raises(ValueError, match="unknown NVFP4 scale rule 'l1'"):
        N.quantize_blocks(x, (0, 1), scale_rule="l1")
    with pytest.raises(ValueError, match="1x16 blocks"):
        N.quantize_with_amax(x, x.abs().amax(), tile_2d=True, scale_rule="mse")
    hist = torch.randn(2, 2, 12, 32)
    ref = torch.cat([N.fake_quantize_kv(hist[:, :, i * 4 : (i + 1) * 4], (0,), "mse") for i in range(3)], 2)
    assert torch.equal(N.fake_quantize_kv_chunks(hist, 4, scale_rule="mse"), ref)


# ---- the KV cache and QAT's history fake-quant ------------------------------------------------


def test_cache_write_is_the_mse_quantizer_on_every_backend():
    x = _inputs()["student_t3"]
    b, h, n, d = x.shape
    want = N.quantize_blocks(x, (0, 1), scale_rule="mse")
    for backend in ("torch", "interpret"):  # "mse" runs the torch reference whatever the backend
        data = torch.empty(b, h, n, d // 2, dtype=torch.uint8)
        scales = torch.empty(b, h, n, d // 16, dtype=torch.uint8)
        amax = torch.empty(b, h, 1, 1)
        nvfp4_quantize_into(x, data, scales, amax, backend=backend, scale_rule="mse")
        assert torch.equal(data, want.data) and torch.equal(scales, want.scales.view(torch.uint8))
        assert torch.equal(amax, want.amax)
    with pytest.raises(ValueError, match="scale rule"):
        KVCache(2, MaskRule("causal", 1), 4, "nvfp4", scale_rule="max")


def test_grouped_history_fake_quant_is_the_mse_cache_format():
    g = torch.Generator().manual_seed(0)
    x_BHLD = torch.randn(2, 4, 30, 32, generator=g) * torch.rand(1, 4, 30, 1, generator=g) * 10
    group = torch.randint(0, 3, (30,), generator=g)
    got = fake_quantize_kv_grouped(x_BHLD, group, 3, scale_rule="mse")
    for c in range(3):
        idx = torch.nonzero(group == c).squeeze(1)
        assert torch.equal(got[:, :, idx], N.fake_quantize_kv(x_BHLD[:, :, idx], (0, 1), scale_rule="mse"))
    assert not torch.equal(got, fake_quantize_kv_grouped(x_BHLD, group, 3))
    with pytest.raises(ValueError, match="no block scales"):
        KVFakeQuantHook(kv_format="fp8", scale_rule="mse")


HW = (4, 4)
TWO = (1000.0, 500.0)


def test_mse_cache_streams_equal_to_teacher_forcing_with_mse_history():
    torch.manual_seed(0)
    model = CausalWanDiT.from_flavor("debug", attn_backend="sdpa").eval()
    cond = debug_text_context(["a cat", "a dog"], model.cfg.text_dim, length=8)
    cfg = SamplerConfig(kv_cache="nvfp4", kv_scale_rule="mse", window_frames=4, sink_frames=2, timesteps=TWO)
    res = StreamingSampler(model, cfg).generate_latents([cond], [4], HW, [1, 2], trace=True)
    stream = torch.cat([ch.trace[1]["v"] for ch in res.chunks], dim=2)
    for step in (0, 1):
        tf = _tf_noisy_pred(model, res, cfg, step, cond, hook=KVFakeQuantHook(scale_rule="mse"))
        torch.testing.assert_close(
            torch.cat([ch.trace[step]["v"] for ch in res.chunks], dim=2), tf, rtol=1e-4, atol=1e-4
        )
    # not the amax history's prediction (the rule reaches the cache; the test is not vacuous)
    amax = _tf_noisy_pred(model, res, cfg, 1, cond, hook=KVFakeQuantHook())
    assert (amax - stream).abs().max() > 1e-4


# ---- flag, recipe key, run resolution ---------------------------------------------------------


def test_cli_flag_parses_and_refuses_unknown(capsys):
    from vidtrain.sample.cli import FLAGS, parser, sampler_config

    assert FLAGS["kv_scale_rule"] == "kv_scale_rule"
    base = ["--checkpoint", "m", "--shots", "s.yaml", "--out", "o.mp4"]
    assert sampler_config(parser().parse_args(base)).kv_scale_rule == "amax"
    args = parser().parse_args([*base, "--kv-cache", "nvfp4", "--kv-scale-rule", "mse"])
    assert args.kv_scale_rule == "mse" and sampler_config(args).kv_scale_rule == "mse"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        parser().parse_args([*base, "--kv-scale-rule", "minmax"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--kv-scale-rule" in err and "invalid choice: 'minmax'" in err and "amax" in err and "mse" in err
    with pytest.raises(ValueError, match="unknown kv_scale_rule 'minmax'; known: amax, mse"):
        SamplerConfig(kv_scale_rule="minmax")


def test_recipe_key_trains_and_samples_with_the_rule():
    from vidtrain.train.qat_method import QAT

    recipe = load_recipe(None, ["method.name=qat", "quant.kv_scale_rule=mse"])
    assert QAT(recipe).kv_hook(None).scale_rule == "mse"
    assert QAT(load_recipe(None, ["method.name=qat"])).kv_hook(None).scale_rule == "amax"
    cfg = SamplerConfig.from_run(recipe)  # the run (a Recipe in memory, DMD's way) decides
    assert (cfg.kv_cache, cfg.kv_scale_rule) == ("nvfp4", "mse")
    flag = SamplerConfig.from_run(recipe, overrides={"kv_scale_rule": "amax"})  # flag > run
    assert flag.kv_scale_rule == "amax"
    assert SamplerConfig.from_run(None).kv_scale_rule == "amax"  # no run: the default
    with pytest.raises(ConfigError, match="kv_scale_rule"):
        load_recipe(None, ["method.name=qat", "quant.kv_scale_rule=l2"])
    with pytest.raises(ConfigError, match="no block scales"):
        load_recipe(None, ["method.name=qat", "quant.format=fp8", "quant.kv_scale_rule=mse"])


def test_run_folder_recipe_decides_the_rule(tmp_path):
    from vidtrain.models.wan.state_dict import save_vidtrain
    from vidtrain.sample import settings

    torch.manual_seed(0)
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    save_vidtrain(CausalWanDiT.from_flavor("debug"), step / "model")
    (step / "recipe.yaml").write_text("method:\n  name: qat\nquant:\n  kv_scale_rule: mse\n")
    got = settings.resolve(SamplerConfig, step)
    assert got["kv_cache"].value == "nvfp4" and got["kv_scale_rule"].value == "mse"
    assert "quant.kv_scale_rule" in got["kv_scale_rule"].source
