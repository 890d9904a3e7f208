"""NVFP4 quantization-aware training: `convert(model)` swaps linears for fake-quant ones.

W4A4 as DESIGN section 7: weights are fake-quantized in 16x16 tiles with a per-tensor amax,
activations in 1x16 blocks along in_features with a per-token amax (layout-invariant); the gradient is straight-through (the backward
of quantize->dequantize is the identity), so the matmul's gradients are those of
`F.linear(x_hat, w_hat)` with x_hat, w_hat passed straight to x and w.

Gradient path (opt-in, NVIDIA's NVFP4 training recipe; `NVFP4Linear.stochastic_rounding`,
`.hadamard`, set from `quant.stochastic_rounding` / `quant.hadamard`): the backward GEMMs take
NVFP4 operands, each quantized in 1x16 blocks along that GEMM's reduction dim (per-row amax):
    dX = Q_g(dY) @ W_hat                                  (blocks along out_features)
    dW = Q_g(R dY^T) @ Q(R X_hat^T)^T  with hadamard      (blocks along tokens)
    dW = Q_g(dY^T) @ X_hat                                without
Q_g rounds stochastically with `stochastic_rounding`, else to nearest even; R is the 16-point
random Hadamard transform along tokens (`rht`), orthogonal, so without quantization
dW is unchanged. The bias gradient is the unquantized sum of dY. The forward (and hence the
sampler) is the same with or without these flags. Either flag turns the gradient path on;
with both off the gradients are straight-through in high precision, exactly as before.

Quantizers are registered by name (`QUANTIZERS`): "nvfp4" (torch emulation, any device),
"nvfp4_te" (Transformer Engine's NVFP4BlockScaling recipe; needs TE and a Blackwell GPU), and
FP8's "torch_fp8" (emulated scaled casts) and "torchao_fp8" (torchao's Float8Linear), both
taking `fp8_recipe` (vidtrain/quant/fp8.py). A recipe names none of them: its `quant.format` and
`quant.backend` (emulate | triton | te | torchao) map to one and to a `vidtrain.kernels` backend
in the tables of `vidtrain.quant.convert` (`BACKENDS`, `FP8_QUANTIZERS`).
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

from vidtrain.config import QAT_EXCLUDE
from vidtrain.formats import fp8 as fp8_format
from vidtrain.formats import nvfp4
from vidtrain.models.seams import quant_exclude
from vidtrain.quant import fp8 as fp8_linear
from vidtrain.registry import Registry

log = logging.getLogger(__name__)

# Module names (fnmatch patterns on the qualified name) kept in high precision by default: the
# recipe's `quant.exclude` default (embeddings, time embedding/projection, the output head);
# norms are no nn.Linear and are never converted. A model family declares its own as the
# `_quant_exclude` seam (vidtrain/models/seams.py), used when no list is given.
DEFAULT_EXCLUDE: tuple[str, ...] = QAT_EXCLUDE


def resolve_exclude(model: nn.Module, exclude: Sequence[str] | None) -> tuple[str, ...]:
    """`exclude` when given, else the model's declared `_quant_exclude` (DEFAULT_EXCLUDE for a
    model that declares none, as a bare test module)."""
    if exclude is not None:
        return tuple(exclude)
    try:
        return quant_exclude(model)
    except ValueError:
        return DEFAULT_EXCLUDE


QUANTIZERS: Registry[Callable[..., nn.Module]] = Registry("quantizer")


def _fake_quantize(x: torch.Tensor, tile_2d: bool, backend: str, per_row: bool = False) -> torch.Tensor:
    if backend == "torch":
        return nvfp4.fake_quantize_rows(x) if per_row else nvfp4.fake_quantize(x, tile_2d=tile_2d)
    from vidtrain import kernels  # lazy: Triton kernels (same bytes) only off the torch path

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


_share_linear = fp8_linear.share_linear  # one way to swap a linear, for NVFP4 and FP8


# ---- gradient path -----------------------------------------------------------------------------


def hadamard_matrix(seed: int = 0, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 16x16 random Hadamard transform R = H16 diag(s) / 4: orthonormal (R R^T = I).

    H16 is the Sylvester Walsh-Hadamard matrix (+-1 entries), s a fixed random sign vector drawn
    from `seed` (CPU generator, so the same on every device).
    """
    h = torch.ones(1, 1)
    while h.shape[0] < nvfp4.BLOCK:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (nvfp4.BLOCK,), generator=g).float() * 2 - 1
    return (h * signs / 4.0).to(device=device, dtype=dtype)


def rht(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Random Hadamard transform over consecutive groups of 16 along the last dim (K % 16 == 0).

    Orthogonal blockwise: rht(a) . rht(b) = a . b along the last dim, for any a, b.
    """
    r = hadamard_matrix(seed, x.device, x.dtype)
    return (x.unflatten(-1, (-1, nvfp4.BLOCK)) @ r.T).flatten(-2)


def _grad_quant(x: torch.Tensor, stochastic: bool, seed: int, counter: int) -> torch.Tensor:
    """Fake-quant a 2D gradient operand in 1x16 blocks along its last dim, per-row amax."""
    xp = nvfp4.pad_last_dim(x)
    u = nvfp4.counter_uniform(xp.shape, seed, counter, xp.device) if stochastic else None
    return nvfp4.fake_quantize_rows(xp, u)[..., : x.shape[-1]]


def grad_path_matmuls(
    g: torch.Tensor,
    x_hat: torch.Tensor,
    w_hat: torch.Tensor,
    *,
    stochastic_rounding: bool,
    hadamard: bool,
    seed: int = 0,
    counter: int = 0,
    quantize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dX, dW) of y = x_hat @ w_hat^T for 2D g [T, out], x_hat [T, in], w_hat [out, in].

    As the module docstring; `quantize=False` skips every quantization (RHT alone), for tests.
    The two stochastic quantizations of dY draw noise from counters 2*counter and 2*counter+1.
    """

    def qg(t: torch.Tensor, stream: int) -> torch.Tensor:
        if not quantize:
            return t
        return _grad_quant(t, stochastic_rounding, seed, 2 * counter + stream)

    dx = qg(g, 0) @ w_hat
    pad = (-g.shape[0]) % nvfp4.BLOCK  # zero tokens: change neither the product nor any amax
    a = F.pad(g.T, (0, pad))  # [out, T16]
    b = F.pad(x_hat.T, (0, pad))  # [in, T16]
    if hadamard:
        a, b = rht(a, seed), rht(b, seed)
        if quantize:
            b = _grad_quant(b, False, seed, 0)
    dw = qg(a, 1) @ b.T
    return dx, dw


class _NVFP4LinearGradPath(torch.autograd.Function):
    """y = F.linear(x_hat, w_hat, bias) forward (as NVFP4Linear's); NVFP4 backward GEMMs."""

    @staticmethod
    def forward(ctx, x, weight, bias, mod):
        w_hat = _fake_quantize(weight, True, mod.backend)
        x_hat = _fake_quantize(x, False, mod.backend, per_row=True)
        ctx.save_for_backward(x_hat, w_hat)
        ctx.mod, ctx.has_bias = mod, bias is not None
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return F.linear(x_hat, w_hat, bias)

    @staticmethod
    def backward(ctx, gy):
        x_hat, w_hat = ctx.saved_tensors
        mod = ctx.mod
        g2 = gy.reshape(-1, gy.shape[-1])
        dt = gy.dtype  # the GEMMs run in the gradient's dtype (bf16 under autocast)
        dx, dw = grad_path_matmuls(
            g2, x_hat.reshape(-1, x_hat.shape[-1]).to(dt), w_hat.to(dt),
            stochastic_rounding=mod.stochastic_rounding, hadamard=mod.hadamard,
            seed=mod.grad_seed, counter=mod.next_grad_counter(),
        )  # fmt: skip
        x_dt, w_dt, b_dt = ctx.dtypes
        dx = dx.reshape(*gy.shape[:-1], dx.shape[-1]).to(x_dt) if ctx.needs_input_grad[0] else None
        dw = dw.to(w_dt) if ctx.needs_input_grad[1] else None
        db = g2.sum(0).to(b_dt) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None


class NVFP4Linear(nn.Linear):
    """nn.Linear whose forward fake-quantizes weight (16x16 tiles) and input (1x16 blocks).

    The input's second-level (fp32) scale is taken per token rather than per tensor: a token's
    quantization then never depends on the other tokens in the tensor, so teacher forcing, every
    sequence-parallel layout and the sampler's one-chunk passes quantize each token identically.

    Parameters keep their names (`weight`, `bias`), so state dicts load either way.
    `backend` picks the fake-quant implementation (see `fake_quantize_ste`); all give one result.

    `stochastic_rounding` / `hadamard` turn on the NVFP4 gradient path (module docstring; the
    gradient-path quantization runs in the torch reference whatever `backend`). Its noise is a
    pure function of (`grad_seed`, counter): the counter is `grad_step * 2^20` plus the number of
    backward calls of this module since `grad_step` was last set, so a run that sets `grad_step`
    every optimizer step (the `qat` method does) draws the same noise on every device, rerun and
    resume; without it the count simply runs on from construction.
    """

    backend: str = "torch"
    stochastic_rounding: bool = False
    hadamard: bool = False
    grad_seed: int = 0
    _grad_step: int = 0
    _grad_calls: int = 0

    @property
    def grad_step(self) -> int:
        return self._grad_step

    @grad_step.setter
    def grad_step(self, step: int) -> None:
        self._grad_step, self._grad_calls = int(step), 0

    def next_grad_counter(self) -> int:
        """The noise counter of the next backward (and advance the call count)."""
        self._grad_calls += 1
        return (self._grad_step << 20) + self._grad_calls - 1

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kw) -> None:
        if in_features % nvfp4.BLOCK:
            raise ValueError(f"NVFP4Linear needs in_features % {nvfp4.BLOCK} == 0, got {in_features}")
        super().__init__(in_features, out_features, bias, **kw)

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> NVFP4Linear:
        """Wrap an existing linear, sharing (not copying) its parameters."""
        return _share_linear(cls, lin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stochastic_rounding or self.hadamard:
            return _NVFP4LinearGradPath.apply(x, self.weight, self.bias, self)
        w_hat = fake_quantize_ste(self.weight, tile_2d=True, backend=self.backend)
        x_hat = fake_quantize_ste(x, backend=self.backend, per_row=True)
        return F.linear(x_hat, w_hat, self.bias)


def _excluded(name: str, exclude: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in exclude)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@QUANTIZERS.register("nvfp4")
def convert_nvfp4(model: nn.Module, exclude: Sequence[str] | None = None) -> nn.Module:
    """Swap every nn.Linear (not excluded, in_features % 16 == 0) for an NVFP4Linear, in place."""
    exclude = resolve_exclude(model, exclude)
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
def convert_nvfp4_te(model: nn.Module, exclude: Sequence[str] | None = None) -> nn.Module:
    """Transformer Engine NVFP4BlockScaling for the same linears `convert_nvfp4` would take.

    Only where transformer_engine imports and a Blackwell (sm_100+) GPU is present.
    """
    te_available_or_raise()
    exclude = resolve_exclude(model, exclude)
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


@QUANTIZERS.register("torch_fp8")
def convert_fp8(
    model: nn.Module, exclude: Sequence[str] | None = None, fp8_recipe: str = "tensorwise"
) -> nn.Module:
    """Emulated FP8 training linears (`fp8.FP8Linear`) for every nn.Linear not excluded whose
    dims are multiples of 16, in place."""
    fp8_linear.convert_fp8(model, resolve_exclude(model, exclude), fp8_recipe, "emulate")
    return model


@QUANTIZERS.register("torchao_fp8")
def convert_fp8_torchao(
    model: nn.Module, exclude: Sequence[str] | None = None, fp8_recipe: str = "tensorwise"
) -> nn.Module:
    """torchao's Float8Linear (`convert_to_float8_training`, `Float8LinearConfig.from_recipe_name`)
    for the same linears `convert_fp8` takes."""
    fp8_linear.convert_fp8(model, resolve_exclude(model, exclude), fp8_recipe, "torchao")
    return model


def convert(
    model: nn.Module, quantizer: str = "nvfp4", exclude: Sequence[str] | None = None, **options
) -> nn.Module:
    """QAT convert step, by registered quantizer name (in place; returns the model); `exclude`
    None takes the model's declared `_quant_exclude`; `options` go to the quantizer (FP8's
    `fp8_recipe`)."""
    return QUANTIZERS.get(quantizer)(model, exclude=resolve_exclude(model, exclude), **options)


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


def quant_record(model: nn.Module) -> dict | None:
    """What `quant.json` says of `model`: its NVFP4 linears, or its FP8 linears and their recipe
    ({"format": "fp8", "recipe": ..., "linears": [...]}); None for a high-precision model."""
    names = [n for n, m in model.named_modules() if isinstance(m, NVFP4Linear)]
    if names:
        return {"format": "nvfp4", "linears": names}
    fp8_mods = {n: m for n, m in model.named_modules() if fp8_linear.is_fp8_linear(m)}
    if not fp8_mods:
        return None
    recipes = sorted({fp8_linear.fp8_recipe_of(m) for m in fp8_mods.values()})
    if len(recipes) != 1:
        raise ValueError(f"FP8 linears of more than one recipe ({', '.join(recipes)}): no single record")
    return {"format": "fp8", "recipe": recipes[0], "linears": list(fp8_mods)}


def write_quant_record(model: nn.Module, folder: str | Path) -> Path | None:
    """Write `folder/quant.json` listing the NVFP4 (or FP8) linears of `model` (nothing if there
    are none)."""
    record = quant_record(model)
    if record is None:
        return None
    path = Path(folder) / QUANT_RECORD
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def read_quant_record(folder: str | Path) -> dict | None:
    """A checkpoint folder's `quant.json` (None without one), its format checked."""
    path = Path(folder) / QUANT_RECORD
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if record.get("format") not in ("nvfp4", "fp8"):
        raise ValueError(f"{path}: unknown quantization format {record.get('format')!r}")
    if record["format"] == "fp8" and record.get("recipe") not in fp8_format.RECIPES:
        raise ValueError(f"{path}: unknown FP8 recipe {record.get('recipe')!r}")
    return record


def apply_quant_record(
    model: nn.Module, folder: str | Path, backend: str = "torch", fp8_backend: str = "emulate"
) -> bool:
    """Convert exactly the linears a checkpoint folder's `quant.json` lists; False if it has none.
    NVFP4 linears run on the kernels `backend`; FP8 ones on `fp8_backend` (emulate | torchao)."""
    record = read_quant_record(folder)
    if record is None:
        return False
    if record["format"] == "fp8":
        todo = [n for n in record["linears"] if not fp8_linear.is_fp8_linear(model.get_submodule(n))]
        fp8_linear.convert_fp8(model, (), record["recipe"], fp8_backend, names=todo)
        return True
    for name in record["linears"]:
        mod = model.get_submodule(name)
        if not isinstance(mod, NVFP4Linear):
            new = NVFP4Linear.from_linear(mod)
            new.backend = backend
            _set_submodule(model, name, new)
    return True


def ptq_fp8(
    model: nn.Module, folder: str | Path, recipe: str | None = None, backend: str = "emulate"
) -> tuple[str, int, int]:
    """FP8 post-training quantization for sampling: the linears (a checkpoint's FP8 record's, else
    every one FP8 takes under the model's `_quant_exclude`) as `fp8.FP8StoredLinear` (e4m3 weights
    + scales), in place. Call it after moving the model to its device and dtype (a float8 buffer
    would be cast by `.to(dtype)`). `recipe` None: the record's, else tensorwise. Returns (recipe,
    linears, bytes of the stored weights). An NVFP4 checkpoint is refused."""
    record = read_quant_record(folder)
    if record is not None and record["format"] != "fp8":
        raise ValueError(
            f"{folder} is an {record['format'].upper()} checkpoint: it samples as recorded; drop --quant fp8"
        )
    if record is not None:
        if recipe is not None and recipe != record["recipe"]:
            raise ValueError(f"{folder} trained FP8 {record['recipe']}; --fp8-recipe {recipe} differs")
        recipe, names = record["recipe"], list(record["linears"])
    else:
        recipe = recipe or "tensorwise"
        names = fp8_linear.candidates(model, resolve_exclude(model, None))
    return recipe, len(names), fp8_linear.store_fp8(model, names, recipe, backend)
