"""`make demo`'s job end to end (shortened): every stage's console command, the report, the video."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "vidtrain.demo", "--out", str(out), "--steps", "2", "--dmd-steps", "5"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "vidtrain demo finished" in proc.stdout
    for rel in ("video.mp4", "video.metrics.json", "video.timeline.png", "report.md", "dmd/lora/adapter_config.json",
                "tf/balance.png", "qat/checkpoints/latest", "qat/checkpoints/step_000020/model/quant.json"):  # fmt: skip
        assert (out / rel).exists(), rel
    metrics = json.loads((out / "video.metrics.json").read_text())
    assert metrics["fps_end_to_end"] > 0 and metrics["kv_cache_bytes"] > 0
    import imageio.v3 as iio

    frames = iio.imread(out / "video.mp4")
    assert frames.shape[0] == 1 + 4 * (3 * 7 - 1)  # 7 chunks of 3 latent frames
