"""The attention cores a model declares, wrapped from outside by sequence parallelism.

A model family names its self-attention modules (`_attention_modules`, vidtrain/models/seams.py);
each has a swappable `core` and `num_heads`. Ulysses (ulysses.py) and ring attention (ring.py)
replace every such core with a `WrappedCore` around it; the model file does not change.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from vidtrain.models.seams import declared_modules


class WrappedCore(nn.Module):
    """A sequence-parallel wrapper of one attention core (`inner`): same call, same layer index."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    @property
    def layer_idx(self) -> int:
        return self.inner.layer_idx


def wrap_attention_cores(model: nn.Module, wrap: Callable[[nn.Module, nn.Module], WrappedCore]) -> int:
    """`module.core = wrap(module, module.core)` for every declared self-attention module whose
    core is not wrapped yet; returns how many were wrapped (none is an error)."""
    n = 0
    for module in declared_modules(model, "_attention_modules"):
        if isinstance(module.core, WrappedCore):
            continue
        module.core = wrap(module, module.core)
        n += 1
    if n == 0:
        raise ValueError("no self-attention core found to wrap for sequence parallelism")
    return n
