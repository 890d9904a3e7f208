"""LatentShardDataset / SyntheticLatentDataset: format, splitting, shuffling, exact resume."""

from __future__ import annotations

import functools
import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vidtrain.data import LatentLoader, LatentShardDataset, SyntheticLatentDataset, collate_latents
from vidtrain.data_tools._shards import RollingShardWriter, write_manifest


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def make_latent_shards(folder: Path, n: int = 22, per_shard: int = 4) -> Path:
    """n samples; latents hold their index, text has 3..7 tokens of width 6 (float16)."""
    folder.mkdir(parents=True, exist_ok=True)
    w = RollingShardWriter(folder, 0, per_shard, None)
    for i in range(n):
        lat = np.full((4, 2, 3, 5), i, np.float32)
        text = np.full((3 + i % 5, 6), i, np.float16)
        w.write(
            f"s{i:04d}",
            {"latents.npy": _npy(lat), "text.npy": _npy(text), "json": json.dumps({"i": i}).encode()},
        )
    w.close()
    write_manifest(folder, "vidtrain-latent-shards", {}, [])
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_latent_shards(tmp_path_factory.mktemp("lat") / "shards")


def _keys(ds, k: int) -> list[str]:
    return [x["key"] for x in itertools.islice(iter(ds), k)]


def test_items_and_one_epoch_covers_every_sample(shards: Path) -> None:
    ds = LatentShardDataset(shards, shuffle_buffer=5, seed=3)
    items = list(itertools.islice(iter(ds), 22))
    x = items[0]
    assert set(x) == {"latents", "text", "key"}
    assert x["latents"].dtype == torch.float32 and x["latents"].shape == (4, 2, 3, 5)
    assert x["text"].dtype == torch.float32 and x["text"].shape[1] == 6
    i = int(x["key"][1:])
    assert torch.all(x["latents"] == i) and x["text"].shape[0] == 3 + i % 5
    assert sorted(it["key"] for it in items) == [f"s{i:04d}" for i in range(22)]
    assert [it["key"] for it in items] != sorted(it["key"] for it in items)  # shuffled
    assert _keys(LatentShardDataset(shards, shuffle_buffer=5, seed=3), 30) == _keys(
        ds.__class__(shards, shuffle_buffer=5, seed=3), 30
    )
    assert _keys(LatentShardDataset(shards, shuffle_buffer=5, seed=4), 22) != [it["key"] for it in items]
    assert _keys(LatentShardDataset(shards, shuffle=False), 5) == [f"s{i:04d}" for i in range(5)]


@pytest.mark.parametrize("world_size", [2, 8])  # 6 shards: split by shard, then by sample
def test_ranks_partition_an_epoch(shards: Path, world_size: int) -> None:
    seen = []
    for r in range(world_size):
        ds = LatentShardDataset(shards, seed=1, rank=r, world_size=world_size, shuffle_buffer=3)
        n = ds._epoch_len(0, r, world_size)
        seen += _keys(ds, n)
    assert sorted(seen) == [f"s{i:04d}" for i in range(22)]


def test_in_process_resume_is_exact_across_epochs(shards: Path) -> None:
    full = _keys(LatentShardDataset(shards, seed=7, shuffle_buffer=4), 60)
    ds = LatentShardDataset(shards, seed=7, shuffle_buffer=4)
    head = _keys(ds, 31)  # stops in the second epoch
    state = json.loads(json.dumps(ds.state_dict()))  # survives a checkpoint round trip
    again = LatentShardDataset(shards, seed=7, shuffle_buffer=4)
    again.load_state_dict(state)
    assert head + _keys(again, 29) == full


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resume_with_workers_is_exact(shards: Path, workers: int) -> None:
    def loader() -> LatentLoader:
        return LatentLoader(
            LatentShardDataset(shards, seed=2, shuffle_buffer=3), batch_size=2, num_workers=workers
        )

    full = [k for b in itertools.islice(iter(loader()), 14) for k in b["keys"]]
    first = loader()
    head = [k for b in itertools.islice(iter(first), 5) for k in b["keys"]]  # odd: the next turn is worker 1
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    tail = [k for b in itertools.islice(iter(resumed), 9) for k in b["keys"]]
    assert head + tail == full


def test_state_mismatch_is_a_clear_error(shards: Path) -> None:
    ds = LatentShardDataset(shards, seed=1)
    with pytest.raises(ValueError, match="seed"):
        LatentShardDataset(shards, seed=2).load_state_dict(ds.state_dict())
    two = LatentLoader(LatentShardDataset(shards), batch_size=1, num_workers=2)
    with pytest.raises(ValueError, match="same num_workers"):
        LatentLoader(LatentShardDataset(shards), batch_size=1).load_state_dict(two.state_dict())
    with pytest.raises(ValueError, match="rank"):
        LatentShardDataset(shards, rank=2, world_size=2)
    with pytest.raises(ValueError, match="neither"):
        LatentShardDataset(shards / "nope")


def test_collate_pads_text_with_a_mask(shards: Path) -> None:
    items = _keys_items = list(itertools.islice(iter(LatentShardDataset(shards, shuffle=False)), 3))
    # the masked option (Wan's fixed-length padding: tests/test_text_padding.py)
    batch = collate_latents(_keys_items, text_padding="masked")
    assert batch["latents"].shape == (3, 4, 2, 3, 5)
    assert batch["text"].shape == (3, 5, 6) and batch["text_mask"].tolist() == [
        [1] * 3 + [0] * 2,
        [1] * 4 + [0],
        [1] * 5,
    ]
    assert torch.all(batch["text"][0, 3:] == 0) and batch["keys"] == [it["key"] for it in items]
    items[1] = {**items[1], "latents": torch.zeros(4, 3, 3, 5)}
    with pytest.raises(ValueError, match="differ in shape"):
        collate_latents(items)


def test_synthetic_dataset_format_split_and_resume() -> None:
    def make(**kw) -> SyntheticLatentDataset:
        return SyntheticLatentDataset(
            10, channels=4, frames=3, height=2, width=2, text_len=5, text_dim=8, seed=1, **kw
        )

    x = next(iter(make()))
    assert (
        x["latents"].shape == (4, 3, 2, 2) and x["text"].shape == (5, 8) and x["key"].startswith("synthetic-")
    )
    assert torch.equal(next(iter(make(shuffle=False)))["latents"], next(iter(make(shuffle=False)))["latents"])
    full = _keys(make(), 25)
    assert sorted(full[:10]) == sorted(full[10:20])
    ds = make()
    head = _keys(ds, 13)
    again = make()
    again.load_state_dict(ds.state_dict())
    assert head + _keys(again, 12) == full
    r0, r1 = _keys(make(rank=0, world_size=2), 5), _keys(make(rank=1, world_size=2), 5)
    assert sorted(r0 + r1) == sorted(full[:10])
    masked = functools.partial(collate_latents, text_padding="masked")  # a mask to look at
    batch = next(iter(LatentLoader(make(), batch_size=4, collate_fn=masked)))
    assert batch["latents"].shape == (4, 4, 3, 2, 2) and batch["text_mask"].all()
