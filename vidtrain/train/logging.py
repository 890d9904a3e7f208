"""Metrics as JSONL in the run folder, wandb (offline by default), plots, logging callbacks."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

from vidtrain.utils.io import atomic_write_text
from vidtrain.utils.plots import integer_axis, pyplot, set_value_scale


class StepCallback(Protocol):
    """What the trainer tells a logging callback (e.g. vidtrain.parallel.BalanceLog). Called on
    every rank: a callback may gather figures over the ranks."""

    def on_batch(self, batch: dict) -> None:
        """A batch the step will train on (before its loss)."""

    def on_step(self, logs: dict[str, float]) -> dict[str, float]:
        """After an optimizer step, with its figures: more figures for the step's log."""

    def on_finish(self) -> None:
        """At the end of a run (plots)."""


class MetricsLogger:
    """Rank 0 appends one JSON object per step to `metrics.jsonl`; wandb mirrors it."""

    def __init__(self, run_dir: Path, recipe, enabled: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self._wandb = None
        mode = os.environ.get("WANDB_MODE", recipe.log.wandb)
        if enabled and mode != "disabled":
            try:
                import wandb

                self._wandb = wandb.init(
                    project=recipe.log.project,
                    name=recipe.run.name,
                    dir=str(run_dir),
                    mode=mode,
                    config=recipe.to_dict(),
                    reinit="finish_previous",
                    # its banner and 20-line summary only when asked (VIDTRAIN_VERBOSE=1)
                    settings=wandb.Settings(silent=not os.environ.get("VIDTRAIN_VERBOSE")),
                )
            except Exception as e:  # wandb must never stop a training run
                print(f"[vidtrain] wandb disabled: {e}")

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps that the restored checkpoint has not seen."""
        if not self.enabled or not self.path.exists():
            return
        keep, torn = [], 0
        for ln in self.path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(ln)
            except ValueError:  # a line torn by a kill mid-write
                torn += int(bool(ln.strip()))
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                keep.append(ln)
        if torn:
            print(f"[vidtrain] {self.path}: dropped {torn} torn line(s) (a write cut by a kill)")
        atomic_write_text(self.path, "".join(ln + "\n" for ln in keep))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(record, step=record.get("step"))

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line torn by a kill is left out."""
    rows = []
    for ln in Path(path).read_text(errors="replace").splitlines():
        try:
            rows.append(json.loads(ln))
        except ValueError:
            continue
    return [r for r in rows if isinstance(r, dict)]


# the losses a run logs, in the order they are drawn; DMD's `loss` is its critic loss, so a run
# that logs both role losses shows those two instead
LOSS_KEYS = ("loss", "generator_loss", "critic_loss")


def plot_loss(
    metrics_path: Path, out_png: Path, keys: tuple[str, ...] | None = None, title: str | None = None
) -> Path | None:
    """Loss curve(s) of a run as a PNG (see `loss_figure`); None when it logged no loss."""
    rows = read_metrics(metrics_path) if Path(metrics_path).exists() else []
    fig = loss_figure(rows, keys, title or f"{Path(metrics_path).parent.name}: training loss")
    if fig is None:
        return None
    fig.savefig(out_png, dpi=100)
    pyplot().close(fig)
    return out_png


def loss_figure(rows: list[dict], keys: tuple[str, ...] | None, title: str):
    """Every loss key the rows carry (both DMD roles: their `loss` is the critic's and is left
    out), titled, integer step ticks, a log axis only when the losses span decades."""
    if keys is None:
        logged = {k for r in rows for k in r}
        keys = tuple(k for k in LOSS_KEYS if k in logged)
        if "critic_loss" in keys:
            keys = tuple(k for k in keys if k != "loss")
    curves = {k: [(r["step"], r[k]) for r in rows if k in r and "step" in r] for k in keys}
    curves = {k: pts for k, pts in curves.items() if pts}
    if not curves:
        return None
    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    for key, pts in curves.items():
        ax.plot(*zip(*pts), label=key.replace("_", " "), marker="." if len(pts) < 30 else None)
    set_value_scale(ax, [v for pts in curves.values() for _, v in pts])
    integer_axis(ax, "x")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
