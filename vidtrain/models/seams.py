"""A model family's seams, declared as data on its model class (as diffusers' `_no_split_modules`).

Strategies and conversions read these class attributes instead of probing modules:
  _attention_modules                 class names of the self-attention modules; each has a
                                     swappable `core` (an AttentionCore over the global token
                                     order) and `num_heads`: sequence parallelism wraps the core
  _shard_units                       class names of the FSDP shard units (each sharded, then the root)
  _supports_gradient_checkpointing   the model's forward checkpoints each block when its
                                     `gradient_checkpointing` flag is set
  _quant_exclude                     fnmatch patterns of the linears that quantization keeps in
                                     high precision (embeddings, time embedding, output head):
                                     the default of QAT's and NVFP4 conversion's `exclude`
The model may sit inside a wrapper (a peft model, a converted model): the first module whose
class declares a seam is the model that owns it.
"""

from __future__ import annotations

from torch import nn

SEAMS = ("_attention_modules", "_shard_units", "_supports_gradient_checkpointing", "_quant_exclude")


def seam_owner(model: nn.Module, seam: str) -> nn.Module:
    """The module of `model` (itself, or the model inside a wrapper) whose class declares `seam`."""
    if seam not in SEAMS:
        raise ValueError(f"unknown model seam {seam!r}; known: {', '.join(SEAMS)}")
    for m in model.modules():
        if hasattr(type(m), seam):  # a class attribute: declared, never an instance's state
            return m
    raise ValueError(
        f"{type(model).__name__} declares no {seam}: a model family lists its seams as class "
        "attributes (see vidtrain/models/seams.py and CausalWanDiT)"
    )


def declared_modules(model: nn.Module, seam: str) -> list[nn.Module]:
    """The modules of the classes the model declares for `seam`, in module order."""
    owner = seam_owner(model, seam)
    names = set(getattr(type(owner), seam))
    # by class name, as diffusers does; the bases count too (FSDP2 renames a sharded module's class)
    return [m for m in owner.modules() if any(c.__name__ in names for c in type(m).__mro__)]


def quant_exclude(model: nn.Module) -> tuple[str, ...]:
    """The patterns the model declares for `_quant_exclude`."""
    return tuple(type(seam_owner(model, "_quant_exclude"))._quant_exclude)
