"""vidtrain-encode (debug VAE, tiny text encoder) and vidtrain-inspect on real clips; read back."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import decord
import numpy as np
import pytest
import torch

from vidtrain.assets_paths import sample_videos
from vidtrain.data import LatentShardDataset
from vidtrain.data_tools import encode, inspect, shard
from vidtrain.data_tools._shards import sha256_file

ENC = [
    "--tiny-text-encoder",
    "--tiny-text-dim",
    "32",
    "--max-text-len",
    "16",
    "--latents-per-pass",
    "0",
    "--no-progress",
]


@pytest.fixture(scope="module")
def video_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 clips of 9 frames at 64x64 (bikes x2, carphone x1), 2 per shard -> 2 shards."""
    root = tmp_path_factory.mktemp("enc")
    vids = root / "videos"
    vids.mkdir()
    for v in sample_videos():
        if not v.name.startswith("bigbuckbunny"):
            (vids / v.name).symlink_to(v)
    (vids / "bikes.txt").write_text("people ride bikes\n")
    out = root / "video_shards"
    args = [str(vids), str(out), "--height", "64", "--width", "64", "--frames", "9", "--fps", "4"]
    assert shard.main([*args, "--max-clips-per-video", "2", "--samples-per-shard", "2", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def latent_shards(video_shards: Path) -> Path:
    out = video_shards.parent / "latents"
    assert encode.main([str(video_shards), str(out), "--world-size", "2", "--rank", "1", *ENC]) == 0
    assert not (out / "manifest.json").exists()  # rank 0 has not finished yet
    assert encode.main([str(video_shards), str(out), "--world-size", "2", "--rank", "0", *ENC]) == 0
    return out


def test_encode_matches_direct_vae_and_text(video_shards: Path, latent_shards: Path) -> None:
    from vidtrain.models.text import TextEncoder
    from vidtrain.models.vae import CausalVideoVAE

    m = json.loads((latent_shards / "manifest.json").read_text())
    assert m["num_samples"] == 3 and [s["name"] for s in m["shards"]] == [
        "shard-000000.tar",
        "shard-000001.tar",
    ]
    assert all(sha256_file(latent_shards / s["name"]) == s["sha256"] for s in m["shards"])
    torch.manual_seed(0)
    vae = CausalVideoVAE.from_flavor("debug").eval()
    te = TextEncoder.from_pretrained(latent_shards / ".tiny-text-encoder", max_length=16)
    with tarfile.open(video_shards / "shard-000000.tar") as tf:
        key = tf.getnames()[0].split(".")[0]
        mp4 = tf.extractfile(f"{key}.mp4").read()
        caption = tf.extractfile(f"{key}.txt").read().decode()
    frames = decord.VideoReader(io.BytesIO(mp4)).get_batch(list(range(9))).asnumpy()
    x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    with torch.no_grad():
        z = vae.encode(x, latents_per_pass=None)[0]
    emb, mask = te.encode([caption])
    item = {
        it["__key__"]: it for it in LatentShardDataset(latent_shards, shuffle=False)._epoch_items(0, 0, 1)
    }[key]
    lat, text = np.load(io.BytesIO(item["latents.npy"])), np.load(io.BytesIO(item["text.npy"]))
    assert lat.shape == (16, 3, 8, 8) and lat.dtype == np.float32 and text.dtype == np.float16
    np.testing.assert_allclose(lat, z.numpy(), atol=1e-4)
    assert text.shape == (int(mask.sum()), 32)
    np.testing.assert_allclose(text, emb[0, : text.shape[0]].numpy(), atol=2e-3, rtol=2e-3)
    meta = json.loads(item["json"])
    assert meta["caption"] == caption and meta["frames"] == 9 and meta["latent_shape"] == [16, 3, 8, 8]

    got = [x for _, x in zip(range(3), iter(LatentShardDataset(latent_shards, seed=0)))]
    assert {x["key"] for x in got} == {k for s in m["shards"] for k in _keys(latent_shards / s["name"])}
    assert all(x["latents"].shape == (16, 3, 8, 8) and x["text"].shape[1] == 32 for x in got)


def _keys(path: Path) -> set[str]:
    with tarfile.open(path) as tf:
        return {n.split(".")[0] for n in tf.getnames()}


def test_encode_resume_and_bad_inputs(
    video_shards: Path, latent_shards: Path, tmp_path: Path, capsys
) -> None:
    stamp = (latent_shards / "shard-000000.tar").stat().st_mtime_ns
    assert encode.main([str(video_shards), str(latent_shards), *ENC]) == 0  # all done: nothing redone
    assert (latent_shards / "shard-000000.tar").stat().st_mtime_ns == stamp
    assert "2 already done" in capsys.readouterr().err

    # A folder with a good shard, a shard holding one broken clip, and a corrupt tar.
    src = tmp_path / "vs"
    src.mkdir()
    shutil.copy(video_shards / "shard-000001.tar", src / "shard-000000.tar")
    with (
        tarfile.open(video_shards / "shard-000000.tar") as tf,
        tarfile.open(src / "shard-000001.tar", "w") as out,
    ):
        for mem in tf.getmembers():
            data = tf.extractfile(mem).read()
            if mem.name.endswith(".mp4") and "bikes" in mem.name and "c00001" in mem.name:
                data = b"not an mp4"
            mem.size = len(data)
            out.addfile(mem, io.BytesIO(data))
    (src / "shard-000002.tar").write_bytes(b"\x00garbage" * 100)
    lat = tmp_path / "lat"
    (lat).mkdir()
    (lat / "shard-000001.tar.tmp").write_bytes(b"half")  # a killed run
    assert encode.main([str(src), str(lat), *ENC]) == 0
    m = json.loads((lat / "manifest.json").read_text())
    assert m["num_samples"] == 2 and m["num_shards"] == 2 and not list(lat.glob("*.tmp"))
    reasons = {s["input"]: s["reason"] for s in m["skipped"]}
    assert len(reasons) == 2
    assert any(k.startswith("shard-000001.tar/bikes") for k in reasons)
    assert any("unreadable shard" in r for r in reasons.values())

    # Bad arguments: one line each.
    capsys.readouterr()
    assert encode.main([str(src), str(tmp_path / "x"), "--no-progress"]) == 2
    assert "--text-encoder" in capsys.readouterr().err
    assert encode.main([str(tmp_path / "none"), str(tmp_path / "x"), *ENC]) == 2
    assert encode.main([str(src), str(tmp_path / "y"), "--vae", "nope", *ENC]) == 2
    assert "neither a flavor" in capsys.readouterr().err


def test_inspect_video_and_latent_shards(
    video_shards: Path, latent_shards: Path, tmp_path: Path, capsys
) -> None:
    sheet = tmp_path / "sheet.png"
    assert inspect.main([str(video_shards), "--contact-sheet", str(sheet)]) == 0
    out = capsys.readouterr().out
    assert "3 sample(s)" in out and "checksums OK" in out and "9x64x64" in out
    from PIL import Image

    assert Image.open(sheet).size[0] > 64
    assert inspect.main([str(latent_shards)]) == 0
    out = capsys.readouterr().out
    assert "latents 16x3x8x8" in out and "checksums OK" in out

    bad = tmp_path / "copy"
    shutil.copytree(latent_shards, bad, ignore=shutil.ignore_patterns(".tiny-text-encoder"))
    with open(bad / "shard-000001.tar", "ab") as f:
        f.write(b"\0" * 512)
    assert inspect.main([str(bad)]) == 1
    assert "checksum MISMATCH" in capsys.readouterr().out


def test_encode_refuses_nonfinite_latents_and_unverified_inputs(
    video_shards: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    real = encode.Encoder.encode_batch

    def overflowing(self, clips, captions):  # a VAE that overflows on the first clip of a batch
        z, texts = real(self, clips, captions)
        z[0, 0, 0, 0, 0] = np.nan
        texts[-1][0, 0] = np.inf if len(texts) > 1 else texts[-1][0, 0]
        return z, texts

    monkeypatch.setattr(encode.Encoder, "encode_batch", overflowing)
    out = tmp_path / "lat"
    assert encode.main([str(video_shards), str(out), "--batch-size", "2", *ENC]) == 1  # nothing usable
    m = json.loads((out / "manifest.json").read_text())
    reasons = {s["input"]: s["reason"] for s in m["skipped"]}
    # shard 0 holds 2 clips (one batch: first has NaN latents, second inf text), shard 1 one clip
    assert m["num_samples"] == 0 and len(reasons) == 3, reasons
    assert all("non-finite" in r for r in reasons.values())
    assert (
        sum("latents" in r for r in reasons.values()) == 2 and sum("text" in r for r in reasons.values()) == 1
    )
    assert "non-finite" in capsys.readouterr().err
    assert m["shards"] == [] and not list(out.glob("shard-*"))  # no shard holds a refused sample
    monkeypatch.setattr(encode.Encoder, "encode_batch", real)

    # an input shard that does not match its manifest is skipped, not encoded
    src = tmp_path / "vs"
    shutil.copytree(video_shards, src)
    data = bytearray((src / "shard-000001.tar").read_bytes())
    data[-2000] ^= 0xFF
    (src / "shard-000001.tar").write_bytes(bytes(data))
    out2 = tmp_path / "lat2"
    assert encode.main([str(src), str(out2), *ENC]) == 0
    m = json.loads((out2 / "manifest.json").read_text())
    assert m["num_samples"] == 2 and [s["name"] for s in m["shards"]] == ["shard-000000.tar"]
    (bad,) = m["skipped"]
    assert bad["input"].endswith("shard-000001.tar") and "does not match manifest.json" in bad["reason"]
