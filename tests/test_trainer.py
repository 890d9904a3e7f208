"""The trainer loop: outputs in the run folder, bit-exact resume, atomic checkpoints, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from vidtrain.config import load_recipe
from vidtrain.models.wan import CausalWanDiT
from vidtrain.train.checkpoint import latest_checkpoint
from vidtrain.train.trainer import train

BASE = [
    "log.wandb=disabled", "train.progress=false", "data.synthetic_samples=5", "data.batch_size=2",
    "data.frames=6", "data.height=4", "data.width=4", "optim.warmup_steps=1", "train.grad_accum=2",
]  # fmt: skip


def run(tmp, *extra):
    return train(load_recipe(None, [*BASE, f"run.dir={tmp}", *extra]))


def weights(folder):
    return CausalWanDiT.from_pretrained(folder).state_dict()


def test_run_folder_has_checkpoint_metrics_and_plot(tmp_path):
    run(tmp_path, "train.max_steps=3", "train.ckpt_every=2")
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all({"loss", "lr", "grad_norm", "samples_per_s"} <= set(r) for r in rows)
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert latest_checkpoint(tmp_path).name == "step_000003"
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")], (
        "temp folders left"
    )


def test_resume_is_bit_exact(tmp_path):
    """4 steps straight == 2 steps, a kill, a resume, 2 more steps (weights, EMA, data, losses)."""
    import shutil

    straight, split = tmp_path / "straight", tmp_path / "split"
    args = ("train.max_steps=4", "train.ckpt_every=2", "train.ema_decay=0.9")
    run(straight, *args)
    # the killed run: what the straight run had on disk right after step 2
    shutil.copytree(straight, split)
    shutil.rmtree(split / "checkpoints" / "step_000004")
    (split / "checkpoints" / "latest").write_text("step_000002\n")
    run(split, *args)  # resumes at step 2
    ca, cb = latest_checkpoint(straight), latest_checkpoint(split)
    assert ca.name == cb.name == "step_000004"
    a, b = weights(ca / "model"), weights(cb / "model")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = torch.load(ca / "trainer_state.pt", weights_only=False)
    sb = torch.load(cb / "trainer_state.pt", weights_only=False)
    for k in sa["ema"]["shadow"]:
        assert torch.equal(sa["ema"]["shadow"][k], sb["ema"]["shadow"][k]), k
    assert sa["data"] == sb["data"]
    ema_model = weights(ca / "model_ema")  # the EMA weights as a loadable model folder
    for k, v in sa["ema"]["shadow"].items():
        assert torch.equal(ema_model[k], v), k
    assert sa["optimizer"]["state"][0]["exp_avg"].equal(sb["optimizer"]["state"][0]["exp_avg"])
    la = [json.loads(x)["loss"] for x in (straight / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (split / "metrics.jsonl").read_text().splitlines()]
    assert la == lb and len(la) == 4


@pytest.mark.parametrize("shape", [(1, 16, 6, 4), (1, 8, 6, 4, 4)], ids=["rank4", "channels8"])
def test_latents_that_do_not_fit_are_a_clear_error(tmp_path, shape):
    from vidtrain.train.trainer import Trainer

    trainer = Trainer(load_recipe(None, [*BASE, f"run.dir={tmp_path}", "train.max_steps=1"]))
    trainer.loader = [{"latents": torch.randn(shape), "text": torch.randn(1, 8, 32)}]
    with pytest.raises(ValueError, match=r"does not fit the model: expected \[B, 16, F, H, W\]"):
        trainer.fit()


def test_checkpoint_of_another_shape_is_refused_and_run_folder_kept(tmp_path):
    run(tmp_path / "a", "train.max_steps=1")
    before = sorted(p.name for p in (tmp_path / "a").rglob("*"))
    recipe_before = (tmp_path / "a" / "recipe.yaml").read_text()
    other = tmp_path / "other"
    other_model = CausalWanDiT.from_flavor("debug", num_layers=3)
    from vidtrain.models.wan.state_dict import save_vidtrain

    save_vidtrain(other_model, other)
    cfg = json.loads((other / "vidtrain_model.json").read_text())
    cfg["num_layers"] = 2
    (other / "vidtrain_model.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not fit the model"):
        run(tmp_path / "a", "train.max_steps=2", f"model.checkpoint={other}")
    assert sorted(p.name for p in (tmp_path / "a").rglob("*")) == before
    assert (tmp_path / "a" / "recipe.yaml").read_text() == recipe_before
