"""`vidtrain plan`: a recipe's step on fake tensors in a fake process group (vidtrain/plan.py).

The plan is checked against measured steps at debug size: the same recipe trained for real on
this CPU (the plan in its CPU mode: CPU attention, the trainer's autocast), its live tensor
bytes summed by a dispatch mode of its own (`LiveBytes`: every storage an op creates, until it
is freed), which shares no code with the MemTracker the plan uses. Measured errors (2-core
CPU, torch 2.13): teacher forcing -0.3%, with activation checkpointing +3.1% (MemTracker's own
module hooks keep a little alive), QAT with the KV fake-quant hook -0.3%, DMD (LoRA roles,
self-forcing rollout) -0.7%, DDP + Ulysses SP on 2 gloo ranks -0.4%, the sampler's KV cache
exact. Bound: 5%.
"""

from __future__ import annotations

import os
import weakref
from types import SimpleNamespace

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from vidtrain import cli, plan
from vidtrain.config import load_recipe
from vidtrain.sample import SamplerConfig, StreamingSampler
from vidtrain.train.trainer import Trainer, build_model

TOLERANCE = 0.05


class LiveBytes(TorchDispatchMode):
    """Bytes of the live tensor storages: those registered, and every one an op returns until
    it is freed; `peak` is the most at any time."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.total = self.peak = 0

    def add(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr in self.live or st.nbytes() == 0:
            return
        self.live[ptr] = st.nbytes()
        self.total += st.nbytes()
        self.peak = max(self.peak, self.total)
        weakref.finalize(st, self._drop, ptr)

    def _drop(self, ptr: int) -> None:
        self.total -= self.live.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            self.add(t)
        return out


def measured_step(recipe_path: str, overrides: list[str], tmp_path) -> int:
    """Peak live bytes of a real training step (step 0 run twice: the second has optimizer
    state, and for DMD is a generator step as the plan's), the EMA shadows (host memory, which
    the plan reports apart) left out."""
    recipe = load_recipe(recipe_path, [f"run.dir={tmp_path / 'run'}", "train.ema_decay=null", *overrides])
    trainer = Trainer(recipe)
    try:
        trainer.method.train_step(trainer, 0)
        live = LiveBytes()
        for p in trainer.model.parameters():
            live.add(p)
        for state in trainer.optimizer.state.values():
            for v in state.values():
                live.add(v)
        ema = getattr(trainer.method, "ema", None)  # DMD's generator EMA
        shadows = list(ema.shadow.values()) if ema is not None else []
        for t in shadows:
            live.add(t)
        with live:
            trainer.method.train_step(trainer, 0)
        return live.peak - sum(t.numel() * t.element_size() for t in shadows)
    finally:
        trainer.close()


@pytest.mark.parametrize(
    "recipe, overrides",
    [
        ("recipes/tf_debug.yaml", []),
        ("recipes/tf_debug.yaml", ["model.activation_checkpointing=true"]),
        ("recipes/qat_debug.yaml", ["model.checkpoint=null"]),  # dense masks + the KV fake-quant hook
        ("recipes/dmd_lora_debug.yaml", []),  # LoRA roles, self-forcing rollout through the sampler
    ],
    ids=["teacher_forcing", "activation_checkpointing", "qat_kv_hook", "dmd"],
)
def test_plan_matches_a_measured_step(recipe, overrides, request, tmp_path):
    if "dmd" in recipe:
        overrides = [*overrides, f"method.dmd.teacher={request.getfixturevalue('teacher')}"]
    measured = measured_step(recipe, overrides, tmp_path)
    planned = plan.plan_rank(load_recipe(recipe, overrides), 1, 0, gpu=False)
    assert planned.error is None
    assert planned.peak["total"] == pytest.approx(measured, rel=TOLERANCE)
    params = planned.trainable + planned.frozen
    assert planned.peak["params"] == 4 * params  # fp32 weights
    assert planned.peak["optim"] == pytest.approx(8 * planned.trainable, rel=0.01)  # Adam m, v


def _measured_rank(rank: int, world: int, port: int, out: str, run_dir: str, overrides: list[str]) -> None:
    """One gloo rank of a real run: the peak live bytes of its second step, in `out/RANK`."""
    import os
    from pathlib import Path

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    recipe = load_recipe("recipes/tf_debug.yaml", [f"run.dir={run_dir}", "train.ema_decay=null", *overrides])
    trainer = Trainer(recipe)
    try:
        trainer.method.train_step(trainer, 0)
        live = LiveBytes()
        for p in trainer.model.parameters():
            live.add(p)
        for state in trainer.optimizer.state.values():
            for v in state.values():
                live.add(v)
        with live:
            trainer.method.train_step(trainer, 0)
        Path(out, str(rank)).write_text(str(live.peak))
    finally:
        trainer.close()
        trainer.strategy.teardown()


def test_plan_matches_measured_ranks_of_ulysses_sp(tmp_path):
    """DDP + Ulysses SP over 2 real gloo ranks against the plan's fake world of 2: the
    all-to-alls ran on fake tensors, the memory agrees (measured 0.4%)."""
    import socket

    import torch.multiprocessing as mp

    overrides = ["parallel.strategy=ddp", "parallel.sp_size=2", "parallel.sp_impl=ulysses"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_measured_rank, args=(2, port, str(tmp_path), str(tmp_path / "run"), overrides), nprocs=2)
    for rank in range(2):
        measured = int((tmp_path / str(rank)).read_text())
        planned = plan.plan_rank(load_recipe("recipes/tf_debug.yaml", overrides), 2, rank, gpu=False)
        assert planned.error is None
        assert planned.peak["buffers"] > 0  # DDP's buckets
        assert planned.peak["total"] == pytest.approx(measured, rel=TOLERANCE)


def test_sampler_plan_matches_a_measured_stream():
    """KV cache bytes exactly as the real sampler holds them (window, sink, NVFP4), peak within
    the bound."""
    recipe = load_recipe("recipes/tf_debug.yaml")
    flags = {"window_frames": 6, "sink_frames": 3, "kv_cache": "nvfp4"}
    sp = plan.plan_sample(recipe, 12, flags, gpu=False)
    assert sp.error is None
    cfg = SamplerConfig.from_run(plan.plan_recipe(recipe, gpu=False), overrides=flags, bounded=True)
    model = build_model(plan.plan_recipe(recipe, gpu=False)).eval().requires_grad_(False)
    live = LiveBytes()
    for p in model.parameters():
        live.add(p)
    with live, torch.no_grad():
        cond = cfg.condition(torch.randn(1, recipe.model.text_len, model.cfg.text_dim))
        out = StreamingSampler(model, cfg).generate_latents(
            cond, 4, (recipe.data.height, recipe.data.width), [0]
        )
    assert sp.kv_per_chunk == out.kv_bytes_per_chunk
    assert sp.peak["total"] == pytest.approx(live.peak, rel=TOLERANCE)


def test_sampler_plan_takes_what_vidtrain_sample_takes():
    """A run trained without a window is planned with `vidtrain sample`'s bounded default (not
    all history); `--window-frames none` plans all history; an FP8 run is labelled FP8."""
    from vidtrain.config import SAMPLE_SINK_FRAMES, SAMPLE_WINDOW_FRAMES

    recipe = load_recipe("recipes/tf_debug.yaml")
    assert recipe.model.window_frames is None
    bounded = plan.plan_sample(recipe, 6, {}, gpu=False)
    assert (bounded.config.window_frames, bounded.config.sink_frames) == (
        SAMPLE_WINDOW_FRAMES,
        SAMPLE_SINK_FRAMES,
    )
    assert plan.plan_sample(recipe, 6, {"window_frames": None}, gpu=False).config.window_frames is None
    fp8 = load_recipe("recipes/qat_fp8_debug.yaml")
    lines = plan.format_sample(
        fp8,
        plan.plan_sample(fp8, 6, {}, gpu=False),
        SimpleNamespace(gpu_memory_gib=80.0, tflops=989.0, mfu=0.4),
    )
    assert "FP8 fake-quant" in lines[0] and "NVFP4" not in lines[0]


def test_the_step_runs_in_a_fake_world():
    """Sequence parallelism's collectives run on fake tensors in a fake process group: Ulysses
    under the real DeepSpeed engine, ring attention under FSDP2 (its parameters sharded)."""
    ds = plan.plan_rank(load_recipe("recipes/tf_debug_sp2.yaml"), 4, 1)  # ZeRO-2 + Ulysses SP 2
    assert ds.error is None and ds.flops["backward"] > ds.flops["forward"] > 0
    assert any("ZeRO-2 engine" in n for n in ds.notes)
    ring = load_recipe(
        "recipes/tf_debug.yaml", ["parallel.strategy=fsdp", "parallel.sp_size=2", "parallel.sp_impl=ring"]
    )
    fsdp = plan.plan_rank(ring, 4, 0)
    single = plan.plan_rank(load_recipe("recipes/tf_debug.yaml"), 1, 0)
    assert fsdp.error is None
    # FSDP2 over 4 ranks: the resident (sharded) weights and their Adam state are a quarter
    assert fsdp.peak["optim"] == pytest.approx(single.peak["optim"] / 4, rel=0.05)


def test_production_shapes_allocate_nothing():
    """Wan2.1-1.3B teacher forcing at 480x832, 24 latent frames, in one process: more than this
    machine's memory, planned in seconds (every large tensor is fake)."""
    shape = ["data.frames=24", "data.height=60", "data.width=104"]
    single = ["parallel.strategy=none", "parallel.sp_size=1", "train.ema_decay=null"]
    rp = plan.plan_rank(load_recipe("recipes/tf_1.3B.yaml", shape + single), 1, 0)
    assert rp.error is None
    assert rp.trainable == 1_418_996_800
    assert rp.peak["params"] == 4 * rp.trainable  # fp32 weights under bf16 autocast
    assert rp.peak["optim"] == pytest.approx(8 * rp.trainable, rel=0.01)  # Adam m, v
    assert rp.peak["total"] > os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert rp.tokens == 2 * 24 * 30 * 52  # clean + noisy copies
    assert rp.flops["recompute"] == pytest.approx(rp.flops["forward"], rel=0.01)  # checkpointed blocks


def test_a_failing_step_is_reported_as_the_trainer_fails(teacher, tmp_path):
    """DMD's self-forcing rollout under activation checkpointing: the plan reports what the real
    trainer does with the same recipe (today both fail: the KV cache grows between a chunk's
    checkpointed forward and its recompute), never a traceback."""
    overrides = [
        f"method.dmd.teacher={teacher}",
        "model.activation_checkpointing=true",
        "train.ema_decay=null",
    ]
    trainer = Trainer(load_recipe("recipes/dmd_lora_debug.yaml", [f"run.dir={tmp_path / 'run'}", *overrides]))
    try:
        trainer.method.train_step(trainer, 0)
        real_error = None
    except Exception as e:
        real_error = type(e).__name__
    finally:
        trainer.close()
    rp = plan.plan_rank(load_recipe("recipes/dmd_lora_debug.yaml", overrides), 1, 0, gpu=False)
    assert (rp.error or "").split(":")[0] == (real_error or "")


def test_zero_formula():
    """ZeRO paper's model states (bf16 weights, Adam with fp32 master: K = 12)."""
    z = plan.zero_states(2, trainable=8, frozen=0, world=4, largest_unit=1)
    assert (z["params"], z["grads"], z["optim"]) == (16, 4, 24)
    z3 = plan.zero_states(3, trainable=8, frozen=8, world=4, largest_unit=2)
    assert (z3["params"], z3["grads"], z3["optim"], z3["buffers"]) == (8, 4, 24, 8)


def test_keys_per_query_counts_the_mask():
    """The allowed pairs, counted per frame, equal the dense teacher-forcing mask's."""
    from vidtrain.tokens import MaskRule, TokenMeta, build_mask, grid_meta

    recipe = load_recipe("recipes/tf_debug.yaml", ["model.window_frames=3", "model.sink_frames=3"])
    d, m = recipe.data, recipe.model
    meta = TokenMeta.cat(
        [grid_meta(d.frames, d.height // 2, d.width // 2, m.frames_per_chunk, noisy=n) for n in (False, True)]
    )
    dense = build_mask(MaskRule.of("teacher_forcing", m), meta, meta)
    kpq, frac = plan.keys_per_query(recipe)
    assert kpq == pytest.approx(float(dense.sum()) / len(meta))
    assert frac == pytest.approx(float(dense.float().mean()))


def test_cli_prints_the_table(capsys):
    assert cli.main(["plan", "recipes/tf_debug.yaml"]) == 0
    out = capsys.readouterr().out
    assert "MiB per rank" in out and "rank 0" in out and "step time at 989 TFLOP/s" in out
    assert cli.main(["plan", "recipes/tf_debug.yaml", "--sample", "--sample-frames", "12"]) == 0
    assert "KV cache" in capsys.readouterr().out
    assert cli.main(["plan", "recipes/tf_debug.yaml", "--world-size", "2"]) == 2  # one-process recipe
    assert "needs ddp, fsdp or deepspeed" in capsys.readouterr().err


def test_ranks_argument():
    assert plan._ranks("all", 3) == [0, 1, 2]
    assert plan._ranks("2,0", 4) == [0, 2]
    with pytest.raises(plan.PlanError, match="outside"):
        plan._ranks("4", 4)
