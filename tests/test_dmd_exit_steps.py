"""DMD rollouts draw one exit step per chunk, the same on every rank (a function of seed, step)."""

from __future__ import annotations

import torch

from vidtrain.config import load_recipe
from vidtrain.distill import method as dmd_method
from vidtrain.lora import roles as lora
from vidtrain.sample.sampler import StreamingSampler


def trainer(teacher, run_dir, rollout: str):
    from vidtrain.train.trainer import Trainer

    overrides = [
        "method.name=dmd", f"method.dmd.teacher={teacher}", f"run.dir={run_dir}", "train.ema_decay=null",
        "train.progress=false", "log.plots=false", "log.wandb=disabled", "method.dmd.lora_rank=4",
        f"method.dmd.rollout={rollout}", "data.frames=9", "data.synthetic_samples=2", "train.max_steps=1",
    ]  # fmt: skip
    return Trainer(load_recipe(None, overrides))


def test_exit_steps_per_chunk_depend_on_seed_and_step_only():
    r = load_recipe(None, [])
    fake = type("M", (), {"recipe": r, "sigmas": [1.0, 0.8, 0.6, 0.4]})()
    draws = [dmd_method.DMD.exit_steps(fake, step, 5) for step in range(20)]
    assert draws == [dmd_method.DMD.exit_steps(fake, step, 5) for step in range(20)]  # repeatable
    assert all(len(d) == 5 and all(0 <= k < 4 for k in d) for d in draws)
    assert any(len(set(d)) > 1 for d in draws)  # chunks draw their own step
    assert len({tuple(d) for d in draws}) > 1  # and steps differ


def test_self_forcing_rollout_exits_per_chunk(teacher, tmp_path, monkeypatch):
    tr = trainer(teacher, tmp_path / "run", "self_forcing")
    model, method = tr.strategy.unwrap(tr.model), tr.method
    seen = []
    stream = StreamingSampler.stream

    def spy(self, *args, **kw):
        seen.append(kw.get("grad_exit"))
        return stream(self, *args, **kw)

    monkeypatch.setattr(StreamingSampler, "stream", spy)
    batch = tr.next_batch()
    x = method.rollout(tr, model, batch, 3, grad=True)
    assert seen == [method.exit_steps(3, 3)]
    method.generator_loss(tr, model, x, batch)[0].backward()
    # the exit passes recompute the text K/V with a graph: the cross-attention k/v LoRA learns
    grads = {n for n, p in lora.adapter_params(model, "dmd").items() if p.grad is not None}
    assert any("cross_attn.k." in n for n in grads) and any("cross_attn.v." in n for n in grads)
    model.zero_grad(set_to_none=True)


def test_tf_rollout_noises_each_chunk_at_its_exit_sigma(teacher, tmp_path, monkeypatch):
    tr = trainer(teacher, tmp_path / "run", "teacher_forcing")
    model, method = tr.strategy.unwrap(tr.model), tr.method
    seen = []
    velocity = dmd_method.tf_velocity

    def spy(model, x0, noise, sigma_BF, *args):
        seen.append(sigma_BF)
        return velocity(model, x0, noise, sigma_BF, *args)

    monkeypatch.setattr(dmd_method, "tf_velocity", spy)
    with torch.no_grad():
        method.rollout(tr, model, tr.next_batch(), 5, grad=False)
    want = torch.tensor([method.sigmas[k] for k in method.exit_steps(5, 3)]).repeat_interleave(3)
    torch.testing.assert_close(seen[0], want.expand(seen[0].shape[0], -1))
