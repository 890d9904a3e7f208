"""Training from video shards: the resumable reader, lazy per-range VAE latents, one-process trainer."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import decord
import pytest
import torch

from vidtrain.config import load_recipe
from vidtrain.data.videos import VideoBatchEncoder, VideoLatents, VideoShardDataset, collate_videos
from vidtrain.testing.equality import debug_vae, make_video_shards
from vidtrain.train.checkpoint import latest_checkpoint
from vidtrain.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tf_debug_videos.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """3 clips of 21 frames (6 latent frames) at 32x32 from bikes.mp4, one per shard."""
    return make_video_shards(tmp_path_factory.mktemp("videos"), frames=21, clips=3)


def test_items_are_decoded_clips_with_captions(shards):
    items = iter(VideoShardDataset(shards, shuffle=False))
    it = next(items)
    assert it["video"].shape == (3, 21, 32, 32) and it["video"].dtype == torch.float32
    assert float(it["video"].min()) >= -1.0 and float(it["video"].max()) <= 1.0
    assert it["caption"] == "people ride bikes down a busy city street"
    import webdataset as wds

    raw = next(
        iter(wds.WebDataset([str(sorted(shards.glob("*.tar"))[0])], shardshuffle=False, empty_check=False))
    )
    frames = decord.VideoReader(io.BytesIO(raw["mp4"])).get_batch(list(range(21))).asnumpy()
    want = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0
    assert raw["__key__"] == it["key"] and torch.equal(it["video"], want)
    assert collate_videos([it, next(items)])["video"].shape == (2, 3, 21, 32, 32)


def test_ranks_split_and_position_resumes(shards):
    def keys(ds, n):
        items = iter(ds)
        return [next(items)["key"] for _ in range(n)]

    a = keys(VideoShardDataset(shards, seed=3, rank=0, world_size=2, shuffle_buffer=0), 2)
    b = keys(VideoShardDataset(shards, seed=3, rank=1, world_size=2, shuffle_buffer=0), 1)
    assert len(set(a[:1] + b)) == 2  # different clips in the same epoch
    ds = VideoShardDataset(shards, seed=3, shuffle_buffer=2)
    straight = keys(ds, 5)
    first = VideoShardDataset(shards, seed=3, shuffle_buffer=2)
    keys(first, 2)
    resumed = VideoShardDataset(shards, seed=3, shuffle_buffer=2)
    resumed.load_state_dict(first.state_dict())
    assert keys(resumed, 3) == straight[2:]


def test_lazy_latents_encode_only_the_asked_frames():
    torch.manual_seed(0)
    vae, video = debug_vae(), torch.rand(1, 3, 45, 32, 32) * 2 - 1  # 12 latent frames
    with torch.no_grad():
        whole = vae.encode(video)
    exact = VideoLatents(vae, video, vae.temporal_receptive_field())
    assert exact.shape == whole.shape and exact.ndim == 5
    torch.testing.assert_close(exact.frames(6, 12), whole[:, :, 6:12], rtol=1e-5, atol=1e-6)
    near = VideoLatents(vae, video, halo=1)
    near.frames(6, 12)
    assert near.pixel_frames_read == vae.pixel_range(6, 12, 1)[1] - vae.pixel_range(6, 12, 1)[0] == 4 * 7
    with pytest.raises(ValueError, match="vae_halo must be >= 0"):
        VideoLatents(vae, video, -1)


def test_batch_encoder_trims_text_to_the_longest_caption(shards):
    from vidtrain.models.text import TextEncoder

    text = TextEncoder.from_pretrained(shards.parent / "text_encoder")
    items = iter(VideoShardDataset(shards, shuffle=False))
    raw = collate_videos([next(items), next(items)])
    raw["captions"][1] = "a cat"
    out = VideoBatchEncoder(debug_vae(), text, text_padding="masked")(raw)  # trimming: the masked option
    assert out["text"].shape[:2] == out["text_mask"].shape and out["text_mask"][0].all()
    assert out["text_mask"].sum(1).tolist()[1] < out["text_mask"].shape[1]
    assert isinstance(out["latents"], VideoLatents) and out["latents"].shape == (2, 16, 6, 4, 4)


def test_one_process_trains_from_videos_and_resumes_exactly(shards, tmp_path):
    """The shipped recipe in one process: 4 steps == 2 steps + resume + 2 steps (losses, weights)."""
    args = ["parallel.strategy=none", "parallel.sp_size=1", f"data.shards={shards}", "train.ckpt_every=2"]
    args += ["optim.schedule=constant", "log.plots=false", "train.ema_decay=0.9"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(load_recipe(RECIPE, [*args, f"run.dir={straight}"]))
    train(load_recipe(RECIPE, [*args, f"run.dir={split}", "train.max_steps=2"]))
    train(load_recipe(RECIPE, [*args, f"run.dir={split}"]))  # resumes at step 2
    la, lb = (
        [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]
        for d in (straight, split)
    )
    assert la == lb and len(la) == 4
    sa, sb = (
        torch.load(latest_checkpoint(d) / "trainer_state.pt", weights_only=False) for d in (straight, split)
    )
    assert sa["data"] == sb["data"] and sa["data"]["consumed"] == [4]
    for k, v in sa["ema"]["shadow"].items():
        assert torch.equal(v, sb["ema"]["shadow"][k]), k
    shutil.rmtree(tmp_path)
