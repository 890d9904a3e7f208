"""Resumable, endless, rank- and worker-split streams of latent samples for the trainer.

An item is `{"latents": FloatTensor[C,F,H,W], "text": FloatTensor[L,D], "key": str}` (the
caption's true length L); `collate_latents` pads a batch's text as `model.text_padding` says.

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

Integrity. A shard read through a manifest is checked against it the first time this process
opens it (`verify`: size, then sha256 streamed in blocks; once per process). A shard that fails
the check, is truncated or unreadable, and a sample that cannot be decoded or holds non-finite
values stop the stream with a `BadDataError` naming the shard (and the sample), or with
`on_bad_sample="skip"` are skipped: printed once per shard and counted in the position
(`state_dict()["skipped"]`). A bad shard still fills its manifest's sample count as bad slots,
so the position counts slots, good or skipped: the stream of slots stays a fixed function of
(seed, shards, n) and a resume after a skip continues at the same sample.

Legend: B batch, C channels, F latent frames, H, W latent height and width, L text tokens,
D text width.
"""

from __future__ import annotations

import functools
import io
import os
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vidtrain.config import TEXT_LEN, TEXT_PADDING
from vidtrain.data_tools._shards import check_shard, error_text, manifest_of, readable_keys, resolve_shards
from vidtrain.models.text import text_context
from vidtrain.utils.rng import stream_seed

_STATE_VERSION = 1
BAD_SAMPLE_POLICIES = ("error", "skip")
# what reading a damaged tar raises (webdataset passes tarfile's errors through)
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, KeyError)
_FIX = "re-create it (vidtrain-shard / vidtrain-encode) or set data.on_bad_sample=skip"

# per process: shard path -> ((size, mtime_ns, expected sha256), problem or None); hashed once
_VERIFIED: dict[str, tuple[tuple[Any, ...], str | None]] = {}
_REPORTED: set[tuple[str, str]] = set()  # (kind, shard) already printed by this process


class BadDataError(ValueError):
    """A shard or sample the reader cannot use; the message names it and what to do."""


class BadSample(Exception):
    """Raised by `_decode` for a record that cannot be used (turned into a skip or a BadDataError)."""

    def __init__(self, shard: str | None, key: str | None, reason: str) -> None:
        super().__init__(reason)
        self.shard, self.key, self.reason = shard, key, reason


class _Slot(NamedTuple):
    """An item with the position after it (slots read, samples skipped), or an error."""

    item: Any
    done: int
    skipped: int
    error: str | None = None


def _report(kind: str, shard: str, message: str) -> None:
    if (kind, shard) not in _REPORTED:
        _REPORTED.add((kind, shard))
        print(f"[vidtrain] data: {message}", file=sys.stderr, flush=True)


def _nonfinite(name: str, a: np.ndarray) -> str | None:
    if a.dtype.kind not in "fc":
        return None
    bad = a.size - int(np.count_nonzero(np.isfinite(a)))
    return f"{name} hold {bad} non-finite value(s) (NaN/Inf) of {a.size}" if bad else None


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

    def __init__(
        self,
        *,
        seed: int,
        rank: int,
        world_size: int,
        shuffle: bool,
        shuffle_buffer: int,
        on_bad_sample: str = "error",
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, got {on_bad_sample!r}")
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        self.on_bad_sample = on_bad_sample
        self._roles = 1  # W of the run that produced `_consumed`
        self._consumed = [0]  # slots read per role (good or skipped)
        self._skipped = [0]  # of those, skipped as bad
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
        for slot in self._iter_slots():
            if slot.error is not None:
                raise BadDataError(slot.error)
            yield slot.item

    def _iter_slots(self) -> Iterator[_Slot]:
        """Items with their position; a bad record ends the stream in an error slot (repeated, so a
        DataLoader batch fills and reaches the main process) unless on_bad_sample is skip."""
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
        done, skipped = self._consumed[role], self._skipped[role]
        epoch, offset = self._locate(done, c, n)
        try:
            while True:
                good = 0
                for i, raw in enumerate(self._epoch_items(epoch, c, n)):
                    if i < offset:
                        continue
                    done += 1
                    try:
                        item = self._decode_slot(raw)
                    except BadSample as e:
                        where = f"shard {e.shard}" + (f" sample {e.key}" if e.key else "")
                        if self.on_bad_sample == "error":
                            raise BadDataError(f"{where}: {e.reason}; {_FIX}") from None
                        skipped += 1
                        if e.key is not None:  # whole-shard skips were printed when the shard was read
                            _report(
                                "sample", str(e.shard), f"skipping sample {e.key} of shard {e.shard}: {e.reason} "
                                "(data.on_bad_sample=skip; "
                                "further bad samples of this shard are counted, not printed)",
                            )  # fmt: skip
                        continue
                    good += 1
                    self._consumed[role], self._skipped[role] = done, skipped
                    yield _Slot(item, done, skipped)
                if good == 0 and offset == 0:
                    raise BadDataError(
                        f"no usable sample: all {self._epoch_len(epoch, c, n)} sample(s) this reader "
                        f"(consumer {c} of {n}) reads in epoch {epoch} are bad or the shards are empty"
                    )
                epoch, offset = epoch + 1, 0
        except BadDataError as e:
            while True:
                yield _Slot(None, done, skipped, str(e))

    def _decode_slot(self, raw: Any) -> dict[str, Any]:
        if isinstance(raw, dict) and "__bad__" in raw:  # a slot of a shard found bad when read
            raise BadSample(raw["__url__"], None, raw["__bad__"])
        return self._decode(raw)

    # -- position
    def state_dict(self) -> dict[str, Any]:
        """Position after the samples yielded so far by in-process iteration."""
        return self._state(self._consumed, self._next_role, self._skipped)

    def _state(self, consumed: list[int], next_role: int, skipped: list[int] | None = None) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_units": self._num_units(),
            "roles": len(consumed),
            "consumed": list(consumed),  # slots read per role, skipped ones included
            "skipped": list(skipped) if skipped is not None else [0] * len(consumed),
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
        self._skipped = [int(x) for x in state.get("skipped") or [0] * len(self._consumed)]
        self._next_role = int(state["next_role"])


class ShardStream(ResumableStream):
    """Webdataset shards as an endless resumable stream (one unit per shard); subclasses decode.

    `source` is a shard folder (manifest order when it has `manifest.json`), a manifest path
    or a list of `.tar` paths. `verify` checks each shard against the manifest (size and
    sha256) the first time this process opens it; `on_bad_sample` is "error" or "skip" (module
    docstring).
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
        verify: bool = True,
        on_bad_sample: str = "error",
    ) -> None:
        super().__init__(
            seed=seed, rank=rank, world_size=world_size, shuffle=shuffle, shuffle_buffer=shuffle_buffer,
            on_bad_sample=on_bad_sample,
        )  # fmt: skip
        if not isinstance(source, (str, Path)):
            source = list(source)
        self.shards = [str(p) for p in resolve_shards(source)]
        missing = [p for p in self.shards if not Path(p).is_file()]
        if missing:
            raise ValueError(f"{len(missing)} shard(s) missing, e.g. {missing[0]}")
        self.verify = verify
        manifest = manifest_of(source)
        # per shard: its manifest entry (None: no manifest to check against)
        self.entries: list[dict[str, Any] | None] = (
            list(manifest["shards"]) if manifest is not None else [None] * len(self.shards)
        )
        self._problems: dict[int, str] = {}  # shards found bad while counting (no manifest)
        if manifest is not None:
            self.counts = [int(s["samples"]) for s in manifest["shards"]]
        else:
            if verify:
                where = source if isinstance(source, (str, Path)) else f"{len(self.shards)} listed shard(s)"
                _report("unverified", str(where), f"{where}: no manifest.json, shard checksums not verified")
            self.counts = [self._count(u) for u in range(len(self.shards))]

    def _count(self, unit: int) -> int:
        keys, problem = readable_keys(Path(self.shards[unit]))
        if problem is not None:
            self._bad_shard(unit, problem, len(keys))
            self._problems[unit] = problem
        return len(keys)

    def _num_units(self) -> int:
        return len(self.shards)

    def _unit_len(self, unit: int) -> int:
        return self.counts[unit]

    def _check(self, unit: int) -> str | None:
        """What is wrong with a shard against its manifest entry, checked once per process."""
        path, entry = self.shards[unit], self.entries[unit]
        if unit in self._problems:
            return self._problems[unit]
        if not self.verify or entry is None:
            return None
        st = os.stat(path)
        sig = (st.st_size, st.st_mtime_ns, entry.get("bytes"), entry.get("sha256"))
        hit = _VERIFIED.get(path)
        if hit is None or hit[0] != sig:
            hit = _VERIFIED[path] = (sig, check_shard(Path(path), entry))
        return hit[1]

    def _bad_shard(self, unit: int, problem: str, slots: int) -> None:
        """A bad shard: BadDataError (on_bad_sample=error), else print it once and go on."""
        path = self.shards[unit]
        if self.on_bad_sample == "error":
            raise BadDataError(f"shard {path}: {problem}; {_FIX}")
        _report(
            "shard",
            path,
            f"skipping shard {path} ({slots} sample slot(s)): {problem} (data.on_bad_sample=skip)",
        )

    def _read_unit(self, unit: int) -> Iterator[dict[str, Any]]:
        """The shard's records (raw bytes per extension; decoded only when kept), always exactly
        its manifest's sample count: a bad shard's missing records come as bad slots."""
        import webdataset as wds

        want, n = self.counts[unit], 0
        problem = self._check(unit)
        if problem is None:
            ds = wds.WebDataset(
                [self.shards[unit]], shardshuffle=False, nodesplitter=None, workersplitter=None,
                empty_check=False,
            )  # fmt: skip
            try:
                for raw in ds:
                    if n == want:
                        problem = f"holds more samples than the {want} manifest.json lists"
                        break
                    yield raw
                    n += 1
            except _READ_ERRORS as e:
                problem = f"unreadable after {n} of {want} sample(s) ({type(e).__name__}: {error_text(e)})"
            if problem is None and n < want:
                problem = f"truncated: {n} of {want} sample(s) readable"
        if problem is not None:
            self._bad_shard(unit, problem, want - n)
        for _ in range(want - n):
            yield {"__bad__": problem, "__url__": self.shards[unit], "__key__": None}


class LatentShardDataset(ShardStream):
    """Latent shards (`latents.npy`, `text.npy`, `json`) as an endless resumable stream."""

    def _decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        shard, key = raw.get("__url__"), raw.get("__key__")
        lacking = [k for k in ("latents.npy", "text.npy") if k not in raw]
        if lacking:
            raise BadSample(shard, key, f"lacks {' and '.join(lacking)}")
        try:
            latents = np.load(io.BytesIO(raw["latents.npy"]))
            text = np.load(io.BytesIO(raw["text.npy"]))
        except (ValueError, OSError, EOFError) as e:
            raise BadSample(shard, key, f"unreadable .npy ({type(e).__name__}: {error_text(e)})") from None
        problem = _nonfinite("latents", latents) or _nonfinite("text embeddings", text)
        if problem:
            raise BadSample(shard, key, problem)
        return {
            "latents": torch.from_numpy(latents.astype(np.float32, copy=False)),
            "text": torch.from_numpy(text.astype(np.float32, copy=False)),
            "key": key,
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
        g = torch.Generator().manual_seed(stream_seed(self.seed, raw))
        return {
            "latents": torch.randn(self.shape_CFHW, generator=g),
            "text": torch.randn(self.text_LD, generator=g),
            "key": f"synthetic-{raw:08d}",
        }


def collate_latents(
    items: list[dict[str, Any]], text_padding: str = TEXT_PADDING, text_len: int = TEXT_LEN
) -> dict[str, Any]:
    """Stack latents to [B,C,F,H,W] and pad each caption's true-length text [L_b, D] as the recipe's
    `model.text_padding` says (`vidtrain.models.text.text_context`): `wan` zero-pads to exactly
    `text_len` tokens with `text_mask` None (Wan2.1), `masked` pads to the longest caption with a
    bool `text_mask` [B, L]. Longer captions are truncated to `text_len` (said once)."""
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
    text_BLD, mask = text_context(text_BLD, mask_BL, text_padding, text_len)
    return {
        "latents": torch.stack([it["latents"] for it in items]),
        "text": text_BLD,
        "text_mask": mask,
        "keys": [it["key"] for it in items],
    }


def latent_collate(model_config) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """`collate_latents` with a recipe's `model.text_padding` and `model.text_len` (picklable, for
    DataLoader workers)."""
    return functools.partial(
        collate_latents, text_padding=model_config.text_padding, text_len=model_config.text_len
    )


class _Slots(IterableDataset):
    """The slots of a stream (items with their position), for LatentLoader's DataLoader."""

    def __init__(self, dataset: ResumableStream) -> None:
        self.dataset = dataset

    def __iter__(self) -> Iterator[_Slot]:
        return self.dataset._iter_slots()


class _CollateSlots:
    """Collates the items of a batch of slots; returns (batch, slots read, skipped, error)."""

    def __init__(self, collate_fn: Callable[[list[dict[str, Any]]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, slots: list[_Slot]) -> tuple[Any, int, int, str | None]:
        error = next((s.error for s in slots if s.error is not None), None)
        if error is not None:
            return None, 0, 0, error
        return self.collate_fn([s.item for s in slots]), slots[-1].done, slots[-1].skipped, None


class LatentLoader:
    """An endless DataLoader over a ResumableStream whose position survives a restart.

    Batch k comes from worker role `k % W` (the DataLoader takes them round-robin) and carries
    the position its role reached (slots read, samples skipped), so every role's position is
    known exactly, bad samples skipped or not. A bad record in a worker ends the stream with the
    worker's one-line BadDataError, raised here.
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
        self._skipped = [0] * self.roles
        self._next_role = 0

    def __iter__(self) -> Iterator[Any]:
        self.dataset.load_state_dict(self.dataset._state(self._consumed, self._next_role, self._skipped))
        loader = DataLoader(
            _Slots(self.dataset),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=_CollateSlots(self.collate_fn),
            **self.loader_kwargs,
        )
        for batch, done, skipped, error in loader:
            if error is not None:
                raise BadDataError(error)
            role = self._next_role
            self._consumed[role], self._skipped[role] = done, skipped
            self._next_role = (role + 1) % self.roles
            yield batch

    @property
    def skipped(self) -> int:
        """Bad samples skipped so far (data.on_bad_sample=skip), over all worker roles."""
        return sum(self._skipped)

    def state_dict(self) -> dict[str, Any]:
        return self.dataset._state(self._consumed, self._next_role, self._skipped)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["roles"]) != self.roles:
            raise ValueError(
                f"saved data position used {state['roles']} worker(s), this loader has {self.roles}; "
                "resume with the same num_workers"
            )
        self.dataset.load_state_dict(state)
        self._consumed = [int(x) for x in state["consumed"]]
        self._skipped = [int(x) for x in state.get("skipped") or [0] * self.roles]
        self._next_role = int(state["next_role"])
