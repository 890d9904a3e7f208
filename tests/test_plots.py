"""Plots a person reads at a glance: titles, linear unless decades, integer ticks, both DMD
losses, labelled mean lines, no empty panels."""

from __future__ import annotations

import json

from vidtrain.parallel.balance import plot_rank_figures, rank_figure
from vidtrain.train.logging import loss_figure, plot_loss
from vidtrain.utils.plots import pyplot, spans_decades


def _labels(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def _integer_ticks(ax):
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    return ticks and all(float(t).is_integer() for t in ticks)


def test_dmd_plot_shows_both_role_losses_on_a_linear_axis():
    rows = [{"step": s, "loss": 1.5 - 0.01 * s, "critic_loss": 1.5 - 0.01 * s} for s in range(1, 8)]
    rows += [{"step": s, "generator_loss": 0.9 + 0.01 * s} for s in (5,)]
    ax = loss_figure(rows, None, "dmd: training loss").axes[0]
    assert _labels(ax) == ["generator loss", "critic loss"]  # `loss` is the critic's: not twice
    assert ax.get_yscale() == "linear" and ax.get_title() == "dmd: training loss"
    assert _integer_ticks(ax)
    pyplot().close("all")


def test_losses_spanning_decades_get_a_log_axis(tmp_path):
    assert spans_decades([100.0, 0.5]) and not spans_decades([1.6, 1.4]) and not spans_decades([0.0, 5.0])
    path = tmp_path / "tf" / "metrics.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps({"step": s, "loss": 10.0 ** (-s)}) + "\n" for s in range(4)))
    assert plot_loss(path, tmp_path / "loss.png").exists()
    ax = loss_figure([json.loads(ln) for ln in path.read_text().splitlines()], None, "t").axes[0]
    assert ax.get_yscale() == "log"
    assert plot_loss(tmp_path / "missing.jsonl", tmp_path / "none.png") is None
    pyplot().close("all")


def test_balance_plot_drops_empty_panels_and_labels_the_mean(tmp_path):
    figures = {"vae_frames": [0, 0], "tokens": [10.0, 12.0], "step_time_s": [0.5, 0.7]}
    fig = rank_figure(figures, "tf: per-rank balance")
    titles = [ax.get_title().split("\n")[0] for ax in fig.axes]
    assert titles == ["tokens", "step_time_s"]
    assert all(_labels(ax)[0].startswith("mean ") for ax in fig.axes)
    assert all(_integer_ticks(ax) for ax in fig.axes)
    assert fig._suptitle.get_text() == "tf: per-rank balance"
    plot_rank_figures({"vae_frames": [0, 0]}, tmp_path / "b.png")  # nothing to draw: no file
    assert not (tmp_path / "b.png").exists()
    pyplot().close("all")
