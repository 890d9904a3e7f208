"""bench/train_bench.py's exit code: an out-of-memory row is a result, other failures are not."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import train_bench

OOM = "out of memory: CUDA out of memory. Tried to allocate 18.6 GiB"


@pytest.mark.parametrize(
    ("errors", "rc"),
    [
        ((None, None), 0),
        ((OOM, OOM), 0),  # the shape does not fit this device: measured, recorded
        ((None, "timed out after 60 s"), 0),  # one setting ran
        (("timed out after 60 s", "exit 1: boom"), 1),
        ((OOM, "timed out after 60 s"), 1),  # nothing ran and not only for memory
    ],
)
def test_exit_code(monkeypatch, tmp_path, errors, rc):
    rows = iter(errors)

    def fake_spawn(a, argv, setting):
        err = next(rows)
        row = {"checkpointing": setting == "on", "error": err}
        if err is None:
            row.update(
                step_s=1.0, mask_build_s=0.0, precision="fp32", peak_memory_bytes=1, peak_memory_kind="rss"
            )
        return row

    monkeypatch.setattr(train_bench, "spawn", fake_spawn)
    out = tmp_path / "train.json"
    assert train_bench.main(["--checkpointing", "both", "--out", str(out)]) == rc
    assert out.exists()
