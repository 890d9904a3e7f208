"""Teacher-forcing training step throughput: forward + backward + AdamW step on one device.

    python bench/train_bench.py --out runs/train_bench.json                     # debug flavor (CPU)
    python bench/train_bench.py --flavor 1.3B --height 480 --width 832 --frames 21 \\
        --out runs/train_bench_1.3B.json                                        # GPU (bf16 autocast)

One step is what `TeacherForcing.loss` + `Method.train_step` compute, minus data loading and
noise sampling (the sequence is built once, on the device): a fresh AttentionContext (so the
mask or FlexAttention block mask is rebuilt every step, as in training), the model over the
[clean | noisy] sequence, the flow-matching loss on noisy tokens, backward, AdamW step.
Weights are random (speed and memory do not depend on them); parameters are fp32 as in the
trainer, with bf16 autocast on CUDA (`--precision auto`).

Each activation-checkpointing setting runs in its own process (`--one`), so its peak belongs to it
alone and an out-of-memory error is recorded instead of ending the run (a result: the exit code
is 1 only when no setting ran and one failed for another reason). Step time: the median of
--iters steps after --warmup steps, each bracketed by torch.cuda.synchronize on CUDA.
"of which mask": the median time to build the step's attention mask alone (the FlexAttention
block mask on CUDA, the dense mask on CPU), which the step time includes.
Peak memory: torch.cuda.max_memory_allocated over the timed steps (CUDA); process peak RSS (CPU).

Model FLOPs per step (MFU counts these; recomputation under checkpointing is not counted):
  linear     6 * (P_tok * B * L + P_txt * B * S)
             P_tok: weights of matmuls applied to every video token (patch embedding, self-attn
             q/k/v/o, cross-attn q/o, FFN, head); P_txt: those applied to text tokens (text
             embedding, cross-attn k/v); time embeddings (a few distinct timesteps) are left out
  self-attn  3 * 4 * B * pairs * dim * layers   (QK^T and PV: 2 * dim each per allowed pair;
             x3 for forward + backward); pairs = query-key pairs the teacher-forcing mask allows,
             counted from token metadata (vidtrain/tokens.py) on one token per frame, x tokens/frame^2
  cross-attn 3 * 4 * B * L * S * dim * layers
L = 2 x frames x tokens/frame (clean + noisy copies), S = text tokens.
MFU = FLOPs per step / step time / peak dense bf16 FLOP/s of the device (datasheet; CPU: n/a).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_common import child_timeout, datasheet, write_json

from vidtrain.parallel.balance import vae_stride

CKPT = {"on": True, "off": False}


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 tensor-core peak from the datasheet (bench_common.DATASHEET), None if unknown."""
    return datasheet(device_name)["bf16_flops"]


def tf_mask_pairs(frames: int, frames_per_chunk: int, tokens_per_frame: int) -> int:
    """Query-key pairs the teacher-forcing mask allows over the whole [clean | noisy] sequence."""
    from vidtrain.tokens import MaskRule, TokenMeta, build_mask, grid_meta

    meta = TokenMeta.cat([grid_meta(frames, 1, 1, frames_per_chunk, noisy=n) for n in (False, True)])
    rule = MaskRule("teacher_forcing", frames_per_chunk)
    return int(build_mask(rule, meta, meta).sum()) * tokens_per_frame**2


def param_split(model) -> tuple[int, int, int]:
    """(P_tok, P_txt, total): matmul weights applied per video token, per text token, all params."""
    tok = model.patch_embedding.weight.numel() + model.head.head.weight.numel()
    txt = sum(m.weight.numel() for m in model.text_embedding if isinstance(m, torch.nn.Linear))
    for b in model.blocks:
        tok += sum(getattr(b.self_attn, n).weight.numel() for n in "qkvo")
        tok += b.cross_attn.q.weight.numel() + b.cross_attn.o.weight.numel()
        tok += sum(m.weight.numel() for m in b.ffn if isinstance(m, torch.nn.Linear))
        txt += b.cross_attn.k.weight.numel() + b.cross_attn.v.weight.numel()
    return tok, txt, sum(p.numel() for p in model.parameters())


def model_flops(cfg, p_tok: int, p_txt: int, batch: int, seq_len: int, text_len: int, pairs: int) -> dict:
    linear = 6 * (p_tok * batch * seq_len + p_txt * batch * text_len)
    self_attn = 12 * batch * pairs * cfg.dim * cfg.num_layers
    cross_attn = 12 * batch * seq_len * text_len * cfg.dim * cfg.num_layers
    return {"linear": linear, "self_attn": self_attn, "cross_attn": cross_attn,
            "total": linear + self_attn + cross_attn}  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(a, checkpointing: bool) -> dict:
    """Build the model and one TF sequence, then time full optimizer steps (child process)."""
    from vidtrain.forcing.flow import frames_sigma, sample_chunk_sigmas
    from vidtrain.forcing.teacher import TFSequence, build_tf_sequence, tf_loss_terms
    from vidtrain.models.wan import CausalWanDiT
    from vidtrain.models.wan.attention import AttentionContext
    from vidtrain.tokens import MaskRule

    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    torch.manual_seed(0)
    with torch.device(dev):
        model = CausalWanDiT.from_flavor(a.flavor, a.attn_backend)
    model.gradient_checkpointing = checkpointing
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    cfg, fpc = model.cfg, a.frames_per_chunk
    stride = vae_stride(a.vae)
    b, f, h, w = a.batch, a.frames, a.height // stride, a.width // stride
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(b, cfg.in_channels, f, h, w, generator=g)
    sigma_BF = frames_sigma(sample_chunk_sigmas(b, f // fpc, generator=g), fpc)
    s = build_tf_sequence(x0, torch.randn(x0.shape, generator=g), sigma_BF, fpc)
    seq = TFSequence(s.x_BLP.to(dev), s.t_BL.to(dev), s.target_BLP.to(dev), s.meta.to(dev))
    text = torch.randn(b, a.text_len, cfg.text_dim, generator=g).to(dev)
    rule = MaskRule("teacher_forcing", fpc)
    bf16 = a.precision == "bf16" or (a.precision == "auto" and dev.type == "cuda")

    def step() -> float:
        _sync(dev)
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            attn = AttentionContext(rule=rule, meta=seq.meta)  # fresh per step, as in training
            pred = model(seq.x_BLP, seq.t_BL, text, meta=seq.meta, attn=attn)
            sq, count = tf_loss_terms(pred, seq)
            loss = sq / count
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(dev)
        return time.perf_counter() - t0

    def build_mask() -> float:  # what each step's fresh AttentionContext builds first
        _sync(dev)
        t0 = time.perf_counter()
        ctx = AttentionContext(rule=rule, meta=seq.meta)
        flex = dev.type == "cuda" and a.attn_backend in ("auto", "flex")
        ctx.block_mask(dev) if flex else ctx.mask()
        _sync(dev)
        return time.perf_counter() - t0

    for _ in range(a.warmup):
        step()
    mask_s = statistics.median(build_mask() for _ in range(3))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = [step() for _ in range(a.iters)]
    if dev.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(dev), "cuda max_memory_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"
    return {"checkpointing": checkpointing, "step_s": statistics.median(times), "step_s_all": times,
            "mask_build_s": mask_s, "peak_memory_bytes": int(peak), "peak_memory_kind": kind, "precision": "bf16" if bf16 else "fp32",
            "error": None}  # fmt: skip


def child(a, setting: str) -> None:
    """Print one JSON line: the timings, or the error (out of memory, say) that stopped them."""
    try:
        res = run_one(a, CKPT[setting])
    except torch.OutOfMemoryError as e:
        res = {"checkpointing": CKPT[setting], "error": "out of memory: " + str(e).split("\n")[0]}
    print(json.dumps(res))


def spawn(a, argv: list[str], setting: str) -> dict:
    cmd = [sys.executable, __file__, *argv, "--one", setting]
    timeout = child_timeout(a.timeout)  # capped by the GPU suite's stage deadline, if any
    if timeout < 5:
        return {"checkpointing": CKPT[setting], "error": "skipped: the stage's time is spent"}
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"checkpointing": CKPT[setting], "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in r.stdout.strip().splitlines() if ln.startswith("{")]
    if r.returncode or not lines:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        return {"checkpointing": CKPT[setting], "error": f"exit {r.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def markdown(res: dict) -> str:
    c = res["config"]
    fl = res["flops_per_step"]
    lines = [
        f"Teacher-forcing train step, {c['flavor']} ({res['params'] / 1e6:.1f}M params) on {res['device']}: "
        f"{c['height']}x{c['width']} px, {c['frames']} latent frames, chunk {c['frames_per_chunk']}, "
        f"batch {c['batch']}, {res['seq_len']:,} tokens, text {c['text_len']}; "
        f"model FLOPs/step {fl['total'] / 1e12:.3g} T (linear {fl['linear'] / fl['total']:.0%}, "
        f"self-attn {fl['self_attn'] / fl['total']:.0%}, cross-attn {fl['cross_attn'] / fl['total']:.0%})",
        "",
        "| act. ckpt | precision | step (s, median) | of which mask (s) | tokens/s | model TFLOP/s | MFU | peak memory (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        ck = "on" if r["checkpointing"] else "off"
        if r.get("error"):
            lines.append(f"| {ck} | - | {r['error'][:60]} | - | - | - | - | - |")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        lines.append(
            f"| {ck} | {r['precision']} | {r['step_s']:.4g} | {r['mask_build_s']:.2g} | {r['tokens_per_s']:,.0f} | "
            f"{r['tflops_per_s']:.3g} | {mfu} | {r['peak_memory_bytes'] / 2**20:,.0f} ({r['peak_memory_kind']}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flavor", default="debug")
    p.add_argument("--height", type=int, default=128, help="pixels (latents: / the VAE's stride)")
    p.add_argument("--width", type=int, default=128, help="pixels (latents: / the VAE's stride)")
    p.add_argument("--vae", default=None,
                   help="the VAE whose latents are trained (its spatial stride sets the latent size): "
                        "default wan2.2 for 48-channel flavors (5B), else wan2.1")  # fmt: skip
    p.add_argument("--frames", type=int, default=9, help="latent frames")
    p.add_argument("--frames-per-chunk", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--text-len", type=int, default=512, help="text tokens (umT5: 512)")
    p.add_argument("--checkpointing", choices=("on", "off", "both"), default="both")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU (as the trainer)")  # fmt: skip
    p.add_argument("--attn-backend", default="auto", choices=("auto", "sdpa", "flash", "flex"))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device's bf16 peak")
    p.add_argument("--timeout", type=float, default=600, help="seconds per checkpointing setting")
    p.add_argument("--out", default=None, help="write JSON here (and the table beside it, .md)")
    p.add_argument("--one", choices=tuple(CKPT), default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    from vidtrain.models.wan import CausalWanDiT

    with torch.device("meta"):
        model = CausalWanDiT.from_flavor(a.flavor)
    a.vae = a.vae or ("wan2.2" if model.cfg.in_channels == 48 else "wan2.1")
    unit = 2 * vae_stride(a.vae)  # pixels per token side: the VAE's stride x the 2x2 patch
    if a.frames % a.frames_per_chunk or a.height % unit or a.width % unit:
        raise ValueError(
            f"frames must be a multiple of frames_per_chunk; height and width multiples of {unit} "
            f"(the {a.vae} VAE's stride x the 2x2 patch)"
        )
    if a.one:
        child(a, a.one)
        return 0
    p_tok, p_txt, total = param_split(model)
    tpf = (a.height // unit) * (a.width // unit)
    seq_len = 2 * a.frames * tpf
    pairs = tf_mask_pairs(a.frames, a.frames_per_chunk, tpf)
    flops = model_flops(model.cfg, p_tok, p_txt, a.batch, seq_len, a.text_len, pairs)
    name = device_name(a.device)
    peak = (
        a.peak_tflops * 1e12 if a.peak_tflops else (peak_flops(name) if a.device.startswith("cuda") else None)
    )
    res = {
        "device": name, "torch": torch.__version__, "peak_bf16_flops": peak,
        "config": {k: getattr(a, k) for k in ("flavor", "vae", "height", "width", "frames", "frames_per_chunk",
                                              "batch", "text_len", "precision", "attn_backend", "warmup", "iters", "threads")},
        "params": total, "params_per_video_token": p_tok, "params_per_text_token": p_txt,
        "tokens_per_frame": tpf, "seq_len": seq_len, "mask_pairs": pairs, "flops_per_step": flops, "rows": [],
    }  # fmt: skip
    child_argv = [x for x in (argv if argv is not None else sys.argv[1:])]
    settings = ("on", "off") if a.checkpointing == "both" else (a.checkpointing,)
    if a.out:  # the shape and FLOP count, before any setting runs
        write_json(a.out, res)
    for s in settings:
        r = spawn(a, child_argv, s)
        if not r.get("error"):
            r["tokens_per_s"] = a.batch * seq_len / r["step_s"]
            r["tflops_per_s"] = flops["total"] / r["step_s"] / 1e12
            r["mfu"] = flops["total"] / r["step_s"] / peak if peak else None
        res["rows"].append(r)
        if a.out:  # after each setting, so a later timeout keeps what finished
            write_json(a.out, res)
    table = markdown(res)
    print(table)
    if a.out:
        Path(a.out).with_suffix(".md").write_text(table + "\n")
    # an out-of-memory row is a measured result (the shape does not fit this device), not a failure
    ok = [r for r in res["rows"] if not r.get("error")]
    failed = [r for r in res["rows"] if r.get("error") and not r["error"].startswith("out of memory")]
    return 1 if failed and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
