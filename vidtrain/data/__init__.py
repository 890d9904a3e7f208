"""Readers of latent and video shards for the trainer (latents.py: how streams are split and resumed;
videos.py: training from videos, latents encoded per rank)."""

from vidtrain.data.latents import (
    BadDataError,
    LatentLoader,
    LatentShardDataset,
    ResumableStream,
    ShardStream,
    SyntheticLatentDataset,
    collate_latents,
)

__all__ = [
    "BadDataError",
    "LatentLoader",
    "LatentShardDataset",
    "ResumableStream",
    "ShardStream",
    "SyntheticLatentDataset",
    "collate_latents",
]
