"""Balance report: counts from metadata equal dense-mask counts; CLI runs; balanced beats naive."""

from __future__ import annotations

import json

import pytest

from vidtrain.cli import main as cli
from vidtrain.parallel.balance import layout_report
from vidtrain.parallel.layouts import layout_metas
from vidtrain.tokens import MaskRule, TokenMeta, build_mask


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("layout", ["naive", "balanced"])
def test_pair_counts_equal_dense_mask(layout, window):
    f, fpc, sp, h, w = 12, 3, 4, 4, 6
    rule = MaskRule("teacher_forcing", fpc, window_frames=window, sink_frames=3 if window else 0)
    rep = layout_report(layout, f, fpc, sp, h, w, halo=1, rule=rule)
    metas = layout_metas(layout, f, h // 2, w // 2, fpc, sp)
    full = TokenMeta.cat(metas)
    dense = [float(build_mask(rule, m, full).sum()) for m in metas]
    assert rep["unscheduled"]["per_rank"]["attn_pairs_own_queries"] == dense
    assert sum(rep["per_rank"]["attn_pairs_ring"]) == sum(dense)
    # Ulysses: every rank attends all queries on H/P heads -> all allowed pairs / P each
    assert rep["per_rank"]["attn_pairs_ulysses"] == [float(build_mask(rule, full, full).sum()) / sp] * sp
    assert rep["per_rank"]["tokens"] == [float(len(m)) for m in metas]
    assert sum(rep["per_rank"]["loss_tokens"]) == f * (h // 2) * (w // 2)


def test_balanced_spreads_loss_and_vae_work():
    naive = layout_report("naive", 96, 3, 4, 60, 104, halo=1)["summary"]
    bal = layout_report("balanced", 96, 3, 4, 60, 104, halo=1)["summary"]
    assert naive["loss_tokens"]["max_over_mean"] == 2.0
    assert bal["loss_tokens"]["max_over_mean"] == 1.0
    assert bal["vae_frames"]["max"] == naive["vae_frames"]["max"]  # one encode plan for any layout


def test_cli_json(capsys):
    assert cli(["balance", "--frames", "24", "--sp", "2", "--layout", "balanced", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["tokens_per_frame"] == 30 * 52 and len(rep["per_rank"]["tokens"]) == 2
    assert (
        cli(
            ["balance", "--frames", "24", "--sp", "2", "--window-frames", "6", "--sink-frames", "3", "--json"]
        )
        == 0
    )
    rep = json.loads(capsys.readouterr().out)
    assert rep["mask"] == {"window_frames": 6, "sink_frames": 3, "shot_sink": False}
    assert cli(["balance", "--frames", "24", "--sp", "5"]) == 2


def test_vae_frames_pre_encoded_and_exact_halo():
    """Latent shards: no VAE work. Exact halo: rank 0 has no left context, so encoding its own
    frames it would read less; the encode plan gives it more frames instead."""
    pre = layout_report("balanced", 96, 3, 4, 60, 104, pre_encoded=True)
    assert pre["per_rank"]["vae_frames"] == [0.0] * 4
    exact = layout_report("balanced", 96, 3, 4, 60, 104)  # Wan2.1's receptive field, 28 latent frames
    own = exact["unscheduled"]["per_rank"]["vae_frames_own_span"]
    assert exact["halo_latent_frames"] == 28
    assert own[0] == 4 * 23 + 1 and own[0] < min(own[1:])  # frames 0..23: no halo before the clip's start
    assert exact["vae_encode_plan"] == [[0, 45], [45, 62], [62, 79], [79, 96]]
    assert exact["per_rank"]["vae_frames"] == [4 * 44 + 1, 180.0, 180.0, 180.0]  # 17 frames + 28 halo
    assert exact["summary"]["attn_pairs_ulysses"]["max_over_mean"] == 1.0
    # causal: later queries see more keys; the ring schedule evens that out
    assert exact["unscheduled"]["summary"]["attn_pairs_own_queries"]["max_over_mean"] > 1.5
    assert exact["summary"]["attn_pairs_ring"]["max_over_mean"] < 1.001
