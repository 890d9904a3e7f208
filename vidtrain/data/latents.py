"""Resumable, endless, rank- and worker-split streams of latent samples for the trainer.

An item is `{"latents": FloatTensor[C,F,H,W], "text": FloatTensor[L,D], "key": str}`.

How a stream is cut. Each data-parallel rank runs W "roles" (its DataLoader workers, or one
role when iterated in-process); consumer `c = rank * W + role` of `n = world_size * W`. Epoch
`e` permutes the shards with `(seed, e)` (the same on every rank) and consumer c reads shards
`c, c+n, ...`; with fewer shards than consumers it reads every shard and keeps sample i
when `i % n == c`. A shuffle buffer seeded with `(seed, e, c)` mixes samples within the
epoch and is drained at its end. Epochs never end: the stream runs until the trainer stops.
Ranks of one sequence-parallel group pass the same `rank` (their data-parallel index).

Position. The stream of every consumer is a fixed function of (seed, shards, n), so its
position is one number: samples it has yielded. `state_dict()` counts in-process iteration;
with DataLoader workers use `LatentLoader`, which counts the batches it handed out (the
DataLoader takes batches from its workers round-robin) and, on resume, rotates the worker
roles so the next batch comes from the role whose turn it was. Resuming thus yields exactly
the samples the uninterrupted run would have yielded next.

Legend: B batch, C channels, F latent frames, H, W latent height and width, L text tokens,
D text width.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vidtrain.data_tools._shards import resolve_shards, shard_keys

_STATE_VERSION = 1


def _rng(*seeds: int) -> np.random.Generator:
    return np.random.default_rng([int(s) for s in seeds])


def _buffer_shuffle(items: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Reservoir-style shuffle: fill a buffer, emit a random slot, refill it; drain at the end."""
    buf: list[Any] = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        j = int(rng.integers(size))
        buf[j], x = x, buf[j]
        yield x
    rng.shuffle(buf)
    yield from buf


class ResumableStream(IterableDataset):
    """Base of the latent streams: splitting, shuffling, endless epochs and the position.

    Subclasses give the units of an epoch (`_num_units`, `_unit_len`, `_read_unit`) and
    `_decode`, which turns a raw record into an item (skipped records are never decoded).
    """

    def __init__(self, *, seed: int, rank: int, world_size: int, shuffle: bool, shuffle_buffer: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        self._roles = 1  # W of the run that produced `_consumed`
        self._consumed = [0]
        self._next_role = 0

    # -- to implement
    def _num_units(self) -> int:
        raise NotImplementedError

    def _unit_len(self, unit: int) -> int:
        raise NotImplementedError

    def _read_unit(self, unit: int) -> Iterator[Any]:
        raise NotImplementedError

    def _decode(self, raw: Any) -> dict[str, Any]:
        raise NotImplementedError

    # -- the epoch plan
    def _unit_order(self, epoch: int) -> list[int]:
        order = np.arange(self._num_units())
        if self.shuffle:
            order = _rng(self.seed, epoch).permutation(order)
        return [int(u) for u in order]

    def _check_split(self, n: int) -> None:
        total = sum(self._unit_len(u) for u in range(self._num_units()))
        if total < n:
            raise ValueError(f"{total} samples cannot feed {n} consumers (world_size x workers); add data")

    def _epoch_len(self, epoch: int, c: int, n: int) -> int:
        order = self._unit_order(epoch)
        if len(order) >= n:
            return sum(self._unit_len(u) for u in order[c::n])
        total = sum(self._unit_len(u) for u in order)
        return len(range(c, total, n))

    def _epoch_raw(self, epoch: int, c: int, n: int) -> Iterator[Any]:
        order = self._unit_order(epoch)
        if len(order) >= n:
            for u in order[c::n]:
                yield from self._read_unit(u)
            return
        i = 0
        for u in order:
            for raw in self._read_unit(u):
                if i % n == c:
                    yield raw
                i += 1

    def _epoch_items(self, epoch: int, c: int, n: int) -> Iterator[Any]:
        raw = self._epoch_raw(epoch, c, n)
        if self.shuffle and self.shuffle_buffer > 1:
            raw = _buffer_shuffle(raw, self.shuffle_buffer, _rng(self.seed, epoch, c, 1))
        return raw

    def _locate(self, consumed: int, c: int, n: int) -> tuple[int, int]:
        """(epoch, offset within it) after `consumed` samples of consumer c."""
        epoch = 0
        while consumed >= (length := self._epoch_len(epoch, c, n)):
            consumed -= length
            epoch += 1
        return epoch, consumed

    # -- iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        roles = info.num_workers if info is not None else 1
        if roles != self._roles:
            raise ValueError(
                f"the saved position was made with {self._roles} data worker(s), this run has {roles}; "
                "resume with the same num_workers (0 and 1 both count as one)"
            )
        role = ((info.id if info is not None else 0) + self._next_role) % roles
        c, n = self.rank * roles + role, self.world_size * roles
        self._check_split(n)
        done = self._consumed[role]
        epoch, offset = self._locate(done, c, n)
        while True:
            for i, raw in enumerate(self._epoch_items(epoch, c, n)):
                if i < offset:
                    continue
                item = self._decode(raw)
                done += 1
                self._consumed[role] = done
                yield item
            epoch, offset = epoch + 1, 0

    # -- position
    def state_dict(self) -> dict[str, Any]:
        """Position after the samples yielded so far by in-process iteration."""
        return self._state(self._consumed, self._next_role)

    def _state(self, consumed: list[int], next_role: int) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_units": self._num_units(),
            "roles": len(consumed),
            "consumed": list(consumed),
            "next_role": next_role,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unknown data position version {state.get('version')!r}")
        mine = {
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_units": self._num_units(),
        }
        for k, v in mine.items():
            if state.get(k) != v:
                raise ValueError(f"saved data position has {k}={state.get(k)!r}, this dataset has {v!r}")
        self._roles = int(state["roles"])
        self._consumed = [int(x) for x in state["consumed"]]
        self._next_role = int(state["next_role"])


class ShardStream(ResumableStream):
    """Webdataset shards as an endless resumable stream (one unit per shard); subclasses decode.

    `source` is a shard folder (manifest order when it has `manifest.json`), a manifest path
    or a list of `.tar` paths.
    """

    def __init__(
        self,
        source: str | Path | Iterable[str | Path],
        *,
        shuffle_buffer: int = 256,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        super().__init__(
            seed=seed, rank=rank, world_size=world_size, shuffle=shuffle, shuffle_buffer=shuffle_buffer
        )
        self.shards = [str(p) for p in resolve_shards(source)]
        missing = [p for p in self.shards if not Path(p).is_file()]
        if missing:
            raise ValueError(f"{len(missing)} shard(s) missing, e.g. {missing[0]}")
        self.counts = self._sample_counts(source)

    def _sample_counts(self, source: Any) -> list[int]:
        if isinstance(source, (str, Path)):
            p = Path(source)
            manifest = p if p.is_file() and p.suffix == ".json" else p / "manifest.json"
            if manifest.is_file():
                return [int(s["samples"]) for s in json.loads(manifest.read_text())["shards"]]
        return [len(shard_keys(Path(s))) for s in self.shards]

    def _num_units(self) -> int:
        return len(self.shards)

    def _unit_len(self, unit: int) -> int:
        return self.counts[unit]

    def _read_unit(self, unit: int) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        ds = wds.WebDataset(
            [self.shards[unit]], shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
        )
        yield from ds  # raw bytes per extension; decoded only when kept


class LatentShardDataset(ShardStream):
    """Latent shards (`latents.npy`, `text.npy`, `json`) as an endless resumable stream."""

    def _decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        if "latents.npy" not in raw or "text.npy" not in raw:
            raise ValueError(
                f"sample {raw.get('__key__')} of {raw.get('__url__')} lacks latents.npy or text.npy"
            )
        latents = np.load(io.BytesIO(raw["latents.npy"]))
        text = np.load(io.BytesIO(raw["text.npy"]))
        return {
            "latents": torch.from_numpy(latents.astype(np.float32, copy=False)),
            "text": torch.from_numpy(text.astype(np.float32, copy=False)),
            "key": raw["__key__"],
        }


class SyntheticLatentDataset(ResumableStream):
    """Random items in the latent-shard format; item i is a fixed function of (seed, i)."""

    def __init__(
        self,
        num_samples: int,
        channels: int = 16,
        frames: int = 3,
        height: int = 8,
        width: int = 8,
        text_len: int = 8,
        text_dim: int = 32,
        seed: int = 0,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        super().__init__(seed=seed, rank=rank, world_size=world_size, shuffle=shuffle, shuffle_buffer=0)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = num_samples
        self.shape_CFHW = (channels, frames, height, width)
        self.text_LD = (text_len, text_dim)

    def _num_units(self) -> int:
        return self.num_samples

    def _unit_len(self, unit: int) -> int:
        return 1

    def _read_unit(self, unit: int) -> Iterator[int]:
        yield unit

    def _decode(self, raw: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + raw)
        return {
            "latents": torch.randn(self.shape_CFHW, generator=g),
            "text": torch.randn(self.text_LD, generator=g),
            "key": f"synthetic-{raw:08d}",
        }


def collate_latents(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack latents to [B,C,F,H,W]; pad text to the longest with zeros plus a bool mask [B,L]."""
    shapes = {tuple(it["latents"].shape) for it in items}
    if len(shapes) > 1:
        raise ValueError(f"latents of one batch differ in shape {sorted(shapes)}; shard clips of one size")
    dims = {it["text"].shape[1] for it in items}
    if len(dims) > 1:
        raise ValueError(f"text embeddings of one batch differ in width {sorted(dims)}")
    L = max(it["text"].shape[0] for it in items)
    text_BLD = torch.zeros(len(items), L, dims.pop())
    mask_BL = torch.zeros(len(items), L, dtype=torch.bool)
    for b, it in enumerate(items):
        n = it["text"].shape[0]
        text_BLD[b, :n] = it["text"]
        mask_BL[b, :n] = True
    return {
        "latents": torch.stack([it["latents"] for it in items]),
        "text": text_BLD,
        "text_mask": mask_BL,
        "keys": [it["key"] for it in items],
    }


class LatentLoader:
    """An endless DataLoader over a ResumableStream whose position survives a restart.

    It counts the batches it hands out; batch k came from worker role `k % W`, each batch of
    `batch_size` samples, so the count gives every role's position.
    """

    def __init__(
        self,
        dataset: ResumableStream,
        batch_size: int,
        num_workers: int = 0,
        collate_fn: Callable[[list[dict[str, Any]]], Any] = collate_latents,
        **loader_kwargs: Any,
    ) -> None:
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"need batch_size >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.collate_fn, self.loader_kwargs = collate_fn, loader_kwargs
        self.roles = max(1, num_workers)
        self._consumed = [0] * self.roles
        self._next_role = 0

    def __iter__(self) -> Iterator[Any]:
        self.dataset.load_state_dict(self.dataset._state(self._consumed, self._next_role))
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            **self.loader_kwargs,
        )
        for batch in loader:
            self._consumed[self._next_role] += self.batch_size
            self._next_role = (self._next_role + 1) % self.roles
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return self.dataset._state(self._consumed, self._next_role)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["roles"]) != self.roles:
            raise ValueError(
                f"saved data position used {state['roles']} worker(s), this loader has {self.roles}; "
                "resume with the same num_workers"
            )
        self.dataset.load_state_dict(state)
        self._consumed = [int(x) for x in state["consumed"]]
        self._next_role = int(state["next_role"])
