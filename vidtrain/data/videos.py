"""Training from video shards: a resumable reader, and latents encoded on demand per rank.

`data.source=videos` reads the video shards of `vidtrain-shard` (`mp4`, `txt`, `json`) with the
same splitting, shuffling and resumable position as latent shards (latents.py). An item is
`{"video": FloatTensor[3, T, H, W] in [-1, 1], "caption": str, "key": str}`.

In the main process (the VAE and the text encoder live on the training device) a batch becomes
`{"latents": VideoLatents, "text", "text_mask", "keys"}`: captions are encoded once per batch
and padded as `model.text_padding` says (as latent shards are: `collate_latents`); the latents
are lazy. The layout asks them for the latent frames this rank holds
(`vidtrain.parallel.layouts`): under sequence parallelism each rank VAE-encodes one range of the
group's balanced encode plan plus a left halo (chunk-halo encode) and the ranks exchange latents;
one process encodes the whole clip.

Legend: B batch, C latent channels, T pixel frames, F latent frames, H, W pixel size,
h, w latent size, L text tokens, D text width.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vidtrain.config import TEXT_LEN, TEXT_PADDING
from vidtrain.data.latents import BadSample, LatentLoader, ShardStream
from vidtrain.data_tools._shards import error_text
from vidtrain.data_tools.encode import decode_clip, load_vae
from vidtrain.models.text import TextEncoder, make_tiny_text_encoder, text_context


def decode_mp4(mp4: bytes) -> torch.Tensor:
    """mp4 bytes -> FloatTensor [3, T, H, W] in [-1, 1] (decord, every frame)."""

    frames_THWC = decode_clip(mp4)  # uint8
    return torch.from_numpy(np.ascontiguousarray(frames_THWC)).permute(3, 0, 1, 2).float() / 127.5 - 1.0


class VideoShardDataset(ShardStream):
    """Video shards as an endless resumable stream of decoded clips and their captions."""

    def _decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        shard, key = raw.get("__url__"), raw.get("__key__")
        if "mp4" not in raw:
            raise BadSample(shard, key, "has no mp4")
        try:
            if "txt" in raw:
                caption = raw["txt"].decode()
            else:
                caption = json.loads(raw["json"]).get("caption", "") if "json" in raw else ""
            video = decode_mp4(raw["mp4"])
        except Exception as e:  # decord raises its own types for a damaged mp4
            raise BadSample(shard, key, f"cannot decode ({type(e).__name__}: {error_text(e)})") from None
        return {"video": video, "caption": caption, "key": key}


def collate_videos(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack clips to [B, 3, T, H, W]; captions and keys as lists."""
    shapes = {tuple(it["video"].shape) for it in items}
    if len(shapes) > 1:
        raise ValueError(f"clips of one batch differ in shape {sorted(shapes)}; shard clips of one size")
    return {
        "video": torch.stack([it["video"] for it in items]),
        "captions": [it["caption"] for it in items],
        "keys": [it["key"] for it in items],
    }


class VideoLatents:
    """The clean latents [B, C, F, h, w] of a video batch, VAE-encoded only where asked.

    `frames(f0, f1)` encodes latent frames [f0, f1) from their pixel frames plus `halo` latent
    frames of left context (`CausalVideoVAE.encode_range`: exact when `halo` is at least the
    encoder's temporal receptive field or reaches the clip's start). `shape` and `ndim` are
    those of the full latent tensor, so noise and timesteps are drawn for the whole clip.
    """

    ndim = 5

    def __init__(self, vae, video_BCTHW: torch.Tensor, halo: int) -> None:
        vae.check_video(video_BCTHW)
        if halo < 0:
            raise ValueError(f"data.vae_halo must be >= 0, got {halo}")
        self.vae, self.video_BCTHW, self.halo = vae, video_BCTHW, halo
        b, _, t, h, w = video_BCTHW.shape
        sc = vae.spatial_compression
        self.shape = torch.Size([b, vae.z_dim, vae.num_latent_frames(t), h // sc, w // sc])
        self.pixel_frames_read = 0  # what this rank's VAE actually read (balance figures, tests)

    @property
    def temporal_compression(self) -> int:
        return self.vae.temporal_compression

    @property
    def device(self) -> torch.device:
        """Where the latents are encoded (the VAE's device)."""
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def frames(self, f0: int, f1: int) -> torch.Tensor:
        p0, p1 = self.vae.pixel_range(f0, f1, self.halo)
        ref = next(self.vae.parameters())
        video = self.video_BCTHW[:, :, :p1].to(ref.device, ref.dtype)  # frames past p1 never move
        z_BCFHW = self.vae.encode_range(video, f0, f1, self.halo)
        self.pixel_frames_read += p1 - p0
        return z_BCFHW.float()

    def full(self) -> torch.Tensor:
        """All latent frames (one whole-clip encode)."""
        return self.frames(0, self.shape[2])

    def to(self, device: torch.device | str) -> torch.Tensor:
        """Materialise the whole clip's latents on `device` (methods that need every frame)."""
        return self.full().to(device)


class VideoBatchEncoder:
    """Turns a video batch into a training batch: captions encoded now (their context as
    `text_padding` says, `text_context`), latents on demand."""

    def __init__(
        self, vae, text_encoder, halo: int | None = None, text_padding: str = TEXT_PADDING,
        text_len: int = TEXT_LEN,
    ) -> None:  # fmt: skip
        self.vae, self.text_encoder = vae, text_encoder
        self.halo = vae.temporal_receptive_field() if halo is None else halo
        self.text_padding, self.text_len = text_padding, text_len

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        emb_BLD, mask_BL = self.text_encoder.encode(batch["captions"])
        text, mask = text_context(emb_BLD, mask_BL, self.text_padding, self.text_len)
        return {
            "latents": VideoLatents(self.vae, batch["video"], self.halo),
            "text": text.cpu(),
            "text_mask": None if mask is None else mask.cpu(),
            "keys": batch["keys"],
        }


class EncodingLoader:
    """A loader whose batches pass through `encode` in the main process; the position (and so
    resume) is the wrapped loader's."""

    def __init__(self, loader: LatentLoader, encode: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.loader, self.encode = loader, encode

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            yield self.encode(batch)

    @property
    def skipped(self) -> int:
        """Bad samples skipped so far (data.on_bad_sample=skip)."""
        return self.loader.skipped

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


def load_text_encoder(recipe, strategy, dim: int):
    """The recipe's text encoder: a local umT5 folder, or (None) a tiny random one for tests,
    written once to RUN/.tiny-text-encoder by the main rank (transformers saves on rank 0 only)."""

    path = recipe.data.text_encoder
    if path is None:
        path = Path(recipe.run.dir) / ".tiny-text-encoder"
        if strategy.is_main and not (path / "config.json").exists():
            make_tiny_text_encoder(path, d_model=dim, seed=recipe.seed)
        strategy.barrier()
    return TextEncoder.from_pretrained(path, max_length=recipe.model.text_len, device=strategy.device)


def make_video_loader(recipe, strategy, in_channels: int, text_dim: int) -> EncodingLoader:
    """The trainer's loader for `data.source=videos` (split by data-parallel rank)."""

    d = recipe.data
    ds = VideoShardDataset(
        d.shards, shuffle_buffer=d.shuffle_buffer, seed=recipe.seed, rank=strategy.dp_rank,
        world_size=strategy.dp_size, verify=d.verify_shards, on_bad_sample=d.on_bad_sample,
    )  # fmt: skip
    vae = load_vae(d.vae, recipe.seed, strategy.device, torch.float32)  # flavors: seeded, equal on all ranks
    if vae.z_dim != in_channels:
        raise ValueError(f"data.vae has {vae.z_dim} latent channels, the model takes {in_channels}")
    text = load_text_encoder(recipe, strategy, text_dim)
    if text.dim != text_dim:
        raise ValueError(f"data.text_encoder gives {text.dim}-wide embeddings, the model takes {text_dim}")
    loader = LatentLoader(ds, d.batch_size, d.num_workers, collate_fn=collate_videos)
    m = recipe.model
    return EncodingLoader(loader, VideoBatchEncoder(vae, text, d.vae_halo, m.text_padding, m.text_len))
