"""Parallel strategies: a registry of ways to run the one trainer loop over many ranks."""

from vidtrain.parallel.base import STRATEGIES, Strategy, make_strategy

__all__ = ["STRATEGIES", "Strategy", "make_strategy"]
