"""DMD under ddp and DeepSpeed ZeRO-2 on 2 gloo ranks equals one process on the concatenated batch.

Each rank takes its half of the global batch; two steps of the real trainer (`Trainer.fit`):
step 0 a generator update then a critic update, step 1 a critic update only. After each step
the adapter weights of both roles equal the single-process run (fp32), the role that did not
step is bit-identical to before, and the base stays the teacher. Betas differ per role and
beta1 > 0, so an Adam step with a zero gradient on the idle role would show.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from vidtrain.config import load_recipe
from vidtrain.lora import roles as lora
from vidtrain.testing.equality import free_port

WORLD, LOCAL_B, STEPS = 2, 2, 2
CASES = {
    "ddp": ["parallel.strategy=ddp"],
    "deepspeed_z2": ["parallel.strategy=deepspeed", "parallel.zero_stage=2"],
}


def dmd_recipe(teacher: Path, run_dir: Path, batch_size: int, *extra: str):
    return load_recipe(
        None,
        [
            "method.name=dmd", f"method.dmd.teacher={teacher}", f"run.dir={run_dir}", "run.resume=false",
            "train.ema_decay=null", "train.progress=false", "log.plots=false", "log.wandb=disabled",
            "train.mixed_precision=fp32", f"train.max_steps={STEPS}", "train.ckpt_every=1000",
            "method.dmd.lora_rank=4", "method.dmd.generator_update_every=2", "method.dmd.rollout=self_forcing",
            "method.dmd.generator_lr=1e-3", "method.dmd.critic_lr=2e-3", "method.dmd.generator_betas=[0.9, 0.99]",
            "method.dmd.critic_betas=[0.5, 0.999]", "method.dmd.ema_decay=0.5", "optim.warmup_steps=0",
            "optim.schedule=constant", "optim.weight_decay=0.0", "optim.grad_clip=1.0", "parallel.timeout_s=60",
            f"data.batch_size={batch_size}", "data.frames=6", "data.height=4", "data.width=4",
            # the batches' 8 text tokens (Wan's padding adds none): at 512 zero-padded tokens the fp32
            # rounding of the cross-attention sums alone exceeds the 1e-5 tolerance
            "model.text_len=8", *extra,
        ],
    )  # fmt: skip


def global_batch(step: int) -> dict:
    g = torch.Generator().manual_seed(100 + step)
    b = WORLD * LOCAL_B
    return {"latents": torch.randn(b, 16, 6, 4, 4, generator=g), "text": torch.randn(b, 8, 32, generator=g)}


def run_dmd(recipe, dp_rank: int, local_b: int) -> list[dict[str, torch.Tensor]]:
    """Trainer.fit with this rank's slice of each step's global batch; adapter weights after each step."""
    from vidtrain.train.trainer import Trainer

    tr = Trainer(recipe)
    steps = iter(range(STEPS))
    tr.next_batch = lambda: {
        k: v[dp_rank * local_b : (dp_rank + 1) * local_b] for k, v in global_batch(next(steps)).items()
    }
    snaps, train_step = [], tr.method.train_step

    def step(trainer, i):
        logs = train_step(trainer, i)
        model = trainer.strategy.unwrap(trainer.model)
        snaps.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return logs

    tr.method.train_step = step
    model = tr.strategy.unwrap(tr.model)
    snaps.append({n: p.detach().clone() for n, p in model.named_parameters()})
    tr.fit()
    tr.strategy.teardown()
    return snaps


def _worker(rank: int, port: int, teacher: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        for name, extra in CASES.items():
            recipe = dmd_recipe(Path(teacher), Path(out) / name, LOCAL_B, *extra)
            snaps = run_dmd(recipe, rank, LOCAL_B)
            if rank == 0:
                torch.save(snaps, Path(out) / f"{name}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def parallel_runs(teacher, tmp_path_factory) -> Path:
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("dmdpar_runs")
    ctx = mp.start_processes(
        _worker, args=(free_port(), str(teacher), str(out)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 150
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError("2-rank DMD run did not finish within 150 s")
    return out


@pytest.fixture(scope="module")
def single(teacher, tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    run = tmp_path_factory.mktemp("dmdpar_single")
    return run_dmd(dmd_recipe(teacher, run, WORLD * LOCAL_B), 0, WORLD * LOCAL_B)


def _role(name: str) -> str | None:
    for role in (lora.GENERATOR, lora.CRITIC):
        if lora.is_adapter_param(name, role):
            return role
    return None


@pytest.mark.parametrize("case", list(CASES))
def test_adapters_equal_single_process(case, parallel_runs, single):
    got = torch.load(parallel_runs / f"{case}.pt", weights_only=False)
    assert len(got) == len(single) == STEPS + 1
    # atol: 0.5% of one Adam step (lr 2e-3); a batch of 2 vs 4 through the rollout reorders float
    # sums, and Adam's g / sqrt(v) enlarges that noise where a second-step gradient nearly cancels
    for step in range(STEPS + 1):
        assert got[step].keys() == single[step].keys()
        for n, w in single[step].items():
            torch.testing.assert_close(
                got[step][n], w, rtol=1e-5, atol=1e-5, msg=lambda m, step=step, n=n: f"step {step}: {n}\n{m}"
            )
    # roles moved only on their own updates: step 0 both roles, step 1 the critic alone
    moved = {
        step: {_role(n) for n in single[0] if not torch.equal(got[step + 1][n], got[step][n])}
        for step in range(STEPS)
    }
    assert moved == {0: {lora.GENERATOR, lora.CRITIC}, 1: {lora.CRITIC}}


def test_single_process_keeps_base_and_idle_role(single):
    for n, w in single[-1].items():
        if _role(n) is None:
            assert torch.equal(w, single[0][n]), f"base weight {n} changed"
    gen = [n for n in single[0] if _role(n) == lora.GENERATOR]
    assert all(torch.equal(single[2][n], single[1][n]) for n in gen)
    assert any(not torch.equal(single[1][n], single[0][n]) for n in gen)


def test_rejects_zero3_and_fsdp(teacher, tmp_path):
    from vidtrain.distill.method import check_dmd_recipe

    with pytest.raises(ValueError, match="zero_stage"):
        check_dmd_recipe(
            dmd_recipe(teacher, tmp_path, 2, "parallel.strategy=deepspeed", "parallel.zero_stage=3")
        )
    with pytest.raises(ValueError, match="none, ddp or deepspeed"):
        check_dmd_recipe(dmd_recipe(teacher, tmp_path, 2, "parallel.strategy=fsdp"))
