"""The streaming sampler's KV cache: sinks + rolling window, stored dense, as NVFP4 or as FP8.

The set of history frames a query chunk may see is the training mask's
(`vidtrain.tokens.MaskRule`): for query chunk c with C frames per chunk,
    frame >= c*C - W   (rolling window, W = window_frames; None = all history)
    frame <  G         (global sink, G = sink_frames)
    chunk == first chunk of the query's shot   (shot sink, if shot_sink)
`visible_frames` is that rule; the cache keeps exactly the chunks that still hold a visible
frame and hands the attention only the visible frames' tokens, so no mask is needed (flash
attention stays usable) and sampler and teacher forcing agree token for token.

Storage is per layer and per chunk block (K and V of one chunk, [B, H, Lc, D]):
    "fp32" / "bf16" / "fp16": dense tensors;
    "nvfp4": packed E2M1 codes + E4M3 scales (16 along D) with one fp32 amax per
             (batch, head, chunk block) (`quantize_blocks(block, group_dims=(0, 1))`: per head, so
             head-sharded sequence parallelism quantizes identically). Written and read through
             the `vidtrain.kernels` dispatcher (backend `NVFP4_BACKEND`, "auto": the Triton kernels
             on CUDA, the torch reference elsewhere; every backend gives the same bytes), all
             blocks of a layer dequantized in one call (`dequantize_kv_blocks`). The block-scale
             rule (`scale_rule`, `vidtrain sample --kv-scale-rule`): "amax" (the chain, default)
             or "mse" (per 16 elements the E4M3 scale of least squared error among 8 candidate
             codes, `nvfp4.mse_block_scales`): the same bytes per block and the same dequantizer;
             "mse" writes through the torch reference on every backend (no Triton kernel of the
             search yet; reads still go through the dispatcher);
    "fp8":   float8_e4m3fn codes with one fp32 scale per (batch, head, chunk block)
             (`vidtrain.formats.fp8`: scale = 448 / amax of the block's tokens and head_dim),
             1 byte per element plus 4 bytes per (batch, head) of a block; per head as NVFP4, so
             head-sharded sampling stores the same bytes. Torch arithmetic on every device.
Keys arrive already rotated (RoPE applied inside the attention), so cached keys keep the
positions they were written with. Under multi-rank sampling (parallel_sample.py) the hook runs
inside the Ulysses wrapper, so each rank's cache sees, stores and reads only its H/N heads: every
format's blocks of a head are then the one-process cache's bytes of that head.

Memory layout. With a window (`rule.restricted`) the number of chunks a query can ever see is
bounded (`history_slots`: the window's chunks, the sink chunks, the shot sink, plus the chunk
being written), so each layer's K and V live in one preallocated buffer of that many chunk
slots, allocated at the first write and reused in place (a ring of slots: a dropped chunk frees
its slot): storage never grows with video length and stays at fixed addresses (what a captured
CUDA graph reads). Under `torch.no_grad` (sampling) the history and the current chunk's K/V are
gathered into one workspace shared by all layers instead of a fresh `torch.cat` per layer and
pass. Without a window the history is unbounded and the slots grow as chunks arrive. Either
way the values, their order and so the attention output are bit-identical to gathering the
visible blocks and concatenating them.

Writes are in place: a chunk's K/V are quantized straight into its slot's storage
(`nvfp4_quantize_into`: the Triton kernel on the slot, or the torch reference's chain with its
results landing there; `fp8_quantize_into`; dense: one casting copy), the same bytes as the
quantizers. Static mode (`static=True`, with a window; `vidtrain sample --compile`): every pass
without autograd gets K/V of one length, [visible history | padding | the chunk's tokens] with
the history padded to the slots' capacity, and a bool key mask [1, Lk] that hides the padding,
so a compiled (CUDA-graph) forward sees one shape per chunk shape from the first chunk on. The
exact mode (the default) hands no mask and stays bit-identical to the gather-and-cat reference.

Legend: B batch, H heads, L tokens, Lc tokens of one chunk, D head dim, F frames.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from vidtrain.formats import fp8, kv2, nvfp4
from vidtrain.tokens import MaskRule

try:  # installed from kernels/ by setup.py; a bare source tree has no vidtrain.kernels
    from vidtrain import kernels
except ImportError:  # pragma: no cover
    kernels = None

KV_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "nvfp4": None, "fp8": None,
             "kv2": None}  # fmt: skip
KV_SCALE_RULES = nvfp4.SCALE_RULES  # the NVFP4 cache's block-scale rules ("amax", "mse")


class FP8Block(NamedTuple):
    """One FP8 K or V block: e4m3 codes [..., B, H, Lc, D] and fp32 scales [..., B, H, 1, 1]."""

    data: torch.Tensor
    scale: torch.Tensor


def fp8_quantize_block(t_BHLD: torch.Tensor) -> FP8Block:
    """A [B, H, Lc, D] block as the FP8 cache stores it: one scale per (batch, head)."""
    q, s = fp8.quantize(t_BHLD, dims=(2, 3))
    return FP8Block(q, s)


def fp8_dequantize(block: FP8Block, dtype: torch.dtype) -> torch.Tensor:
    return fp8.dequantize(block.data, block.scale, dtype)


def fp8_quantize_into(t_BHLD: torch.Tensor, data_u8: torch.Tensor, scale_BH11: torch.Tensor) -> None:
    """`fp8_quantize_block(t)` written into preallocated storage: e4m3 codes (as bytes) into
    `data_u8` [B, H, Lc, D], the fp32 scale into `scale_BH11`; the same bytes."""
    scale_BH11.copy_(fp8.scale_from_amax(fp8.amax(t_BHLD, (2, 3))))
    m = fp8.f8_max(fp8.E4M3)
    data_u8.view(fp8.E4M3).copy_((t_BHLD.detach().float() * scale_BH11).clamp(-m, m))


def nvfp4_quantize_into(
    t_BHLD: torch.Tensor,
    data: torch.Tensor,
    scales_u8: torch.Tensor,
    amax_BH11: torch.Tensor,
    backend: str = "torch",
    scale_rule: str = "amax",
) -> None:
    """`quantize_blocks(t, group_dims=(0, 1), scale_rule=scale_rule)` written into preallocated
    storage: packed E2M1 codes into `data` [B, H, Lc, D/2], E4M3 scales (as bytes) into
    `scales_u8` [B, H, Lc, D/16], the fp32 amax per (batch, head) into `amax_BH11`; the same
    bytes as the quantizer.

    "amax": through `vidtrain.kernels.quantize_with_amax(..., out=)`: a Triton backend's kernel
    writes the slot's storage and allocates no output; the torch reference computes its chain and
    copies the result in (torch has no fused form of the chain). "mse": the torch reference's
    chain with its scale search on every backend (on the tensor's device), copied in."""
    x = t_BHLD.detach()
    nvfp4.check_last_dim(x)
    nvfp4.check_scale_rule(scale_rule)
    if kernels is None or scale_rule != "amax":
        amax = nvfp4.group_amax(x, (0, 1)) if kernels is None else kernels.abs_amax(x.contiguous(), (0, 1))
        amax_BH11.copy_(amax)
        q = nvfp4.quantize_with_amax(x, amax_BH11, scale_rule=scale_rule)
        data.copy_(q.data)
        scales_u8.copy_(q.scales.view(torch.uint8))
        return
    amax_BH11.copy_(kernels.abs_amax(x.contiguous(), (0, 1)))
    kernels.quantize_with_amax(x, amax_BH11, backend=backend, out=(data, scales_u8))


def visible_frames(rule: MaskRule, chunk: int, shot_start_chunk: int, frames: torch.Tensor) -> torch.Tensor:
    """Bool per history frame (frames < chunk*C): may query chunk `chunk` attend to it?"""
    c = rule.frames_per_chunk
    hist = frames < chunk * c
    if not rule.restricted:
        return hist
    keep = (frames >= chunk * c - rule.window_frames) | (frames < rule.sink_frames)
    if rule.shot_sink:
        keep |= torch.div(frames, c, rounding_mode="floor") == shot_start_chunk
    return hist & keep


def history_slots(rule: MaskRule) -> int | None:
    """Chunk slots a cache under `rule` ever holds at once (None: unbounded history). The
    visible history of chunk c is the window's frames [cC - W, cC) (ceil(W/C) chunks), the sink
    frames [0, G) (ceil(G/C) chunks) and the shot's first chunk; the chunk being stored is one
    more until the next chunk begins."""
    if not rule.restricted:
        return None
    c = rule.frames_per_chunk
    return math.ceil(rule.window_frames / c) + math.ceil(rule.sink_frames / c) + int(rule.shot_sink) + 1


class _Slots:
    """One layer's K and V storage: a preallocated buffer of chunk slots per stored tensor
    (dense K/V, or NVFP4 codes, scales as bytes and amax), written in place."""

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self.slot: dict[int, int] = {}  # chunk -> slot
        self.free: list[int] = []
        self.bufs: list[list[torch.Tensor]] | None = None  # [K parts, V parts], leading dim = slot
        self.meta: list[tuple] = []  # NVFP4: (shape, dtype, tile_2d) of K and V blocks
        self.views: dict[int, tuple] = {}  # chunk -> (K, V) views of its slot

    def __contains__(self, chunk: int) -> bool:
        return chunk in self.slot

    def __len__(self) -> int:
        return len(self.slot)

    def __iter__(self):
        return iter(self.chunks())

    def chunks(self) -> list[int]:
        return sorted(self.slot)

    def __getitem__(self, chunk: int) -> tuple:
        """(K, V) block of one stored chunk: views of its slot (a mapping view of the storage)."""
        return self.views[chunk]

    def _view(self, which: int, slot: int):
        parts = [b[slot] for b in self.bufs[which]]
        if not self.meta:
            return parts[0]
        if self.meta[which] == "fp8":
            return FP8Block(parts[0].view(fp8.E4M3), parts[1])
        if self.meta[which][0] == "kv2":
            return kv2.KV2Tensor(*parts, *self.meta[which][1:])
        shape, dtype, tile_2d = self.meta[which]
        return nvfp4.NVFP4Tensor(
            parts[0], parts[1].view(torch.float8_e4m3fn), parts[2], shape, dtype, tile_2d
        )

    def drop(self, chunk: int) -> None:
        self.free.append(self.slot.pop(chunk))
        del self.views[chunk]

    def clear(self) -> None:
        self.free += self.slot.values()
        self.slot.clear()
        self.views.clear()

    @staticmethod
    def _parts(t) -> list[torch.Tensor]:
        if isinstance(t, nvfp4.NVFP4Tensor):
            return [t.data, t.scales.view(torch.uint8), t.amax.float()]
        if isinstance(t, FP8Block):
            return [t.data.view(torch.uint8), t.scale.float()]
        if isinstance(t, kv2.KV2Tensor):
            return [t.codes, t.sigma, t.scale, t.index, t.centroids]
        return [t]

    @staticmethod
    def spec(t: torch.Tensor) -> tuple:
        return (tuple(t.shape), t.dtype, t.device)

    def _grow(self, like: list[list[tuple]], n: int) -> None:
        """Room for `n` more slots (all at once when the capacity is known); `like`: (shape,
        dtype, device) of each stored part of K and of V."""
        new = [[torch.empty((n, *shape), dtype=dt, device=dev) for shape, dt, dev in parts] for parts in like]
        if self.bufs is None:
            self.bufs = new
        else:  # unbounded history: the buffers grow, the stored chunks' views follow
            self.bufs = [[torch.cat([b, x]) for b, x in zip(bs, xs)] for bs, xs in zip(self.bufs, new)]
            self.views = {j: (self._view(0, s), self._view(1, s)) for j, s in self.slot.items()}
        start = len(self.slot) + len(self.free)
        self.free += range(start, start + n)

    def take(self, chunk: int, like: list[list[tuple]], meta: list | None = None) -> list[list[torch.Tensor]]:
        """The storage of a fresh slot for `chunk`: per K and V, one tensor per stored part with
        `like`'s (shape, dtype, device) (NVFP4: codes, scales as bytes, fp32 amax; FP8: codes as
        bytes, fp32 scale), to be filled in place. `meta` as `self.meta` (NVFP4 / FP8; None:
        dense)."""
        if not self.meta and meta:
            self.meta = meta
        if not self.free:
            if self.bufs is not None and self.capacity is not None:
                raise RuntimeError(f"KV cache: all {self.capacity} slots in use (a bookkeeping bug)")
            self._grow(like, self.capacity or max(1, len(self.slot)))  # unbounded: doubling
        slot = self.free.pop(0)
        self.slot[chunk] = slot
        self.views[chunk] = (self._view(0, slot), self._view(1, slot))
        return [[b[slot] for b in bufs] for bufs in self.bufs]

    def write(self, chunk: int, k, v) -> None:
        """Store finished blocks (dense, NVFP4Tensor, FP8Block or KV2Tensor) by copying them into a slot."""
        parts = [self._parts(k), self._parts(v)]
        meta = None
        if isinstance(k, nvfp4.NVFP4Tensor):
            meta = [(t.shape, t.dtype, t.tile_2d) for t in (k, v)]
        elif isinstance(k, FP8Block):
            meta = ["fp8", "fp8"]
        elif isinstance(k, kv2.KV2Tensor):
            meta = [("kv2", t.shape, t.dtype) for t in (k, v)]
        like = [[self.spec(p) for p in ps] for ps in parts]
        for dst, ps in zip(self.take(chunk, like, meta), parts):
            for b, p in zip(dst, ps):
                b.copy_(p)

    def read(self, chunks: list[int], which: int):
        """Stacked blocks of `chunks` (in that order) of K (`which` 0) or V (1): a dense
        [n, B, H, Lc, D] tensor, or a stacked NVFP4Tensor (what `dequantize_kv_blocks` takes)."""
        idx = torch.tensor([self.slot[j] for j in chunks], device=self.bufs[which][0].device)
        parts = [b.index_select(0, idx) for b in self.bufs[which]]
        if not self.meta:
            return parts[0]
        if self.meta[which] == "fp8":
            return FP8Block(parts[0].view(fp8.E4M3), parts[1])
        if self.meta[which][0] == "kv2":
            _, shape, dtype = self.meta[which]
            return kv2.KV2Tensor(*parts, torch.Size((len(chunks), *shape)), dtype)
        shape, dtype, tile_2d = self.meta[which]
        return nvfp4.NVFP4Tensor(
            parts[0],
            parts[1].view(torch.float8_e4m3fn),
            parts[2],
            torch.Size((len(chunks), *shape)),
            dtype,
            tile_2d,
        )

    def nbytes(self) -> int:
        """Bytes of the stored chunks (NVFP4: codes + e4m3 scales + fp32 amax; FP8: e4m3 codes +
        fp32 scales)."""
        if self.bufs is None:
            return 0
        per_slot = sum(b[0].numel() * b.element_size() for bufs in self.bufs for b in bufs)
        return per_slot * len(self.slot)


# vidtrain.kernels backend of the NVFP4 KV write and read ("auto", "torch", "triton", "interpret")
NVFP4_BACKEND = "auto"


def _nvfp4_ops(backend: str, scale_rule: str = "amax") -> tuple[Callable, Callable]:
    """(quantize a [B, H, Lc, D] block, dequantize a list of blocks) through vidtrain.kernels when
    present (Triton on CUDA under "auto"), else the torch reference (the same bytes); the "mse"
    scale rule quantizes with the torch reference on every backend."""
    if kernels is None:  # pragma: no cover - kernels are part of the installed package
        return (
            lambda t: nvfp4.quantize_blocks(t, group_dims=(0, 1), scale_rule=scale_rule),
            lambda blocks, dtype: torch.stack([nvfp4.dequantize(b, dtype) for b in blocks]),
        )
    if scale_rule != "amax":
        quant = lambda t: nvfp4.quantize_blocks(t, group_dims=(0, 1), scale_rule=scale_rule)  # noqa: E731
    else:
        quant = lambda t: kernels.quantize_blocks(t, (0, 1), backend=backend)  # noqa: E731
    return (
        quant,
        lambda blocks, dtype: kernels.dequantize_kv_blocks(blocks, dtype, backend=backend),
    )


class KVCache:
    """Per-layer K/V of the retained clean chunks; plugs into `AttentionContext.kv_hook`.

    Protocol per chunk (the sampler drives it): `begin(chunk, shot, write=False)` before the
    denoising passes (they read history), `begin(chunk, shot, write=True)` before the clean pass
    at t=0 (it reads history and stores its own K/V).
    """

    def __init__(
        self,
        num_layers: int,
        rule: MaskRule,
        tokens_per_frame: int,
        kv_dtype: str = "bf16",
        nvfp4_backend: str | None = None,
        static: bool = False,
        scale_rule: str = "amax",
    ) -> None:
        """`nvfp4_backend`: a `vidtrain.kernels` backend for kv_dtype "nvfp4" (None: NVFP4_BACKEND).
        `static`: with a window, every pass without autograd gets K/V of one fixed length, the
        history padded to the slots' capacity, and a key mask (see `hook`). `scale_rule`: the
        NVFP4 block-scale rule, "amax" | "mse" (see the module docstring; other formats ignore it)."""
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"unknown KV cache dtype {kv_dtype!r}; known: {', '.join(KV_DTYPES)}")
        nvfp4.check_scale_rule(scale_rule)
        self.scale_rule = scale_rule
        self.rule, self.kv_dtype = rule, kv_dtype
        self.tokens_per_frame = tokens_per_frame
        self.capacity = history_slots(rule)
        self.chunk_tokens = rule.frames_per_chunk * tokens_per_frame if rule.frames_per_chunk else 0
        self.layers: list[_Slots] = [_Slots(self.capacity) for _ in range(num_layers)]
        self.shot_start: dict[int, int] = {}
        self.chunk, self.shot, self.write = 0, 0, False
        self._history: list[int] = []
        self._token_idx: dict[int, torch.Tensor] = {}  # partly visible chunk -> its visible tokens
        self._workspace: dict[tuple, torch.Tensor] = {}  # (which, dtype, device) -> shared buffer
        self.static = static and self.capacity is not None
        self._history_tokens = 0  # visible history tokens of the current chunk
        self._key_mask: dict[tuple, torch.Tensor] = {}  # (device, length) -> static key mask [1, Lk]
        self.nvfp4_backend = nvfp4_backend or NVFP4_BACKEND
        self._quant, self._dequant = _nvfp4_ops(self.nvfp4_backend, scale_rule)

    # ---- bookkeeping ---------------------------------------------------------------------------
    @property
    def chunks(self) -> list[int]:
        return self.layers[0].chunks()

    def begin(self, chunk: int, shot: int, write: bool = False) -> None:
        """Set the query chunk; pin a new shot's first chunk; drop chunks nothing can see again."""
        self.shot_start.setdefault(shot, chunk)
        self.chunk, self.shot, self.write = chunk, shot, write
        for j in [j for j in self.chunks if j >= chunk or not self._visible(j).any()]:
            for layer in self.layers:
                layer.drop(j)
        self._history = self.chunks  # what every layer's pass of this chunk reads
        self._token_idx = {}
        for j in self._history:
            vis = self._visible(j)
            if not vis.all():  # partly visible block (window edge or sink inside a chunk)
                self._token_idx[j] = torch.nonzero(vis.repeat_interleave(self.tokens_per_frame)).squeeze(1)
        self._history_tokens = sum(
            len(self._token_idx[j]) if j in self._token_idx else self.chunk_tokens for j in self._history
        )

    def _visible(self, j: int) -> torch.Tensor:
        c = self.rule.frames_per_chunk
        frames = torch.arange(j * c, (j + 1) * c)
        return visible_frames(self.rule, self.chunk, self.shot_start[self.shot], frames)

    def clear(self) -> None:
        for layer in self.layers:
            layer.clear()
        self._history = []
        self._token_idx = {}

    def nbytes(self) -> int:
        """Bytes held by all layers' K/V (NVFP4: codes + e4m3 scales + fp32 amax; FP8: e4m3
        codes + one fp32 scale per (batch, head) of a block)."""
        return sum(layer.nbytes() for layer in self.layers)

    # ---- storage -------------------------------------------------------------------------------
    def _write(self, layer: _Slots, k_BHLD: torch.Tensor, v_BHLD: torch.Tensor) -> None:
        """Store this chunk's K and V into a fresh slot of `layer`, quantized straight into the
        slot's storage (dense: one copy with the cast)."""
        b, h, n, d = k_BHLD.shape
        dev = k_BHLD.device
        if self.kv_dtype == "nvfp4":
            nvfp4.check_last_dim(k_BHLD)
            if kernels is not None:  # an unknown backend fails before a slot is taken
                kernels.resolve_backend(self.nvfp4_backend, dev)
            spec = [((b, h, n, d // 2), torch.uint8, dev), ((b, h, n, d // nvfp4.BLOCK), torch.uint8, dev),
                    ((b, h, 1, 1), torch.float32, dev)]  # fmt: skip
            meta = [(t.shape, t.dtype, False) for t in (k_BHLD, v_BHLD)]
        elif self.kv_dtype == "fp8":
            spec = [((b, h, n, d), torch.uint8, dev), ((b, h, 1, 1), torch.float32, dev)]
            meta = ["fp8", "fp8"]
        elif self.kv_dtype == "kv2":  # quantized by the reference (its k-means), then copied in
            layer.write(self.chunk, kv2.quantize(k_BHLD), kv2.quantize(v_BHLD))
            return
        else:
            spec, meta = [((b, h, n, d), KV_DTYPES[self.kv_dtype], dev)], None
        for t, parts in zip((k_BHLD, v_BHLD), layer.take(self.chunk, [spec, spec], meta)):
            if self.kv_dtype == "nvfp4":
                nvfp4_quantize_into(t, *parts, backend=self.nvfp4_backend, scale_rule=self.scale_rule)
            elif self.kv_dtype == "fp8":
                fp8_quantize_into(t, *parts)
            else:
                parts[0].copy_(t.detach())

    def _read(
        self, layer: _Slots, chunks: list[int], dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V blocks of `chunks`, stacked [n, B, H, Lc, D] in `dtype` (NVFP4: all the
        layer's blocks in one dequantize call)."""
        if self.kv_dtype == "fp8":
            return fp8_dequantize(layer.read(chunks, 0), dtype), fp8_dequantize(layer.read(chunks, 1), dtype)
        if self.kv_dtype == "kv2":  # the layer's blocks in one dequantize (the Triton kernel on CUDA)
            deq = kv2.dequantize if kernels is None else kernels.kv2.dequantize
            kw = {} if kernels is None else {"backend": self.nvfp4_backend}
            return deq(layer.read(chunks, 0), dtype, **kw), deq(layer.read(chunks, 1), dtype, **kw)
        if self.kv_dtype != "nvfp4":
            return layer.read(chunks, 0).to(dtype), layer.read(chunks, 1).to(dtype)
        k, v = layer.read(chunks, 0), layer.read(chunks, 1)
        out = self._dequant([k, v], dtype)  # [2, n, B, H, Lc, D]
        return out[0], out[1]

    def _gather(self, which: int, blocks: torch.Tensor, chunks: list[int], cur: torch.Tensor) -> torch.Tensor:
        """[visible history tokens | the current chunk's] along L. Without autograd, written into
        a workspace shared by every layer (one buffer per K/V and dtype, grown to the largest
        history); with it, a concatenation the graph can keep."""
        pieces = [
            blocks[i].index_select(2, self._token_idx[j].to(blocks.device))
            if j in self._token_idx
            else blocks[i]
            for i, j in enumerate(chunks)
        ]
        pieces.append(cur)
        if torch.is_grad_enabled():
            return torch.cat(pieces, dim=2)
        n = sum(p.shape[2] for p in pieces)
        key = (which, cur.dtype, cur.device)
        ws = self._workspace.get(key)
        b, h, _, d = cur.shape
        if ws is None or ws.shape[2] < n or ws.shape[0] != b or ws.shape[1] != h or ws.shape[3] != d:
            # with a window: room for the most history the rule allows, once (a fixed address)
            most = n if self.capacity is None else (self.capacity - 1) * self.chunk_tokens + cur.shape[2]
            ws = self._workspace[key] = torch.empty(
                (b, h, max(n, most), d), dtype=cur.dtype, device=cur.device
            )
        off = 0
        for p in pieces:
            ws[:, :, off : off + p.shape[2]].copy_(p)
            off += p.shape[2]
        return ws[:, :, :n]

    def _gather_static(self, which: int, blocks, chunks: list[int], cur: torch.Tensor) -> torch.Tensor:
        """[visible history | padding | the current chunk's] along L in the shared workspace,
        (capacity - 1) * chunk tokens + the chunk's long whatever the history holds. The padding
        keeps what earlier passes left there (finite values; zeros at first), masked out."""
        b, h, lq, d = cur.shape
        n = (self.capacity - 1) * self.chunk_tokens + lq
        key = (which, cur.dtype, cur.device)
        ws = self._workspace.get(key)
        if ws is None or tuple(ws.shape) != (b, h, n, d):
            ws = self._workspace[key] = torch.zeros((b, h, n, d), dtype=cur.dtype, device=cur.device)
        off = 0
        for i, j in enumerate(chunks):
            if j in self._token_idx:
                idx = self._token_idx[j].to(blocks.device)
                torch.index_select(blocks[i], 2, idx, out=ws[:, :, off : off + len(idx)])
                off += len(idx)
            else:
                ws[:, :, off : off + blocks.shape[3]].copy_(blocks[i])
                off += blocks.shape[3]
        ws[:, :, n - lq :].copy_(cur)
        return ws

    def key_mask(self, lq: int, device: torch.device) -> torch.Tensor:
        """Static mode's bool key mask [1, Lk] (True = attend): the visible history and the
        current chunk's `lq` tokens; one buffer per (device, length), refilled in place."""
        n = (self.capacity - 1) * self.chunk_tokens + lq
        mask = self._key_mask.get((device, n))
        if mask is None:
            mask = self._key_mask[(device, n)] = torch.zeros((1, n), dtype=torch.bool, device=device)
        mask.fill_(False)
        mask[:, : self._history_tokens] = True
        mask[:, n - lq :] = True
        return mask

    def hook(self, layer_idx: int, q_BHLD, k_BHLD, v_BHLD, ctx) -> tuple:
        """kv_hook: prepend the visible history to this chunk's K/V; store them on the clean pass.

        Static mode without autograd: K/V of fixed length (the history padded to the window's
        capacity) and the key mask that hides the padding; otherwise exactly the visible tokens
        and no mask."""
        layer = self.layers[layer_idx]
        chunks = self._history
        mask = None
        if self.static and not torch.is_grad_enabled():
            hk = hv = None
            if chunks:
                hk, hv = self._read(layer, chunks, k_BHLD.dtype)
            k_out = self._gather_static(0, hk, chunks, k_BHLD)
            v_out = self._gather_static(1, hv, chunks, v_BHLD)
            mask = self.key_mask(k_BHLD.shape[2], k_BHLD.device)
        elif chunks:
            hk, hv = self._read(layer, chunks, k_BHLD.dtype)
            k_out, v_out = self._gather(0, hk, chunks, k_BHLD), self._gather(1, hv, chunks, v_BHLD)
        else:
            k_out, v_out = k_BHLD, v_BHLD
        if self.write:
            self._write(layer, k_BHLD, v_BHLD)
        return k_out, v_out, mask
