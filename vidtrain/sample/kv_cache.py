"""The streaming sampler's KV cache: sinks + rolling window, stored dense or as NVFP4.

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
             blocks of a layer dequantized in one call (`dequantize_kv_blocks`).
Keys arrive already rotated (RoPE applied inside the attention), so cached keys keep the
positions they were written with.

Legend: B batch, H heads, L tokens, Lc tokens of one chunk, D head dim, F frames.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vidtrain.formats import nvfp4
from vidtrain.tokens import MaskRule

try:  # installed from kernels/ by setup.py; a bare source tree has no vidtrain.kernels
    from vidtrain import kernels
except ImportError:  # pragma: no cover
    kernels = None

KV_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "nvfp4": None}


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


# vidtrain.kernels backend of the NVFP4 KV write and read ("auto", "torch", "triton", "interpret")
NVFP4_BACKEND = "auto"


def _nvfp4_ops(backend: str) -> tuple[Callable, Callable]:
    """(quantize a [B, H, Lc, D] block, dequantize a list of blocks) through vidtrain.kernels when
    present (Triton on CUDA under "auto"), else the torch reference (the same bytes)."""
    if kernels is None:  # pragma: no cover - kernels are part of the installed package
        return (
            lambda t: nvfp4.quantize_blocks(t, group_dims=(0, 1)),
            lambda blocks, dtype: torch.stack([nvfp4.dequantize(b, dtype) for b in blocks]),
        )
    return (
        lambda t: kernels.quantize_blocks(t, (0, 1), backend=backend),
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
    ) -> None:
        """`nvfp4_backend`: a `vidtrain.kernels` backend for kv_dtype "nvfp4" (None: NVFP4_BACKEND)."""
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"unknown KV cache dtype {kv_dtype!r}; known: {', '.join(KV_DTYPES)}")
        self.rule, self.kv_dtype = rule, kv_dtype
        self.tokens_per_frame = tokens_per_frame
        self.layers: list[dict[int, tuple]] = [{} for _ in range(num_layers)]
        self.shot_start: dict[int, int] = {}
        self.chunk, self.shot, self.write = 0, 0, False
        self._history: list[int] = []
        self.nvfp4_backend = nvfp4_backend or NVFP4_BACKEND
        self._quant, self._dequant = _nvfp4_ops(self.nvfp4_backend)

    # ---- bookkeeping ---------------------------------------------------------------------------
    @property
    def chunks(self) -> list[int]:
        return sorted(self.layers[0])

    def begin(self, chunk: int, shot: int, write: bool = False) -> None:
        """Set the query chunk; pin a new shot's first chunk; drop chunks nothing can see again."""
        self.shot_start.setdefault(shot, chunk)
        self.chunk, self.shot, self.write = chunk, shot, write
        for j in [j for j in self.chunks if j >= chunk or not self._visible(j).any()]:
            for layer in self.layers:
                layer.pop(j, None)
        self._history = self.chunks  # what every layer's pass of this chunk reads

    def _visible(self, j: int) -> torch.Tensor:
        c = self.rule.frames_per_chunk
        frames = torch.arange(j * c, (j + 1) * c)
        return visible_frames(self.rule, self.chunk, self.shot_start[self.shot], frames)

    def clear(self) -> None:
        for layer in self.layers:
            layer.clear()
        self._history = []

    def nbytes(self) -> int:
        """Bytes held by all layers' K/V (NVFP4: codes + e4m3 scales + fp32 amax)."""
        total = 0
        for layer in self.layers:
            for kv in layer.values():
                for t in kv:
                    if isinstance(t, nvfp4.NVFP4Tensor):
                        total += t.nbytes() + t.amax.numel() * 4
                    else:
                        total += t.numel() * t.element_size()
        return total

    # ---- storage -------------------------------------------------------------------------------
    def _store(self, t_BHLD: torch.Tensor):
        if self.kv_dtype == "nvfp4":
            return self._quant(t_BHLD.detach())
        return t_BHLD.detach().to(KV_DTYPES[self.kv_dtype])

    def _read(self, layer: dict[int, tuple], chunks: list[int], dtype: torch.dtype) -> tuple[list, list]:
        """K and V blocks of `chunks` in `dtype` (NVFP4: every block of the layer in one call)."""
        if self.kv_dtype != "nvfp4":
            return [layer[j][0].to(dtype) for j in chunks], [layer[j][1].to(dtype) for j in chunks]
        blocks = [layer[j][0] for j in chunks] + [layer[j][1] for j in chunks]
        out = self._dequant(blocks, dtype)  # [2n, B, H, Lc, D]
        return list(out[: len(chunks)]), list(out[len(chunks) :])

    def hook(self, layer_idx: int, q_BHLD, k_BHLD, v_BHLD, ctx) -> tuple:
        """kv_hook: prepend the visible history to this chunk's K/V; store them on the clean pass."""
        layer = self.layers[layer_idx]
        chunks = self._history
        ks, vs = self._read(layer, chunks, k_BHLD.dtype) if chunks else ([], [])
        for i, j in enumerate(chunks):
            vis = self._visible(j)
            if not vis.all():  # partly visible block (window edge or sink inside a chunk)
                idx = torch.nonzero(vis.repeat_interleave(self.tokens_per_frame)).squeeze(1)
                idx = idx.to(k_BHLD.device)
                ks[i], vs[i] = ks[i].index_select(2, idx), vs[i].index_select(2, idx)
        if self.write:
            layer[self.chunk] = (self._store(k_BHLD), self._store(v_BHLD))
        return torch.cat([*ks, k_BHLD], dim=2), torch.cat([*vs, v_BHLD], dim=2), None
