"""Part of vidtrain (installed as vidtrain.kernels)."""

from vidtrain.kernels import kv2
from vidtrain.kernels.nvfp4 import (
    BACKENDS,
    abs_amax,
    dequantize,
    dequantize_kv_blocks,
    quantize,
    quantize_blocks,
    quantize_with_amax,
    resolve_backend,
    stack_blocks,
)

__all__ = [
    "BACKENDS",
    "abs_amax",
    "dequantize",
    "dequantize_kv_blocks",
    "kv2",
    "quantize",
    "quantize_blocks",
    "quantize_with_amax",
    "resolve_backend",
    "stack_blocks",
]
