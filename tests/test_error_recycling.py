"""Error recycling (method.error_recycling): the bank's math, injection into the clean history
only, the plain step when nothing is injected, equality under SP / DDP with one process, and
exact resume with the bank in the checkpoint."""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from vidtrain.config import ConfigError, ErrorRecyclingConfig, load_recipe
from vidtrain.forcing.error_bank import ErrorBank, noisy_frame_errors
from vidtrain.forcing.flow import velocity_target
from vidtrain.forcing.teacher import build_tf_sequence
from vidtrain.models.wan import CausalWanDiT
from vidtrain.parallel import STRATEGIES, Mesh, Strategy, parallelize
from vidtrain.parallel.layouts import LAYOUTS, local_tf_sequence
from vidtrain.testing.equality import Case, global_batch, make_recipe, spawn
from vidtrain.tokens import patchify
from vidtrain.train.checkpoint import latest_checkpoint
from vidtrain.train.methods import TeacherForcing
from vidtrain.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
FPC = 3

# ---- the bank ---------------------------------------------------------------------------------


def test_buckets_split_the_timesteps_evenly():
    bank = ErrorBank(50, 4)
    t = torch.tensor([0.0, 19.99, 20.0, 500.0, 999.9, 1000.0])
    assert bank.bucket_of(t).tolist() == [0, 0, 1, 25, 49, 49]
    assert ErrorBank(1, 4).bucket_of(t).tolist() == [0] * 6


def test_ring_replacement_keeps_the_newest_entries():
    bank = ErrorBank(2, 3, torch.float32)
    for v in range(1, 6):  # five writes into bucket 1 (t >= 500) of three slots
        bank.add(torch.full((1, 1, 2, 2), float(v)), torch.tensor([700.0]))
    assert bank.writes.tolist() == [0, 5] and bank.filled.tolist() == [0, 3]
    assert bank.slots[0] is None  # never written: never allocated
    assert bank.slots[1][:, 0, 0, 0].tolist() == [4.0, 5.0, 3.0]  # 4 and 5 over the oldest
    assert bank.fill == 0.5


def test_memory_is_bounded_and_reported():
    bank = ErrorBank(4, 3, torch.bfloat16)
    c, h, w = 16, 4, 6
    assert bank.nbytes == 0 and bank.max_nbytes((c, h, w)) == 4 * 3 * c * h * w * 2
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        bank.add(torch.randn(7, c, h, w, generator=g), torch.rand(7, generator=g) * 1000)
        assert bank.nbytes <= bank.max_nbytes()
    assert bank.nbytes == bank.max_nbytes() and bank.fill == 1.0  # 70 writes fill all 12 slots
    with pytest.raises(ValueError, match="one latent size"):
        bank.add(torch.zeros(1, c, h, w + 2), torch.tensor([3.0]))


def test_draws_come_from_the_generator_and_the_filled_buckets():
    bank = ErrorBank(10, 4, torch.float32)
    assert bank.sample_history(3, torch.Generator().manual_seed(0)) is None
    bank.add(torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 2, 2), torch.tensor([150.0, 160.0, 170.0]))
    a = bank.sample_history(5, torch.Generator().manual_seed(3))
    b = bank.sample_history(5, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (5, 2, 2, 2)
    assert set(a[:, 0, 0, 0].tolist()) <= {0.0, 1.0, 2.0}  # only written entries (bucket 1)
    e, found = bank.sample_at(torch.tensor([155.0, 900.0]), torch.Generator().manual_seed(1))
    assert found.tolist() == [True, False] and not e[1].any()


def test_state_round_trip_and_no_resize():
    bank = ErrorBank(3, 2, torch.bfloat16)
    bank.add(torch.randn(5, 2, 2, 2), torch.tensor([10.0, 20.0, 30.0, 900.0, 400.0]))
    other = ErrorBank(3, 2, torch.bfloat16)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.writes, bank.writes) and other.entry_shape == bank.entry_shape
    for s, t in zip(bank.slots, other.slots, strict=True):
        assert (s is None and t is None) or torch.equal(s, t)
    with pytest.raises(ValueError, match="cannot be resized"):
        ErrorBank(4, 2).load_state_dict(bank.state_dict())


# ---- injection into the clean history only ----------------------------------------------------


def _inputs(f: int = 12, b: int = 2):
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(b, 4, f, 4, 4, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    sigma = torch.rand(b, f // FPC, generator=g).repeat_interleave(FPC, 1)
    delta = torch.randn(x0.shape, generator=g)
    return x0, noise, sigma, delta


def test_history_changes_only_the_clean_tokens():
    x0, noise, sigma, delta = _inputs()
    plain = build_tf_sequence(x0, noise, sigma, FPC)
    rec = build_tf_sequence(x0, noise, sigma, FPC, history_BCFHW=x0 + delta)
    n = plain.meta.noisy
    assert torch.equal(rec.x_BLP[:, n], plain.x_BLP[:, n])  # noisy inputs bit-identical
    assert torch.equal(rec.target_BLP, plain.target_BLP) and torch.equal(rec.t_BL, plain.t_BL)
    assert torch.equal(rec.x_BLP[:, ~n], patchify(x0 + delta))
    noisy = build_tf_sequence(x0, noise, sigma, FPC, noisy_delta_BCFHW=delta)
    assert torch.equal(noisy.x_BLP[:, ~n], plain.x_BLP[:, ~n]) and torch.equal(
        noisy.target_BLP, plain.target_BLP
    )
    torch.testing.assert_close(noisy.x_BLP[:, n] - plain.x_BLP[:, n], patchify(delta))


@pytest.mark.parametrize("layout", ["naive", "balanced"])
@pytest.mark.parametrize("sp", [1, 2, 4])
def test_every_layout_cuts_the_recycled_sequence_like_the_plain_one(layout, sp):
    """A rank's part with deltas is the plain part with x0 + delta on its clean tokens, and
    their concatenation is the single-process recycled sequence in the layout's order."""
    x0, noise, sigma, delta = _inputs()
    kw = dict(history_delta_BCFHW=delta, noisy_delta_BCFHW=0.5 * delta)
    full = build_tf_sequence(x0, noise, sigma, FPC, history_BCFHW=x0 + delta, noisy_delta_BCFHW=0.5 * delta)
    if sp == 1:
        seq, _ = LAYOUTS.get(layout).tf_sequence(x0, noise, sigma, FPC, Mesh.single(), **kw)
        parts, plains = [seq], [LAYOUTS.get(layout).tf_sequence(x0, noise, sigma, FPC, Mesh.single())[0]]
    else:
        parts = [local_tf_sequence(layout, x0, noise, sigma, FPC, r, sp, **kw)[0] for r in range(sp)]
        plains = [local_tf_sequence(layout, x0, noise, sigma, FPC, r, sp)[0] for r in range(sp)]
    for part, plain in zip(parts, plains, strict=True):  # the same tokens, the same targets
        assert torch.equal(part.target_BLP, plain.target_BLP) and torch.equal(part.t_BL, plain.t_BL)
        assert torch.equal(part.meta.frame, plain.meta.frame) and torch.equal(
            part.meta.noisy, plain.meta.noisy
        )
    # every token of the recycled single-process sequence lands on exactly one rank, unchanged
    key = lambda s: (s.meta.frame * 2 + s.meta.noisy.long()) * 10_000 + s.meta.h * 100 + s.meta.w  # noqa: E731
    got = torch.cat([p.x_BLP for p in parts], 1)[:, torch.argsort(torch.cat([key(p) for p in parts]))]
    want = full.x_BLP[:, torch.argsort(key(full))]
    assert torch.equal(got, want)


def test_frame_errors_of_a_rank_part():
    x0, noise, sigma, delta = _inputs()
    for r in range(2):
        seq, _ = local_tf_sequence("naive", x0, noise, sigma, FPC, r, 2)
        pred = seq.target_BLP.clone()
        pred[:, seq.meta.noisy] += 1.0  # v_pred - v_target = 1 on every noisy element
        frames, err = noisy_frame_errors(pred, seq, sigma, "velocity", 4, 4)
        assert frames.tolist() == sorted(set(seq.meta.frame[seq.meta.noisy].tolist()))
        torch.testing.assert_close(err, torch.ones_like(err))
        _, e0 = noisy_frame_errors(pred, seq, sigma, "x0", 4, 4)
        torch.testing.assert_close(e0, -sigma[:, frames, None, None, None].expand_as(e0))
    # the velocity error of the exact target is zero; of velocity_target(x0 + d, noise) it is -d
    seq = build_tf_sequence(x0, noise, sigma, FPC)
    pred = torch.zeros_like(seq.target_BLP)
    pred[:, seq.meta.noisy] = patchify(velocity_target(x0 + delta, noise), channels_last=True)
    _, err = noisy_frame_errors(pred, seq, sigma, "velocity", 4, 4)
    torch.testing.assert_close(err, -delta.transpose(1, 2))


# ---- whole runs (one process) -----------------------------------------------------------------

BASE = [
    "log.wandb=disabled", "log.plots=false", "train.progress=false", "data.synthetic_samples=5",
    "data.batch_size=2", "data.frames=6", "data.height=4", "data.width=4", "optim.warmup_steps=1",
    "train.grad_accum=2", "model.text_len=16",
]  # fmt: skip
ER = [
    "method.error_recycling.enabled=true",
    "method.error_recycling.buckets=4",
    "method.error_recycling.bank_size=3",
]


def run(tmp, *extra):
    return train(load_recipe(None, [*BASE, f"run.dir={tmp}", *extra]))


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(folder: Path) -> dict:
    return CausalWanDiT.from_pretrained(folder).state_dict()


def _bank(ckpt: Path) -> dict:
    return torch.load(ckpt / "trainer_state.pt", weights_only=False)["method"]["error_bank"]


def _same_bank(a: dict, b: dict) -> None:
    assert torch.equal(a["writes"], b["writes"]) and a["entry_shape"] == b["entry_shape"]
    for x, y in zip(a["entries"], b["entries"], strict=True):
        assert (x is None and y is None) or torch.equal(x, y)


def test_probability_zero_is_the_plain_teacher_forcing_step(tmp_path):
    run(tmp_path / "plain", "train.max_steps=3")
    zero = ["method.error_recycling.probability=0", "method.error_recycling.noisy_probability=0"]
    run(tmp_path / "zero", "train.max_steps=3", *ER, *zero)
    a, b = (_weights(latest_checkpoint(tmp_path / k) / "model") for k in ("plain", "zero"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    plain, zero = _rows(tmp_path / "plain"), _rows(tmp_path / "zero")
    assert [r["loss"] for r in plain] == [r["loss"] for r in zero]
    assert zero[-1]["err_bank_fill"] > 0 and zero[-1]["err_bank_mib"] > 0  # the bank still fills
    assert all(r["err_inject"] == 0 for r in zero)


def test_resume_with_the_bank_is_bit_exact(tmp_path):
    """4 steps straight == 2 steps, a kill, a resume, 2 more (weights, bank, losses)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    args = ("train.max_steps=4", "train.ckpt_every=2", *ER, "method.error_recycling.noisy_probability=0.5",
            "method.error_recycling.warmup_steps=1")  # fmt: skip
    run(straight, *args)
    shutil.copytree(straight, split)
    shutil.rmtree(split / "checkpoints" / "step_000004")
    (split / "checkpoints" / "latest").write_text("step_000002\n")
    run(split, *args)
    ca, cb = latest_checkpoint(straight), latest_checkpoint(split)
    assert ca.name == cb.name == "step_000004"
    a, b = _weights(ca / "model"), _weights(cb / "model")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    _same_bank(_bank(ca), _bank(cb))
    ra, rb = _rows(straight), _rows(split)
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb] and len(ra) == 4
    assert ra[0]["err_inject"] == 0 and any(r["err_inject"] > 0 for r in ra[1:])  # warmup, then injected
    assert [r["err_bank_fill"] for r in ra] == [r["err_bank_fill"] for r in rb]


def test_resizing_the_bank_on_resume_is_refused(tmp_path):
    run(tmp_path, "train.max_steps=1", *ER)
    for extra in ([], ["train.resume_changes=allow"]):
        with pytest.raises(ConfigError, match="cannot be resized"):
            run(tmp_path, "train.max_steps=2", *ER, "method.error_recycling.bank_size=4", *extra)


def test_recipes_load():
    for name in ("tf_error_recycling_debug.yaml", "tf_error_recycling_1.3B.yaml"):
        path = ROOT / "recipes" / name
        assert path.read_text().splitlines()[0].startswith("# Launch")
        er = load_recipe(path).method.error_recycling
        assert er.enabled and er.probability > 0
    assert load_recipe(ROOT / "recipes" / "tf_error_recycling_1.3B.yaml").method.error_recycling.buckets == 50


@pytest.mark.parametrize(
    "override, message",
    [
        ("method.error_recycling.buckets=0", "buckets must be >= 1"),
        ("method.error_recycling.probability=1.5", "probability must be in"),
        ("method.error_recycling.error=pixel", "is not one of"),
        ("method.error_recycling.bank_sizes=3", "did you mean 'bank_size'"),
    ],
)
def test_bad_settings_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(None, [override])


def test_dmd_refuses_error_recycling():
    with pytest.raises(ConfigError, match="needs a teacher-forcing method"):
        load_recipe(None, ["method.name=dmd", "method.error_recycling.enabled=true"])


# ---- SP and DDP equal one process -------------------------------------------------------------

STEPS, GLOBAL_BATCH = 3, 2
CASES = [Case("ddp", 2, "balanced"), Case("ddp", 2, "naive"), Case("ddp", 1, "balanced")]


class _GivenNoise(TeacherForcing):
    def noise(self, trainer, batch, micro):
        return batch["noise"], batch["sigma"]


class _Ctx:
    """The StepContext a method sees, over fixed global batches (step s: seed s + 1)."""

    def __init__(self, strategy, model, optimizer) -> None:
        self.strategy, self.model, self.optimizer = strategy, model, optimizer
        self.recipe, self.device, self.step = strategy.recipe, strategy.device, 0

    def next_batch(self) -> dict:
        batch = global_batch(GLOBAL_BATCH, seed=self.step + 1)
        b = GLOBAL_BATCH // self.strategy.dp_size
        return {k: v[self.strategy.dp_rank * b : (self.strategy.dp_rank + 1) * b] for k, v in batch.items()}

    def autocast(self):
        return nullcontext()

    def optimizer_step(self, finite: bool = True, role=None) -> float:
        return self.strategy.clip_and_step(self.model, self.optimizer, 0.0, finite)

    def scheduler_step(self) -> None:
        pass


def _er_recipe(case: Case):
    r = make_recipe(case)
    r.method.error_recycling = ErrorRecyclingConfig(
        enabled=True, buckets=5, bank_size=4, dtype="fp32", probability=1.0, noisy_probability=0.5
    )
    return r


def _train(strategy) -> dict:
    torch.manual_seed(1234)
    model, optimizer = parallelize(
        CausalWanDiT.from_flavor("debug", "sdpa"), strategy.mesh, strategy.recipe, strategy.data_parallel,
        lambda ps: torch.optim.AdamW(ps, lr=1e-3, eps=1e-3, weight_decay=0.0),
    )  # fmt: skip
    method, ctx = _GivenNoise(strategy.recipe), _Ctx(strategy, model, optimizer)
    model.train()
    rows = []
    for _ in range(STEPS):
        rows.append(method.train_step(ctx, ctx.step))
        ctx.step += 1
    return {
        "rows": rows,
        "bank": method.error_bank.state_dict(),
        "weights": strategy.checkpoint.model_state(model),
    }


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for case in CASES:
            strategy = STRATEGIES.get(case.strategy)(_er_recipe(case))
            strategy.setup()
            torch.save(_train(strategy), Path(out) / f"{case.name}_rank{rank}.pt")
            strategy.teardown()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("er_ranks")
    spawn(_worker, 2, (str(out),), timeout_s=240)
    strategy = Strategy(_er_recipe(Case("none", 1)))
    strategy.mesh = Mesh.single(torch.device("cpu"))
    return out, _train(strategy)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("index", range(len(CASES)), ids=[c.name for c in CASES])
def test_bank_and_losses_under_sp_and_ddp_equal_one_process(ranks, index):
    out, ref = ranks
    case = CASES[index]
    r0, r1 = (torch.load(out / f"{case.name}_rank{r}.pt", weights_only=False) for r in (0, 1))
    _same_bank(r0["bank"], r1["bank"])  # every rank holds the same bank, bit for bit
    assert torch.equal(r0["bank"]["writes"], ref["bank"]["writes"])
    assert int(ref["bank"]["writes"].sum()) == STEPS * GLOBAL_BATCH * 12 and ref["bank"]["writes"].max() > 4
    for got, want in zip(r0["bank"]["entries"], ref["bank"]["entries"], strict=True):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert [r["err_inject"] for r in ref["rows"]] == [0.0, 1.0, 1.0]  # the bank fills at step 1
    assert max(r["err_inject_noisy"] for r in ref["rows"]) > 0
    if case.sp_size > 1:  # an SP group's ranks report the group's loss
        assert [r["loss"] for r in r0["rows"]] == [r["loss"] for r in r1["rows"]]
        assert [r["loss"] for r in r0["rows"]] == pytest.approx([r["loss"] for r in ref["rows"]], rel=1e-5)
    else:  # data parallel: each rank's loss is its own sample's; the mean is the global batch's
        mean = [(a["loss"] + b["loss"]) / 2 for a, b in zip(r0["rows"], r1["rows"], strict=True)]
        assert mean == pytest.approx([r["loss"] for r in ref["rows"]], rel=1e-5)
    for name, w in ref["weights"].items():
        torch.testing.assert_close(r0["weights"][name], w, rtol=1e-4, atol=1e-6)


def test_qat_recycles_errors_too(tmp_path):
    """The qat method is teacher forcing on an NVFP4 fake-quant model: it inherits the bank."""
    run(tmp_path, "method.name=qat", "train.max_steps=2", *ER, "method.error_recycling.warmup_steps=0")
    rows = _rows(tmp_path)
    assert rows[-1]["err_bank_fill"] > 0 and rows[-1]["err_inject"] > 0
    assert (
        _bank(latest_checkpoint(tmp_path))["writes"].sum() == 2 * 2 * 2 * 6
    )  # steps x accum x batch x frames


def test_an_i2v_conditioning_frame_is_neither_perturbed_nor_banked():
    from types import SimpleNamespace

    from vidtrain.config import Recipe

    recipe = Recipe()
    recipe.method.error_recycling = ErrorRecyclingConfig(enabled=True, buckets=2, bank_size=4, probability=1.0,
                                                         noisy_probability=1.0, dtype="fp32")  # fmt: skip
    method = TeacherForcing(recipe)
    ctx = SimpleNamespace(step=0, strategy=Strategy(recipe))
    x0, noise, sigma, _ = _inputs(f=6, b=2)
    sigma[0, 0] = 0.0  # sample 0 is image-to-video: its frame 0 is the clean image
    seq = build_tf_sequence(x0, noise, sigma, FPC)
    method.keep_errors(ctx, seq.target_BLP + 1.0, seq, sigma, 4, 4, micro=0)
    method.commit_errors(ctx.strategy)
    assert int(method.error_bank.writes.sum()) == 2 * 6 - 1  # every noisy frame but the image
    deltas, logs = method.recycled_errors(ctx, x0.shape, sigma, micro=0)
    assert logs == {"err_inject": 1.0, "err_inject_noisy": 1.0}
    for d in deltas.values():
        assert not d[0, :, 0].any() and d[0, :, 1:].abs().sum() > 0 and d[1].abs().sum() > 0
