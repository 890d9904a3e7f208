"""Harness for "single process vs sharded" equality checks (used by tests/test_parallel_*.py).

`reference(case)` runs one teacher-forcing step in one process on the global batch;
`spawn_checks(world, cases, out)` starts `world` gloo ranks that run the same step through each
case's strategy (a case = strategy + sp_size + layout + zero_stage) and save rank 0's loss, full
gradients and updated weights, plus every rank's loss. One process group serves all cases.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from vidtrain.config import Recipe
from vidtrain.models.wan import CausalWanDiT
from vidtrain.train.methods import TeacherForcing

FRAMES, HW, CHANNELS, TEXT_LEN = 12, 4, 16, 8


@dataclass(frozen=True)
class Case:
    strategy: str = "none"
    sp_size: int = 1
    layout: str = "balanced"
    zero_stage: int = 2
    frames: int = FRAMES

    @property
    def name(self) -> str:
        return f"{self.strategy}_z{self.zero_stage}_sp{self.sp_size}_{self.layout}_f{self.frames}"


class _GivenNoise(TeacherForcing):
    """Teacher forcing with the batch's own noise and sigmas (so a reference can share them)."""

    def noise(self, trainer, batch, micro):
        return batch["noise"], batch["sigma"]


def make_recipe(case: Case, run_dir: str = "/tmp/vidtrain-eq") -> Recipe:
    r = Recipe()
    r.run.dir = run_dir
    r.parallel.strategy, r.parallel.sp_size, r.parallel.layout = case.strategy, case.sp_size, case.layout
    r.parallel.zero_stage, r.parallel.timeout_s = case.zero_stage, 60.0
    r.model.attn_backend = "sdpa"
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


def _plain_model() -> CausalWanDiT:
    torch.manual_seed(1234)
    return CausalWanDiT.from_flavor("debug", "sdpa")


def run_step(strategy, case: Case, batch: dict) -> dict:
    """Wrap a fresh model, one forward/backward/step on this rank's batch; full results."""
    recipe = strategy.recipe
    model, optimizer = strategy.wrap(
        _plain_model(),
        lambda ps: torch.optim.AdamW(ps, lr=recipe.optim.lr, eps=recipe.optim.eps, weight_decay=0.0),
    )
    method = _GivenNoise(recipe)
    fake = SimpleNamespace(strategy=strategy, device=strategy.device, model=model)
    b = batch["latents"].shape[0] // strategy.dp_size
    local = {k: v[strategy.dp_rank * b : (strategy.dp_rank + 1) * b] for k, v in batch.items()}
    model.train()
    loss, logs = method.loss(fake, local, 0)
    strategy.backward(loss, model)
    grads = strategy.full_grads(model) if hasattr(strategy, "full_grads") else _grads(model)
    norm = strategy.clip_and_step(model, optimizer, 0.0)
    return {"loss": logs["loss"], "grads": grads, "weights": strategy.model_state(model), "grad_norm": norm}


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def reference(case: Case, world: int) -> dict:
    """The single-process step on the global batch of `case` run at `world` ranks."""
    from vidtrain.parallel.base import Strategy

    ref = Case("none", 1, case.layout, case.zero_stage, case.frames)
    strategy = Strategy(make_recipe(ref))
    strategy.device = torch.device("cpu")
    return run_step(strategy, ref, global_batch(world // case.sp_size, case.frames))


def _worker(rank: int, world: int, port: int, cases: list[Case], out: str) -> None:
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

    from vidtrain.parallel import STRATEGIES

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=90))
    try:
        for case in cases:
            strategy = STRATEGIES.get(case.strategy)(make_recipe(case))
            strategy.setup()
            res = run_step(strategy, case, global_batch(world // case.sp_size, case.frames))
            strategy.teardown()
            torch.save(res if rank == 0 else {"loss": res["loss"]}, Path(out) / f"{case.name}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_checks(world: int, cases: list[Case], out: str | Path, timeout_s: float = 240.0) -> None:
    """Run `cases` on `world` gloo ranks; raise if a rank fails or the whole run exceeds timeout_s."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _worker, args=(world, free_port(), cases, str(out)), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{world}-rank equality run did not finish within {timeout_s:.0f} s")
