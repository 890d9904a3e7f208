"""Smoke test of bench/long_horizon.py: the analytic dataset, the per-chunk error, a tiny pipeline."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import long_horizon as lh


def test_pattern_video_is_the_closed_form_and_continues_consistently():
    p = lh.make_patterns(3)[1]
    x = lh.pattern_video(p, start=37, frames=10)
    assert x.shape == (lh.C, 10, lh.HW, lh.HW) and x.dtype == np.float32
    # one element by hand: channel 5, frame 37 + 4, position (h, w) = (3, 6)
    want = sum(
        p.mix[k, 5] * math.sin(2 * math.pi * (a * 3 + b * 6) / lh.HW + p.omega[k] * 41 + p.phase[k])
        for k, (a, b) in enumerate(p.wavenumbers)
    )
    assert x[5, 4, 3, 6] == pytest.approx(want, abs=1e-5)
    # a crop of a longer video is the shorter video at a later start (the continuation is consistent)
    long = lh.pattern_video(p, start=30, frames=400)
    np.testing.assert_allclose(long[:, 7:17], x, atol=1e-5)
    np.testing.assert_allclose(long[:, 307:317], lh.pattern_video(p, start=337, frames=10), atol=1e-5)
    # it moves: no two consecutive frames are equal
    assert np.abs(np.diff(long, axis=1)).mean(axis=(0, 2, 3)).min() > 0.05
    # distinct captions and motions; unit variance per element on average
    ps = lh.make_patterns(6)
    assert len({q.caption for q in ps}) == 6 and all(np.abs(q.omega).max() < math.pi for q in ps)
    ctx = lh.captions_context(ps)
    assert ctx.shape == (6, lh.TEXT_TOKENS, lh.TEXT_DIM) and not torch.equal(ctx[0], ctx[1])
    assert 0.5 < float(np.mean([lh.pattern_video(q, 0, 30).var() for q in ps])) < 2.0


def test_chunk_errors_on_a_known_case():
    truth = torch.ones(2, 4, 6, 2, 2)
    x = truth.clone()
    x[0, :, 3:] += 0.5  # sample 0, chunk 1: every element off by 0.5
    x[1, :, :3] = 0.0  # sample 1, chunk 0: all zeros -> relative L2 exactly 1
    e = lh.chunk_errors(x, truth, fpc=3)
    torch.testing.assert_close(e["rel_l2"], torch.tensor([[0.0, 0.25], [1.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(e["mse"], torch.tensor([[0.0, 0.25], [1.0, 0.0]], dtype=torch.float64))
    # the horizons: chunks of frames in ((L/2) T, L T], the 1x one after the prefix
    assert lh.horizon_chunks(6, 3, 1) == [1]
    assert lh.horizon_chunks(6, 3, 2) == [2, 3]
    assert lh.horizon_chunks(6, 3, 8) == [8, 9, 10, 11, 12, 13, 14, 15]


def test_quick_pipeline_gives_finite_figures(tmp_path):
    out = tmp_path / "lh.json"
    res = lh.main(["--quick", "--steps", "4", "--model-seeds", "2", "--prompts", "2", "--crops", "1",
                   "--train-samples", "16", "--sample-seeds", "2", "--horizon", "2", "--dmd-steps", "2",
                   "--out", str(out)])  # fmt: skip
    doc = json.loads(out.read_text())
    assert set(doc["configs"]) >= {"TF, bf16 KV", "TF, nvfp4 KV", "TF+ER, bf16 KV", "TF+ER, nvfp4 KV"}
    for name, r in res["configs"].items():
        assert len(r["per_chunk_mean"]) == doc["resolved"]["chunks"] == 4
        assert r["per_chunk_mean"][0] == 0.0  # the given prefix
        for fac in ("1x", "2x"):
            assert math.isfinite(r["at"][fac]["mean"]) and r["at"][fac]["n"] == 2
        window = (3, 0) if "as trained" in name else (12, 3)  # as `vidtrain sample` bounds it
        assert (r["sampler"]["window_frames"], r["sampler"]["sink_frames"]) == window, name
    assert {"TF -> DMD clip rollout, bf16 KV", "TF -> DMD long rollout, bf16 KV"} <= set(doc["configs"])
    # 4 steps learn nothing: the gate says so and the tables fall back to every seed, with a note
    gate = doc["learned_gate"]
    assert len(gate["tf_bf16_1x_per_model"]) == 2 and gate["hold_1x"] > 0
    if not any(v < gate["ratio"] * gate["hold_1x"] for v in gate["tf_bf16_1x_per_model"]):
        assert any("learned gate" in n for n in doc["notes"])
    assert (
        "TF -> DMD long rollout, bf16 KV minus TF -> DMD clip rollout, bf16 KV" in doc["paired_differences"]
    )
    assert out.with_suffix(".png").stat().st_size > 0
