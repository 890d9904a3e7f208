"""Every strategy and layout equals the single-process run (loss, gradients, weights after a step).

Gloo ranks on CPU; one process group per world size serves several cases (see
vidtrain.testing.equality). fp32, debug model (4 heads), 16x12x4x4 latents.
"""

from __future__ import annotations

import pytest
import torch

from vidtrain.testing.equality import Case, reference, spawn_checks

WORLD2 = [
    Case("ddp", 1),
    Case("ddp", 2, "naive"),
    Case("ddp", 2, "balanced"),
    Case("fsdp", 1),
    Case("fsdp", 2, "balanced"),
]
WORLD4 = [
    Case("ddp", 4, "naive"),
    Case("ddp", 4, "balanced"),
    Case("fsdp", 2, "balanced"),
    Case("ddp", 4, "balanced", sp_impl="ring"),  # work-balanced ring schedule over 4 ranks
]
DEEPSPEED2 = [
    Case("deepspeed", 1, zero_stage=2),
    Case("deepspeed", 1, zero_stage=3),
    Case("deepspeed", 2, "balanced", zero_stage=2),
    Case("deepspeed", 2, "naive", zero_stage=3),
]
DEEPSPEED4 = [
    Case("deepspeed", 2, "balanced", zero_stage=2),  # dp 2 x sp 2
    Case("deepspeed", 4, "balanced", zero_stage=3),
]
RUNS = {
    "world2": (2, WORLD2),
    "world4": (4, WORLD4),
    "deepspeed2": (2, DEEPSPEED2),
    "deepspeed4": (4, DEEPSPEED4),
}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    done: dict[str, object] = {}

    def get(run: str):
        if run not in done:
            world, cases = RUNS[run]
            out = tmp_path_factory.mktemp(run)
            spawn_checks(world, cases, out, timeout_s=240)
            done[run] = out
        return done[run]

    return get


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize(
    "run,index", [(r, i) for r, (_, cases) in RUNS.items() for i in range(len(cases))],
    ids=[f"{r}-{c.name}" for r, (_, cases) in RUNS.items() for c in cases],
)  # fmt: skip
def test_equals_single_process(outputs, run, index):
    world, cases = RUNS[run]
    case = cases[index]
    folder = outputs(run)
    ref = reference(case, world)
    got = torch.load(folder / f"{case.name}_rank0.pt", weights_only=False)
    losses = [
        torch.load(folder / f"{case.name}_rank{r}.pt", weights_only=False)["loss"] for r in range(world)
    ]
    dp = world // case.sp_size
    # every SP rank logs the group's loss; data-parallel groups average to the global loss
    group_losses = [losses[d * case.sp_size] for d in range(dp)]
    assert all(abs(x - losses[d // case.sp_size * case.sp_size]) < 1e-6 for d, x in enumerate(losses))
    assert sum(group_losses) / dp == pytest.approx(ref["loss"], rel=1e-5)
    assert got["grads"].keys() == ref["grads"].keys()
    for name, g in ref["grads"].items():
        assert _rel(got["grads"][name], g) < 1e-5, name
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    for name, w in ref["weights"].items():
        torch.testing.assert_close(got["weights"][name], w, rtol=1e-5, atol=1e-6)
