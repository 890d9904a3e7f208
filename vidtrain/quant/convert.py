"""Convert a model for a recipe's `quant` section: format, backend, gradient-path options.

`quant.backend` is the one word a user writes for where the NVFP4 arithmetic runs; `BACKENDS`
below is the one table that maps it to the quantizer registered in `QUANTIZERS` (the linears)
and the `vidtrain.kernels` backend (NVFP4Linear's fake-quant and the KV fake-quant hook):
  emulate  torch reference arithmetic on any device                 nvfp4     + kernels "torch"
  triton   the Triton kernels of `vidtrain.kernels` (CUDA only;     nvfp4     + kernels "triton"
           the same bytes as emulate)
  te       Transformer Engine's NVFP4 recipe for the linears: needs  nvfp4_te  + kernels "auto"
           TE and a Blackwell GPU, else a clear error; K/V fake-quant on the Triton kernels
           where they run, else the torch reference (the same bytes)
  torchao  FP8 only: torchao's Float8Linear (torch._scaled_mm)      torchao_fp8 + kernels "torch"
With `quant.format: fp8` (vidtrain/quant/fp8.py, recipe `quant.fp8_recipe`) `emulate` is the
quantizer "torch_fp8" (scaled casts in torch, high-precision GEMMs) and `torchao` torchao's own; the
FP8 K/V fake-quant is torch arithmetic either way (`FP8_QUANTIZERS`).
Parameters keep their names, so checkpoints load into plain and converted models alike.
"""

from __future__ import annotations

import torch

from vidtrain.quant.qat import NVFP4Linear, convert

FORMATS = ("nvfp4", "fp8")
# quant.backend -> (quantizer name in QUANTIZERS, vidtrain.kernels backend); the recipe schema's
# Literal (vidtrain/config.py QuantConfig.backend) lists the same words (tests/test_qat_method.py)
BACKENDS: dict[str, tuple[str, str]] = {
    "emulate": ("nvfp4", "torch"),
    "triton": ("nvfp4", "triton"),
    "te": ("nvfp4_te", "auto"),
    "torchao": ("torchao_fp8", "torch"),
}
# quant.format=fp8: quant.backend -> quantizer in QUANTIZERS (the backends FP8 has)
FP8_QUANTIZERS: dict[str, str] = {"emulate": "torch_fp8", "torchao": "torchao_fp8"}


def kernel_backend(backend: str, device: torch.device) -> str:
    """`quant.backend` -> the `vidtrain.kernels` backend behind NVFP4Linear and the KV hook
    ("torch" or "triton")."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown quant.backend {backend!r}; known: {', '.join(BACKENDS)}")
    kernels_backend = BACKENDS[backend][1]
    if kernels_backend == "triton" and device.type != "cuda":
        raise ValueError(
            f"quant.backend=triton runs the Triton kernels on CUDA, but the model is on {device}; "
            "use quant.backend=emulate (identical arithmetic in torch)"
        )
    if kernels_backend == "auto":
        try:
            # lazy: the compiled kernels are an optional part of an installed vidtrain
            from vidtrain import kernels
        except ImportError:  # pragma: no cover - a bare source tree
            return "torch"
        return kernels.resolve_backend("auto", device)
    return kernels_backend


def convert_for_recipe(model: torch.nn.Module, quant, device: torch.device, seed: int = 0) -> str:
    """Convert `model` in place as `quant` (the recipe's section) asks; returns the kernel backend.

    `seed` keys the gradient path's noise (module i gets `grad_seed = seed * 2^16 + i`).
    """
    if quant.format not in FORMATS:
        raise ValueError(f"unknown quant.format {quant.format!r}; known: {', '.join(FORMATS)}")
    if quant.format == "fp8":
        return _convert_fp8(model, quant)
    if quant.backend == "torchao":
        raise ValueError(
            f"quant.backend={quant.backend} is an FP8 backend; quant.format=nvfp4 runs on "
            "emulate | triton | te (or set quant.format=fp8)"
        )
    backend = kernel_backend(quant.backend, device)
    convert(model, BACKENDS[quant.backend][0], exclude=quant.exclude)
    linears = [m for m in model.modules() if isinstance(m, NVFP4Linear)]
    for i, mod in enumerate(linears):
        mod.backend = backend
        if quant.stochastic_rounding or quant.hadamard:
            mod.stochastic_rounding, mod.hadamard = bool(quant.stochastic_rounding), bool(quant.hadamard)
            mod.grad_seed = (seed << 16) + i
    return backend


def _convert_fp8(model: torch.nn.Module, quant) -> str:
    """quant.format=fp8: the linears as `quant.fp8_recipe` trains them (vidtrain/quant/fp8.py);
    returns the K/V fake-quant backend ("torch": FP8 K/V casts are torch arithmetic)."""
    if quant.backend not in FP8_QUANTIZERS:
        raise ValueError(
            f"quant.backend={quant.backend} is an NVFP4 backend; quant.format=fp8 runs on "
            f"{' | '.join(FP8_QUANTIZERS)} (emulate: scaled casts in torch, any device; torchao: "
            "torchao's Float8Linear on torch._scaled_mm)"
        )
    if quant.stochastic_rounding or quant.hadamard:
        raise ValueError(
            "quant.stochastic_rounding / quant.hadamard are NVFP4's gradient path; FP8's recipes "
            "(quant.fp8_recipe) define their own backward casts: turn them off with quant.format=fp8"
        )
    convert(model, FP8_QUANTIZERS[quant.backend], exclude=quant.exclude, fp8_recipe=quant.fp8_recipe)
    return "torch"
