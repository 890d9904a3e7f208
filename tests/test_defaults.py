"""Every default in one place: shared values, one keyed RNG, one backend table, one EMA, checks
only in config.validate."""

from __future__ import annotations

import typing

import pytest
import torch

from vidtrain import config
from vidtrain.config import ConfigError, QuantConfig, load_recipe
from vidtrain.forcing import flow
from vidtrain.quant import convert, qat
from vidtrain.sample.sampler import SamplerConfig
from vidtrain.train.ema import EMA
from vidtrain.utils import rng


def test_shared_values_have_one_source():
    r = load_recipe(None)
    assert r.method.forcing.timestep_shift == r.method.dmd.timestep_shift == SamplerConfig.shift
    assert SamplerConfig.shift == config.TIMESTEP_SHIFT
    assert r.model.frames_per_chunk == SamplerConfig.frames_per_chunk == config.FRAMES_PER_CHUNK
    assert tuple(r.method.dmd.denoising_steps) == SamplerConfig.timesteps == config.DENOISING_STEPS
    assert flow.NUM_TRAIN_TIMESTEPS == config.NUM_TRAIN_TIMESTEPS
    assert tuple(r.quant.exclude) == qat.DEFAULT_EXCLUDE == config.QAT_EXCLUDE
    assert SamplerConfig().sigmas() == flow.step_sigmas(config.DENOISING_STEPS, config.TIMESTEP_SHIFT)


def test_keyed_seeds_are_the_formulas_the_rooms_used():
    seed, step, micro, rank, salt, b = 3, 17, 1, 2, 5, 4
    key = ((seed * 1_000_003 + step) * 131 + micro) * 1009 + rank
    want = torch.rand(4, generator=torch.Generator().manual_seed(key * 7 + salt))
    assert torch.equal(torch.rand(4, generator=rng.step_generator(seed, step, micro, rank, salt)), want)
    key = (seed * 1_000_003 + step) * 65_536 + rank * b
    assert rng.sample_seeds(seed, step, rank * b, b, salt) == [(key + i) * 8 + salt for i in range(b)]
    want = torch.rand(4, generator=torch.Generator().manual_seed(seed * 1_000_003 + step * 7919 + 101))
    assert torch.equal(torch.rand(4, generator=rng.step_only_generator(seed, step)), want)
    assert rng.stream_seed(seed, rank) == seed * 1_000_003 + rank


def test_one_backend_vocabulary():
    assert set(typing.get_args(typing.get_type_hints(QuantConfig)["backend"])) == set(convert.BACKENDS)
    assert all(q in qat.QUANTIZERS for q, _ in convert.BACKENDS.values())
    assert convert.kernel_backend("emulate", torch.device("cpu")) == "torch"
    assert convert.kernel_backend("te", torch.device("cpu")) == "torch"  # TE's K/V: the reference
    with pytest.raises(ValueError, match="CUDA"):
        convert.kernel_backend("triton", torch.device("cpu"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method.dmd.denoising_steps=[500, 750]"], "method.dmd.denoising_steps must be strictly decreasing"),
        (["method.dmd.denoising_steps=[1500]"], r"method.dmd.denoising_steps must be in \(0, 1000\]"),
        (["method.forcing.min_timestep=900", "method.forcing.max_timestep=100"], "method.forcing needs"),
        (["method.forcing.timestep_shift=0"], "method.forcing.timestep_shift must be a finite number > 0"),
        (["train.ema_decay=1.5"], r"train.ema_decay must be in \[0, 1\)"),
        (["method.dmd.ema_decay=1.0"], r"method.dmd.ema_decay must be in \[0, 1\)"),
        (["method.name=dmd", "train.grad_accum=2"], "one rollout per step"),
        (["method.name=dmd", "parallel.strategy=fsdp"], "none, ddp or deepspeed"),
        (["method.name=dmd", "method.dmd.teacher=a", "model.checkpoint=b"], "one base serves all DMD roles"),
        (["quant.enabled=true"], "quant.enabled=true needs method.name=qat"),
    ],
)
def test_checks_live_in_config_validate(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(None, overrides)


def test_quantized_means_one_thing():
    assert not load_recipe(None).quantized
    assert load_recipe(None, ["method.name=qat"]).quantized  # QAT is training the NVFP4 model
    assert load_recipe(None, ["method.name=dmd", "quant.enabled=true"]).quantized
    assert not load_recipe(None, ["method.name=dmd"]).quantized


def test_ema_of_a_mapping_equals_the_module_ema():
    lin = torch.nn.Linear(4, 3)
    a, b = EMA(lin, 0.5), EMA(dict(lin.named_parameters()), 0.5)
    with torch.no_grad():
        lin.weight.add_(1.0)
    a.update(lin)
    b.update(dict(lin.named_parameters()))
    assert all(torch.equal(a.shadow[n], b.shadow[n]) for n in a.shadow)


def test_a_role_step_needs_a_role_optimizer(tmp_path):
    from vidtrain.train.trainer import Trainer

    tr = Trainer(
        load_recipe(None, [f"run.dir={tmp_path / 'r'}", "train.progress=false", "log.wandb=disabled"])
    )
    try:
        with pytest.raises(TypeError, match="no roles"):
            tr.optimizer_step(True, role="critic")
    finally:
        tr.close()


def test_chunked_masks_need_their_chunk_size():
    from vidtrain.tokens import MaskRule

    assert MaskRule("full").frames_per_chunk is None  # full attention has no chunks
    for kind in ("causal", "teacher_forcing"):
        with pytest.raises(ValueError, match="needs frames_per_chunk"):
            MaskRule(kind)
    assert MaskRule.of("causal", load_recipe(None).model).frames_per_chunk == config.FRAMES_PER_CHUNK


def test_quant_excludes_are_a_model_seam():
    from vidtrain.models.seams import quant_exclude
    from vidtrain.models.wan.config import flavor
    from vidtrain.models.wan.model import CausalWanDiT

    model = CausalWanDiT(flavor("debug"))
    assert quant_exclude(model) == config.QAT_EXCLUDE
    declared = qat.convert(CausalWanDiT(flavor("debug")))  # no list: the model's declared one
    listed = qat.convert(CausalWanDiT(flavor("debug")), exclude=config.QAT_EXCLUDE)
    kinds = [[type(m).__name__ for m in x.modules()] for x in (declared, listed)]
    assert kinds[0] == kinds[1] and "NVFP4Linear" in kinds[0] and "Linear" in kinds[0]
    assert load_recipe(None, ["quant.exclude=null"]).quant.exclude is None
    bare = torch.nn.Sequential(torch.nn.Linear(16, 16))  # declares nothing: the Wan default list
    assert qat.resolve_exclude(bare, None) == qat.DEFAULT_EXCLUDE
