"""DMD with image-to-video rollouts (data.task i2v / mixed): the generator's frame 0 is the image,
teacher and critic see it clean at timestep 0, no loss on it, t2v unchanged, mixed keyed, resume."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import vidtrain.distill.method as dmd_method
import vidtrain.distill.rollout as dmd_rollout
from vidtrain.config import load_recipe
from vidtrain.distill.method import DMD
from vidtrain.lora import roles as lora
from vidtrain.models.wan import CausalWanDiT
from vidtrain.train.methods import TeacherForcing

BASE = [
    "method.name=dmd", "train.ema_decay=null", "train.progress=false", "log.plots=false", "log.wandb=disabled",
    "method.dmd.lora_rank=4", "method.dmd.generator_update_every=2", "method.dmd.rollout=self_forcing",
    "train.max_steps=4", "optim.warmup_steps=0", "optim.schedule=constant", "method.dmd.generator_lr=1e-3",
    "method.dmd.critic_lr=1e-3", "data.synthetic_samples=4", "data.frames=6", "data.height=4", "data.width=4",
    "model.flavor=wan2.2-debug", "method.forcing.min_timestep=20",
]  # fmt: skip


@pytest.fixture(scope="module")
def i2v_teacher(tmp_path_factory):
    """A Wan2.2 TI2V-shaped debug DiT (48 latent channels) saved as the I2V runs' teacher."""
    from vidtrain.models.wan.state_dict import save_vidtrain

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("i2v_teacher") / "teacher"
    save_vidtrain(CausalWanDiT.from_flavor("wan2.2-debug"), path)
    return path


def recipe(teacher, run_dir, *extra):
    return load_recipe(None, [*BASE, f"method.dmd.teacher={teacher}", f"run.dir={run_dir}", *extra])


def trainer(r):
    from vidtrain.train.trainer import Trainer

    return Trainer(r)


def fit(r):
    tr = trainer(r)
    try:
        tr.fit()
    finally:
        tr.close()
    return tr


def losses(run_dir):
    recs = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], k): r[k] for r in recs for k in ("critic_loss", "generator_loss") if k in r}


def generator_params(tr):
    model = tr.strategy.unwrap(tr.model)
    return {n: p.detach().clone() for n, p in lora.adapter_params(model, lora.GENERATOR).items()}


# ---- (a) the generator's frame 0 is the image ------------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["method.dmd.rollout=teacher_forcing"]], ids=["self_forcing", "tf"])
def test_i2v_rollout_frame0_is_the_image(i2v_teacher, tmp_path, extra):
    tr = trainer(recipe(i2v_teacher, tmp_path / "r", "data.task=i2v", "data.batch_size=2", *extra))
    try:
        model, method = tr.strategy.unwrap(tr.model), tr.method
        batch = tr.next_batch()
        x = method.rollout(tr, model, batch, 0, grad=True)
        assert torch.equal(x[:, :, 0].detach(), batch["latents"][:, :, 0])
        assert (x[:, :, 1:].detach() - batch["latents"][:, :, 1:]).abs().max() > 1e-3  # the rest generated
        loss, _ = method.generator_loss(tr, model, x, batch)
        assert torch.isfinite(loss)
    finally:
        tr.close()


LONG = ["method.dmd.rollout_frames=12", "method.dmd.window_frames=6", "model.window_frames=3",
        "model.sink_frames=3"]  # fmt: skip


@pytest.mark.parametrize("bni", [False, True], ids=["plain", "backward_noise_init"])
def test_long_rollout_conditions_only_the_window_at_chunk0(i2v_teacher, tmp_path, monkeypatch, bni):
    """A long rollout's window holding chunk 0 starts at the image (not re-noised under backward
    noise init) and is scored with frame 0 at sigma 0; a later window is scored as usual."""
    r = recipe(i2v_teacher, tmp_path / "r", "data.task=i2v", *LONG, "method.dmd.windows=2",
               "method.dmd.window_frames=3", f"method.dmd.backward_noise_init={str(bni).lower()}")  # fmt: skip
    monkeypatch.setattr(dmd_method, "window_starts", lambda *a, **k: [0, 2])
    sigmas = []
    real_v = dmd_method.tf_velocity

    def spy(model, x, noise, sigma_BF, *a, **k):
        sigmas.append(sigma_BF.detach().clone())
        return real_v(model, x, noise, sigma_BF, *a, **k)

    monkeypatch.setattr(dmd_method, "tf_velocity", spy)
    tr = trainer(r)
    try:
        model, method = tr.strategy.unwrap(tr.model), tr.method
        batch = tr.next_batch()
        wins = method.rollout(tr, model, batch, 0, grad=True)
        assert [w.frame_offset for w in wins] == [0, 6]
        assert torch.equal(wins[0].x_BCFHW[:, :, 0].detach(), batch["latents"][:, :, 0])
        assert not torch.equal(wins[1].x_BCFHW[:, :, 0].detach(), batch["latents"][:, :, 0])
        loss, _ = method.generator_loss(tr, model, wins, batch)
        assert torch.isfinite(loss)
        assert len(sigmas) == 6  # teacher cond + uncond, critic, per window
        assert all(bool((s[:, 0] == 0).all()) for s in sigmas[:3])
        assert all(bool((s > 0).all()) for s in sigmas[3:])
    finally:
        tr.close()


# ---- (b) teacher and critic see frame 0 clean at timestep 0 ----------------------------------------


def test_scores_and_critic_see_frame0_clean_at_t0(i2v_teacher, tmp_path, monkeypatch):
    seqs = []
    real_build = dmd_rollout.build_tf_sequence

    def spy(x0, noise, sigma_BF, *a, **k):
        seq = real_build(x0, noise, sigma_BF, *a, **k)
        seqs.append((x0.detach().clone(), sigma_BF.detach().clone(), seq))
        return seq

    monkeypatch.setattr(dmd_rollout, "build_tf_sequence", spy)
    tr = trainer(recipe(i2v_teacher, tmp_path / "r", "data.task=i2v", "data.batch_size=2"))
    try:
        model, method = tr.strategy.unwrap(tr.model), tr.method
        batch = tr.next_batch()
        x = method.rollout(tr, model, batch, 0, grad=True)
        assert not seqs  # the self-forcing rollout runs the sampler, not teacher forcing
        method.generator_loss(tr, model, x, batch)
        method.critic_loss(tr, model, x, batch)
        assert len(seqs) == 4  # teacher cond + uncond, critic score, critic loss
        for x0, sigma_BF, seq in seqs:
            assert bool((sigma_BF[:, 0] == 0).all()) and bool((sigma_BF[:, 1:] > 0).all())
            assert torch.equal(x0[:, :, 0], batch["latents"][:, :, 0])
            meta = seq.meta
            noisy0 = meta.noisy & (meta.frame == 0)
            clean0 = ~meta.noisy & (meta.frame == 0)
            assert bool((seq.t_BL[:, noisy0] == 0).all())  # timestep 0 on the conditioning frame
            assert bool((seq.t_BL[:, meta.noisy & (meta.frame > 0)] > 0).all())
            assert torch.equal(seq.x_BLP[:, noisy0], seq.x_BLP[:, clean0])  # never noised
    finally:
        tr.close()


# ---- (c) no loss on frame 0 -------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["i2v", "t2v"])
def test_losses_ignore_frame0_predictions(i2v_teacher, tmp_path, monkeypatch, task):
    tr = trainer(recipe(i2v_teacher, tmp_path / "r", f"data.task={task}", "data.batch_size=2"))
    try:
        model, method = tr.strategy.unwrap(tr.model), tr.method
        batch = tr.next_batch()
        with torch.no_grad():
            x = method.rollout(tr, model, batch, 0, grad=False)

        def both():
            xg = x.detach().clone().requires_grad_(True)
            lg, _ = method.generator_loss(tr, model, xg, batch)
            lg.backward()
            return float(lg.detach()), float(method.critic_loss(tr, model, x, batch).detach()), xg.grad

        ref_g, ref_c, grad = both()
        real_v = dmd_method.tf_velocity

        def perturbed(*a, **k):  # what the model predicts for frame 0, far off
            v = real_v(*a, **k).clone()
            v[:, :, 0] += 1e3
            return v

        monkeypatch.setattr(dmd_method, "tf_velocity", perturbed)
        got_g, got_c, _ = both()
        if task == "i2v":
            assert bool((grad[:, :, 0] == 0).all()) and grad[:, :, 1:].abs().max() > 0
            assert got_g == ref_g and got_c == ref_c
        else:  # the test has teeth: text-to-video frame 0 is scored
            assert got_c != ref_c and grad[:, :, 0].abs().max() > 0
    finally:
        tr.close()


def test_masked_dmd_gradient_and_loss():
    x = torch.randn(2, 4, 6, 2, 2, requires_grad=True)
    real, fake = torch.randn(2, 4, 6, 2, 2), torch.randn(2, 4, 6, 2, 2)
    keep = dmd_method.loss_frames(torch.tensor([True, False]), 6)
    assert keep.tolist() == [[False] + [True] * 5, [True] * 6]
    real0 = real.clone()
    real0[0, :, 0] = float("nan")  # even a non-finite score on the conditioning frame is ignored
    g = dmd_method.dmd_gradient(x.detach(), real0, fake, 3, keep)
    assert bool((g[0, :, 0] == 0).all()) and torch.isfinite(g).all()
    # sample 1 (not conditioned): today's gradient; sample 0 chunk 0: normalised over frames 1, 2
    torch.testing.assert_close(g[1:], dmd_method.dmd_gradient(x.detach()[1:], real[1:], fake[1:], 3))
    norm = (x.detach()[0, :, 1:3] - real[0, :, 1:3]).abs().mean()
    torch.testing.assert_close(g[0, :, 1:3], (fake - real)[0, :, 1:3] / norm)
    dmd_method.dmd_loss(x, g, keep).backward()
    want = torch.where(keep[:, None, :, None, None], g, 0.0) / (int(keep.sum()) * 4 * 2 * 2)
    torch.testing.assert_close(x.grad, want)
    assert dmd_method.loss_frames(torch.tensor([False, False]), 6) is None


# ---- (d) t2v unchanged ------------------------------------------------------------------------------


def test_t2v_unchanged(i2v_teacher, tmp_path):
    """The default, explicit t2v and mixed with fraction 0 (every sample drawn unconditioned, the
    I2V code paths taken with no sample conditioned) train bit-identically."""
    runs = {}
    for name, extra in [("default", []), ("t2v", ["data.task=t2v"]),
                        ("mixed0", ["data.task=mixed", "data.i2v_fraction=0.0"])]:  # fmt: skip
        tr = fit(recipe(i2v_teacher, tmp_path / name, "train.max_steps=2", "data.batch_size=2", *extra))
        runs[name] = (losses(tmp_path / name), generator_params(tr))
    ref_l, ref_p = runs["default"]
    for name in ("t2v", "mixed0"):
        got_l, got_p = runs[name]
        assert got_l == ref_l, name
        assert all(torch.equal(got_p[n], ref_p[n]) for n in ref_p), name


# ---- (e) mixed: a keyed per-sample draw ---------------------------------------------------------------


def _stub(r, step=3, dp_rank=0):
    return SimpleNamespace(recipe=r, step=step, strategy=SimpleNamespace(dp_rank=dp_rank))


def test_mixed_choice_is_teacher_forcings_keyed_draw(i2v_teacher, tmp_path):
    r = recipe(i2v_teacher, tmp_path, "data.task=mixed")
    m = DMD(r)
    a = m.conditioned(_stub(r), 16)
    assert torch.equal(a, m.conditioned(_stub(r), 16)) and 0 < int(a.sum()) < 16
    assert torch.equal(a, TeacherForcing(r).conditioned(_stub(r), 16, 0))  # the same decision function
    halves = torch.cat([m.conditioned(_stub(r, dp_rank=k), 8) for k in (0, 1)])
    assert torch.equal(halves, a)  # however the global batch is split over ranks
    assert not torch.equal(a, m.conditioned(_stub(r, step=4), 16))
    r.data.task = "i2v"
    assert bool(m.conditioned(_stub(r), 4).all())


def test_mixed_rollout_pins_only_conditioned_samples(i2v_teacher, tmp_path):
    r = recipe(i2v_teacher, tmp_path / "r", "data.task=mixed", "data.batch_size=4")
    tr = trainer(r)
    try:
        model, method = tr.strategy.unwrap(tr.model), tr.method
        batch = tr.next_batch()
        cond = method.conditioned(tr, 4)
        if not (0 < int(cond.sum()) < 4):
            pytest.skip("this seed's draw conditions all or none of the batch")
        x = method.rollout(tr, model, batch, tr.step, grad=False)
        x2 = method.rollout(tr, model, batch, tr.step, grad=False)
        assert torch.equal(x, x2)  # deterministic
        first = batch["latents"][:, :, 0]
        for i in range(4):
            assert torch.equal(x[i, :, 0], first[i]) == bool(cond[i])
        # the unconditioned samples roll out as text-to-video, with their own seeds
        r.data.task = "t2v"
        t2v = method.rollout(tr, model, batch, tr.step, grad=False)
        torch.testing.assert_close(x[~cond], t2v[~cond], rtol=1e-4, atol=1e-5)
        loss_c = method.critic_loss(tr, model, x, batch)
        assert torch.isfinite(loss_c)
    finally:
        tr.close()


def test_mixed_training_is_deterministic(i2v_teacher, tmp_path):
    extra = [
        "data.task=mixed",
        "data.batch_size=4",
        "train.max_steps=2",
        "method.dmd.rollout=teacher_forcing",
    ]
    a = fit(recipe(i2v_teacher, tmp_path / "a", *extra))
    b = fit(recipe(i2v_teacher, tmp_path / "b", *extra))
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    pa, pb = generator_params(a), generator_params(b)
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    recs = [json.loads(s) for s in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all("i2v_fraction" in rec for rec in recs)


# ---- (f) exact resume ----------------------------------------------------------------------------------


def test_i2v_resume_equals_uninterrupted(i2v_teacher, tmp_path):
    full = fit(recipe(i2v_teacher, tmp_path / "a", "data.task=i2v"))
    fit(recipe(i2v_teacher, tmp_path / "b", "data.task=i2v", "train.max_steps=2", "train.ckpt_every=2"))
    rest = fit(
        recipe(i2v_teacher, tmp_path / "b", "data.task=i2v", "train.max_steps=4", "train.ckpt_every=2")
    )
    assert rest.method.updates == {"generator": 2, "critic": 4}
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert set(a) == set(b) and len(a) == 6
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    for role in (lora.GENERATOR, lora.CRITIC):
        pa = lora.adapter_params(full.strategy.unwrap(full.model), role)
        pb = lora.adapter_params(rest.strategy.unwrap(rest.model), role)
        for n in pa:
            torch.testing.assert_close(pa[n], pb[n], rtol=1e-5, atol=1e-6)
