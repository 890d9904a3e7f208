"""FP8 training and inference linears (Hopper / Ada: FP8 tensor cores, where NVFP4 saves memory only).

Two ways to train a model's linears in FP8 (`quant.format: fp8`, recipe `quant.fp8_recipe`:
tensorwise | rowwise, torchao's `Float8LinearRecipeName` names; arithmetic in
`vidtrain.formats.fp8`), chosen by `quant.backend`:
  emulate  `FP8Linear`: each of the three GEMMs of a linear (y = x W^T, dX = dY W, dW = dY^T x)
           takes scaled-cast operands exactly as the recipe stores them (quantize -> dequantize
           to fp32), then multiplies in high precision. Any device; what a GPU runs instead is
           the same casts feeding `torch._scaled_mm` (FP8 tensor cores, fp32 accumulation): the
           two differ only by the accumulation order of the fp32 products.
  torchao  torchao's own `Float8Linear` (`torchao.float8.convert_to_float8_training` with
           `Float8LinearConfig.from_recipe_name`): its FP8 GEMMs through `torch._scaled_mm`
           (CUDA sm_89+; torch >= 2.13 also has a CPU kernel, so the tests run it here).
Both keep the parameters (`weight`, `bias`) in high precision under their names: checkpoints
load into plain and converted models alike, and peft LoRA adapters on a converted linear stay
high precision (they run beside the base linear, as on an NVFP4 base).

Post-training quantization for sampling: `FP8StoredLinear` keeps the weight as float8_e4m3fn
codes with the recipe's scales (per tensor, or per output row), the input cast on the fly; its
forward equals `FP8Linear`'s for the same weights. `backend` "emulate" dequantizes and
multiplies in fp32; "scaled_mm" calls `torch._scaled_mm` (what a GPU runs).

Note on layouts: under tensorwise the activation's scale is one amax over all tokens of the
call, so a token's rounding depends on the other tokens (the sampler's one-chunk passes round
differently from teacher forcing's whole sequence); rowwise scales are per token, layout-invariant.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence

import torch
from torch import nn

from vidtrain.formats import fp8

log = logging.getLogger(__name__)

BACKENDS = ("emulate", "torchao")
ALIGN = 16  # torch._scaled_mm needs both dims of each operand divisible by 16


def _dq(x: torch.Tensor, recipe: str, reduce_dim: int, grad: bool = False) -> torch.Tensor:
    """One GEMM operand as the recipe stores it, dequantized to fp32."""
    q, s = fp8.recipe_cast(x, recipe, reduce_dim, grad)
    return fp8.dequantize(q, s)


class _FP8LinearFn(torch.autograd.Function):
    """y = x_hat W_hat^T + b, backward GEMMs on scaled-cast operands (module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, recipe):
        with torch.autocast(x.device.type, enabled=False):  # the GEMMs in fp32, also under autocast
            return _FP8LinearFn._forward(ctx, x, weight, bias, recipe)

    @staticmethod
    def _forward(ctx, x, weight, bias, recipe):
        x2 = x.reshape(-1, x.shape[-1])
        xq, wq = _dq(x2, recipe, -1), _dq(weight, recipe, -1)  # reduction over in_features
        y = xq @ wq.T
        if bias is not None:
            y = y + bias.float()
        ctx.save_for_backward(x2, weight)
        ctx.recipe, ctx.has_bias = recipe, bias is not None
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, gy):
        with torch.autocast(gy.device.type, enabled=False):
            return _FP8LinearFn._backward(ctx, gy)

    @staticmethod
    def _backward(ctx, gy):
        x2, weight = ctx.saved_tensors
        r = ctx.recipe
        g2 = gy.reshape(-1, gy.shape[-1])
        x_dt, w_dt, b_dt = ctx.dtypes
        dx = dw = db = None
        if ctx.needs_input_grad[0]:  # dX = dY W: reduction over out_features
            dx = _dq(g2, r, -1, grad=True) @ _dq(weight, r, 0)
            dx = dx.to(x_dt).reshape(*gy.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:  # dW = dY^T X: reduction over tokens
            dw = (_dq(g2, r, 0, grad=True).T @ _dq(x2, r, 0)).to(w_dt)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g2.float().sum(0).to(b_dt)
        return dx, dw, db, None


def share_linear(cls: type[nn.Linear], lin: nn.Linear) -> nn.Linear:
    """An instance of the nn.Linear subclass `cls` that shares (not copies) `lin`'s parameters
    (the NVFP4 and FP8 conversions both swap linears this way)."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.in_features, new.out_features = lin.in_features, lin.out_features
    new.register_parameter("weight", lin.weight)
    new.register_parameter("bias", lin.bias)
    new.train(lin.training)
    return new


class FP8Linear(nn.Linear):
    """nn.Linear trained in emulated FP8 (`recipe`: tensorwise | rowwise); parameters shared,
    names kept."""

    recipe: str = "tensorwise"

    @classmethod
    def from_linear(cls, lin: nn.Linear, recipe: str = "tensorwise") -> FP8Linear:
        new = share_linear(cls, lin)
        new.recipe = fp8.check_recipe(recipe)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FP8LinearFn.apply(x, self.weight, self.bias, self.recipe)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8={self.recipe}"


class FP8StoredLinear(nn.Module):
    """A linear whose weight is stored as float8_e4m3fn codes + fp32 scales (sampling only).

    `weight_scale` is 0-dim (tensorwise) or [out, 1] (rowwise, powers of two); the input is cast
    per tensor / per token at each call.
    """

    def __init__(self, lin: nn.Linear, recipe: str = "tensorwise", backend: str = "emulate") -> None:
        super().__init__()
        if backend not in ("emulate", "scaled_mm"):
            raise ValueError(f"unknown FP8StoredLinear backend {backend!r}; known: emulate, scaled_mm")
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.recipe, self.backend = fp8.check_recipe(recipe), backend
        q, s = fp8.recipe_cast(lin.weight.detach(), recipe, -1)
        self.register_buffer("weight_fp8", q)
        self.register_buffer("weight_scale", s)
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone(), requires_grad=False)

    def nbytes(self) -> int:
        return self.weight_fp8.numel() + self.weight_scale.numel() * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        xq, xs = fp8.recipe_cast(x2, self.recipe, -1)
        if self.backend == "scaled_mm":
            sb = self.weight_scale.reshape(1, -1) if self.weight_scale.dim() else self.weight_scale
            # cuBLAS' rowwise-scaled FP8 GEMM writes bf16 only (torchao routes it the same way)
            rowwise_cuda = self.recipe == "rowwise" and x.device.type == "cuda"
            y = torch._scaled_mm(
                xq, self.weight_fp8.T, scale_a=xs.reciprocal(), scale_b=sb.reciprocal(),
                out_dtype=torch.bfloat16 if rowwise_cuda else torch.float32,
            ).float()  # fmt: skip
        else:
            y = fp8.dequantize(xq, xs) @ fp8.dequantize(self.weight_fp8, self.weight_scale).T
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8={self.recipe} (stored)"


def _excluded(name: str, exclude: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in exclude)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def is_fp8_linear(mod: nn.Module) -> bool:
    """A training FP8 linear: ours (`FP8Linear`) or torchao's `Float8Linear`."""
    if isinstance(mod, FP8Linear):
        return True
    return type(mod).__name__ == "Float8Linear" and type(mod).__module__.startswith("torchao.")


def fp8_recipe_of(mod: nn.Module) -> str:
    if isinstance(mod, FP8Linear):
        return mod.recipe
    cfg = mod.config  # torchao's Float8Linear
    return "rowwise" if cfg.round_scales_to_power_of_2 else "tensorwise"


def candidates(model: nn.Module, exclude: Sequence[str]) -> list[str]:
    """Qualified names of the plain nn.Linear that FP8 takes: not excluded, both dims % 16 == 0."""
    names = []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear or _excluded(name, exclude):
            continue
        if mod.in_features % ALIGN or mod.out_features % ALIGN:
            log.info("FP8: %s stays high precision (%dx%d)", name, mod.out_features, mod.in_features)
            continue
        names.append(name)
    return names


def convert_fp8(
    model: nn.Module, exclude: Sequence[str], recipe: str = "tensorwise", backend: str = "emulate",
    names: Sequence[str] | None = None,
) -> list[str]:  # fmt: skip
    """Swap the linears FP8 takes (or exactly `names`) for FP8 training linears, in place;
    returns their names."""
    fp8.check_recipe(recipe)
    if backend not in BACKENDS:
        raise ValueError(f"unknown FP8 backend {backend!r}; known: {', '.join(BACKENDS)}")
    names = list(candidates(model, exclude) if names is None else names)
    if backend == "emulate":
        for name in names:
            _set_submodule(model, name, FP8Linear.from_linear(model.get_submodule(name), recipe))
    else:
        try:
            # lazy: torchao is an optional dependency, only for quant.backend=torchao
            from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        except ImportError as e:  # pragma: no cover - torchao is installed in the dev venv
            raise ValueError("quant.backend=torchao needs torchao (pip install torchao)") from e
        wanted = set(names)
        convert_to_float8_training(
            model, module_filter_fn=lambda m, fqn: fqn in wanted,
            config=Float8LinearConfig.from_recipe_name(recipe),
        )  # fmt: skip
    log.info("FP8 (%s, %s): %d linears converted", recipe, backend, len(names))
    return names


def store_fp8(model: nn.Module, names: Sequence[str], recipe: str, backend: str = "emulate") -> int:
    """Replace the linears `names` (plain or FP8 training ones) by `FP8StoredLinear`; returns the
    bytes of the stored weights."""
    total = 0
    for name in names:
        mod = FP8StoredLinear(model.get_submodule(name), recipe, backend)
        total += mod.nbytes()
        _set_submodule(model, name, mod)
    return total
