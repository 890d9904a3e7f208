"""Keyed random numbers: every draw of a run is a pure function of the recipe's seed and a key.

A key is a mixed-radix number over named parts, `((seed * r1 + v1) * r2 + v2) * ...` for parts
(v1, r1), (v2, r2), ...: distinct keys while every value stays below its radix. The step, the
micro-batch, the rank and the sample's index in the global batch are such parts, so a draw is
the same on a rerun, after a resume and however a batch is split over data-parallel ranks.

One helper for the whole package (the trainer's noise, DMD's seeds and exit steps, the QAT
gradient path's noise, the synthetic data): the formulas below are the ones each of them used.
"""

from __future__ import annotations

import torch

STEP_RADIX = 1_000_003  # a prime: the first part under the seed (a step, a rank, a sample)


def keyed_seed(seed: int, *parts: tuple[int, int]) -> int:
    """`seed` extended by each (value, radix) part in turn: key = key * radix + value."""
    key = int(seed)
    for value, radix in parts:
        key = key * int(radix) + int(value)
    return key


def keyed_generator(seed: int, *parts: tuple[int, int]) -> torch.Generator:
    """A CPU generator seeded with `keyed_seed(seed, *parts)` (the same numbers on every device)."""
    return torch.Generator().manual_seed(keyed_seed(seed, *parts))


def step_generator(seed: int, step: int, micro: int, dp_rank: int, salt: int = 0) -> torch.Generator:
    """Training noise of (step, micro-batch, data-parallel rank): the same on every rank of a
    sequence-parallel group (lockstep) and across a resume; `salt` < 7 picks a stream."""
    return keyed_generator(seed, (step, STEP_RADIX), (micro, 131), (dp_rank, 1009), (salt, 7))


def sample_seeds(seed: int, step: int, first: int, count: int, salt: int) -> list[int]:
    """One seed per sample of a step, keyed by the sample's index in the global batch (`first`
    is this rank's first one), so a step draws the same numbers however its batch is split;
    `salt` < 8 picks a stream."""
    return [keyed_seed(seed, (step, STEP_RADIX), (first + i, 65_536), (salt, 8)) for i in range(count)]


def step_only_generator(seed: int, step: int) -> torch.Generator:
    """A draw that depends on (seed, step) alone: equal on every rank (DMD's exit steps)."""
    return keyed_generator(seed, (step * 7919 + 101, STEP_RADIX))


def stream_seed(seed: int, index: int) -> int:
    """The seed of stream `index` of a run (a global rank's QAT gradient noise, a sample's
    synthetic latents)."""
    return keyed_seed(seed, (index, STEP_RADIX))
