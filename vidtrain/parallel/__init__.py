"""Parallelism, applied to a plain model from outside (torchtitan's shape).

  mesh.py          `Mesh`: world = data-parallel x sequence-parallel ranks
  parallelize.py   `parallelize(model, mesh, recipe, data_parallel, make_optimizer)`: SP ->
                   activation checkpointing -> compile -> the strategy's data parallelism
  base.py          `Strategy` (single process) and the registry `STRATEGIES`; strategies.py
                   ddp / fsdp, deepspeed_strategy.py deepspeed (each with its checkpoint adapter)
  layouts.py       teacher-forcing layouts `LAYOUTS` (naive, balanced), called by the method
  ulysses.py, ring.py, cores.py   sequence-parallel attention around the model's declared cores
  vae_plan.py      the SP group's planned VAE encode; schedule.py the schedules behind it and ring
  balance_log.py   per-rank balance figures as a logging callback; balance.py `vidtrain balance`
The distributed strategies (ddp, fsdp, deepspeed) register themselves when the composition root
(vidtrain/plugins.py) imports them.
"""

from vidtrain.parallel.balance_log import BalanceLog
from vidtrain.parallel.base import STRATEGIES, Strategy, make_strategy
from vidtrain.parallel.layouts import LAYOUTS, Layout
from vidtrain.parallel.mesh import Mesh
from vidtrain.parallel.parallelize import parallelize

__all__ = [
    "LAYOUTS",
    "STRATEGIES",
    "BalanceLog",
    "Layout",
    "Mesh",
    "Strategy",
    "make_strategy",
    "parallelize",
]
