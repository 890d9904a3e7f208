"""vidtrain-shard on the real sample clips: geometry, manifest, bad inputs, resume."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import decord
import pytest

from vidtrain.assets_paths import sample_videos
from vidtrain.data_tools import shard
from vidtrain.data_tools._shards import sha256_file

FAST = ["--height", "64", "--width", "80", "--frames", "9", "--fps", "4", "--no-progress"]
# clips of 9 frames at 4 fps: bigbuckbunny 5.28 s -> 21 frames -> 2, bikes 10 s -> 40 -> 4,
# carphone 4.0 s -> 16 -> 1
EXPECTED = {"bigbuckbunny": 2, "bikes": 4, "carphone_pristine": 1}


def _videos(tmp_path: Path) -> Path:
    d = tmp_path / "videos"
    d.mkdir()
    for v in sample_videos():
        (d / v.name).symlink_to(v)
    (d / "bikes.txt").write_text("people ride bikes down a street\n")
    return d


def _read_shard(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


def test_shard_folder_geometry_and_manifest(tmp_path: Path) -> None:
    out = tmp_path / "shards"
    rc = shard.main([str(_videos(tmp_path)), str(out), *FAST, "--samples-per-shard", "3", "--workers", "2"])
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["num_samples"] == sum(EXPECTED.values()) == 7
    assert [s["samples"] for s in m["shards"]] == [3, 3, 1]
    assert m["skipped"] == [] and m["args"]["frames"] == 9 and m["args"]["samples_per_shard"] == 3
    per_source: dict[str, int] = {}
    for s in m["shards"]:
        assert sha256_file(out / s["name"]) == s["sha256"]
        for key, files in _read_shard(out / s["name"]).items():
            assert set(files) == {"mp4", "json", "txt"} and "." not in key
            info = json.loads(files["json"])
            vr = decord.VideoReader(io.BytesIO(files["mp4"]))
            assert len(vr) == info["frames"] == 9
            assert vr[0].shape == (64, 80, 3) and info["size"] == [64, 80] and info["fps"] == 4.0
            stem = Path(info["source"]).stem
            per_source[stem] = per_source.get(stem, 0) + 1
            caption = files["txt"].decode()
            assert caption == ("people ride bikes down a street" if stem == "bikes" else stem)
            a, b = info["clip"]["source_frames"]
            assert 0 <= a < b and b - a >= 9
    assert per_source == EXPECTED
    assert not list(out.glob("*.tmp"))


def test_shard_size_rollover_and_csv_ranges(tmp_path: Path) -> None:
    carphone = next(v for v in sample_videos() if v.name.startswith("carphone"))
    lst = tmp_path / "list.csv"
    lst.write_text(f"path,caption,start,end\n{carphone},a man on a phone,1.0,4.0\n")
    out = tmp_path / "o"
    assert shard.main([str(lst), str(out), *FAST, "--fps", "6", "--shard-size-mb", "0.001"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["num_samples"] == 2 and m["num_shards"] == 2  # 3 s at 6 fps = 18 frames; one clip per shard
    (sample,) = _read_shard(out / m["shards"][0]["name"]).values()
    info = json.loads(sample["json"])
    assert sample["txt"] == b"a man on a phone" and info["clip"]["source_frames"][0] == 30  # 1 s at 29.97 fps


def test_bad_inputs_are_skipped_and_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    carphone = next(v for v in sample_videos() if v.name.startswith("carphone"))
    (tmp_path / "zero.mp4").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a video at all\n")
    (tmp_path / "cut.mp4").write_bytes(carphone.read_bytes()[:20000])  # moov atom lost
    rows = [
        f"{carphone},good",
        "missing.mp4,nope",
        "zero.mp4,empty",
        "notes.txt,text",
        "cut.mp4,truncated",
        f"{carphone},too short,0,1.5",
    ]
    lst = tmp_path / "list.csv"
    lst.write_text(
        "path,caption,start,end\n" + "\n".join(r if r.count(",") == 3 else r + ",," for r in rows) + "\n"
    )
    out = tmp_path / "o"
    assert shard.main([str(lst), str(out), *FAST]) == 0
    m = json.loads((out / "manifest.json").read_text())
    reasons = {
        Path(s["input"]).name + (":short" if "shorter" in s["reason"] else ""): s["reason"]
        for s in m["skipped"]
    }
    assert m["num_samples"] == 1
    assert "does not exist" in reasons["missing.mp4"]
    assert "0 bytes" in reasons["zero.mp4"]
    assert "cannot decode" in reasons["notes.txt"] and "cannot decode" in reasons["cut.mp4"]
    assert "need 9" in reasons[f"{carphone.name}:short"]
    err = capsys.readouterr().err
    assert err.count("vidtrain-shard: skipped") == 5

    # Nothing usable at all -> non-zero exit, manifest still lists why.
    lst.write_text("path,caption\nzero.mp4,x\nnotes.txt,y\n")
    out2 = tmp_path / "o2"
    assert shard.main([str(lst), str(out2), *FAST]) == 1
    assert len(json.loads((out2 / "manifest.json").read_text())["skipped"]) == 2


def test_bad_arguments_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    vids = _videos(tmp_path)
    assert shard.main([str(vids), str(blocker / "out"), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vidtrain-shard: error: output folder") and "not writable" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert shard.main([str(vids), str(tmp_path / "o"), "--frames", "8"]) == 2
    assert "1+4k" in capsys.readouterr().err
    assert shard.main([str(vids), str(tmp_path / "o"), "--height", "60"]) == 2
    assert shard.main([str(tmp_path / "nope"), str(tmp_path / "o")]) == 2


def test_resume_skips_finished_shards_and_cleans_killed_run(tmp_path: Path, capsys) -> None:
    vids = _videos(tmp_path)
    (vids / "bigbuckbunny.mp4").unlink()  # keep it quick: bikes (4) + carphone (1)
    out = tmp_path / "o"
    args = [str(vids), str(out), *FAST, "--samples-per-shard", "2"]
    assert shard.main(args) == 0
    first = json.loads((out / "manifest.json").read_text())
    assert first["num_samples"] == 5 and first["num_shards"] == 3
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}

    # A second run redoes nothing.
    assert shard.main(args) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")} == stamps
    assert "0 clip(s) to do" in capsys.readouterr().err

    # A killed run: the last shard never got renamed, a temp file and no manifest remain.
    (out / "shard-000002.tar").rename(out / "shard-000002.tar.tmp")
    (out / "manifest.json").unlink()
    assert shard.main(args) == 0
    assert not list(out.glob("*.tmp"))
    again = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in again["shards"]] == [s["name"] for s in first["shards"]]
    assert [s["samples"] for s in again["shards"]] == [2, 2, 1]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-00000[01].tar")} == {
        k: v for k, v in stamps.items() if k != "shard-000002.tar"
    }
    assert again["shards"][2]["sha256"] == first["shards"][2]["sha256"]  # deterministic re-encode

    # Other settings into the same folder are refused.
    assert shard.main([str(vids), str(out), *FAST, "--fps", "5", "--samples-per-shard", "2"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_copy_of_folder_keeps_keys_distinct(tmp_path: Path) -> None:
    vids = _videos(tmp_path)
    for name in ("bigbuckbunny.mp4", "bikes.mp4"):
        (vids / name).unlink()
    sub = vids / "again"
    sub.mkdir()
    shutil.copy(vids / "carphone_pristine.mp4", sub / "carphone_pristine.mp4")
    out = tmp_path / "o"
    assert shard.main([str(vids), str(out), *FAST]) == 0
    keys = list(_read_shard(out / "shard-000000.tar"))
    assert len(keys) == 2 and len(set(keys)) == 2


def _one_line_error(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("vidtrain-shard: error: ")
    return err


@pytest.mark.parametrize(
    "body,line,needle",
    [
        ("path,caption,start,end\n{v},a,2,1\n", 2, "end (1 s) must be after start (2 s)"),
        ("path,caption,start,end\n{v},a,1,1\n", 2, "end (1 s) must be after start (1 s)"),
        (
            "path,caption,start,end\n{v},a,0,5\n{v},b,nan,\n",
            3,
            "start must be a finite number of seconds >= 0, got 'nan'",
        ),
        ("path,caption,start,end\n{v},a,-1,\n", 2, "start must be a finite number of seconds >= 0, got '-1'"),
        ("path,caption,start,end\n{v},a,,inf\n", 2, "end must be a finite number of seconds >= 0, got 'inf'"),
        ("path,caption,start,end\n{v},a,one,\n", 2, "start must be a number of seconds, got 'one'"),
        ("path,caption\n{v},a\n{v},b\n", 3, "same video and clip range as line 2"),
        ('{{"path": "{v}", "start": NaN}}\n', 1, "start must be a finite number of seconds >= 0, got nan"),
        ('{{"path": "{v}", "start": 3, "end": 2}}\n', 1, "end (2 s) must be after start (3 s)"),
        ('{{"path": "{v}", "start": true}}\n', 1, "start must be a number of seconds, got True"),
        ('{{"path": "{v}"}}\n\n{{"path": "{v}", "start": null}}\n', 3, "same video and clip range as line 1"),
    ],
)
def test_bad_list_rows_are_refused_naming_the_line(tmp_path, capsys, body, line, needle) -> None:
    carphone = next(v for v in sample_videos() if v.name.startswith("carphone"))
    lst = tmp_path / ("list.jsonl" if body.startswith("{") else "list.csv")
    lst.write_text(body.format(v=carphone))
    out = tmp_path / "o"
    assert shard.main([str(lst), str(out), *FAST]) == 2
    err = _one_line_error(capsys)
    assert f"{lst}:{line}: " in err and needle in err, err
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_non_utf8_list_is_one_line_naming_the_line(tmp_path, capsys, suffix) -> None:
    lst = tmp_path / f"list{suffix}"
    head = b"path,caption\n" if suffix == ".csv" else b""
    row = b"a.mp4,caf\xe9 au lait\n" if suffix == ".csv" else b'{"path": "a.mp4", "caption": "caf\xe9"}\n'
    lst.write_bytes(head + b"b.mp4,fine\n" * (suffix == ".csv") + row)
    assert shard.main([str(lst), str(tmp_path / "o"), *FAST]) == 2
    err = _one_line_error(capsys)
    line = 3 if suffix == ".csv" else 1
    assert f"{lst}:{line}: not valid UTF-8 (byte 0xe9" in err and "save the list as UTF-8" in err
    assert not (tmp_path / "o").exists()
    lst.write_bytes(b"\xef\xbb\xbf" + head + row.replace(b"\xe9", "é".encode()))  # UTF-8 with a BOM reads
    assert shard.list_inputs(lst)[0].caption.startswith("café")


def test_distinct_videos_with_colliding_keys_get_longer_digests(tmp_path, capsys, monkeypatch) -> None:
    carphone = next(v for v in sample_videos() if v.name.startswith("carphone"))
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        shutil.copy(carphone, tmp_path / d / "clip.mp4")
    lst = tmp_path / "list.csv"
    lst.write_text("path,caption\na/clip.mp4,first\nb/clip.mp4,second\n")
    monkeypatch.setattr(shard, "_digest", lambda ident, n: "0" * n if n == 8 else shard._sha1(ident)[:n])
    inputs = shard.list_inputs(lst)
    keys = [shard.clip_key(v, 0) for v in inputs]
    assert keys[0] == "clip_00000000_c00000" and keys[1].startswith("clip_") and len(set(keys)) == 2
    assert len(keys[1].split("_")[1]) == 16  # the later row gets a 16-hex digest, deterministically
    assert keys == [shard.clip_key(v, 0) for v in shard.list_inputs(lst)]
    err = capsys.readouterr().err
    assert f"{lst}:3: " in err and "collides with line 2" in err


def test_damaged_finished_shard_is_named_on_resume(tmp_path, capsys) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "shard-000000.tar").write_bytes(b"\x00garbage" * 100)
    assert shard.main([str(_videos(tmp_path)), str(out), *FAST]) == 2
    err = _one_line_error(capsys)
    assert "finished shard" in err and "shard-000000.tar is damaged" in err and "delete it" in err
