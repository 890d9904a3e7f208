"""Readers of latent shards for the trainer (see latents.py for how streams are split and resumed)."""

from vidtrain.data.latents import (
    LatentLoader,
    LatentShardDataset,
    ResumableStream,
    SyntheticLatentDataset,
    collate_latents,
)

__all__ = [
    "LatentLoader",
    "LatentShardDataset",
    "ResumableStream",
    "SyntheticLatentDataset",
    "collate_latents",
]
