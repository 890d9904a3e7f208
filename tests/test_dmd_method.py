"""DMD method: schedule, frozen base, adapter-only gradients, the DMD gradient, resume, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from vidtrain.config import ConfigError, load_recipe
from vidtrain.distill.method import DMD, check_dmd_recipe, dmd_gradient, dmd_loss
from vidtrain.lora import roles as lora
from vidtrain.models.wan import CausalWanDiT


def recipe(teacher, run_dir, *extra):
    return load_recipe(
        None,
        [
            "method.name=dmd", f"method.dmd.teacher={teacher}", f"run.dir={run_dir}", "train.ema_decay=null",
            "train.progress=false", "log.plots=false", "log.wandb=disabled", "method.dmd.lora_rank=4",
            "method.dmd.generator_update_every=2", "method.dmd.rollout=teacher_forcing", "train.max_steps=4",
            "optim.warmup_steps=0", "optim.schedule=constant", "method.dmd.generator_lr=1e-3", "method.dmd.critic_lr=1e-3",
            "data.synthetic_samples=4", *extra,
        ],
    )  # fmt: skip


def test_update_schedule():
    r = load_recipe(None, ["method.dmd.generator_update_every=5"])
    sched = [DMD.is_generator_step(type("M", (), {"cfg": r.method.dmd})(), s) for s in range(10)]
    assert sched == [True, False, False, False, False, True, False, False, False, False]


def test_dmd_loss_gradient_is_g_over_n():
    x = torch.randn(2, 4, 6, 4, 4, requires_grad=True)
    g = torch.randn(2, 4, 6, 4, 4)
    dmd_loss(x, g).backward()
    torch.testing.assert_close(x.grad, g / x.numel())


def test_dmd_gradient_normalised_per_chunk():
    x = torch.zeros(1, 2, 4, 2, 2)
    real = torch.cat([torch.full((1, 2, 2, 2, 2), 2.0), torch.full((1, 2, 2, 2, 2), 0.5)], dim=2)
    fake = real + 1.0
    g = dmd_gradient(x, real, fake, frames_per_chunk=2)
    torch.testing.assert_close(g[:, :, :2], torch.full((1, 2, 2, 2, 2), 0.5))  # 1 / mean|x - real| = 1/2
    torch.testing.assert_close(g[:, :, 2:], torch.full((1, 2, 2, 2, 2), 2.0))  # 1 / 0.5


def test_training_keeps_base_and_follows_schedule(teacher, tmp_path):
    from vidtrain.train.trainer import Trainer

    tr = Trainer(recipe(teacher, tmp_path / "run"))
    tr.fit()
    model = tr.strategy.unwrap(tr.model)
    base = CausalWanDiT.from_pretrained(str(teacher)).state_dict()
    trained = lora.base_state_dict(model)
    assert set(base) == set(trained)
    assert all(torch.equal(base[k], trained[k]) for k in base), "the base must stay bit-identical"
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [("generator_loss" in rec) for rec in lines] == [True, False, True, False]
    assert lines[-1]["critic_updates"] == 4 and lines[-1]["generator_updates"] == 2
    # the generator adapter moved, the exported LoRA exists
    assert any(p.abs().sum() > 0 for n, p in lora.adapter_params(model, "dmd").items() if "lora_B" in n)
    assert (tmp_path / "run" / "lora" / "adapter_model.safetensors").exists()


def test_only_adapter_params_get_grads(teacher, tmp_path):
    from vidtrain.train.trainer import Trainer

    tr = Trainer(recipe(teacher, tmp_path / "run", "method.dmd.rollout=self_forcing", "data.frames=3"))
    model, method = tr.strategy.unwrap(tr.model), tr.method
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    batch = tr.next_batch()
    x = method.rollout(tr, model, batch, 0, grad=True)
    method.generator_loss(tr, model, x, batch)[0].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(lora.is_adapter_param(n, "dmd") for n in with_grad)
    model.zero_grad(set_to_none=True)
    method.critic_loss(tr, model, x, batch).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(lora.is_adapter_param(n, "critic") for n in with_grad)


@pytest.mark.parametrize("quant", [[], ["quant.enabled=true"]], ids=["bf16_kv", "nvfp4_base_and_kv"])
def test_self_forcing_rollout_with_activation_checkpointing_equals_without(teacher, tmp_path, quant):
    """The grad passes of a self-forcing rollout recompute in the backward after later chunks
    wrote the cache: they must read the history the forward read (the same adapter weights)."""
    from vidtrain.train.trainer import Trainer

    weights = {}
    for ac in (False, True):
        tr = Trainer(
            recipe(teacher, tmp_path / f"ac{ac}", "method.dmd.rollout=self_forcing", "data.frames=9",
                   "model.window_frames=3", "model.sink_frames=3", f"model.activation_checkpointing={ac}",
                   "train.max_steps=2", *quant)
        )  # fmt: skip
        try:
            tr.fit()
            model = tr.strategy.unwrap(tr.model)
            weights[ac] = {n: p.detach().clone() for n, p in lora.adapter_params(model, "dmd").items()}
        finally:
            tr.close()
    assert weights[True].keys() == weights[False].keys()
    assert any(p.abs().sum() > 0 for n, p in weights[True].items() if "lora_B" in n)
    for n in weights[True]:
        torch.testing.assert_close(weights[True][n], weights[False][n], rtol=0, atol=1e-6, msg=n)


def test_resume_restores_both_optimizers(teacher, tmp_path):
    from vidtrain.train.trainer import Trainer

    full = Trainer(recipe(teacher, tmp_path / "a"))
    full.fit()
    half = Trainer(recipe(teacher, tmp_path / "b", "train.max_steps=2", "train.ckpt_every=2"))
    half.fit()
    rest = Trainer(recipe(teacher, tmp_path / "b", "train.max_steps=4", "train.ckpt_every=2"))
    rest.fit()
    assert len(rest.optimizer.state) > 0 and rest.method.updates == {"generator": 2, "critic": 4}

    def losses(run):
        recs = [json.loads(s) for s in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {(r["step"], k): r[k] for r in recs for k in ("critic_loss", "generator_loss") if k in r}

    a, b = losses("a"), losses("b")
    assert set(a) == set(b)
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    pa = lora.adapter_params(full.strategy.unwrap(full.model), "critic")
    pb = lora.adapter_params(rest.strategy.unwrap(rest.model), "critic")
    for n in pa:
        torch.testing.assert_close(pa[n], pb[n], rtol=1e-5, atol=1e-6)


def test_bad_inputs_fail_before_training(teacher, tmp_path):
    from vidtrain.train.trainer import Trainer

    with pytest.raises(ConfigError, match="generator_update_every"):
        recipe(teacher, tmp_path, "method.dmd.generator_update_every=0")
    r = recipe(teacher, tmp_path)
    r.method.dmd.generator_update_every = 0
    with pytest.raises(ValueError, match="generator_update_every"):
        check_dmd_recipe(r)
    with pytest.raises(FileNotFoundError, match="teacher"):
        DMD(recipe(tmp_path / "missing", tmp_path))
    with pytest.raises(ValueError, match="match no linear"):
        Trainer(recipe(teacher, tmp_path / "r1", "method.dmd.lora_targets=[q, nope]"))
    with pytest.raises(ValueError, match="lora_rank"):
        Trainer(recipe(teacher, tmp_path / "r2", "method.dmd.lora_rank=1000"))


def test_nvfp4_base_with_lora_trains(teacher, tmp_path):
    from vidtrain.quant.qat import NVFP4Linear
    from vidtrain.train.trainer import Trainer

    tr = Trainer(recipe(teacher, tmp_path / "q", "quant.enabled=true", "train.max_steps=1"))
    tr.fit()
    model = tr.strategy.unwrap(tr.model)
    assert isinstance(model.get_base_model().blocks[0].self_attn.q.base_layer, NVFP4Linear)
    base = CausalWanDiT.from_pretrained(str(teacher)).state_dict()
    trained = lora.base_state_dict(model)
    assert all(torch.equal(base[k], trained[k]) for k in base)


def test_recipes_load(teacher):
    from pathlib import Path

    for path in sorted(Path(__file__).parents[1].glob("recipes/dmd_*.yaml")):
        r = load_recipe(path, [f"method.dmd.teacher={teacher}", "model.checkpoint=null"])
        assert r.method.name == "dmd"
        assert path.read_text().startswith("#")
