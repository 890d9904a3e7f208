"""Wan2.1 DiT made chunk-causal."""

from vidtrain.models.wan.config import FLAVORS, WanConfig, flavor
from vidtrain.models.wan.model import CausalWanDiT

__all__ = ["FLAVORS", "CausalWanDiT", "WanConfig", "flavor"]
