"""Whole runs on 2 gloo ranks, one spawn for all: training from videos under SP (each rank encodes
only its frames) equals one process encoding the whole clip; ring (context-parallel) SP equals one
process; FSDP resume is exact; ZeRO-3 with EMA trains and its EMA equals the single-process one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vidtrain.config import load_recipe
from vidtrain.models.wan import CausalWanDiT
from vidtrain.testing.equality import Case, make_video_shards, reference, spawn_checks
from vidtrain.train.checkpoint import latest_checkpoint
from vidtrain.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
VIDEO_RECIPE = str(ROOT / "recipes" / "tf_debug_videos.yaml")
COMMON = [
    "log.wandb=disabled", "log.plots=false", "train.progress=false", "train.mixed_precision=fp32",
    "model.attn_backend=sdpa", "parallel.timeout_s=60", "optim.schedule=constant", "optim.warmup_steps=1",
]  # fmt: skip
SYNTH = [*COMMON, "data.synthetic_samples=8", "data.height=4", "data.width=4", "data.frames=12"]
FSDP = [*SYNTH, "parallel.strategy=fsdp", "parallel.sp_size=1", "train.ckpt_every=2", "train.ema_decay=0.9"]
ZERO3 = [*SYNTH, "parallel.strategy=deepspeed", "parallel.zero_stage=3", "parallel.sp_size=2"]
ZERO3 += ["train.max_steps=2", "train.ema_decay=0.5", "optim.grad_clip=0", "optim.weight_decay=0"]
VIDEO = [*COMMON, "train.max_steps=2", "train.ema_decay=null"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _video_case(shards: Path) -> Case:
    return Case("ddp", 2, "balanced", video=str(shards))


RING = [Case("ddp", 2, "balanced", sp_impl="ring"), Case("fsdp", 2, "naive", sp_impl="ring")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """165-frame clips (42 latent frames: rank 1's exact halo starts mid-clip), then one spawn."""
    root = tmp_path_factory.mktemp("ptrain")
    shards = make_video_shards(root, frames=165, clips=1)
    d = {k: root / k for k in ("video", "fsdp_straight", "fsdp_split", "zero3")}
    jobs = [
        (VIDEO_RECIPE, [*VIDEO, f"data.shards={shards}", f"run.dir={d['video']}"]),
        (None, [*FSDP, "train.max_steps=4", f"run.dir={d['fsdp_straight']}"]),
        (None, [*FSDP, "train.max_steps=2", f"run.dir={d['fsdp_split']}"]),
        (None, [*FSDP, "train.max_steps=4", f"run.dir={d['fsdp_split']}"]),  # resumes at step 2
        (None, [*ZERO3, f"run.dir={d['zero3']}"]),
    ]
    spawn_checks(2, [_video_case(shards), *RING], root, timeout_s=400, runs=jobs)
    return root, shards, d


def _losses(run_dir: Path, rank: int | None = None) -> list[float]:
    f = run_dir / "metrics.jsonl" if rank is None else run_dir / "ranks" / f"rank{rank}.jsonl"
    return [json.loads(x)["loss"] for x in f.read_text().splitlines()]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _check_equal(root: Path, case: Case) -> tuple[dict, dict]:
    """SP=2 (one data-parallel group) vs the single-process step: loss, gradients, weights."""
    ref = reference(case, 2)
    got = torch.load(root / f"{case.name}_rank0.pt", weights_only=False)
    other = torch.load(root / f"{case.name}_rank1.pt", weights_only=False)
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5) and other["loss"] == got["loss"]
    assert got["grads"].keys() == ref["grads"].keys()
    for name, g in ref["grads"].items():
        assert _rel(got["grads"][name], g) < 1e-5, name
    for name, w in ref["weights"].items():
        torch.testing.assert_close(got["weights"][name], w, rtol=1e-5, atol=1e-6)
    return got, other


def test_sp2_from_videos_equals_one_process_encoding_the_whole_clip(runs):
    root, shards, _ = runs
    got, other = _check_equal(root, _video_case(shards))  # reference: vae.encode of the whole clip
    # balanced encode plan over the 42 latent frames with the exact halo (20 latent frames of the
    # debug VAE): rank 0 encodes [0, 31) (pixel frames [0, 121)), rank 1 [31, 42) after its halo
    # (pixel frames [41, 165)); rank 1 then receives latents 21..30. Encoding its own frames [21,
    # 42) with the halo, rank 1 would read 164 pixel frames and rank 0 only 81.
    assert (got["vae_pixel_frames"], other["vae_pixel_frames"]) == (121, 124)


@pytest.mark.parametrize("index", range(len(RING)), ids=[c.name for c in RING])
def test_ring_sp_equals_one_process(runs, index):
    _check_equal(runs[0], RING[index])


def test_ring_needs_no_head_divisibility():
    from vidtrain.parallel.ring import RingAttention, apply_ring

    model = CausalWanDiT.from_flavor("debug")  # 4 heads: Ulysses refuses sp_size=3
    assert apply_ring(model, None, 3, 0) == len(model.blocks)
    assert all(isinstance(b.self_attn.core, RingAttention) for b in model.blocks)


def test_video_recipe_under_sp2_equals_one_process(runs, tmp_path):
    _, shards, d = runs
    one = tmp_path / "one"
    train(
        load_recipe(
            VIDEO_RECIPE,
            [
                *VIDEO,
                f"data.shards={shards}",
                f"run.dir={one}",
                "parallel.strategy=none",
                "parallel.sp_size=1",
            ],
        )
    )
    assert _losses(d["video"], 0) == _losses(d["video"], 1)  # SP lockstep
    assert _losses(d["video"]) == pytest.approx(_losses(one), rel=1e-5)
    row = json.loads((d["video"] / "metrics.jsonl").read_text().splitlines()[-1])
    assert (
        row["balance/tokens_max_over_mean"] == 1.0 and row["balance/attn_pairs_ulysses_max_over_mean"] == 1.0
    )
    assert 1.0 < row["balance/vae_frames_max_over_mean"] <= 1.05  # 121 vs 124 pixel frames
    assert row["balance/attn_pairs_ring_max_over_mean"] <= 1.05


def test_fsdp_resume_is_exact(runs):
    _, _, d = runs
    a, b = d["fsdp_straight"], d["fsdp_split"]
    for r in (0, 1):
        la, lb = _losses(a, r), _losses(b, r)  # the split run appends steps 3-4 after its resume
        assert len(la) == 4 and la == pytest.approx(lb, rel=1e-6, abs=1e-7), r
    ca, cb = latest_checkpoint(a), latest_checkpoint(b)
    assert ca.name == cb.name == "step_000004"
    wa, wb = (CausalWanDiT.from_pretrained(c / "model").state_dict() for c in (ca, cb))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7)
    sa, sb = (torch.load(c / "trainer_state.pt", weights_only=False) for c in (ca, cb))
    assert sa["data"] == sb["data"]
    assert sa["ema"]["shadow"] and sa["ema"]["shadow"].keys() <= wa.keys()
    for k, v in sa["ema"]["shadow"].items():
        assert type(v) is torch.Tensor and v.shape == wa[k].shape, k  # full, not a DTensor shard
        torch.testing.assert_close(v, sb["ema"]["shadow"][k], rtol=1e-6, atol=1e-7)


def test_zero3_with_ema_trains_and_its_ema_reads_full_parameters(runs, tmp_path):
    _, _, d = runs
    one = tmp_path / "one"
    train(load_recipe(None, [*ZERO3, "parallel.strategy=none", "parallel.sp_size=1", f"run.dir={one}"]))
    assert _losses(d["zero3"]) == pytest.approx(_losses(one), rel=1e-5)
    ema3 = torch.load(latest_checkpoint(d["zero3"]) / "trainer_state.pt", weights_only=False)["ema"]["shadow"]
    ema1 = torch.load(latest_checkpoint(one) / "trainer_state.pt", weights_only=False)["ema"]["shadow"]
    assert ema3.keys() == ema1.keys() and ema1
    for k, v in ema1.items():
        assert ema3[k].shape == v.shape, k  # ZeRO-3 placeholders are empty; EMA must be full
        torch.testing.assert_close(ema3[k], v, rtol=1e-4, atol=1e-6)
