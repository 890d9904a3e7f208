"""Per-rank balance figures of a distributed run, as a logging callback of the trainer.

Every step each rank appends its own figures to `RUN/ranks/rank{r}.jsonl` (loss, step time:
lockstep is checkable), and the step's log gets max/mean figures: step time over all ranks
(one all-gather) and the layout's per-rank work (`balance.layout_report` of the first batch,
under sequence parallelism). At the end rank 0 plots them to `RUN/balance.png` (`log.plots`).
The trainer calls `on_batch`, `on_step` (every rank, every step: a collective) and `on_finish`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from vidtrain.parallel.balance import layout_report, plot_rank_figures
from vidtrain.parallel.mesh import Mesh
from vidtrain.tokens import MaskRule


class BalanceLog:
    def __init__(self, recipe, mesh: Mesh) -> None:
        self.recipe, self.mesh = recipe, mesh
        self.run_dir = Path(recipe.run.dir)
        self.step_times: list[list[float]] = []  # per step: every rank's step time
        self.layout_figures: dict[str, list[float]] | None = None

    def on_batch(self, batch: dict) -> None:
        """The layout's per-rank figures, once, from the first batch the layout lays out."""
        if self.layout_figures is None and self.mesh.sp_size > 1:
            self.layout_figures = self._layout_figures(batch["latents"])

    def _layout_figures(self, x0) -> dict[str, list[float]]:
        """VAE frames with the run's halo, or 0 for latent shards (latents pre-encoded)."""
        f, h, w = x0.shape[2:]
        pre_encoded = isinstance(x0, torch.Tensor)
        halo = 0 if pre_encoded else x0.halo
        rule = MaskRule.of("teacher_forcing", self.recipe.model)  # the mask training runs
        fpc = self.recipe.model.frames_per_chunk
        rep = layout_report(
            self.recipe.parallel.layout, f, fpc, self.mesh.sp_size, h, w, halo, pre_encoded, rule
        )
        return {k: v for k, v in rep["per_rank"].items()}

    def on_step(self, logs: dict[str, float]) -> dict[str, float]:
        """Figures to add to the step's log (`logs`: this rank's figures, `step_time_s` among them)."""
        step_time_s = logs["step_time_s"]
        self._rank_log(step_time_s, logs)
        t = torch.tensor([step_time_s], dtype=torch.float64)
        if self.mesh.device.type == "cuda":
            t = t.to(self.mesh.device)
        out = [torch.zeros_like(t) for _ in range(self.mesh.world_size)]
        dist.all_gather(out, t)
        times = [float(x) for x in out]
        self.step_times.append(times)
        mean = sum(times) / len(times)
        report = {"balance/step_time_max_over_mean": max(times) / mean if mean > 0 else 1.0}
        for key, vals in (self.layout_figures or {}).items():
            m = sum(vals) / len(vals)
            report[f"balance/{key}_max_over_mean"] = max(vals) / m if m > 0 else 1.0
        return report

    def _rank_log(self, step_time_s: float, logs: dict[str, float]) -> None:
        """RUN/ranks/rank{r}.jsonl: every rank's own loss and step time (lockstep is checkable)."""
        folder = self.run_dir / "ranks"
        folder.mkdir(parents=True, exist_ok=True)
        m = self.mesh
        rec = {
            "local_step": len(self.step_times) + 1,
            "rank": m.rank,
            "dp_rank": m.dp_rank,
            "sp_rank": m.sp_rank,
        }
        rec |= {k: float(v) for k, v in logs.items() if isinstance(v, int | float)} | {
            "step_time_s": step_time_s
        }
        with open(folder / f"rank{m.rank}.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def rank_figures(self) -> dict[str, list[float]]:
        """Per-rank figures of the run: the layout's counts (per SP rank) and mean step time."""
        figs = dict(self.layout_figures or {})
        if self.step_times:
            n = len(self.step_times)
            figs["step_time_s"] = [
                sum(s[r] for s in self.step_times) / n for r in range(self.mesh.world_size)
            ]
        return figs

    def on_finish(self) -> None:
        if self.mesh.is_main and self.step_times and self.recipe.log.plots:
            plot_rank_figures(self.rank_figures(), self.run_dir / "balance.png")
