"""Convert a model for a recipe's `quant` section: format, backend, gradient-path options.

`quant.backend`:
  emulate  torch reference arithmetic on any device
  triton   the Triton kernels of `vidtrain.kernels` (CUDA only; the same bytes as emulate)
  te       Transformer Engine's NVFP4 recipe: needs TE and a Blackwell GPU, else a clear error
Parameters keep their names, so checkpoints load into plain and converted models alike.
"""

from __future__ import annotations

import torch

from vidtrain.quant.qat import NVFP4Linear, convert

FORMATS = ("nvfp4",)


def kernel_backend(backend: str, device: torch.device) -> str:
    """`quant.backend` -> the implementation behind NVFP4Linear and the KV hook."""
    if backend == "emulate":
        return "torch"
    if backend == "triton":
        if device.type != "cuda":
            raise ValueError(
                f"quant.backend=triton runs the Triton kernels on CUDA, but the model is on {device}; "
                "use quant.backend=emulate (identical arithmetic in torch)"
            )
        return "triton"
    if backend == "te":
        return "te"
    raise ValueError(f"unknown quant.backend {backend!r}; known: emulate, triton, te")


def convert_for_recipe(model: torch.nn.Module, quant, device: torch.device, seed: int = 0) -> str:
    """Convert `model` in place as `quant` (the recipe's section) asks; returns the kernel backend.

    `seed` keys the gradient path's noise (module i gets `grad_seed = seed * 2^16 + i`).
    """
    if quant.format not in FORMATS:
        raise ValueError(f"unknown quant.format {quant.format!r}; known: {', '.join(FORMATS)}")
    backend = kernel_backend(quant.backend, device)
    convert(model, "nvfp4_te" if backend == "te" else "nvfp4", exclude=quant.exclude)
    linears = [m for m in model.modules() if isinstance(m, NVFP4Linear)]
    for i, mod in enumerate(linears):
        mod.backend = backend
        if quant.stochastic_rounding or quant.hadamard:
            mod.stochastic_rounding, mod.hadamard = bool(quant.stochastic_rounding), bool(quant.hadamard)
            mod.grad_seed = (seed << 16) + i
    return backend
