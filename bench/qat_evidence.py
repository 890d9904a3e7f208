"""Does NVFP4 QAT help? Held-out flow-matching loss of the debug DiT, nine ways (CPU, minutes).

  a     high precision, teacher forcing for --base-steps on a fixed structured latent set
  a'    a + --ft-steps more of high-precision teacher forcing (the fair baseline for c)
  b     post-training NVFP4: a converted without fine-tuning (W4A4 + KV history fake-quant)
  b_w   b with high-precision K/V (the W4A4 gap alone)
  b_kv  a (high-precision weights) with only the KV-history fake-quant (the KV gap alone)
  c     NVFP4 QAT: a fine-tuned --ft-steps with method=qat (same data, lr and steps as a')
  c_w   c's run with quant.kv_fake_quant=false (high-precision history in training), evaluated
        with the quantized history as c is: c_w - c is what training on that history buys
  a'_kv a' evaluated with the quantized KV history (high-precision weights, not trained for it)
  c_kv  c's run on high-precision weights (quant.exclude=["*"]: no W4A4), the history alone
        fake-quantized in training: (c_kv - a') vs (a'_kv - a') is QAT on the KV gap by itself
  a_noise a with the history K/V replaced by noise: (a_noise - a) is how much a reads its history

`--kv-format` is the KV cache the history is fake-quantized as, in the evaluation (b, b_kv, c,
c_w, a'_kv, c_kv) and in QAT's training (c, c_kv): nvfp4 (the default, the weights' format) or kv2 (the 2-bit cache,
`vidtrain.formats.kv2`; QAT runs with `quant.kv_format=kv2`). Either way `KVFakeQuantHook` groups
the clean history by chunk (token metadata), so each chunk's K/V is quantized as one block, as
the sampler's cache stores it chunk by chunk. kv2's k-means is not differentiable: QAT's
gradient goes straight through it (`vidtrain.quant.kv._GroupedKVSTE`, identity backward).

Training goes through vidtrain's one trainer (`load_recipe(None, overrides)` + `train`). The
held-out loss uses separate samples, fixed noise and fixed per-chunk timesteps; quantized
models are evaluated with W4A4 and the KV-history hook (what the sampler would run).
The latents are synthetic but structured (drifting waves whose parameters the text encodes), so
history and text carry information; `--hide phase,mix` withholds the waves' phases and channel
mix from the caption, so the second chunk can learn them from the first one's history only
(which is what a quantized history can spoil). Prints a Markdown table; writes JSON with --out.

    python bench/qat_evidence.py --out runs/qat_evidence/evidence.json
    python bench/qat_evidence.py --kv-format kv2 --hide phase,mix --base-steps 1500 --ft-steps 300 \
        --heldout-samples 32 --out runs/qat_evidence/kv2_seed0.json

(At the default 150 base steps the model barely reads its history: a_noise - a, the history K/V
replaced by noise, is about 0.002, so no KV format can show an effect; at 1500 steps with --hide
it is about 0.05.)
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


HIDE = ("phase", "mix")  # what --hide may withhold from the caption


def make_sample(
    rng: np.random.Generator, proj: np.ndarray, hide: tuple[str, ...] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """Latents [C, F, H, W]: 3 drifting plane waves mixed into C channels; text encodes them,
    less what `hide` names (the waves' phases, the channel mix): then only the history shows it."""
    params = rng.uniform(-1, 1, size=(3, 6))  # per wave: freq_h, freq_w, vel_h, vel_w, phase, gain
    f, h, w = np.meshgrid(np.arange(F), np.arange(HW), np.arange(HW), indexing="ij")
    mix = rng.standard_normal((3, C)) / math.sqrt(3)
    x = np.zeros((C, F, HW, HW))
    for k, (fh, fw, vh, vw, ph, gain) in enumerate(params):
        wave = np.sin(2 * np.pi * (fh * (h + 2 * vh * f) + fw * (w + 2 * vw * f)) / 4 + np.pi * ph)
        x += mix[k][:, None, None, None] * (1 + 0.5 * gain) * wave[None]
    shown = params.copy()
    if "phase" in hide:
        shown[:, 4] = 0.0
    code = np.concatenate([shown.ravel(), 0.0 * mix.ravel() if "mix" in hide else mix.ravel()])
    text = np.tanh(proj @ code).reshape(TEXT_LEN, TEXT_DIM)
    return x.astype(np.float32), text.astype(np.float32)


def write_shard(folder: Path, n: int, seed: int, proj: np.ndarray, hide: tuple[str, ...] = ()) -> Path:
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with wds.TarWriter(str(folder / "shard-000000.tar")) as sink:
        for i in range(n):
            x, t = make_sample(rng, proj, hide)
            enc = {}
            for key, arr in (("latents.npy", x), ("text.npy", t)):
                buf = io.BytesIO()
                np.save(buf, arr)
                enc[key] = buf.getvalue()
            sink.write({"__key__": f"s{i:06d}", **enc, "json": json.dumps({"i": i}).encode()})
    return folder


def heldout_set(n: int, seed: int, proj: np.ndarray, hide: tuple[str, ...] = ()):
    rng = np.random.default_rng(seed)
    xs, ts = zip(*(make_sample(rng, proj, hide) for _ in range(n)), strict=True)
    x0 = torch.from_numpy(np.stack(xs))
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g)
    return x0, torch.from_numpy(np.stack(ts)), noise


def noise_history_hook(seed: int = 0):
    """A KV hook that replaces every clean-history K/V with Gaussian noise of the tensor's std
    (seeded): the loss it gives, against the plain one, is how much the model reads its history."""
    from vidtrain.quant.kv import KVFakeQuantHook

    g = torch.Generator().manual_seed(seed)

    class NoiseHistory(KVFakeQuantHook):
        def __call__(self, layer_idx, q_BHLD, k_BHLD, v_BHLD, ctx):
            p = self.plan(ctx)
            if p is None or p.clean_idx.numel() == 0:
                return k_BHLD, v_BHLD, ctx.mask()

            def noise(x: torch.Tensor) -> torch.Tensor:
                shape = (*x.shape[:2], p.clean_idx.numel(), x.shape[3])
                return torch.randn(shape, generator=g, dtype=x.dtype) * x.std()

            k = torch.cat([noise(k_BHLD), k_BHLD], dim=2)
            v = torch.cat([noise(v_BHLD), v_BHLD], dim=2)
            return k, v, p.mask

    return NoiseHistory()


@torch.no_grad()
def heldout_loss(
    model, data, quantized_kv: bool, kv_format: str = "nvfp4", noise_history: bool = False
) -> float:
    """Mean held-out TF loss; `quantized_kv`: the history K/V through `kv_format`'s fake-quant;
    `noise_history`: replaced by noise instead (`noise_history_hook`)."""
    from vidtrain.forcing.teacher import build_tf_sequence, tf_loss_terms
    from vidtrain.models.wan.attention import AttentionContext
    from vidtrain.quant.kv import KVFakeQuantHook
    from vidtrain.tokens import MaskRule

    x0, text, noise = data
    model.eval()
    total, count = 0.0, 0.0
    for i, t_chunks in enumerate(EVAL_TIMESTEPS):
        sigma_BF = torch.tensor(t_chunks).repeat_interleave(FPC).expand(x0.shape[0], F) / 1000.0
        seq = build_tf_sequence(x0, noise, sigma_BF, FPC)
        hook = KVFakeQuantHook(kv_format=kv_format) if quantized_kv else None
        hook = noise_history_hook(i) if noise_history else hook
        attn = AttentionContext(rule=MaskRule("teacher_forcing", FPC), meta=seq.meta, kv_hook=hook)
        pred = model(seq.x_BLP, seq.t_BL, text, meta=seq.meta, attn=attn)
        sq, n = tf_loss_terms(pred, seq)
        total, count = total + float(sq), count + float(n)
    return total / count


def run(
    method: str,
    run_dir: Path,
    steps: int,
    lr: float,
    shards: Path,
    start: Path | None,
    seed: int,
    extra: list[str] | None = None,
):
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
    over += extra or []
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
    p.add_argument(
        "--kv-format",
        choices=("nvfp4", "kv2"),
        default="nvfp4",
        help="KV cache format the history is fake-quantized as (eval of b, b_kv, c, c_w, a'_kv, c_kv; QAT of c, c_kv)",
    )
    p.add_argument(
        "--hide",
        default="",
        help=f"comma list of {', '.join(HIDE)}: withheld from the caption, so only the history shows it",
    )
    args = p.parse_args(argv)
    hide = tuple(h.strip() for h in args.hide.split(",") if h.strip())
    if set(hide) - set(HIDE):
        p.error(f"--hide: unknown {sorted(set(hide) - set(HIDE))}; known: {', '.join(HIDE)}")
    kvf = args.kv_format
    kv_name = "KV" if kvf == "nvfp4" else f"{kvf} KV"  # nvfp4 keeps its row labels
    t_start = time.perf_counter()

    from vidtrain.config import load_recipe
    from vidtrain.models.wan import CausalWanDiT
    from vidtrain.quant.convert import convert_for_recipe

    torch.set_num_threads(2)
    work = Path(args.workdir)
    proj = np.random.default_rng(1234).standard_normal((TEXT_LEN * TEXT_DIM, 18 + 3 * C)) / 6
    shards = write_shard(work / "latents", args.train_samples, args.seed, proj, hide)
    data = heldout_set(args.heldout_samples, args.seed + 10_000, proj, hide)

    rows = []
    add = lambda *row: rows.append(row)  # noqa: E731  (name, what, train steps, loss, train s)
    n_base, full, ft = args.base_steps, args.base_steps + args.ft_steps, (args.ft_steps, args.ft_lr, shards)
    a, a_ckpt, t_a = run("teacher_forcing", work / "a", n_base, args.base_lr, shards, None, args.seed)
    add("a", "high precision (fp32)", n_base, heldout_loss(a, data, False), t_a)
    a2, _, t_a2 = run("teacher_forcing", work / "a2", *ft, a_ckpt, args.seed + 1)
    add("a'", "high precision, + fine-tune", full, heldout_loss(a2, data, False), t_a2)
    b = CausalWanDiT.from_pretrained(str(a_ckpt))
    convert_for_recipe(b, load_recipe(None, []).quant, torch.device("cpu"))
    add("b", f"PTQ NVFP4 (W4A4 + {kv_name}), no fine-tune", n_base, heldout_loss(b, data, True, kvf), 0.0)
    add("b_w", "PTQ NVFP4 W4A4 only (K/V high precision)", n_base, heldout_loss(b, data, False), 0.0)
    what = f"high-precision weights, {kvf} KV history only"
    add("b_kv", what, n_base, heldout_loss(a, data, True, kvf), 0.0)
    extra = [] if kvf == "nvfp4" else [f"quant.kv_format={kvf}"]  # nvfp4: the weights' format
    c, _, t_c = run("qat", work / "c", *ft, a_ckpt, args.seed + 1, extra)
    add("c", f"NVFP4 QAT (W4A4 + {kv_name}), + fine-tune", full, heldout_loss(c, data, True, kvf), t_c)
    # the KV ablation: the same QAT run (data, seed, steps) with high-precision history in
    # training, evaluated with the same quantized history: what training on that history buys
    c_w, _, t_cw = run("qat", work / "c_w", *ft, a_ckpt, args.seed + 1, ["quant.kv_fake_quant=false"])
    what = f"NVFP4 QAT W4A4 only (history high precision in training), evaluated with {kv_name}"
    add("c_w", what, full, heldout_loss(c_w, data, True, kvf), t_cw)
    kv_gap_c = rows[-2][3] - heldout_loss(c, data, False)  # what the quantized history costs c
    kv_gap_cw = rows[-1][3] - heldout_loss(c_w, data, False)
    # the KV history alone: high-precision weights (every linear excluded from W4A4), a' with the
    # quantized history (no training for it) vs fine-tuned with it (QAT of the history only)
    add(
        "a'_kv",
        f"a' with the {kvf} KV history (not trained for it)",
        full,
        heldout_loss(a2, data, True, kvf),
        0.0,
    )
    kv_only = [f"quant.kv_format={kvf}", 'quant.exclude=["*"]']
    c_kv, _, t_ckv = run("qat", work / "c_kv", *ft, a_ckpt, args.seed + 1, kv_only)
    what = f"high-precision weights fine-tuned with the {kvf} KV history (QAT of the history alone)"
    add("c_kv", what, full, heldout_loss(c_kv, data, True, kvf), t_ckv)
    kv_gap_ckv = rows[-1][3] - heldout_loss(c_kv, data, False)
    # how much a reads its history at all: a KV format can cost at most about this much
    what = "a with the history K/V replaced by noise (how much the model reads its history)"
    add("a_noise", what, n_base, heldout_loss(a, data, False, noise_history=True), 0.0)

    ref = {r[0]: r[3] for r in rows}
    print("\n| model | what | train steps | held-out loss | vs a' | train time (s) |")
    print("|---|---|---:|---:|---:|---:|")
    base = ref["a'"]
    for name, what, steps, loss, secs in rows:
        print(f"| {name} | {what} | {steps} | {loss:.5f} | {loss - base:+.5f} | {secs:.1f} |")
    gap_b, gap_c = ref["b"] - ref["a"], ref["c"] - ref["a'"]
    gap_w, gap_kv = ref["b_w"] - ref["a"], ref["b_kv"] - ref["a"]
    closed = 1.0 - gap_c / gap_b if gap_b > 0 else None  # undefined without a PTQ gap
    label = "NVFP4" if kvf == "nvfp4" else f"NVFP4 W4A4 + {kvf} KV"
    print(f"\n{label} gap: PTQ (b - a) = {gap_b:+.5f}; QAT (c - a') = {gap_c:+.5f}")
    closed_s = "n/a (no PTQ gap)" if closed is None else f"{100 * closed:.0f} %"
    print(
        f"{kvf} KV: W4A4 alone (b_w - a) = {gap_w:+.5f}; KV alone (b_kv - a) = {gap_kv:+.5f}; "
        f"QAT closes {closed_s} of the PTQ gap"
    )
    print(
        f"{kvf} KV history in QAT: c_w - c = {ref['c_w'] - ref['c']:+.5f}; the {kvf} history costs "
        f"c {kv_gap_c:+.5f}, c_w {kv_gap_cw:+.5f} (evaluated with it vs high-precision K/V)"
    )
    kv_ptq, kv_qat = ref["a'_kv"] - ref["a'"], ref["c_kv"] - ref["a'"]
    kv_closed = 1.0 - kv_qat / kv_ptq if kv_ptq > 0 else None
    kv_closed_s = "n/a (no gap)" if kv_closed is None else f"{100 * kv_closed:.0f} %"
    print(
        f"{kvf} KV history alone: untrained (a'_kv - a') = {kv_ptq:+.5f}; trained for it (c_kv - a') = "
        f"{kv_qat:+.5f}; QAT closes {kv_closed_s} of it; the {kvf} history costs c_kv {kv_gap_ckv:+.5f}"
        f" (a' {kv_ptq:+.5f})"
    )
    result = {
        "rows": [dict(zip(("model", "what", "train_steps", "heldout_loss", "train_time_s"), r, strict=True)) for r in rows],
        "gap_ptq": gap_b, "gap_qat": gap_c, "args": vars(args), "eval_timesteps": EVAL_TIMESTEPS,
        "device": "cpu", "torch": torch.__version__,
        "kv_format": kvf, "gap_w4a4": gap_w, "gap_kv": gap_kv, "gap_closed": closed, "hide": list(hide),
        "kv_qat_gain": ref["c_w"] - ref["c"], "kv_gap_c": kv_gap_c, "kv_gap_c_w": kv_gap_cw,
        "history_use": ref["a_noise"] - ref["a"], "kv_gap_ptq": kv_ptq, "kv_gap_qat": kv_qat, "kv_gap_closed": kv_closed, "kv_gap_c_kv": kv_gap_ckv,
        "wall_s": time.perf_counter() - t_start,
    }  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
