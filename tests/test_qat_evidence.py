"""Smoke test of bench/qat_evidence.py with the 2-bit KV cache (--kv-format kv2), tiny steps."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import qat_evidence as qe


def test_kv2_rows_gaps_and_qat_recipe(tmp_path):
    """--kv-format kv2: every row (a, a', b, b_w, b_kv, c, c_w, a'_kv, c_kv, a_noise) has a finite held-out
    loss, the gaps and the fractions closed are in the JSON with the format, the kv2 history
    changes a's loss (b_kv != a), the QAT run trained with quant.kv_format=kv2, its ablation c_w
    without the history fake-quant, and c_kv on high-precision weights with the kv2 history."""
    threads = torch.get_num_threads()
    out = tmp_path / "kv2.json"
    try:
        res = qe.main(
            [
                "--kv-format", "kv2", "--hide", "phase,mix", "--workdir", str(tmp_path / "w"), "--out", str(out),
                "--base-steps", "3", "--ft-steps", "2", "--train-samples", "8", "--heldout-samples", "2",
            ]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    loss = {r["model"]: r["heldout_loss"] for r in res["rows"]}
    assert list(loss) == ["a", "a'", "b", "b_w", "b_kv", "c", "c_w", "a'_kv", "c_kv", "a_noise"]
    assert all(math.isfinite(v) for v in loss.values())
    assert loss["b_kv"] != loss["a"]  # the kv2 hook reaches the prediction
    assert res["kv_format"] == "kv2" and res["args"]["kv_format"] == "kv2"
    assert res["gap_ptq"] == pytest.approx(loss["b"] - loss["a"])
    assert res["gap_qat"] == pytest.approx(loss["c"] - loss["a'"])
    assert res["gap_kv"] == pytest.approx(loss["b_kv"] - loss["a"])
    if res["gap_ptq"] > 0:
        assert res["gap_closed"] == pytest.approx(1 - res["gap_qat"] / res["gap_ptq"])
    else:
        assert res["gap_closed"] is None
    assert all("kv2" in r["what"] for r in res["rows"] if r["model"] in ("b", "b_kv", "c", "c_w"))
    assert res["kv_qat_gain"] == pytest.approx(loss["c_w"] - loss["c"]) and res["hide"] == ["phase", "mix"]
    assert all(math.isfinite(res[k]) for k in ("kv_gap_c", "kv_gap_c_w", "kv_gap_c_kv"))
    assert res["kv_gap_ptq"] == pytest.approx(loss["a'_kv"] - loss["a'"])
    assert res["kv_gap_qat"] == pytest.approx(loss["c_kv"] - loss["a'"])
    assert res["history_use"] == pytest.approx(loss["a_noise"] - loss["a"]) and loss["a_noise"] != loss["a"]
    assert json.loads(out.read_text())["rows"] == res["rows"]
    recipe = yaml.safe_load((tmp_path / "w" / "c" / "recipe.yaml").read_text())
    assert recipe["method"]["name"] == "qat" and recipe["quant"]["kv_format"] == "kv2"
    ablation = yaml.safe_load((tmp_path / "w" / "c_w" / "recipe.yaml").read_text())
    assert ablation["method"]["name"] == "qat" and ablation["quant"]["kv_fake_quant"] is False
    kv_only = yaml.safe_load((tmp_path / "w" / "c_kv" / "recipe.yaml").read_text())["quant"]
    assert kv_only["exclude"] == ["*"] and kv_only["kv_format"] == "kv2" and kv_only["kv_fake_quant"]


def test_unknown_kv_format_or_hidden_field_is_refused():
    with pytest.raises(SystemExit):
        qe.main(["--kv-format", "fp8"])
    with pytest.raises(SystemExit):
        qe.main(["--hide", "colour"])


def test_hide_withholds_the_field_from_the_caption_only():
    """--hide changes the caption, never the latents; the phase is in the caption otherwise."""
    proj = np.random.default_rng(1234).standard_normal((qe.TEXT_LEN * qe.TEXT_DIM, 18 + 3 * qe.C)) / 6
    x0, t0 = qe.make_sample(np.random.default_rng(5), proj)
    x1, t1 = qe.make_sample(np.random.default_rng(5), proj, ("phase", "mix"))
    assert np.array_equal(x0, x1) and not np.allclose(t0, t1)
