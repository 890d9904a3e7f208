"""Exponential moving average of trainable weights: the one EMA of the package.

The trainer keeps one over every trainable parameter (`train.ema_decay`), the dmd method one over
its generator LoRA (`method.dmd.ema_decay`, the exported weights). The shadow is fp32 on the CPU;
each update is `shadow.lerp_(weight, 1 - decay)`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

# a module, or anything module-like with `named_parameters()` (a strategy's `full_params` view),
# or a mapping name -> tensor (DMD's generator adapter)
Params = nn.Module | Mapping[str, torch.Tensor]


def _named(params: Params) -> Iterable[tuple[str, torch.Tensor]]:
    return params.items() if isinstance(params, Mapping) else params.named_parameters()


class EMA:
    """EMA of a module's trainable parameters, or of the named tensors of a mapping."""

    def __init__(self, params: Params, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        trainable = ((n, p) for n, p in _named(params) if isinstance(params, Mapping) or p.requires_grad)
        self.shadow = {n: p.detach().float().cpu().clone() for n, p in trainable}

    @torch.no_grad()
    def update(self, params: Params) -> None:
        """Move the shadow towards the current weights (names it does not track are ignored)."""
        for n, p in _named(params):
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float().cpu(), 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.load_shadow(state["shadow"])

    def load_shadow(self, shadow: Mapping[str, torch.Tensor]) -> None:
        self.shadow = {k: v.clone() for k, v in shadow.items()}

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                p.copy_(self.shadow[n].to(p.device, p.dtype))
