"""Shard integrity in the reader: sha256 against manifest.json, truncated shards, non-finite
latents. Each ends in an error naming the shard (and sample), or with on_bad_sample=skip in a
counted, printed skip that keeps the resume position exact."""

from __future__ import annotations

import io
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from vidtrain.data import BadDataError, LatentLoader, LatentShardDataset
from vidtrain.data import latents as latents_mod
from vidtrain.data_tools import _shards
from vidtrain.data_tools._shards import RollingShardWriter, write_manifest


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def make_shards(folder: Path, n: int = 12, per_shard: int = 4, nan_keys=(), shape=(4, 2, 3, 5), text_dim=6):
    """n samples `s0000...`; latents hold their index, or NaN for `nan_keys`."""
    folder.mkdir(parents=True, exist_ok=True)
    w = RollingShardWriter(folder, 0, per_shard, None)
    for i in range(n):
        key = f"s{i:04d}"
        lat = np.full(shape, np.nan if key in nan_keys else i, np.float32)
        text = np.full((3, text_dim), i, np.float16)
        w.write(key, {"latents.npy": _npy(lat), "text.npy": _npy(text), "json": b"{}"})
    w.close()
    write_manifest(folder, "vidtrain-latent-shards", {}, [])
    return folder


@pytest.fixture(autouse=True)
def _fresh_process_caches(monkeypatch):
    """Each test is a 'new process': nothing verified or reported yet."""
    monkeypatch.setattr(latents_mod, "_VERIFIED", {})
    monkeypatch.setattr(latents_mod, "_REPORTED", set())


def _tamper(path: Path) -> None:
    """Flip the first byte of the first sample's latents.npy (the tar still parses)."""
    data = bytearray(path.read_bytes())
    data[1536] ^= 0xFF  # headers and json take 3 x 512 bytes; then the npy magic
    path.write_bytes(bytes(data))


def _keys(ds, k: int) -> list[str]:
    return [x["key"] for x in itertools.islice(iter(ds), k)]


def _one_line(text: str) -> str:
    text = text.strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    return text


def test_tampered_shard_is_an_error_naming_it(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "s")
    _tamper(shards / "shard-000001.tar")
    ds = LatentShardDataset(shards, shuffle=False)
    with pytest.raises(BadDataError) as e:
        _keys(ds, 12)
    msg = _one_line(str(e.value))
    assert "shard-000001.tar" in msg and "sha256" in msg and "does not match manifest.json" in msg
    assert "data.on_bad_sample=skip" in msg
    # verification off: the tampered bytes are read as they are (the flip hit the npy header -> the
    # sample is undecodable, an error naming shard and sample)
    ok = LatentShardDataset(shards, shuffle=False, verify=False)
    with pytest.raises(BadDataError, match=r"shard-000001.tar sample s0004"):
        _keys(ok, 12)


@pytest.mark.parametrize("cut", ["half", "header"])
def test_truncated_shard_is_an_error_not_a_tar_traceback(tmp_path: Path, cut: str) -> None:
    shards = make_shards(tmp_path / "s")
    p = shards / "shard-000002.tar"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2] if cut == "half" else data[:3000])
    for verify in (True, False):
        with pytest.raises(BadDataError) as e:
            _keys(LatentShardDataset(shards, shuffle=False, verify=verify), 12)
        msg = _one_line(str(e.value))
        assert "shard-000002.tar" in msg
        assert ("manifest.json says" in msg) if verify else ("truncated" in msg or "unreadable" in msg)
    # without a manifest (a list of paths) the reader counts what it can read: a clear error too
    with pytest.raises(BadDataError, match=r"shard-000002\.tar"):
        _keys(LatentShardDataset(sorted(shards.glob("*.tar")), shuffle=False), 12)


def test_nonfinite_latents_are_refused_naming_shard_and_key(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "s", nan_keys={"s0005"})
    with pytest.raises(BadDataError) as e:
        _keys(LatentShardDataset(shards, shuffle=False), 12)
    msg = _one_line(str(e.value))
    assert "shard-000001.tar sample s0005" in msg and "non-finite" in msg and "NaN/Inf" in msg
    with pytest.raises(BadDataError, match=r"s0005.*non-finite"):  # through the DataLoader workers too
        list(itertools.islice(iter(LatentLoader(LatentShardDataset(shards), 2, num_workers=2)), 12))


def test_skip_counts_prints_once_per_shard_and_resume_is_exact(tmp_path: Path, capsys) -> None:
    shards = make_shards(tmp_path / "s", n=16, nan_keys={"s0001", "s0002", "s0013"})
    _tamper(shards / "shard-000002.tar")  # s0008..s0011

    def make():
        return LatentShardDataset(shards, seed=5, shuffle_buffer=3, on_bad_sample="skip")

    ds = make()
    epoch = _keys(ds, 11)  # 16 slots - 3 NaN - 4 tampered = 9 good per epoch
    good = (
        {f"s{i:04d}" for i in range(16)} - {"s0001", "s0002", "s0013"} - {f"s{i:04d}" for i in range(8, 12)}
    )
    assert set(epoch[:9]) == good and set(epoch[9:]) <= good
    state = ds.state_dict()
    assert state["skipped"][0] >= 7 and state["consumed"][0] == 11 + state["skipped"][0]
    err = capsys.readouterr().err
    assert err.count("skipping shard") == 1 and "shard-000002.tar (4 sample slot(s))" in err
    # per-sample skips: printed the first time per shard (s0001 or s0002 of shard 0, s0013 of
    # shard 3), then counted
    assert err.count("skipping sample s00") == 2
    assert ("s0001" in err) != ("s0002" in err) and "s0013" in err

    full = _keys(make(), 40)
    for k in (1, 5, 9, 14):  # stops before, between and after skipped samples, across epochs
        first = make()
        head = _keys(first, k)
        saved = json.loads(json.dumps(first.state_dict()))
        again = make()
        again.load_state_dict(saved)
        assert head + _keys(again, 40 - k) == full, k
    assert first.state_dict()["skipped"][0] >= 7


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resume_after_skips_is_exact(tmp_path: Path, workers: int) -> None:
    shards = make_shards(tmp_path / "s", n=16, nan_keys={"s0003", "s0006", "s0007"})

    def loader():
        ds = LatentShardDataset(shards, seed=2, shuffle_buffer=3, on_bad_sample="skip")
        return LatentLoader(ds, batch_size=2, num_workers=workers)

    full = [k for b in itertools.islice(iter(loader()), 15) for k in b["keys"]]
    assert not {"s0003", "s0006", "s0007"} & set(full)
    skips = []
    for k in (2, 5, 7):
        first = loader()
        head = [k for b in itertools.islice(iter(first), k) for k in b["keys"]]
        state = json.loads(json.dumps(first.state_dict()))
        skips.append(first.skipped)
        assert sum(state["skipped"]) == first.skipped
        assert sum(state["consumed"]) == 2 * k + first.skipped  # slots: the good ones + the skipped
        resumed = loader()
        resumed.load_state_dict(state)
        tail = [k for b in itertools.islice(iter(resumed), 15 - k) for k in b["keys"]]
        assert head + tail == full, k
    assert skips[0] < skips[-1]  # the later resumes cross skipped samples


def test_each_shard_is_hashed_once_per_process(tmp_path: Path, monkeypatch) -> None:
    shards = make_shards(tmp_path / "s")
    calls: list[str] = []
    real = _shards.sha256_file
    monkeypatch.setattr(_shards, "sha256_file", lambda p, *a: calls.append(Path(p).name) or real(p, *a))
    _keys(LatentShardDataset(shards, seed=1), 12 * 3)  # three epochs
    _keys(LatentShardDataset(shards, seed=2), 12)  # another reader in the same process
    assert sorted(calls) == sorted(p.name for p in shards.glob("*.tar"))
    calls.clear()
    _keys(LatentShardDataset(shards, verify=False), 12)
    assert calls == []
    # a shard replaced after it was verified is checked again (size / mtime changed)
    _tamper(shards / "shard-000000.tar")
    with pytest.raises(BadDataError, match=r"shard-000000\.tar"):
        _keys(LatentShardDataset(shards, shuffle=False), 12)


def test_all_bad_is_an_error_not_an_endless_loop(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "s", n=4, nan_keys={f"s{i:04d}" for i in range(4)})
    with pytest.raises(BadDataError, match="no usable sample"):
        _keys(LatentShardDataset(shards, on_bad_sample="skip"), 1)


def test_bad_policy_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="on_bad_sample"):
        LatentShardDataset(make_shards(tmp_path / "s", n=4), on_bad_sample="ignore")


def test_vidtrain_train_on_a_tampered_shard_exits_2_with_one_line(tmp_path: Path, capsys) -> None:
    from vidtrain.cli import main

    shards = make_shards(tmp_path / "s", n=4, per_shard=2, shape=(16, 3, 4, 4), text_dim=32)
    _tamper(shards / "shard-000001.tar")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  source: shards\n")
    run = tmp_path / "run"
    argv = ["train", str(recipe), f"data.shards={shards}", f"run.dir={run}", "log.wandb=disabled",
            "train.progress=false", "train.max_steps=4", "data.batch_size=2", "data.shuffle_buffer=0"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 2
    err = _one_line(capsys.readouterr().err)
    assert err.startswith("vidtrain train: error: shard ") and "shard-000001.tar" in err and "sha256" in err
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").glob("step_*"))


def test_copied_folder_with_manifest_verifies(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "s", n=4)
    shutil.copytree(shards, tmp_path / "copy")
    assert len(_keys(LatentShardDataset(tmp_path / "copy" / "manifest.json", shuffle=False), 4)) == 4


def test_undecodable_video_sample_names_shard_and_key(tmp_path: Path) -> None:
    from vidtrain.data.videos import VideoShardDataset

    folder = tmp_path / "v"
    folder.mkdir()
    w = RollingShardWriter(folder, 0, 4, None)
    w.write("clip_a", {"mp4": b"not an mp4", "txt": b"a caption", "json": b"{}"})
    w.close()
    write_manifest(folder, "vidtrain-video-shards", {}, [])
    with pytest.raises(BadDataError) as e:
        _keys(VideoShardDataset(folder, shuffle=False), 1)
    msg = _one_line(str(e.value))
    assert "shard-000000.tar sample clip_a: cannot decode" in msg


def test_inspect_reports_truncated_and_nonfinite_shards(tmp_path: Path, capsys) -> None:
    from vidtrain.data_tools import inspect

    shards = make_shards(tmp_path / "s", nan_keys={"s0001"})
    p = shards / "shard-000002.tar"
    p.write_bytes(p.read_bytes()[:5000])
    assert inspect.main([str(shards)]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM shard-000000.tar: sample s0001: ValueError: latents hold non-finite values" in out
    assert "PROBLEM shard-000002.tar: " in out and "checksum MISMATCH" in out and "Traceback" not in out
