"""`qat`: NVFP4 quantization-aware training as a method of the one trainer loop.

Teacher forcing on a converted model (DESIGN section 7):
  - `prepare_model` swaps the linears for NVFP4Linear (W4A4 fake-quant, straight-through
    gradients), keeping `recipe.quant.exclude` in high precision;
  - `quant.stochastic_rounding` / `quant.hadamard` turn on NVIDIA's NVFP4 gradient path on
    every NVFP4Linear (dY quantized to NVFP4 for the backward GEMMs, stochastically rounded;
    16-point random Hadamard transform on the weight-gradient GEMM's operands; see
    `vidtrain.quant.qat`). The forward, hence the sampler, is unchanged by either. Its noise is
    seeded by `seed`, the global rank and the module's index, and keyed by the optimizer step,
    so reruns and resumes draw the same noise. backend `te` uses Transformer Engine's recipe
    as is (its own defaults for these options);
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


@METHODS.register("qat")
class QAT(TeacherForcing):
    """Teacher forcing on an NVFP4 fake-quant model, history K/V as the NVFP4 cache stores them."""

    name = "qat"

    def __init__(self, recipe) -> None:
        super().__init__(recipe)
        self.backend = "torch"
        self._linears: list[NVFP4Linear] = []

    def prepare_model(self, model: torch.nn.Module, trainer) -> torch.nn.Module:
        seed = self.recipe.seed * 1_000_003 + trainer.strategy.rank  # per-rank gradient noise
        self.backend = convert_for_recipe(model, self.recipe.quant, trainer.device, seed=seed)
        self._linears = [m for m in model.modules() if isinstance(m, NVFP4Linear)]
        return model

    def train_step(self, trainer, step: int) -> dict[str, float]:
        for mod in self._linears:  # the gradient path's noise is keyed by the optimizer step
            mod.grad_step = step
        return super().train_step(trainer, step)

    def kv_hook(self, trainer) -> KVFakeQuantHook | None:
        return KVFakeQuantHook(self.backend) if self.recipe.quant.kv_fake_quant else None
