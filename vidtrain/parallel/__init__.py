"""Parallel strategies: a registry of ways to run the one trainer loop over many ranks.

The distributed strategies (ddp, fsdp, deepspeed) register themselves when the composition root
(vidtrain/plugins.py) imports them.
"""

from vidtrain.parallel.base import STRATEGIES, Strategy, make_strategy

__all__ = ["STRATEGIES", "Strategy", "make_strategy"]
