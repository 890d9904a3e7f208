"""`qat`: NVFP4 quantization-aware training as a method of the one trainer loop.

Teacher forcing on a converted model (DESIGN section 7):
  - `prepare_model` swaps the linears for NVFP4Linear (W4A4 fake-quant, straight-through
    gradients), keeping `recipe.quant.exclude` in high precision;
  - with `quant.kv_fake_quant`, the clean-history K/V of every self-attention are fake-quantized
    exactly as the sampler's NVFP4 KV cache stores them (`vidtrain.quant.kv`).

`method.name: qat` is what turns QAT on; it converts whatever `quant.enabled` says (the flag
describes the checkpoint for consumers such as the sampler and export). `quant.backend`:
  emulate  torch reference arithmetic on any device
  triton   the Triton kernels of `vidtrain.kernels` (CUDA only; the same bytes as emulate)
  te       Transformer Engine's NVFP4 recipe: needs TE and a Blackwell GPU, else a clear error
Parameters keep their names, so checkpoints load into plain and converted models alike.
"""

from __future__ import annotations

import torch

from vidtrain.quant.kv import KVFakeQuantHook
from vidtrain.quant.qat import NVFP4Linear, convert
from vidtrain.train.methods import METHODS, TeacherForcing

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


def convert_for_recipe(model: torch.nn.Module, quant, device: torch.device) -> str:
    """Convert `model` in place as `quant` (the recipe's section) asks; returns the kernel backend."""
    if quant.format not in FORMATS:
        raise ValueError(f"unknown quant.format {quant.format!r}; known: {', '.join(FORMATS)}")
    if quant.stochastic_rounding or quant.hadamard:
        raise ValueError(
            "quant.stochastic_rounding and quant.hadamard (gradient-path options) are not "
            "implemented yet; set both to false"
        )
    backend = kernel_backend(quant.backend, device)
    convert(model, "nvfp4_te" if backend == "te" else "nvfp4", exclude=quant.exclude)
    for mod in model.modules():
        if isinstance(mod, NVFP4Linear):
            mod.backend = backend
    return backend


@METHODS.register("qat")
class QAT(TeacherForcing):
    """Teacher forcing on an NVFP4 fake-quant model, history K/V as the NVFP4 cache stores them."""

    name = "qat"

    def __init__(self, recipe) -> None:
        super().__init__(recipe)
        self.backend = "torch"

    def prepare_model(self, model: torch.nn.Module, trainer) -> torch.nn.Module:
        self.backend = convert_for_recipe(model, self.recipe.quant, trainer.device)
        return model

    def kv_hook(self, trainer) -> KVFakeQuantHook | None:
        return KVFakeQuantHook(self.backend) if self.recipe.quant.kv_fake_quant else None
