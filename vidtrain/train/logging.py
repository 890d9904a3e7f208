"""Metrics as JSONL in the run folder, wandb (offline by default), and plots."""

from __future__ import annotations

import json
import os
from pathlib import Path


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
                    reinit=True,
                )
            except Exception as e:  # wandb must never stop a training run
                print(f"[vidtrain] wandb disabled: {e}")

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps that the restored checkpoint has not seen."""
        if not self.enabled or not self.path.exists():
            return
        lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
        keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))

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
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def plot_loss(metrics_path: Path, out_png: Path, keys: tuple[str, ...] = ("loss",)) -> Path | None:
    """Loss curve(s) of a run as a PNG."""
    rows = read_metrics(metrics_path) if Path(metrics_path).exists() else []
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
