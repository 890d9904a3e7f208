"""`vidtrain plan RECIPE [key=value ...] --world-size N`: a recipe's memory and time, without a GPU.

The recipe's real model, method and strategy are built (`Trainer._build`'s order) and one full
training step runs (`Method.train_step`: forward, backward and optimizer step through the
strategy, DeepSpeed's engine included) on fake tensors (torch's `FakeTensorMode`: shapes,
dtypes and strides, no storage) in a fake process group of N ranks (torch's "fake" backend:
every collective, the sequence-parallel all-to-alls and gathers too, runs on the fake tensors
and moves nothing), so nothing of the production shapes is allocated. `MemTracker`
(torch.distributed._tools) sorts every live tensor into parameters, gradients, optimizer
state and activations; FlopCounterMode's formulas count the FLOPs (torchtitan's memory
estimation, DESIGN section 14). `--ranks` picks the ranks planned (each its own fake world).

Where a fake step differs from a GPU step, and how the plan bridges it (all in this file):
  * Small tensors keep real values (`_SmallTensorsReal`: at most `REAL_NUMEL` elements: token
    metadata, timesteps, schedules, exit steps), so the step's data-dependent bookkeeping
    (unique timesteps, mask plans, ring schedules) runs as on a GPU. A floating scalar computed
    from large tensors (loss, gradient norm, DeepSpeed's overflow check) is 1.0: finite.
  * The fake tensors live on the CPU (a CPU build of torch holds no CUDA tensor), so the GPU's
    attention kernels are stood in for: masked attention without a KV hook runs FlexAttention on
    a GPU (`model.attn_backend: auto`); its block mask is built at block size only (the compiled
    builder never makes an [Lq, Lk] tensor) and the kernel is `_FlexAttention`, which allocates
    what the fused kernel keeps (output, log-sum-exp; the gradients of q, k, v). Dense-mask
    SDPA (QAT's KV fake-quant hook, as on a GPU) and unmasked attention run as they are.
    Masked attention FLOPs are counted by the pairs the mask allows (`AttentionFlops`).
  * CPU autocast has CUDA's lower-precision list for linears and attention; a few norms differ
    (transients of [tokens, dim]). Optimizers take their multi-tensor path, as on CUDA.
  * `quant.backend: triton` is planned with its torch emulation (the same arithmetic; the
    emulation's transients bound the fused kernels').
  * DTensor's sharding propagation (FSDP2) runs ops on global-shape fake tensors in the active
    fake mode: it is given a fake mode of its own, so they are not counted (no GPU holds them).
  * DDP's construction-time shape check and broadcast read data (skipped) and its bucket
    all-reduce is a no-op hook (the fake group's futures carry no tensor); its buckets count.
  * DeepSpeed's engine runs as is, bf16 as on CUDA, its `module.to(device)` skipped (the fake
    weights are there already); ZeRO's formula (`zero_states`) is printed beside it.
  * Optimizer state exists from the second step on: one step on zero gradients creates it
    before the measured step, so the plan is of a steady-state step.
  * EMA shadows (`train.ema_decay`, DMD's generator EMA) live in host memory: reported apart.
  * Error recycling's bank (`method.error_recycling`) is host memory written by data-dependent
    bookkeeping after the forward: the step is planned without it, its bound reported apart.
  * A step that fails on these shapes is reported (the exception's first line), exit code 1.
Weights and data are never read: the model is built from `model.flavor`; a sample is
`data.frames x data.height x data.width` latents (set them for shards: their shape is in the
shards, not the recipe) and `model.text_len` caption tokens.

`--sample` plans the streaming sampler instead: the recipe's model (NVFP4 when the recipe
trains it so) in bf16, the settings `vidtrain sample` takes from this run
(`SamplerConfig.from_run`; flags override), `--sample-frames` latent frames streamed chunk by
chunk: the KV cache bytes (what the window and sinks keep, in the KV format) and the peak.

Checked against measured steps at debug size in tests/test_plan.py (within 5%).

Legend: B batch, H heads, L tokens, D head dim, N ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from vidtrain.config import Recipe, load_recipe
from vidtrain.data.latents import latent_collate
from vidtrain.distill import method as dmd_method
from vidtrain.lora import roles as lora
from vidtrain.parallel import make_strategy, parallelize
from vidtrain.parallel.deepspeed_strategy import DeepSpeedStrategy, deepspeed_config
from vidtrain.quant.convert import convert_for_recipe
from vidtrain.sample import SamplerConfig, StreamingSampler
from vidtrain.tokens import MaskRule, TokenMeta, build_mask, grid_meta
from vidtrain.train.ema import EMA
from vidtrain.train.methods import make_method
from vidtrain.train.trainer import LRSchedule, Trainer, build_model

aten = torch.ops.aten
GIB = 2**30
# tensors of at most this many elements keep their values on fake tensors (`_SmallTensorsReal`)
REAL_NUMEL = 1 << 20
# DeepSpeed's default ZeRO reduce bucket (elements); ZeRO 1-2 keep one in the gradient dtype
DS_REDUCE_BUCKET = 500_000_000
# what a fake step cannot see: the fits verdict needs this much head room
UNCOUNTED = "not counted: the CUDA context and the caching allocator's fragmentation (usually 1-3 GiB)"
H100 = {"tflops": 989.0, "mfu": 0.4, "gpu_memory_gib": 80.0}  # H100 SXM, bf16 dense


class PlanError(ValueError):
    """A recipe the plan cannot run (the message says why)."""


# ---- the fake runtime --------------------------------------------------------------------------


class _PlanFakeMode(FakeTensorMode):
    """FakeTensorMode whose constants (fake tensors that carry their real values) may hold up to
    REAL_NUMEL elements (torch's own limit is one element), and whose fresh op outputs are not
    memoised: the memo's weak reference would make every fake parameter unswappable, and
    `nn.Module.to` swaps fake parameters (parallelize moves the model, the engine casts it)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        converter = self.fake_tensor_converter

        def from_meta_and_device(fake_mode, t, device, pytype=None, dispatch_keys=None):
            return FakeTensor(fake_mode, t, device, pytype=pytype, dispatch_keys=dispatch_keys)

        converter.from_meta_and_device = from_meta_and_device

    def may_turn_const(self, t: torch.Tensor) -> bool:
        return (
            t.numel() <= REAL_NUMEL
            and t.layout == torch.strided
            and not self.is_our_fake(t)
            and t.device.type != "meta"
        )


def _is_const(t) -> bool:
    return isinstance(t, FakeTensor) and t.constant is not None


class _SmallTensorsReal(TorchDispatchMode):
    """Sits on the fake mode: small tensors keep real values, large ones are shapes only.

    - a factory (no tensor input; not `empty*`) whose result is small computes it for real;
    - an op whose tensor inputs are all constants runs on their values when its result is
      small (the fake mode's constant propagation), else on their shapes only (so an
      [L, L] mask built from metadata is never computed);
    - a floating scalar computed from tensors without values (a loss, a gradient norm, an
      amax) is 1.0: finite, so every finiteness check of the step passes (the trainer's, the
      DeepSpeed engine's overflow check) and the step is applied; reading a value of a large
      tensor gives 1.0 (floating), True (bool) or 0 (a one-element integer: a flag); any other
      integer raises.
    """

    def __init__(self, fake_mode: FakeTensorMode) -> None:
        super().__init__()
        self.fake_mode = fake_mode
        self.enabled = True

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Shapes only: what is built here (parameters) carries no values, so it stays an
        ordinary fake tensor that `nn.Module.to` can swap."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def _const(self, real: torch.Tensor) -> FakeTensor:
        return self.fake_mode.fake_tensor_converter.from_real_tensor(self.fake_mode, real, make_constant=True)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.enabled:
            return func(*args, **kwargs)
        flat = pytree.tree_leaves((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        if func is aten._local_scalar_dense.default and not _is_const(args[0]):
            t = args[0]
            if t.dtype.is_floating_point:
                return 1.0
            if t.dtype == torch.bool:
                return True
            if t.numel() == 1:  # a flag or a count (DeepSpeed's overflow flag): none
                return 0
            raise PlanError(
                f"the step reads an integer from a tensor of {t.numel()} elements ({list(t.shape)}), "
                f"which has no values in a plan (more than {REAL_NUMEL} elements)"
            )
        if not tensors:
            out = func(*args, **kwargs)
            if (
                isinstance(out, FakeTensor)
                and "empty" not in func.__name__
                and out.numel() <= REAL_NUMEL
                and out.device.type == "cpu"
            ):
                with unset_fake_temporarily():
                    real = func(*args, **kwargs)
                return self._const(real)
            return out
        if all(_is_const(t) for t in tensors) and self._large_result(func, args, kwargs):

            def shape_only(x):
                if _is_const(x):
                    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
                return x

            return func(*pytree.tree_map(shape_only, args), **pytree.tree_map(shape_only, kwargs))
        out = func(*args, **kwargs)
        if (
            isinstance(out, FakeTensor)
            and out.constant is None
            and out.numel() == 1
            and out.dtype.is_floating_point
            and not func.is_view
            and not func._schema.is_mutable
        ):  # a scalar of values the plan does not have (a loss, a norm, an amax): 1.0
            with unset_fake_temporarily():
                one = torch.ones(out.shape, dtype=out.dtype, device=out.device)
            return self._const(one)
        return out

    @staticmethod
    def _large_result(func, args, kwargs) -> bool:
        """Would the op on these constants give a result over REAL_NUMEL (its meta kernel)?"""

        def meta(x):
            return x.constant.to("meta") if _is_const(x) else x

        try:
            with unset_fake_temporarily():
                out = func(*pytree.tree_map(meta, args), **pytree.tree_map(meta, kwargs))
        except Exception:  # no meta kernel (data-dependent): the result is bounded by the inputs
            return False
        return any(isinstance(o, torch.Tensor) and o.numel() > REAL_NUMEL for o in pytree.tree_leaves(out))


# ---- GPU kernels stood in for --------------------------------------------------------------------


class _Phase:
    """Which part of the step an op belongs to: forward, activation recompute (a module's
    forward run inside backward) or backward; global module hooks keep the forward depth."""

    depth = 0

    @classmethod
    def now(cls) -> str:
        if torch._C._current_graph_task_id() == -1:
            return "forward"
        return "recompute" if cls.depth > 0 else "backward"

    @classmethod
    @contextlib.contextmanager
    def tracking(cls) -> Iterator[None]:
        from torch.nn.modules import module as nn_module

        def pre(mod, args):
            cls.depth += 1

        def post(mod, args, out):
            cls.depth -= 1

        handles = [
            nn_module.register_module_forward_pre_hook(pre),
            nn_module.register_module_forward_hook(post, always_call=True),  # also when recompute stops early
        ]
        cls.depth = 0
        try:
            yield
        finally:
            for h in handles:
                h.remove()


@dataclass
class AttentionFlops:
    """Attention FLOPs by the allowed query-key pairs (FlopCounterMode counts every pair of a
    masked call): `keys_per_query` is the mean number of keys a query of the recipe's mask may
    see, so a masked call of Lq queries counts Lq x keys_per_query pairs (4 FLOPs per pair and
    head dim forward, 2.5x that backward, as FlopCounterMode's SDPA formulas)."""

    keys_per_query: float | None = None
    # FLOPs of the FlexAttention stand-in by phase (FlopCounterMode does not see it)
    outside: dict[str, float] = field(
        default_factory=lambda: {"forward": 0.0, "recompute": 0.0, "backward": 0.0}
    )
    allowed: float = 0.0  # masked calls: FLOPs of the allowed pairs
    dense: float = 0.0  # masked calls: FLOPs of every pair

    def masked(self, b: int, h: int, lq: int, lk: int, d: int, backward: bool) -> int:
        dense = 4 * b * h * lq * lk * d * (2.5 if backward else 1.0)
        kpq = lk if self.keys_per_query is None else min(self.keys_per_query, lk)
        self.allowed += dense * kpq / lk
        self.dense += dense
        return int(dense * kpq / lk)


_ATTN = AttentionFlops()


class _FlexAttention(torch.autograd.Function):
    """The fused FlexAttention kernel's footprint: forward keeps q, k, v, the output and the
    log-sum-exp [B, H, L] (fp32); backward allocates the gradients of q, k, v."""

    @staticmethod
    def forward(ctx, q_BHLD, k_BHLD, v_BHLD):
        b, h, lq, d = q_BHLD.shape
        out = q_BHLD.new_empty((b, h, lq, v_BHLD.shape[-1]))
        lse = q_BHLD.new_empty((b, h, lq), dtype=torch.float32)
        ctx.save_for_backward(q_BHLD, k_BHLD, v_BHLD, out, lse)
        _ATTN.outside[_Phase.now()] += _ATTN.masked(b, h, lq, k_BHLD.shape[2], d, backward=False)
        return out

    @staticmethod
    def backward(ctx, g_BHLD):
        q, k, v, _, _ = ctx.saved_tensors
        b, h, lq, d = q.shape
        _ATTN.outside["backward"] += _ATTN.masked(b, h, lq, k.shape[2], d, backward=True)
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flex_attention(query, key, value, score_mod=None, block_mask=None, scale=None, **kw):
    if score_mod is not None:
        raise PlanError("the plan's FlexAttention stand-in has no score_mod")
    return _FlexAttention.apply(query, key, value)


def _block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device="cuda", BLOCK_SIZE=128, **kw):
    """A BlockMask of the shapes the compiled builder returns (block counts and indices), built
    without evaluating `mask_mod`: its values are not needed on fake tensors."""
    from torch.nn.attention.flex_attention import BlockMask

    bs = BLOCK_SIZE if isinstance(BLOCK_SIZE, int) else BLOCK_SIZE[0]
    qb, kb = -(-Q_LEN // bs), -(-KV_LEN // bs)
    num = torch.empty((B or 1, H or 1, qb), dtype=torch.int32, device=device)
    idx = torch.empty((B or 1, H or 1, qb, kb), dtype=torch.int32, device=device)
    return BlockMask.from_kv_blocks(
        num, idx, torch.empty_like(num), torch.empty_like(idx), BLOCK_SIZE=bs, mask_mod=mask_mod,
        seq_lengths=(Q_LEN, KV_LEN),
    )  # fmt: skip


def _sdpa_cpu_flops(query, key, value, *args, attn_mask=None, out_val=None, **kw) -> int:
    b, h, lq, d = query.shape
    if attn_mask is not None:
        return _ATTN.masked(b, h, lq, key.shape[2], d, backward=False)
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _sdpa_cpu_backward_flops(grad_out, query, key, value, *args, attn_mask=None, out_val=None, **kw) -> int:
    b, h, lq, d = query.shape
    if attn_mask is not None:
        return _ATTN.masked(b, h, lq, key.shape[2], d, backward=True)
    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


SDPA_CPU_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
}


class _StepFlops(TorchDispatchMode):
    """FLOPs by FlopCounterMode's formulas (torch.utils.flop_counter's registry, plus the CPU
    SDPA kernels: masked calls by allowed pairs), each count split by phase (`_Phase`).

    Not FlopCounterMode itself: its module tracker and its decompositions keep recomputed
    activations alive under activation checkpointing (+21% peak on a checkpointed MLP, +55% on
    the debug DiT), which would distort the memory measured in the same step."""

    def __init__(self) -> None:
        super().__init__()
        self.formulas = {**flop_registry, **SDPA_CPU_FLOPS}
        self.phases = {"forward": 0.0, "recompute": 0.0, "backward": 0.0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None:
            self.phases[_Phase.now()] += formula(*args, **kwargs, out_val=out)
        return out


class _NoHook:
    def remove(self) -> None:
        pass


_NO_HOOK = _NoHook()


class _StepMemTracker(MemTracker):
    """MemTracker over a whole step, which may call the root module more than once (DMD's
    rollouts and scores, the sampler's chunks): a repeated top-level call starts that module's
    snapshots afresh (the plan reads the per-category totals and the peak only)."""

    def _pre_fw_hook(self, module: nn.Module, inputs) -> None:
        try:
            super()._pre_fw_hook(module, inputs)
        except NotImplementedError:
            del self.memory_tracking[module]
            super()._pre_fw_hook(module, inputs)

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True):
        """As MemTracker's, with no gradient hook on frozen parameters (a LoRA's base), which
        torch refuses (a placeholder handle marks them as done)."""
        for p in module.parameters():
            if not p.requires_grad and p not in self._param_to_grad_hook_handles:
                self._param_to_grad_hook_handles[p] = (_NO_HOOK, _NO_HOOK)
        return super()._track_module_params_and_buffers(module, install_grad_hooks)

    def _update_peak_stats(self, peak_state) -> None:
        """The global peak only (MemTracker also updates every live module's peak on every op:
        quadratic in a 1.3B step's ops x modules)."""
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev] = snap["Total"]
                self._peak_mem_snap[dev] = dict(snap)

    def reset_peak(self) -> None:
        """The peak from now on (the step's, not the build's)."""
        self._peak_mem_snap = self.get_tracker_snapshot("current")
        self._peak_mem = {dev: snap["Total"] for dev, snap in self._peak_mem_snap.items()}

    def totals(self, kind: str = "peak") -> dict[str, int]:
        """Bytes by category ("Parameter", "Gradient", "Activation", "Temp", "Optstate",
        "Other", "Total"), summed over devices."""
        out: dict[str, int] = {}
        for snap in self.get_tracker_snapshot(kind).values():
            for k, v in snap.items():
                name = getattr(k, "value", k)
                out[name] = out.get(name, 0) + v
        return out


@contextlib.contextmanager
def fake_runtime(gpu: bool = True) -> Iterator[_SmallTensorsReal]:
    """Fake tensors with small ones real; `gpu`: the GPU's attention kernels stood in for."""
    import torch.distributed.tensor._sharding_prop as sharding_prop
    import torch.nn.attention.flex_attention as flex
    import torch.nn.parallel.distributed as ddp

    fake = _PlanFakeMode(allow_non_fake_inputs=True)
    with contextlib.ExitStack() as stack:
        if gpu:
            stack.enter_context(mock.patch.object(flex, "create_block_mask", _block_mask))
            stack.enter_context(mock.patch.object(flex, "flex_attention", _flex_attention))
        # DTensor's sharding propagation runs the op on fake tensors of the global shapes, in the
        # active fake mode when there is one: ours would count them (3 model copies for a foreach
        # optimizer op), a GPU never allocates them; its own fake mode keeps them out of sight
        stack.enter_context(mock.patch.object(sharding_prop, "detect_fake_mode", _noop))
        # DDP's construction reads parameter data (shape check across ranks, broadcast)
        stack.enter_context(mock.patch.object(ddp, "_verify_param_shape_across_processes", _noop))
        stack.enter_context(mock.patch.object(ddp, "_sync_module_states", _noop))
        stack.enter_context(fake)
        yield stack.enter_context(_SmallTensorsReal(fake))


def _noop(*args, **kwargs) -> None:
    return None


@contextlib.contextmanager
def fake_world(world_size: int, rank: int) -> Iterator[None]:
    """The default process group as rank `rank` of `world_size` on torch's fake backend (every
    collective completes at once and moves nothing), with the launcher's environment set."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise PlanError("a process group is already initialised: run the plan in its own process")
    env = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}  # fmt: skip
    with mock.patch.dict(os.environ, env):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
        try:
            yield
        finally:
            dist.destroy_process_group()


@contextlib.contextmanager
def _deepspeed_state_kept() -> Iterator[None]:
    """DeepSpeed caches its process groups in module globals: they are put back as they were,
    so a later plan (or a real run) in this process does not meet the fake world's dead groups."""
    import deepspeed.comm.comm
    import deepspeed.utils.groups

    saved = []
    for module in (deepspeed.utils.groups, deepspeed.comm.comm):
        for name, value in vars(module).items():
            if not name.startswith("__"):
                saved.append((module, name, value, dict(value) if isinstance(value, dict) else None))
    try:
        yield
    finally:
        for module, name, value, content in saved:
            setattr(module, name, value)
            if content is not None:
                value.clear()
                value.update(content)


def _ddp_noop_hook(state, bucket):
    """DDP comm hook: the bucket's all-reduce on the fake group, the bucket as its result."""
    buf = bucket.buffer()
    dist.all_reduce(buf)
    fut = torch.futures.Future()
    fut.set_result(buf)
    return fut


# ---- the recipe's shapes -----------------------------------------------------------------------


def keys_per_query(recipe: Recipe) -> tuple[float, float]:
    """(mean keys a query may see, allowed fraction of all pairs) of the teacher-forcing mask
    over one sample: counted per frame (a frame's tokens share their mask row)."""
    d, m = recipe.data, recipe.model
    rule = MaskRule.of("teacher_forcing", m)
    with unset_fake_temporarily():
        frames = TokenMeta.cat(
            [grid_meta(d.frames, 1, 1, m.frames_per_chunk, noisy=n) for n in (False, True)]
        )
        allowed_frames = int(build_mask(rule, frames, frames).sum())
    tpf = (d.height // 2) * (d.width // 2)
    return allowed_frames * tpf / (2 * d.frames), allowed_frames / (2 * d.frames) ** 2


def plan_recipe(recipe: Recipe, gpu: bool = True) -> Recipe:
    """The recipe as the plan builds it: no weights read (model.checkpoint, method.dmd.teacher
    dropped), attention backends as on a GPU (`gpu`; auto / flash: FlexAttention for masks),
    quant.backend triton as its torch emulation (the same arithmetic)."""
    backend = recipe.model.attn_backend
    m = dataclasses.replace(
        recipe.model,
        checkpoint=None,
        attn_backend="flex" if gpu and backend in ("auto", "flash") else backend,
    )
    q = recipe.quant
    q = dataclasses.replace(q, backend="emulate") if q.backend == "triton" else q
    method = dataclasses.replace(recipe.method, dmd=dataclasses.replace(recipe.method.dmd, teacher=None))
    return dataclasses.replace(recipe, model=m, quant=q, method=method)


class _PlanDMD(dmd_method.DMD):
    """The dmd method without its teacher's files: the base is built from model.flavor (its
    weights never matter to a plan), NVFP4 when the recipe says so (`quant.enabled`; a QAT
    teacher's quant.json makes a real run NVFP4 too: plan it with quant.enabled=true)."""

    def __init__(self, recipe: Recipe) -> None:
        no_teacher = Path("<teacher: not read by vidtrain plan>")
        with mock.patch.object(dmd_method, "check_dmd_recipe", lambda r: no_teacher):
            super().__init__(recipe)

    def prepare_model(self, model: nn.Module, trainer) -> nn.Module:
        if self.recipe.quantized:
            convert_for_recipe(model, self.recipe.quant, trainer.device)
        d = self.cfg
        self._peft_model = lora.add_roles(model, d.lora_rank, d.lora_alpha, d.lora_targets)
        if d.ema_decay > 0:
            self.ema = EMA(lora.adapter_params(self._peft_model, lora.GENERATOR), d.ema_decay)
        return self._peft_model


class _PlanDeepSpeed(DeepSpeedStrategy):
    """The deepspeed strategy with the real engine on fake tensors: bf16 as on a GPU (the
    strategy turns it on for CUDA devices only), and the engine's `module.to(device)` a no-op
    (the fake parameters are on the device already; swapping them is refused)."""

    def __init__(self, recipe, gpu: bool = True) -> None:
        super().__init__(recipe)
        self.gpu = gpu

    def data_parallel(self, model: nn.Module, make_optimizer):
        import deepspeed

        use_bf16 = self.recipe.train.mixed_precision != "fp32" if self.gpu else False
        cfg = deepspeed_config(self.recipe, self.world_size, use_bf16)
        params = [p for p in model.parameters() if p.requires_grad]
        to = nn.Module.to

        def same_device_to(module, *args, **kwargs):
            if args and isinstance(args[0], torch.device) and args[0] == self.device and not kwargs:
                return module
            return to(module, *args, **kwargs)

        with mock.patch.object(nn.Module, "to", same_device_to):
            engine, optimizer, _, _ = deepspeed.initialize(
                model=model, model_parameters=params, optimizer=make_optimizer, config=cfg
            )
        return engine, getattr(optimizer, "optimizer", optimizer)


def zero_states(stage: int, trainable: int, frozen: int, world: int, largest_unit: int) -> dict[str, float]:
    """Per-rank bytes of DeepSpeed ZeRO's model states with bf16 weights and Adam (ZeRO paper,
    K = 12: fp32 master weights, momentum and variance), over `world` data-parallel ranks
    (DeepSpeed counts every rank, SP ones too):
        stage 0: 2P + 2T + 12T          stage 1: 2P + 2T + 12T/N
        stage 2: 2P + (2 + 12)T/N       stage 3: (2P + (2 + 12)T)/N
    P all parameters, T the trainable ones; plus buffers: ZeRO 1-2 one reduce bucket (5e8
    bf16 elements, allocated at that size whatever the model's), ZeRO 3 the gathered bf16
    weights of two shard units (one in use, one prefetched). The plan runs the engine itself;
    this is the cross-check it prints."""
    n, p, t = world, trainable + frozen, trainable
    params = 2 * p / n if stage == 3 else 2 * p
    grads = 2 * t / n if stage >= 2 else 2 * t
    optim = 12 * t / n if stage >= 1 else 12 * t
    buffers = 2 * 2 * largest_unit if stage == 3 else (2 * DS_REDUCE_BUCKET if stage else 0)
    return {"params": params, "grads": grads, "optim": optim, "buffers": buffers}


# ---- one rank's step ---------------------------------------------------------------------------


class _PlanTrainer(Trainer):
    """The trainer as a method sees it (`StepContext`: the Trainer's own step methods) on fake
    tensors: no run folder, data loader or logger; `next_batch` is a batch of the recipe's
    shapes; autocast as on a GPU (bf16 unless train.mixed_precision is fp32)."""

    def __init__(self, recipe: Recipe, strategy, gpu: bool = True) -> None:  # nothing on disk
        self.recipe = recipe
        self.gpu = gpu
        self.strategy = strategy
        self.device = strategy.device
        self.run_dir = Path(recipe.run.dir)
        self.step = 0
        self.last_keys: list[str] = []
        self.nonfinite = {"in_a_row": 0, "skipped": 0}
        self.callbacks = []

    def build(self) -> None:
        """Trainer._build's order: method, model, prepare_model, parallelize, schedule, EMA."""
        recipe = self.recipe
        self.method = _PlanDMD(recipe) if recipe.method.name == "dmd" else make_method(recipe)
        plain = build_model(recipe)
        self.model_config = plain.cfg
        plain = self.method.prepare_model(plain, self)
        s = self.strategy
        self.model, self.optimizer = parallelize(
            plain, s.mesh, recipe, s.data_parallel, lambda params: self.method.make_optimizer(self, params)
        )
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            self.model.register_comm_hook(None, _ddp_noop_hook)
        if self.gpu:  # torch's optimizers take their multi-tensor path on CUDA (its transients)
            for group in self.optimizer.param_groups:
                if group.get("foreach", False) is None and not group.get("fused"):
                    group["foreach"] = True
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, LRSchedule(recipe))
        decay = recipe.train.ema_decay
        self.ema = EMA(s.full_params(self.model), decay) if decay else None
        # error recycling's bank is host memory filled by data-dependent bookkeeping after the
        # forward (which fake tensors cannot run): the step is planned without it and the bank's
        # bound (every bucket full) is reported as host memory
        bank = getattr(self.method, "error_bank", None)
        self.error_bank_bytes = 0
        if bank is not None:
            d = recipe.data
            self.error_bank_bytes = bank.max_nbytes((self.model_config.in_channels, d.height, d.width))
            self.method.error_bank = None

    def next_batch(self) -> dict:
        d, cfg = self.recipe.data, self.model_config
        samples = [
            {
                "latents": torch.empty(cfg.in_channels, d.frames, d.height, d.width),
                "text": torch.empty(self.recipe.model.text_len, cfg.text_dim),
                "key": f"plan-{i}",
            }
            for i in range(d.batch_size)
        ]
        batch = latent_collate(self.recipe.model)(samples)
        self.last_keys = list(batch.get("keys", []))
        return batch

    def autocast(self):
        if not self.gpu:  # the trainer's own rule on this device (auto: fp32 on a CPU)
            return super().autocast()
        if self.recipe.train.mixed_precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def warm_optimizer(self) -> None:
        """Create the optimizer state as a first step would (one step on zero gradients)."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for p in params:
            p.grad = torch.zeros_like(p)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


@dataclass
class RankPlan:
    """One rank's planned step: bytes at the step's peak by category, FLOPs by phase."""

    rank: int
    peak: dict[str, float]  # params, grads, optim, buffers, activations, total (GPU memory)
    host: dict[str, float]  # host memory (EMA shadow, error-recycling bank)
    flops: dict[str, float]  # forward, recompute, backward (executed)
    tokens: int  # tokens this rank's model passes see in the step (one forward of the batch)
    trainable: int
    frozen: int
    notes: list[str] = field(default_factory=list)
    error: str | None = None  # the step failed on these shapes (the exception's first line)


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def _tracked_states(trainer) -> list[torch.Tensor]:
    """The EMA shadows (fp32, host memory): the trainer's and a method's own (DMD's LoRA)."""
    emas = [trainer.ema, getattr(trainer.method, "ema", None)]
    return [t for e in emas if isinstance(e, EMA) for t in e.shadow.values()]


def plan_rank(recipe: Recipe, world_size: int, rank: int, gpu: bool = True) -> RankPlan:
    """Build the recipe on rank `rank` of a fake world and run one steady-state training step.

    `gpu` False plans the step as it runs on this CPU (CPU attention, the trainer's autocast):
    what the tests compare with a measured step. A step that fails on these shapes is reported
    (`RankPlan.error`), not raised: that is what a plan is for."""
    recipe = plan_recipe(recipe, gpu)
    p = recipe.parallel
    _ATTN.keys_per_query = keys_per_query(recipe)[0]
    _ATTN.outside.update(forward=0.0, recompute=0.0, backward=0.0)
    torch.manual_seed(recipe.seed)
    world = fake_world(world_size, rank) if p.strategy != "none" else contextlib.nullcontext()
    kept = _deepspeed_state_kept() if p.strategy == "deepspeed" else contextlib.nullcontext()
    error = None
    with kept, world, fake_runtime(gpu) as runtime, _Phase.tracking():
        strategy = _PlanDeepSpeed(recipe, gpu) if p.strategy == "deepspeed" else make_strategy(recipe)
        strategy.setup()
        trainer = _PlanTrainer(recipe, strategy, gpu)
        mt = _StepMemTracker()
        flops = _StepFlops()
        with mt:
            with runtime.paused():
                trainer.build()
            model = strategy.unwrap(trainer.model)
            mt.track_external(model, trainer.optimizer)
            host = _tracked_states(trainer)
            if host:
                mt.track_external(*host)  # category "Other": host memory, apart from the GPU's
            trainer.warm_optimizer()
            gc.collect()  # what the build and the warm-up left in reference cycles (a first step's)
            base = mt.totals("current")
            mt.reset_peak()
            try:
                with flops:
                    trainer.method.train_step(trainer, 0)
            except PlanError:
                raise
            except Exception as e:  # the recipe's step fails on these shapes
                error = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
            peak = mt.totals("peak")
        trainable = [q for q in model.parameters() if q.requires_grad]
        frozen = [q for q in model.parameters() if not q.requires_grad]
        n_train, n_frozen = _numel(trainable), _numel(frozen)
        unit = max((_numel(b.parameters()) for b in getattr(model, "blocks", [])), default=0)
    gpu_bytes = {
        "params": peak.get("Parameter", 0) + peak.get("Buffer", 0),
        "grads": peak.get("Gradient", 0),
        "optim": peak.get("Optstate", 0),
        # persistent before the step: DDP's buckets, DeepSpeed's flat partitions
        "buffers": base.get("Activation", 0),
        "activations": peak.get("Activation", 0) + peak.get("Temp", 0) - base.get("Activation", 0),
    }
    gpu_bytes["total"] = sum(gpu_bytes.values())
    notes = []
    if p.strategy == "deepspeed":
        z = zero_states(p.zero_stage, n_train, n_frozen, world_size, unit)
        notes.append(
            f"DeepSpeed ZeRO-{p.zero_stage} engine run on fake tensors; ZeRO's formula for its model "
            f"states (vidtrain.plan.zero_states): {sum(z.values()) / GIB:.2f} GiB, the engine holds "
            f"{(gpu_bytes['total'] - gpu_bytes['activations']) / GIB:.2f} GiB (its flat fp32 partitions)"
        )
    phases = {k: flops.phases[k] + _ATTN.outside[k] for k in flops.phases}
    return RankPlan(
        rank, gpu_bytes, {"ema": peak.get("Other", 0), "error_bank": trainer.error_bank_bytes},
        phases, _forward_tokens(recipe),
        n_train, n_frozen, notes, error,
    )  # fmt: skip


def _forward_tokens(recipe: Recipe) -> int:
    """Tokens of one teacher-forcing forward of a rank's batch (clean + noisy copies)."""
    d = recipe.data
    return d.batch_size * 2 * d.frames * (d.height // 2) * (d.width // 2) // recipe.parallel.sp_size


# ---- the sampler -------------------------------------------------------------------------------


@dataclass
class SamplePlan:
    """The streaming sampler over `frames` latent frames: bytes at the peak, KV cache bytes."""

    config: SamplerConfig
    frames: int
    peak: dict[str, float]  # params, kv_cache, activations, total
    kv_per_chunk: list[int]  # cache bytes each chunk attended to (after eviction)
    flops: float
    error: str | None = None


class _PlanSampler(StreamingSampler):
    """The sampler, keeping its cache in reach (for the bytes it holds at the end)."""

    cache = None

    def new_cache(self, tokens_per_frame: int):
        self.cache = super().new_cache(tokens_per_frame)
        return self.cache


def plan_sample(
    recipe: Recipe, frames: int | None = None, overrides: dict | None = None, gpu: bool = True
) -> SamplePlan:
    """`vidtrain sample` of this recipe's checkpoints, planned: the model as the sampler loads
    it (NVFP4 / FP8 fake-quant when the recipe trains it so; bf16 weights as on a GPU), the
    settings `vidtrain sample` takes from the recipe (`SamplerConfig.from_run(bounded=True)`: a
    run without a window samples with the constant-memory default; `overrides`: flags), one sample of `frames`
    latent frames (default data.frames) streamed chunk by chunk with its text context."""
    recipe = plan_recipe(recipe, gpu)
    # as `vidtrain sample` takes them: a run without a window samples with the bounded default
    cfg = SamplerConfig.from_run(recipe, overrides=overrides, bounded=True)
    frames = frames or recipe.data.frames
    c = cfg.frames_per_chunk
    if frames % c:
        raise PlanError(f"--sample-frames {frames} is not a multiple of frames_per_chunk={c}")
    d = recipe.data
    _ATTN.keys_per_query = None
    with fake_runtime(gpu) as runtime, _Phase.tracking():
        with runtime.paused():
            model = build_model(recipe)
            if recipe.quantized:
                convert_for_recipe(model, recipe.quant, torch.device("cpu"))
        mt = _StepMemTracker()
        flops = _StepFlops()
        error = None
        with mt:
            with runtime.paused():
                model.to(torch.bfloat16 if gpu else torch.float32).eval().requires_grad_(False)
            mt.track_external(model)
            mt.reset_peak()
            sampler = _PlanSampler(model, cfg)
            cond = cfg.condition(torch.empty(1, recipe.model.text_len, model.cfg.text_dim))
            try:
                with flops, torch.no_grad():
                    out = sampler.generate_latents(cond, frames // c, (d.height, d.width), [recipe.seed])
                kv = out.kv_bytes_per_chunk
            except PlanError:
                raise
            except Exception as e:
                error, kv = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}", []
            peak = mt.totals("peak")
    cache = max(kv, default=0)
    params = peak.get("Parameter", 0) + peak.get("Buffer", 0)
    b = {"params": params, "kv_cache": cache, "activations": peak.get("Total", 0) - params - cache}
    b["total"] = sum(b.values())
    return SamplePlan(cfg, frames, b, kv, sum(flops.phases.values()), error)


# ---- the report --------------------------------------------------------------------------------


def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def describe_recipe(recipe: Recipe, world_size: int) -> list[str]:
    """The plan's first lines: what runs where, at which shapes."""
    p, m, d = recipe.parallel, recipe.model, recipe.data
    strategy = {"deepspeed": f"deepspeed ZeRO-{p.zero_stage}"}.get(p.strategy, p.strategy)
    dp = world_size // p.sp_size
    sp = f", sp {p.sp_size} ({p.sp_impl}, {p.layout} layout)" if p.sp_size > 1 else ""
    tpf = (d.height // 2) * (d.width // 2)
    video = d.frames * tpf
    base = f"{recipe.quant.format.upper()} fake-quant" if recipe.quantized else "high precision"
    return [
        f"method {recipe.method.name}, model {m.flavor} ({base}), {strategy} on {world_size} "
        f"rank{'s' if world_size > 1 else ''}: dp {dp}{sp}; "
        f"activation checkpointing {'on' if m.activation_checkpointing else 'off'}, "
        f"mixed precision {'fp32' if recipe.train.mixed_precision == 'fp32' else 'bf16'}",
        f"one sample: {d.frames} x {d.height} x {d.width} latents ({video:,} video tokens), {m.text_len} text "
        f"tokens; batch {d.batch_size} per data-parallel rank",
    ]


def format_plan(recipe: Recipe, world_size: int, plans: list[RankPlan], args) -> list[str]:
    limit = args.gpu_memory_gib * GIB
    lines = describe_recipe(recipe, world_size)
    first = plans[0]
    lines.append(f"parameters {_count(first.trainable + first.frozen)}, trainable {_count(first.trainable)}")
    cols = ("params", "grads", "optim", "buffers", "activations", "total")
    big = max(rp.peak["total"] for rp in plans) >= GIB / 4
    unit, div = ("GiB", GIB) if big else ("MiB", 2**20)
    head = f"{unit} per rank " + "".join(f"{c:>12s}" for c in cols) + f"   fits {args.gpu_memory_gib:g} GiB"
    lines.append(head)
    for rp in plans:
        if rp.error:
            lines.append(f"rank {rp.rank:<8d} the step FAILS: {rp.error}")
            continue
        fits = "yes" if rp.peak["total"] <= limit else f"NO (+{_gib(rp.peak['total'] - limit)} GiB)"
        lines.append(
            f"rank {rp.rank:<8d}" + "".join(f"{rp.peak[c] / div:>12.2f}" for c in cols) + f"   {fits}"
        )
    ok = [rp for rp in plans if not rp.error]
    if not ok:
        return lines
    rp = max(ok, key=lambda r: r.peak["total"])
    if rp.host["ema"]:
        lines.append(f"host memory per rank: EMA shadow {_gib(rp.host['ema'])} GiB (fp32, CPU)")
    if rp.host.get("error_bank"):
        lines.append(
            f"host memory per rank: error-recycling bank up to {_gib(rp.host['error_bank'])} GiB "
            "(every bucket full; its bookkeeping after the forward is not planned)"
        )
    f = rp.flops
    executed = sum(f.values())
    model_flops = executed - f["recompute"]
    lines.append(
        f"FLOPs per rank per step: {executed:.3e} executed (forward {f['forward']:.3e}, recompute "
        f"{f['recompute']:.3e}, backward {f['backward']:.3e}); model FLOPs {model_flops:.3e} (without recompute)"
    )
    kpq, frac = keys_per_query(recipe)
    lines.append(
        f"attention: the teacher-forcing mask allows {frac:.1%} of the query-key pairs ({kpq:,.0f} keys per "
        f"query); masked attention is counted by allowed pairs"
    )
    seconds = model_flops / (args.tflops * 1e12 * args.mfu)
    d = recipe.data
    video = (
        d.batch_size * (world_size // recipe.parallel.sp_size) * d.frames * (d.height // 2) * (d.width // 2)
    )
    lines.append(
        f"step time at {args.tflops:g} TFLOP/s x MFU {args.mfu:g}: {seconds:.2f} s; {video:,} video tokens per "
        f"step over all ranks ({video / seconds:,.0f} per s); {rp.tokens:,} tokens per rank per forward"
    )
    lines += [f"note: {n}" for n in rp.notes + _bridges(recipe) + [UNCOUNTED]]
    return lines


def _bridges(recipe: Recipe) -> list[str]:
    """What the plan ran in place of what a GPU runs (the module docstring has the list)."""
    notes = []
    kv_hook = recipe.quantized and recipe.quant.kv_fake_quant and recipe.method.name == "qat"
    if recipe.model.attn_backend in ("auto", "flash", "flex"):
        notes.append(
            "masked attention as on a GPU: FlexAttention (its footprint: output + log-sum-exp, no [L, L] "
            "mask)"
            + ("; QAT's KV fake-quant hook takes the dense-mask SDPA path, as on a GPU" if kv_hook else "")
        )
    if recipe.quantized and recipe.quant.backend == "triton":
        notes.append("quant.backend triton planned as its torch emulation (same arithmetic, more transients)")
    return notes


def format_sample(recipe: Recipe, sp: SamplePlan, args) -> list[str]:
    c, d = sp.config, recipe.data
    window = "all history" if c.window_frames is None else f"window {c.window_frames} frames"
    sinks = f", sink {c.sink_frames} frames" if c.sink_frames else ""
    shot = ", shot sink" if c.shot_sink else ""
    base = f"{recipe.quant.format.upper()} fake-quant" if recipe.quantized else "high precision"
    lines = [
        f"sampler: model {recipe.model.flavor} ({base}, bf16 weights), {sp.frames} latent frames of "
        f"{d.height} x {d.width} in chunks of {c.frames_per_chunk}, {len(c.timesteps)} steps per chunk; "
        f"KV cache {c.kv_cache}, {window}{sinks}{shot}"
    ]
    if sp.error:
        return [*lines, f"the sampler FAILS: {sp.error}"]
    limit = args.gpu_memory_gib * GIB
    b = sp.peak
    fits = "yes" if b["total"] <= limit else f"NO (+{_gib(b['total'] - limit)})"
    lines.append(
        f"GiB: params {_gib(b['params'])}, KV cache {_gib(b['kv_cache'])} (the most any chunk attended to), "
        f"activations {_gib(b['activations'])}, peak {_gib(b['total'])}; fits {args.gpu_memory_gib:g} GiB: {fits}"
    )
    seconds = sp.flops / (args.tflops * 1e12 * args.mfu)
    lines.append(
        f"FLOPs {sp.flops:.3e} for the video: {seconds:.2f} s at {args.tflops:g} TFLOP/s x MFU {args.mfu:g} "
        "(the DiT only; VAE decode not included)"
    )
    return [*lines, f"note: {UNCOUNTED}"]


def _quiet() -> None:
    """The plan's report only: the step's warnings (dtype fallbacks of CPU kernels, DeepSpeed's
    notes about its accelerator) say nothing about the GPU run being planned."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # spawned rank processes too
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _ranks(spec: str, world_size: int) -> list[int]:
    if spec == "all":
        return list(range(world_size))
    try:
        ranks = sorted({int(r) for r in spec.split(",")})
    except ValueError:
        raise PlanError(f"--ranks must be 'all' or a comma-separated list of ranks, got {spec!r}") from None
    bad = [r for r in ranks if not 0 <= r < world_size]
    if bad:
        raise PlanError(f"--ranks {bad} outside the world of {world_size} ranks")
    return ranks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="vidtrain plan",
        description="Plan a recipe's memory and step time at its real shapes on fake tensors (no GPU, "
        "nothing allocated): one training step (or --sample: the streaming sampler) per rank.",
    )
    ap.add_argument("recipe", help="recipe YAML (see recipes/)")
    ap.add_argument(
        "overrides", nargs="*",
        help="key.sub=value overrides; the sample's latent shape is data.frames / data.height / data.width",
    )  # fmt: skip
    ap.add_argument("--world-size", type=int, default=None, help="ranks (default: parallel.sp_size)")
    ap.add_argument("--ranks", default="0", help="ranks to plan: a list (0,3) or all (default: %(default)s)")
    ap.add_argument(
        "--tflops",
        type=float,
        default=H100["tflops"],
        help="peak TFLOP/s, H100 bf16 dense (default: %(default)s)",
    )
    ap.add_argument(
        "--mfu", type=float, default=H100["mfu"], help="model FLOPs utilisation (default: %(default)s)"
    )
    ap.add_argument(
        "--gpu-memory-gib",
        type=float,
        default=H100["gpu_memory_gib"],
        help="GPU memory in GiB (default: %(default)s)",
    )
    ap.add_argument("--sample", action="store_true", help="plan the streaming sampler instead of training")
    ap.add_argument(
        "--sample-frames", type=int, default=None, help="latent frames to stream (default data.frames)"
    )
    ap.add_argument(
        "--kv-cache", default=None, help="sampler KV format (default: as vidtrain sample takes it)"
    )
    ap.add_argument("--window-frames", default=None, help="sampler window in latent frames, or none")
    ap.add_argument("--sink-frames", type=int, default=None, help="sampler global sink in latent frames")
    args = ap.parse_args(argv)
    _quiet()
    for name in ("tflops", "mfu", "gpu_memory_gib"):
        if not 0 < getattr(args, name) < math.inf:
            raise PlanError(f"--{name.replace('_', '-')} must be a finite number > 0")
    recipe = load_recipe(args.recipe, args.overrides)
    print(f"[vidtrain] plan of {args.recipe} {' '.join(args.overrides)}".rstrip())
    if args.sample:
        overrides = {}
        if args.kv_cache is not None:
            overrides["kv_cache"] = args.kv_cache
        if args.window_frames is not None:
            overrides["window_frames"] = None if args.window_frames == "none" else int(args.window_frames)
        if args.sink_frames is not None:
            overrides["sink_frames"] = args.sink_frames
        sp = plan_sample(recipe, args.sample_frames, overrides)
        for line in format_sample(recipe, sp, args):
            print(line)
        return 1 if sp.error else 0
    world = args.world_size or recipe.parallel.sp_size
    if world < 1:
        raise PlanError(f"--world-size must be >= 1, got {world}")
    if recipe.parallel.strategy == "none" and world != 1:
        raise PlanError(
            f"parallel.strategy none runs one process: --world-size {world} needs ddp, fsdp or deepspeed"
        )
    plans = [plan_rank(recipe, world, r) for r in _ranks(args.ranks, world)]
    for line in format_plan(recipe, world, plans, args):
        print(line)
    return 1 if any(rp.error for rp in plans) else 0


if __name__ == "__main__":
    sys.exit(main())
