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

`method.name: qat` is what turns QAT on: the recipe is then `quantized` (`quant.enabled` is
implied; vidtrain/config.py). The conversion itself (formats, `quant.backend`) is
`vidtrain.quant.convert`; its checkpoints carry `model/quant.json`, so `vidtrain sample` rebuilds
the NVFP4 model and, with `quant.kv_fake_quant`, samples with the NVFP4 KV cache by default.

`quant.format: fp8` (Hopper / Ada) is the same method on FP8 linears (torchao's float8 recipes,
`quant.fp8_recipe`; emulated or torchao's own, `vidtrain.quant.fp8`) with the history K/V
fake-quantized as the FP8 KV cache stores them; the NVFP4 gradient-path flags do not apply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vidtrain.quant.convert import convert_for_recipe
from vidtrain.quant.kv import KVFakeQuantHook
from vidtrain.quant.qat import NVFP4Linear
from vidtrain.train.methods import METHODS, TeacherForcing
from vidtrain.utils import rng

if TYPE_CHECKING:
    from vidtrain.train.context import StepContext


@METHODS.register("qat")
class QAT(TeacherForcing):
    """Teacher forcing on an NVFP4 fake-quant (or FP8) model, history K/V as that format's cache
    stores them."""

    name = "qat"

    def __init__(self, recipe) -> None:
        super().__init__(recipe)
        self.backend = "torch"
        self._linears: list[NVFP4Linear] = []

    def prepare_model(self, model: torch.nn.Module, trainer: StepContext) -> torch.nn.Module:
        seed = rng.stream_seed(self.recipe.seed, trainer.strategy.rank)  # per-rank gradient noise
        self.backend = convert_for_recipe(model, self.recipe.quant, trainer.device, seed=seed)
        self._linears = [m for m in model.modules() if isinstance(m, NVFP4Linear)]
        return model

    def train_step(self, trainer: StepContext, step: int) -> dict[str, float]:
        for mod in self._linears:  # the gradient path's noise is keyed by the optimizer step
            mod.grad_step = step
        return super().train_step(trainer, step)

    def kv_hook(self, trainer) -> KVFakeQuantHook | None:
        quant = self.recipe.quant
        if not quant.kv_fake_quant:
            return None
        kv_format = quant.kv_format or quant.format
        return KVFakeQuantHook(self.backend, kv_format=kv_format, scale_rule=quant.kv_scale_rule)
