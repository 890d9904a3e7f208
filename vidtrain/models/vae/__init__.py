"""Causal video VAEs (Wan2.1 and Wan2.2 architectures): streaming encode/decode and chunk-halo range encode."""

from vidtrain.models.vae.model import (
    ALL_VAE_FLAVORS,
    VAE_FLAVORS,
    WAN22_VAE_FLAVORS,
    CausalVideoVAE,
    StreamDecoder,
    StreamEncoder,
    StreamState,
    VAEConfig,
    flavor_config,
)

__all__ = [
    "ALL_VAE_FLAVORS",
    "VAE_FLAVORS",
    "WAN22_VAE_FLAVORS",
    "CausalVideoVAE",
    "StreamDecoder",
    "StreamEncoder",
    "StreamState",
    "VAEConfig",
    "flavor_config",
]
