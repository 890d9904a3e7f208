"""Does NVFP4 QAT help? Held-out flow-matching loss of the debug DiT, four ways (CPU, minutes).

  a   high precision, teacher forcing for --base-steps on a fixed structured latent set
  a'  a + --ft-steps more of high-precision teacher forcing (the fair baseline for c)
  b   post-training NVFP4: a converted without fine-tuning (W4A4 + KV history fake-quant)
  c   NVFP4 QAT: a fine-tuned --ft-steps with method=qat (same data, lr and steps as a')

Training goes through vidtrain's one trainer (`load_recipe(None, overrides)` + `train`). The
held-out loss uses separate samples, fixed noise and fixed per-chunk timesteps; quantized
models are evaluated with W4A4 and the NVFP4 KV-history hook (what the sampler would run).
The latents are synthetic but structured (drifting waves whose parameters the text encodes), so
history and text carry information. Prints a Markdown table; writes JSON with --out.

    python bench/qat_evidence.py --out runs/qat_evidence/evidence.json
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

C, F, HW, TEXT_LEN, TEXT_DIM, FPC = 16, 6, 4, 4, 32, 3
EVAL_TIMESTEPS = ((900.0, 600.0), (600.0, 300.0), (300.0, 100.0), (750.0, 750.0))  # per chunk


def make_sample(rng: np.random.Generator, proj: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Latents [C, F, H, W]: 3 drifting plane waves mixed into C channels; text encodes them."""
    params = rng.uniform(-1, 1, size=(3, 6))  # per wave: freq_h, freq_w, vel_h, vel_w, phase, gain
    f, h, w = np.meshgrid(np.arange(F), np.arange(HW), np.arange(HW), indexing="ij")
    mix = rng.standard_normal((3, C)) / math.sqrt(3)
    x = np.zeros((C, F, HW, HW))
    for k, (fh, fw, vh, vw, ph, gain) in enumerate(params):
        wave = np.sin(2 * np.pi * (fh * (h + 2 * vh * f) + fw * (w + 2 * vw * f)) / 4 + np.pi * ph)
        x += mix[k][:, None, None, None] * (1 + 0.5 * gain) * wave[None]
    code = np.concatenate([params.ravel(), mix.ravel()])
    text = np.tanh(proj @ code).reshape(TEXT_LEN, TEXT_DIM)
    return x.astype(np.float32), text.astype(np.float32)


def write_shard(folder: Path, n: int, seed: int, proj: np.ndarray) -> Path:
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with wds.TarWriter(str(folder / "shard-000000.tar")) as sink:
        for i in range(n):
            x, t = make_sample(rng, proj)
            enc = {}
            for key, arr in (("latents.npy", x), ("text.npy", t)):
                buf = io.BytesIO()
                np.save(buf, arr)
                enc[key] = buf.getvalue()
            sink.write({"__key__": f"s{i:06d}", **enc, "json": json.dumps({"i": i}).encode()})
    return folder


def heldout_set(n: int, seed: int, proj: np.ndarray):
    rng = np.random.default_rng(seed)
    xs, ts = zip(*(make_sample(rng, proj) for _ in range(n)), strict=True)
    x0 = torch.from_numpy(np.stack(xs))
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g)
    return x0, torch.from_numpy(np.stack(ts)), noise


@torch.no_grad()
def heldout_loss(model, data, quantized_kv: bool) -> float:
    from vidtrain.forcing.teacher import build_tf_sequence, tf_loss_terms
    from vidtrain.models.wan.attention import AttentionContext
    from vidtrain.quant.kv import KVFakeQuantHook
    from vidtrain.tokens import MaskRule

    x0, text, noise = data
    model.eval()
    total, count = 0.0, 0.0
    for t_chunks in EVAL_TIMESTEPS:
        sigma_BF = torch.tensor(t_chunks).repeat_interleave(FPC).expand(x0.shape[0], F) / 1000.0
        seq = build_tf_sequence(x0, noise, sigma_BF, FPC)
        hook = KVFakeQuantHook() if quantized_kv else None
        attn = AttentionContext(rule=MaskRule("teacher_forcing", FPC), meta=seq.meta, kv_hook=hook)
        pred = model(seq.x_BLP, seq.t_BL, text, meta=seq.meta, attn=attn)
        sq, n = tf_loss_terms(pred, seq)
        total, count = total + float(sq), count + float(n)
    return total / count


def run(method: str, run_dir: Path, steps: int, lr: float, shards: Path, start: Path | None, seed: int):
    from vidtrain.config import load_recipe
    from vidtrain.train.trainer import train

    over = [
        f"run.dir={run_dir}", "run.resume=false", f"method.name={method}", f"seed={seed}",
        "data.source=shards", f"data.shards={shards}", "data.batch_size=4", "data.shuffle_buffer=16",
        f"model.text_dim={TEXT_DIM}", f"optim.lr={lr}", "optim.warmup_steps=5", "optim.schedule=constant",
        "optim.weight_decay=0.0", f"train.max_steps={steps}", f"train.ckpt_every={steps}",
        "train.ema_decay=null", "train.progress=false", "train.log_every=10",
        "log.wandb=disabled", "log.plots=false",
    ]  # fmt: skip
    if start is not None:
        over.append(f"model.checkpoint={start}")
    t0 = time.perf_counter()
    trainer = train(load_recipe(None, over))
    model = trainer.strategy.unwrap(trainer.model)
    return model, run_dir / "checkpoints" / f"step_{steps:06d}" / "model", time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="runs/qat_evidence")
    p.add_argument("--out", default=None, help="JSON results path")
    p.add_argument("--base-steps", type=int, default=150)
    p.add_argument("--ft-steps", type=int, default=50)
    p.add_argument("--base-lr", type=float, default=1e-3)
    p.add_argument("--ft-lr", type=float, default=2e-4)
    p.add_argument("--train-samples", type=int, default=256)
    p.add_argument("--heldout-samples", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from vidtrain.config import load_recipe
    from vidtrain.models.wan import CausalWanDiT
    from vidtrain.quant.convert import convert_for_recipe

    torch.set_num_threads(2)
    work = Path(args.workdir)
    proj = np.random.default_rng(1234).standard_normal((TEXT_LEN * TEXT_DIM, 18 + 3 * C)) / 6
    shards = write_shard(work / "latents", args.train_samples, args.seed, proj)
    data = heldout_set(args.heldout_samples, args.seed + 10_000, proj)

    a, a_ckpt, t_a = run(
        "teacher_forcing", work / "a", args.base_steps, args.base_lr, shards, None, args.seed
    )
    rows = [("a", "high precision (fp32)", args.base_steps, heldout_loss(a, data, False), t_a)]
    a2, _, t_a2 = run(
        "teacher_forcing", work / "a2", args.ft_steps, args.ft_lr, shards, a_ckpt, args.seed + 1
    )
    rows.append(
        (
            "a'",
            "high precision, + fine-tune",
            args.base_steps + args.ft_steps,
            heldout_loss(a2, data, False),
            t_a2,
        )
    )
    b = CausalWanDiT.from_pretrained(str(a_ckpt))
    convert_for_recipe(b, load_recipe(None, []).quant, torch.device("cpu"))
    rows.append(
        ("b", "PTQ NVFP4 (W4A4 + KV), no fine-tune", args.base_steps, heldout_loss(b, data, True), 0.0)
    )
    rows.append(
        (
            "b_w",
            "PTQ NVFP4 W4A4 only (K/V high precision)",
            args.base_steps,
            heldout_loss(b, data, False),
            0.0,
        )
    )
    c, _, t_c = run("qat", work / "c", args.ft_steps, args.ft_lr, shards, a_ckpt, args.seed + 1)
    rows.append(
        (
            "c",
            "NVFP4 QAT (W4A4 + KV), + fine-tune",
            args.base_steps + args.ft_steps,
            heldout_loss(c, data, True),
            t_c,
        )
    )

    ref = {r[0]: r[3] for r in rows}
    print("\n| model | what | train steps | held-out loss | vs a' | train time (s) |")
    print("|---|---|---:|---:|---:|---:|")
    base = ref["a'"]
    for name, what, steps, loss, secs in rows:
        print(f"| {name} | {what} | {steps} | {loss:.5f} | {loss - base:+.5f} | {secs:.1f} |")
    gap_b, gap_c = ref["b"] - ref["a"], ref["c"] - ref["a'"]
    print(f"\nNVFP4 gap: PTQ (b - a) = {gap_b:+.5f}; QAT (c - a') = {gap_c:+.5f}")
    result = {
        "rows": [dict(zip(("model", "what", "train_steps", "heldout_loss", "train_time_s"), r, strict=True)) for r in rows],
        "gap_ptq": gap_b, "gap_qat": gap_c, "args": vars(args), "eval_timesteps": EVAL_TIMESTEPS,
        "device": "cpu", "torch": torch.__version__,
    }  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
