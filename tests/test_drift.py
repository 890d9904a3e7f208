"""Drift figures (vidtrain/sample/drift.py) and `vidtrain eval --drift` end to end."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from vidtrain.data_tools._shards import RollingShardWriter, write_manifest
from vidtrain.sample import drift


def _spd(c: int, seed: int) -> torch.Tensor:
    a = torch.randn(c, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(c, dtype=torch.float64)


# -- the Frechet distance


def test_frechet_of_identical_gaussians_is_zero():
    mu, cov = torch.randn(8, dtype=torch.float64), _spd(8, 1)
    assert drift.frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-9)


def test_frechet_matches_the_closed_forms():
    # commuting covariances (one rotation): |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    a, b = (
        torch.tensor([1.0, 2, 3, 4, 5], dtype=torch.float64),
        torch.tensor([4.0, 1, 9, 0.25, 2], dtype=torch.float64),
    )
    mu1, mu2 = torch.zeros(5, dtype=torch.float64), torch.arange(5, dtype=torch.float64)
    want = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    got = drift.frechet_distance(mu1, q @ torch.diag(a) @ q.T, mu2, q @ torch.diag(b) @ q.T)
    assert got == pytest.approx(want, rel=1e-9)
    # non-commuting 2x2: Tr sqrt(S1 S2) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2))
    s1, s2 = _spd(2, 2), _spd(2, 3)
    tr_sqrt = math.sqrt(float(torch.trace(s1 @ s2)) + 2 * math.sqrt(float(torch.det(s1) * torch.det(s2))))
    want = float(s1.trace() + s2.trace()) - 2 * tr_sqrt
    assert drift.frechet_distance(torch.zeros(2), s1, torch.zeros(2), s2) == pytest.approx(want, rel=1e-9)


def test_running_gaussian_stats_match_torch_cov():
    x = torch.randn(300, 6, dtype=torch.float64) * torch.arange(1, 7) + 3
    s = drift.GaussianStats(6)
    for part in x.split(70):
        s.add(part)
    assert s.n == 300
    torch.testing.assert_close(s.mean, x.mean(0))
    torch.testing.assert_close(s.cov, torch.cov(x.T))
    mu, cov = drift.gaussian_fit(x)
    torch.testing.assert_close(mu, x.mean(0))
    torch.testing.assert_close(cov, torch.cov(x.T))
    assert drift.token_vectors(torch.randn(2, 6, 3, 4, 5)).shape == (2 * 3 * 4 * 5, 6)


# -- frame change, seams, identity


def _seamed(chunks: int, fpc: int, inside: float, seam: float) -> torch.Tensor:
    """[1, 2, F, 2, 2] frames whose value steps by `inside` within chunks and `seam` across."""
    steps = [seam if (i + 1) % fpc == 0 else inside for i in range(chunks * fpc - 1)]
    values = torch.tensor([0.0, *np.cumsum(steps).tolist()])
    return values.view(1, 1, -1, 1, 1).expand(1, 2, -1, 2, 2).clone()


def test_boundary_ratio_of_known_seams():
    z = _seamed(chunks=6, fpc=3, inside=1.0, seam=3.0)
    change = drift.frame_change(z)
    assert change.tolist() == [1.0, 1.0, 3.0] * 5 + [1.0, 1.0]
    assert drift.boundary_ratio(change, 3) == pytest.approx(3.0)
    ref = drift.GaussianStats(2)
    ref.add(torch.randn(100, 2))
    fig = drift.drift_figures(z, 3, 2, ref, identity_frames=3)
    assert math.isnan(fig["per_chunk"]["boundary_ratio"][0])
    assert fig["per_chunk"]["boundary_ratio"][1:] == pytest.approx([3.0] * 5)
    assert fig["per_window"]["boundary_ratio"] == pytest.approx([3.0] * 3)
    assert fig["overall_boundary_ratio"] == pytest.approx(3.0)
    # chunk 0 counts its two inside changes, later chunks the seam into them too
    assert fig["per_chunk"]["frame_change"] == pytest.approx([1.0] + [5 / 3] * 5)
    assert math.isnan(drift.boundary_ratio(change, 1))  # one frame per chunk: no inside change


def test_identity_of_a_frozen_video_is_one_and_windows_are_checked():
    frame = torch.randn(2, 4, 1, 3, 3)
    z = frame.repeat(1, 1, 12, 1, 1) * torch.linspace(1, 2, 12).view(1, 1, -1, 1, 1)  # brighter, same image
    torch.testing.assert_close(drift.identity_similarity(z, 3), torch.ones(12))
    ref = drift.GaussianStats(4)
    ref.add(drift.token_vectors(torch.randn(3, 4, 5, 3, 3)))
    fig = drift.drift_figures(frame.repeat(1, 1, 12, 1, 1), 3, 2, ref, identity_frames=3)
    assert fig["per_chunk"]["identity"] == pytest.approx([1.0] * 4)
    assert fig["per_chunk"]["frame_change"][1:] == [0.0] * 3
    assert len(fig["per_window"]["frechet"]) == 2 and len(fig["per_chunk"]["channel_mean"][0]) == 4
    with pytest.raises(ValueError, match="at least two windows"):
        drift.drift_figures(z, 3, 3, ref, identity_frames=3)


# -- vidtrain eval --drift


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def make_reference(folder: Path, n: int = 5, channels: int = 16) -> Path:
    """n latent samples [C, 6, 4, 4] in shards of 2, with a manifest (vidtrain-encode's format)."""
    folder.mkdir(parents=True)
    w = RollingShardWriter(folder, 0, 2, None)
    rng = np.random.default_rng(0)
    for i in range(n):
        lat = rng.standard_normal((channels, 6, 4, 4)).astype(np.float32)
        w.write(
            f"s{i:04d}",
            {"latents.npy": _npy(lat), "text.npy": _npy(np.zeros((3, 32), np.float16)), "json": b"{}"},
        )
    w.close()
    write_manifest(folder, "vidtrain-latent-shards", {}, [])
    return folder


@pytest.fixture(scope="module")
def eval_base(tmp_path_factory, teacher) -> tuple[list[str], Path]:
    tmp = tmp_path_factory.mktemp("drift")
    prompts = tmp / "p.txt"
    prompts.write_text("a\nb\n")
    base = ["eval", "--checkpoints", str(teacher), "--prompts", str(prompts), "--height", "32", "--width", "32",
            "--steps", "1000", "--window-frames", "6", "--sink-frames", "3"]  # fmt: skip
    return base, make_reference(tmp / "ref")


def test_eval_drift_writes_json_plot_and_summary(eval_base, tmp_path):
    from vidtrain.cli import main

    base, ref = eval_base
    out = tmp_path / "eval.md"
    argv = [*base, "--out", str(out), "--chunks", "4", "--drift", "--reference-shards", str(ref),
            "--drift-window", "2", "--reference-samples", "3", "--kv-cache", "fp32", "nvfp4"]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads(out.with_suffix(".drift.json").read_text())
    assert doc["settings"]["chunks"] == 4 and doc["settings"]["window_chunks"] == 2
    assert doc["reference"]["samples"] == 3 and doc["reference"]["samples_available"] == 5
    assert doc["reference"]["token_vectors"] == 3 * 6 * 4 * 4 and len(doc["reference"]["channel_mean"]) == 16
    assert [r["kv_cache"] for r in doc["runs"]] == ["fp32", "nvfp4"]
    for run in doc["runs"]:
        assert run["identity_frames"] == 3 and run["latent_frames"] == 12
        chunk, window = run["per_chunk"], run["per_window"]
        assert chunk["boundary_ratio"][0] is None  # no boundary before chunk 0
        for key in ("frechet", "mean_error", "std_ratio", "frame_change", "identity", "boundary_ratio"):
            assert len(window[key]) == 2 and all(math.isfinite(v) for v in window[key]), key
            values = chunk[key][1:] if key == "boundary_ratio" else chunk[key]
            assert len(chunk[key]) == 4 and all(math.isfinite(v) for v in values), key
        assert np.asarray(chunk["channel_std"]).shape == (4, 16) and np.asarray(
            window["channel_mean"]
        ).shape == (2, 16)
    assert out.with_suffix(".drift.png").stat().st_size > 0
    md = out.read_text()
    assert md.startswith("| checkpoint | kv_cache |") and "## Drift" in md and "->" in md
    assert out.with_suffix(".csv").read_text().splitlines()[0].startswith("checkpoint,kv_cache,latent_fps")


def test_eval_without_drift_writes_no_drift(eval_base, tmp_path):
    from vidtrain.cli import main

    base, _ = eval_base
    out = tmp_path / "eval.md"
    assert main([*base, "--out", str(out), "--chunks", "1"]) == 0
    assert "Drift" not in out.read_text() and not out.with_suffix(".drift.json").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--drift", "--reference-shards", "{tmp}/nowhere"], "no such folder"),
        (
            ["--drift", "--reference-shards", "{ref}", "--chunks", "3", "--drift-window", "2"],
            "at least two windows",
        ),
        (["--drift"], "--drift needs --reference-shards"),
        (["--reference-shards", "{ref}"], "--reference-shards needs --drift"),
        (["--drift", "--reference-shards", "{ref48}"], "48 channels"),
    ],
)
def test_eval_drift_bad_input_is_one_line(eval_base, tmp_path, capsys, extra, message):
    from vidtrain.cli import main

    base, ref = eval_base
    ref48 = make_reference(tmp_path / "ref48", n=1, channels=48) if "{ref48}" in extra else None
    extra = [e.format(tmp=tmp_path, ref=ref, ref48=ref48) for e in extra]
    chunks = [] if "--chunks" in extra else ["--chunks", "8"]
    assert main([*base, "--out", str(tmp_path / "e.md"), *chunks, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "e.md").exists()  # refused before any compute
