"""Long self-rollout DMD tuning: the default step unchanged, graph only in the windows, memory
flat in the rollout length, exact resume, multi-shot rollouts, config errors."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from vidtrain.config import ConfigError, load_recipe
from vidtrain.distill.rollout import long_self_rollout, window_starts
from vidtrain.forcing.flow import NUM_TRAIN_TIMESTEPS
from vidtrain.lora import roles as lora
from vidtrain.models.wan import CausalWanDiT
from vidtrain.sample import SamplerConfig, StreamingSampler
from vidtrain.sample.sampler import Conditioning
from vidtrain.tokens import grid_meta

LONG = ["method.dmd.rollout=self_forcing", "model.window_frames=3", "model.sink_frames=3", "data.frames=6"]


def recipe(teacher, run_dir, *extra):
    return load_recipe(
        None,
        [
            "method.name=dmd", f"method.dmd.teacher={teacher}", f"run.dir={run_dir}", "train.ema_decay=null",
            "train.progress=false", "log.plots=false", "log.wandb=disabled", "method.dmd.lora_rank=4",
            "method.dmd.generator_update_every=2", "train.max_steps=4", "optim.warmup_steps=0",
            "optim.schedule=constant", "method.dmd.generator_lr=1e-3", "method.dmd.critic_lr=1e-3",
            "data.synthetic_samples=4", *LONG, *extra,
        ],
    )  # fmt: skip


def metrics(path):
    return [json.loads(s) for s in (path / "metrics.jsonl").read_text().splitlines()]


def losses(path):
    return {(r["step"], k): r[k] for r in metrics(path) for k in ("critic_loss", "generator_loss") if k in r}


def fit(r):
    from vidtrain.train.trainer import Trainer

    tr = Trainer(r)
    try:
        tr.fit()
    finally:
        tr.close()
    return tr


@pytest.fixture
def sampler(teacher):
    model = CausalWanDiT.from_pretrained(str(teacher))
    cfg = SamplerConfig(frames_per_chunk=3, window_frames=3, sink_frames=3, shot_sink=True, kv_cache="fp32")
    return StreamingSampler(model, cfg)


def cond(model, b=2, shots=1):
    g = torch.Generator().manual_seed(5)
    return [Conditioning(torch.randn(b, 8, model.cfg.text_dim, generator=g)) for _ in range(shots)]


@pytest.mark.parametrize("exits", [None, [1, 3, 0, 2]], ids=["inference", "exit_steps"])
def test_long_loop_equals_stream(sampler, exits):
    """The driven chunk loop is the sampler's: a window over the whole rollout, or one stopping
    early, gives the stream's chunks bit for bit (same noise draws, same cache)."""
    conds, seeds = cond(sampler.model, shots=2), [3, 4]
    ref = sampler.generate_latents(conds, [2, 2], (4, 4), seeds, grad_exit=exits).latents_BCFHW
    (whole,) = long_self_rollout(sampler, conds, [2, 2], (4, 4), seeds, [0], 4, exits=exits, grad=False)
    assert torch.equal(whole, ref)
    stats = {}
    (mid,) = long_self_rollout(
        sampler, conds, [2, 2], (4, 4), seeds, [1], 2, exits=exits, grad=False, stats=stats
    )
    assert torch.equal(mid, ref[:, :, 3:9]) and stats["chunks_generated"] == 3


def test_only_window_chunks_carry_gradients(sampler):
    """Passes with grad only in the window's chunks (one per chunk, its exit step); chunks before
    it under no_grad; none after it."""
    for p in sampler.model.parameters():
        p.requires_grad_(True)
    seen = []
    forward = sampler._forward

    def spy(x, t, meta, *a):
        seen.append((int(meta.frame.min()) // 3, torch.is_grad_enabled()))
        return forward(x, t, meta, *a)

    sampler._forward = spy
    (x,) = long_self_rollout(
        sampler, cond(sampler.model), [6], (4, 4), [1, 2], [2], 2, exits=[1] * 6, grad=True
    )
    assert x.requires_grad and x.shape[2] == 6
    assert {c for c, _ in seen} == {0, 1, 2, 3}  # nothing after the window (chunks 2-3)
    assert sorted(c for c, g in seen if g) == [2, 3]
    x.sum().backward()
    assert all(p.grad is not None for p in sampler.model.blocks[0].parameters() if p.dim() == 2)


def saved_bytes(fn):
    """Peak bytes of tensors autograd saved for the backward (each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def test_memory_constant_in_rollout_length(teacher, tmp_path):
    """Graph (autograd-saved bytes) and KV cache of a rollout of 2x and 4x the window: equal."""
    from vidtrain.train.trainer import Trainer

    got = {}
    for n in (12, 24):
        tr = Trainer(recipe(teacher, tmp_path / f"n{n}", f"method.dmd.rollout_frames={n}"))
        try:
            model, method = tr.strategy.unwrap(tr.model), tr.method
            batch = tr.next_batch()
            nbytes, wins = saved_bytes(
                lambda tr=tr, model=model, batch=batch: tr.method.rollout(tr, model, batch, 0, grad=True)
            )
            assert len(wins) == 1 and wins[0].x_BCFHW.requires_grad
            got[n] = (nbytes, method.rollout_stats["kv_bytes_peak"])
        finally:
            tr.close()
    (g2, kv2), (g4, kv4) = got[12], got[24]
    assert g2 > 0 and abs(g4 - g2) / g2 < 0.03, got
    assert kv2 == kv4 > 0, got


def test_default_and_clip_length_rollout_are_todays_step(teacher, tmp_path):
    a = fit(recipe(teacher, tmp_path / "a", "train.max_steps=2"))
    b = fit(recipe(teacher, tmp_path / "b", "train.max_steps=2", "method.dmd.rollout_frames=6",
                   "method.dmd.window_frames=6"))  # fmt: skip
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    pa, pb = (lora.adapter_params(t.strategy.unwrap(t.model), "dmd") for t in (a, b))
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert "window_start_frame" not in metrics(tmp_path / "a")[-1]


def test_long_rollout_resume_is_exact(teacher, tmp_path):
    opts = ["method.dmd.rollout_frames=12", "method.dmd.backward_noise_init=true"]
    fit(recipe(teacher, tmp_path / "a", *opts))
    fit(recipe(teacher, tmp_path / "b", *opts, "train.max_steps=2", "train.ckpt_every=2"))
    rest = fit(recipe(teacher, tmp_path / "b", *opts, "train.max_steps=4", "train.ckpt_every=2"))
    assert rest.method.updates == {"generator": 2, "critic": 4}
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert set(a) == set(b) and len(a) == 6
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    starts = [r["window_start_frame"] for r in metrics(tmp_path / "a")]
    assert starts == [r["window_start_frame"] for r in metrics(tmp_path / "b")]


def test_multi_shot_rollout_with_two_windows(teacher, tmp_path):
    tr = fit(recipe(teacher, tmp_path / "ms", "train.max_steps=2", "method.dmd.rollout_frames=24",
                    "method.dmd.window_frames=3", "method.dmd.windows=2", "method.dmd.rollout_shots=2",
                    "method.dmd.shot_captions=batch"))  # fmt: skip
    recs = metrics(tmp_path / "ms")
    assert len(recs) == 2 and all(torch.isfinite(torch.tensor(r["critic_loss"])) for r in recs)
    assert "generator_loss" in recs[0] and tr.method.rollout_stats["chunks_generated"] <= 8


def test_window_starts_keyed_inside_shots():
    for seed in range(20):
        s = window_starts(8, 2, 3, 4, torch.Generator().manual_seed(seed))
        assert s == window_starts(8, 2, 3, 4, torch.Generator().manual_seed(seed))
        assert all(b - a >= 2 for a, b in itertools.pairwise(s))
        assert all(a // 4 == (a + 1) // 4 for a in s)  # each window inside one shot of 4 chunks


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["method.dmd.rollout_frames=7"], "multiple of model.frames_per_chunk"),
        (["method.dmd.window_frames=4"], "multiple of model.frames_per_chunk"),
        (["method.dmd.rollout_frames=3"], r"rollout_frames \(3\) must be >="),
        (["method.dmd.rollout_frames=12", "method.dmd.windows=3"], "windows x window_frames"),
        (["method.dmd.rollout_frames=12", "method.dmd.rollout_shots=3"], "must divide"),
        (["method.dmd.rollout_frames=12", "method.dmd.rollout_shots=4"], "inside one shot"),
        (["method.dmd.rollout_frames=12", "method.dmd.rollout=teacher_forcing"], "rollout=self_forcing"),
        (["method.dmd.windows=0"], "integer >= 1"),
        (["method.dmd.rollout_frames=12", "model.window_frames=null"], "needs model.window_frames"),
    ],
)
def test_config_errors(teacher, tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        recipe(teacher, tmp_path, *extra)


def test_backward_noise_init_renoises_the_rollouts_chunk(sampler):
    """A window's first chunk under backward noise initialisation: the chunk the rollout would
    generate (whole schedule), re-noised to its exit step's sigma with the samples' next draws,
    then one pass at that sigma."""
    conds, seeds, k = cond(sampler.model), [3, 4], 1
    with torch.no_grad():
        (got,) = long_self_rollout(
            sampler, conds, [4], (4, 4), seeds, [0], 1, exits=[k] * 4, grad=False, backward_noise_init=True
        )
        x_roll = sampler.generate_latents(conds, [1], (4, 4), seeds).latents_BCFHW  # whole schedule
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        shape = (1, *x_roll.shape[1:])
        n_draws = len(sampler.config.timesteps)  # the first noise + one per re-noising step
        for g in gens:
            for _ in range(n_draws):
                torch.randn(shape, generator=g)
        eps = torch.cat([torch.randn(shape, generator=g) for g in gens])
        s = sampler.config.sigmas()[k]
        x = (1 - s) * x_roll + s * eps
        cache = sampler.new_cache(4)
        cache.begin(0, 0, write=False)
        meta = grid_meta(3, 2, 2, 3, frame_offset=0, shot=0, rope_offset=0)
        want = x - s * sampler._forward(x, s * NUM_TRAIN_TIMESTEPS, meta, 0, conds[0], cache)
    assert not torch.equal(got, x_roll)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
