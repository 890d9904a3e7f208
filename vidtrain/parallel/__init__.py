"""Parallel strategies: a registry of ways to run the one trainer loop over many ranks."""

from vidtrain.parallel import deepspeed_strategy, strategies  # noqa: F401  (register ddp, fsdp, deepspeed)
from vidtrain.parallel.base import STRATEGIES, Strategy, make_strategy

__all__ = ["STRATEGIES", "Strategy", "make_strategy"]
