"""Causal video VAE (Wan2.1 architecture): streaming encode/decode and chunk-halo range encode."""

from vidtrain.models.vae.model import (
    VAE_FLAVORS,
    CausalVideoVAE,
    StreamDecoder,
    StreamEncoder,
    StreamState,
    VAEConfig,
)

__all__ = ["VAE_FLAVORS", "CausalVideoVAE", "StreamDecoder", "StreamEncoder", "StreamState", "VAEConfig"]
