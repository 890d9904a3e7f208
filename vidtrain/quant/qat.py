"""NVFP4 quantization-aware training: `convert(model)` swaps linears for fake-quant ones.

W4A4 as DESIGN section 7: weights are fake-quantized in 16x16 tiles with a per-tensor amax,
activations in 1x16 blocks along in_features with a per-token amax (layout-invariant); the gradient is straight-through (the backward
of quantize->dequantize is the identity), so the matmul's gradients are those of
`F.linear(x_hat, w_hat)` with x_hat, w_hat passed straight to x and w.

Quantizers are registered by name (`QUANTIZERS`): "nvfp4" (torch emulation, any device) and
"nvfp4_te" (Transformer Engine's NVFP4BlockScaling recipe; needs TE and a Blackwell GPU).
"""

from __future__ import annotations

import fnmatch
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vidtrain.quant import nvfp4
from vidtrain.registry import Registry

log = logging.getLogger(__name__)

# Module names (fnmatch patterns on the qualified name) kept in high precision by default:
# embeddings, time embedding/projection, the output head and norms.
DEFAULT_EXCLUDE: tuple[str, ...] = (
    "patch_embedding",
    "patch_embedding.*",
    "text_embedding.*",
    "time_embedding.*",
    "time_projection.*",
    "head",
    "head.*",
    "*norm*",
)

QUANTIZERS: Registry[Callable[..., nn.Module]] = Registry("quantizer")


def _fake_quantize(x: torch.Tensor, tile_2d: bool, backend: str, per_row: bool = False) -> torch.Tensor:
    if backend == "torch":
        return nvfp4.fake_quantize_rows(x) if per_row else nvfp4.fake_quantize(x, tile_2d=tile_2d)
    from vidtrain import kernels  # Triton kernels: same bytes as the torch reference

    if per_row:
        q = kernels.quantize_blocks(x, tuple(range(x.ndim - 1)), backend)
    else:
        q = kernels.quantize(x, tile_2d, backend)
    return kernels.dequantize(q, x.dtype, backend)


class _FakeQuantSTE(torch.autograd.Function):
    """quantize -> dequantize forward, identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, tile_2d: bool, backend: str, per_row: bool) -> torch.Tensor:
        return _fake_quantize(x, tile_2d, backend, per_row)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return grad, None, None, None


def fake_quantize_ste(
    x: torch.Tensor, tile_2d: bool = False, backend: str = "torch", per_row: bool = False
) -> torch.Tensor:
    """NVFP4 fake-quant with a straight-through gradient; `backend` as in `vidtrain.kernels`
    ("torch" reference, "triton" on CUDA, "interpret" for Triton on CPU); `per_row` takes the
    per-tensor amax per row (activations: per token)."""
    return _FakeQuantSTE.apply(x, tile_2d, backend, per_row)


def _share_linear(cls: type[nn.Linear], lin: nn.Linear) -> nn.Linear:
    """An instance of the nn.Linear subclass `cls` that shares (not copies) `lin`'s parameters."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.in_features, new.out_features = lin.in_features, lin.out_features
    new.register_parameter("weight", lin.weight)
    new.register_parameter("bias", lin.bias)
    new.train(lin.training)
    return new


class NVFP4Linear(nn.Linear):
    """nn.Linear whose forward fake-quantizes weight (16x16 tiles) and input (1x16 blocks).

    The input's second-level (fp32) scale is taken per token rather than per tensor: a token's
    quantization then never depends on the other tokens in the tensor, so teacher forcing, every
    sequence-parallel layout and the sampler's one-chunk passes quantize each token identically.

    Parameters keep their names (`weight`, `bias`), so state dicts load either way.
    `backend` picks the fake-quant implementation (see `fake_quantize_ste`); all give one result.
    """

    backend: str = "torch"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kw) -> None:
        if in_features % nvfp4.BLOCK:
            raise ValueError(f"NVFP4Linear needs in_features % {nvfp4.BLOCK} == 0, got {in_features}")
        super().__init__(in_features, out_features, bias, **kw)

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> NVFP4Linear:
        """Wrap an existing linear, sharing (not copying) its parameters."""
        return _share_linear(cls, lin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_hat = fake_quantize_ste(self.weight, tile_2d=True, backend=self.backend)
        x_hat = fake_quantize_ste(x, backend=self.backend, per_row=True)
        return F.linear(x_hat, w_hat, self.bias)


def _excluded(name: str, exclude: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in exclude)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@QUANTIZERS.register("nvfp4")
def convert_nvfp4(model: nn.Module, exclude: Sequence[str] = DEFAULT_EXCLUDE) -> nn.Module:
    """Swap every nn.Linear (not excluded, in_features % 16 == 0) for an NVFP4Linear, in place."""
    swaps = []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear or _excluded(name, exclude):
            continue
        if mod.in_features % nvfp4.BLOCK:
            log.info("NVFP4 QAT: %s stays high precision (in_features=%d)", name, mod.in_features)
            continue
        swaps.append(name)
    for name in swaps:
        _set_submodule(model, name, NVFP4Linear.from_linear(model.get_submodule(name)))
    log.info("NVFP4 QAT: %d linears converted", len(swaps))
    return model


class TENVFP4Linear(nn.Linear):
    """nn.Linear whose matmul runs through Transformer Engine with the NVFP4BlockScaling recipe
    (native FP4 GEMMs on Blackwell). Parameters stay ours (`weight`, `bias`): TE's module borrows
    them, so state dicts and optimizers see one set. Needs TE and an sm_100+ GPU; not exercised
    by this repository's CPU tests.
    """

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> TENVFP4Linear:
        new = _share_linear(cls, lin)
        object.__setattr__(new, "_te_linear", None)  # not a registered submodule: no duplicate params
        return new

    def _te(self):
        import transformer_engine.pytorch as te

        if self._te_linear is None:
            lin = te.Linear(
                self.in_features, self.out_features, bias=self.bias is not None,
                params_dtype=self.weight.dtype, device=self.weight.device,
            )  # fmt: skip
            lin.weight = self.weight
            if self.bias is not None:
                lin.bias = self.bias
            object.__setattr__(self, "_te_linear", lin)
        return self._te_linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import transformer_engine.pytorch as te
        from transformer_engine.common.recipe import NVFP4BlockScaling

        with te.fp8_autocast(enabled=True, fp8_recipe=NVFP4BlockScaling()):
            return self._te()(x)


@QUANTIZERS.register("nvfp4_te")
def convert_nvfp4_te(model: nn.Module, exclude: Sequence[str] = DEFAULT_EXCLUDE) -> nn.Module:
    """Transformer Engine NVFP4BlockScaling for the same linears `convert_nvfp4` would take.

    Only where transformer_engine imports and a Blackwell (sm_100+) GPU is present.
    """
    te_available_or_raise()
    names = [
        n for n, m in model.named_modules()
        if type(m) is nn.Linear and not _excluded(n, exclude) and m.in_features % nvfp4.BLOCK == 0
    ]  # fmt: skip
    for name in names:
        _set_submodule(model, name, TENVFP4Linear.from_linear(model.get_submodule(name)))
    log.info("NVFP4 (Transformer Engine): %d linears converted", len(names))
    return model


def te_available_or_raise() -> None:
    """Raise a clear ValueError unless TE imports and a Blackwell GPU is present."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:
        raise ValueError(
            "quantizer 'nvfp4_te' needs transformer_engine[pytorch] (a CUDA build); "
            "use quantizer 'nvfp4' (torch emulation) instead"
        ) from e
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 10:
        raise ValueError("quantizer 'nvfp4_te' needs a Blackwell GPU (sm_100+); use 'nvfp4' elsewhere")


def convert(
    model: nn.Module, quantizer: str = "nvfp4", exclude: Sequence[str] = DEFAULT_EXCLUDE
) -> nn.Module:
    """QAT convert step, by registered quantizer name (in place; returns the model)."""
    return QUANTIZERS.get(quantizer)(model, exclude=tuple(exclude))


def export_weights(model: nn.Module) -> dict[str, nvfp4.NVFP4Tensor]:
    """Deployment export: packed NVFP4 weights (16x16 tiles) of every NVFP4Linear, by state-dict key.

    Biases and unconverted modules stay in the ordinary state dict.
    """
    return {
        f"{name}.weight": nvfp4.quantize(mod.weight.detach(), tile_2d=True)
        for name, mod in model.named_modules()
        if isinstance(mod, NVFP4Linear)
    }


# ---------------------------------------------------------------------------------------------
# The quantization a checkpoint was trained with travels beside its weights, so the sampler and
# later stages (DMD) rebuild the same fake-quant model instead of silently running high precision.

QUANT_RECORD = "quant.json"


def write_quant_record(model: nn.Module, folder: str | Path) -> Path | None:
    """Write `folder/quant.json` listing the NVFP4 linears of `model` (nothing if there are none)."""
    names = [n for n, m in model.named_modules() if isinstance(m, NVFP4Linear)]
    if not names:
        return None
    path = Path(folder) / QUANT_RECORD
    path.write_text(json.dumps({"format": "nvfp4", "linears": names}, indent=2) + "\n")
    return path


def apply_quant_record(model: nn.Module, folder: str | Path, backend: str = "torch") -> bool:
    """Convert exactly the linears a checkpoint folder's `quant.json` lists; False if it has none."""
    path = Path(folder) / QUANT_RECORD
    if not path.exists():
        return False
    record = json.loads(path.read_text())
    if record.get("format") != "nvfp4":
        raise ValueError(f"{path}: unknown quantization format {record.get('format')!r}")
    for name in record["linears"]:
        mod = model.get_submodule(name)
        if not isinstance(mod, NVFP4Linear):
            new = NVFP4Linear.from_linear(mod)
            new.backend = backend
            _set_submodule(model, name, new)
    return True
