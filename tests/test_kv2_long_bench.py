"""Smoke test of bench/kv2_long_bench.py: a tiny multi-shot stream of the demo DiT per KV format."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import kv2_long_bench


def _run(tmp_path: Path, name: str) -> dict:
    out = tmp_path / f"{name}.json"
    argv = ["--shots", "2", "--chunks-per-shot", "2", "--seeds", "2", "--out", str(out)]
    assert kv2_long_bench.main(argv) == 0
    return json.loads(out.read_text())


def test_tiny_stream(tmp_path, capsys):
    a = _run(tmp_path, "a")
    assert "| format |" in capsys.readouterr().out
    rows = {r["format"]: r for r in a["rows"]}
    assert set(kv2_long_bench.FORMATS) | {kv2_long_bench.UNRELATED} == set(rows)
    ref = rows["bf16"]["error"]
    assert ref["overall"]["mean"] == 0 and all(m["mean"] == 0 for m in ref["per_chunk"])
    for name, r in rows.items():
        if name == "bf16":
            continue
        e = r["error"]
        assert math.isfinite(e["overall"]["mean"]) and e["overall"]["mean"] > 0, name
        assert all(math.isfinite(m["mean"]) and m["mean"] > 0 for m in e["per_shot"]), name
        assert len(e["per_chunk"]) == 4 and len(r["per_seed"]) == 2
        if name != kv2_long_bench.UNRELATED:  # chunk 0 reads no cache: the same latents
            assert e["per_chunk"][0]["mean"] == 0, name
    assert rows["kv2"]["kv_bytes"] < rows["nvfp4"]["kv_bytes"] < rows["bf16"]["kv_bytes"]
    assert rows["nvfp4-mse"]["kv_bytes"] == rows["nvfp4"]["kv_bytes"]
    assert rows["rtn2"]["kv_bytes"] < rows["bf16"]["kv_bytes"]

    b = _run(tmp_path, "b")  # deterministic given --seed (wall times apart)
    strip = lambda d: [{k: v for k, v in r.items() if k != "wall_s"} for r in d["rows"]]  # noqa: E731
    assert strip(a) == strip(b)
