"""One base, three roles: named peft LoRA adapters on a single CausalWanDiT (DESIGN section 9).

teacher   = adapters disabled (the frozen base),
generator = adapter `dmd`,
critic    = adapter `critic`.

Roles are switched with `use_role`, which only changes which adapter the LoRA layers apply.
peft's own `set_adapter` / `disable_adapter` also flip `requires_grad` of adapter weights, which
would silently drop the inactive role from the optimizer's view and from DDP; we keep both
adapters trainable all the time and let the graph decide which one receives gradients.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterator, Sequence

import torch
from torch import nn

GENERATOR = "dmd"
CRITIC = "critic"
TEACHER = None  # adapters disabled

_PEFT_PREFIX = "base_model.model."


def linear_names(model: nn.Module) -> list[str]:
    """Qualified names of every nn.Linear (NVFP4Linear included) of the plain model."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _matches(name: str, target: str) -> bool:
    # peft's rule for a list of targets: the exact name or a dotted suffix
    return name == target or name.endswith("." + target)


def check_targets(model: nn.Module, rank: int, alpha: float, targets: Sequence[str]) -> list[str]:
    """Validate LoRA rank/alpha/targets against the model; returns the targeted module names."""
    if rank < 1:
        raise ValueError(f"method.dmd.lora_rank must be >= 1, got {rank}")
    if alpha <= 0:
        raise ValueError(f"method.dmd.lora_alpha must be > 0, got {alpha}")
    if not targets:
        raise ValueError("method.dmd.lora_targets is empty: name the linears to adapt, e.g. [q, k, v, o]")
    names = linear_names(model)
    dead = [t for t in targets if not any(_matches(n, t) for n in names)]
    if dead:
        examples = sorted({re.sub(r"^blocks\.\d+\.", "", n) for n in names})
        raise ValueError(
            f"method.dmd.lora_targets {dead} match no linear of the model; "
            f"linear names (per block) are: {', '.join(examples)}"
        )
    chosen = [n for n in names if any(_matches(n, t) for t in targets)]
    for n in chosen:
        lin = model.get_submodule(n)
        if rank > min(lin.in_features, lin.out_features):
            raise ValueError(
                f"method.dmd.lora_rank={rank} exceeds the size of {n} "
                f"({lin.out_features}x{lin.in_features}); pick a rank <= {min(lin.in_features, lin.out_features)}"
            )
    return chosen


def lora_config(rank: int, alpha: float, targets: Sequence[str]):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none")


def add_roles(model: nn.Module, rank: int, alpha: float, targets: Sequence[str]):
    """Wrap the plain model in a PeftModel with adapters `dmd` and `critic`; only they train.

    Both adapters start equal to peft's init (B = 0), so every role starts as the teacher.
    """
    from peft import get_peft_model

    check_targets(model, rank, alpha, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = get_peft_model(model, lora_config(rank, alpha, targets), adapter_name=GENERATOR)
    peft_model.add_adapter(CRITIC, lora_config(rank, alpha, targets))
    for n, p in peft_model.named_parameters():
        p.requires_grad_(is_adapter_param(n))
    return peft_model


def is_adapter_param(name: str, adapter: str | None = None) -> bool:
    if ".lora_" not in name:
        return False
    return adapter is None or f".{adapter}." in name or name.endswith(f".{adapter}")


def adapter_params(model: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if is_adapter_param(n, adapter)}


def _tuner_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def use_role(model: nn.Module, adapter: str | None) -> Iterator[nn.Module]:
    """Run `model` as one role: an adapter name, or None for the teacher (adapters off)."""
    layers = _tuner_layers(model)
    saved = [(m._active_adapter, m._disable_adapters) for m in layers]
    for m in layers:
        if adapter is None:
            m._disable_adapters = True
        else:
            if adapter not in m.lora_A:
                raise ValueError(f"adapter {adapter!r} is not on this model; it has {list(m.lora_A)}")
            m._active_adapter, m._disable_adapters = [adapter], False
    try:
        yield model
    finally:
        for m, (active, disabled) in zip(layers, saved):
            m._active_adapter, m._disable_adapters = active, disabled


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base weights under their plain CausalWanDiT names, from a plain or peft-wrapped model."""
    out = {}
    for k, v in model.state_dict().items():
        if ".lora_" in k:
            continue
        k = k.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")
        out[k] = v
    return out


def base_fingerprint(model: nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every base tensor, in name order."""
    h = hashlib.sha256()
    for k, v in sorted(base_state_dict(model).items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
