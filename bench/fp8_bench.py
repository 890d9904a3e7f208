"""FP8 GEMM speed: bf16 vs torch._scaled_mm (e4m3, tensorwise / rowwise scales) at Wan2.1-1.3B's linears.

    python bench/fp8_bench.py --out runs/fp8_bench.json            # GPU: M=32760, 1.3B shapes
    python bench/fp8_bench.py --tokens 128 --shapes 64x64,64x128    # CPU smoke: bf16 rows only

Shapes are in->out features of the 1.3B's linears (vidtrain/models/wan/config.py, flavor "1.3B":
dim 1536, ffn_dim 8960): attention projections 1536->1536, FFN up 1536->8960, down 8960->1536;
M tokens per rank (32760 = half of the 21-frame 480x832 sequence). Each row: a y = x W^T of
[M, K] x [N, K] timed over --iters calls after one warm-up (device synchronize around), 2*M*K*N
FLOP. The FP8 rows take their operands as `vidtrain.quant` casts them (`vidtrain.formats.fp8
.recipe_cast`, what the emulate backend and `FP8StoredLinear(backend="scaled_mm")` use: the
weight cast once, not timed; the activation cast timed on its own as `cast_s`) and multiply with
`torch._scaled_mm` into bf16; `tflops_incl_cast` counts the GEMM plus the activation cast (what a
linear pays per call). FP8 needs CUDA sm_89+ (Ada / Hopper): elsewhere the FP8 rows say
"skipped: needs CUDA (sm_89+)"; a GPU whose _scaled_mm rejects a recipe records the error per
row. The JSON (--out) is rewritten after every row; the exit status is 0 unless a bf16 row failed.
"""

from __future__ import annotations

import argparse
import sys

import torch
from bench_common import datasheet, seconds_left, time_call, write_json

from vidtrain.formats import fp8

SHAPES = "1536x1536,1536x8960,8960x1536"  # in x out features of the 1.3B's linears
SKIP = "skipped: needs CUDA (sm_89+)"


def fp8_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _bf16_fn(x: torch.Tensor, w: torch.Tensor):
    return lambda: x @ w.T


def _scaled_mm_fn(x: torch.Tensor, w: torch.Tensor, recipe: str):
    """(the GEMM, the activation cast) for one recipe; the weight is cast here, once."""
    wq, ws = fp8.recipe_cast(w, recipe, -1)  # [N, K] codes, scale [] or [N, 1]
    xq, xs = fp8.recipe_cast(x, recipe, -1)  # [M, K] codes, scale [] or [M, 1]
    sb = ws.reshape(1, -1) if ws.dim() else ws
    sa_inv, sb_inv, wqt = xs.reciprocal(), sb.reciprocal(), wq.T

    def gemm():
        return torch._scaled_mm(xq, wqt, scale_a=sa_inv, scale_b=sb_inv, out_dtype=torch.bfloat16)

    return gemm, lambda: fp8.recipe_cast(x, recipe, -1)


def run(
    tokens: int, shapes: list[tuple[int, int]], iters: int, device: torch.device, out: str | None
) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    res = {"device": name, "torch": torch.__version__, "tokens": tokens, "iters": iters,
           "datasheet_bf16_flops": datasheet(name)["bf16_flops"] if device.type == "cuda" else None,
           "fp8_supported": fp8_supported(device), "rows": []}  # fmt: skip
    gen = torch.Generator(device=device).manual_seed(0)
    for k, n in shapes:
        flop = 2 * tokens * k * n
        shape = f"{k}->{n}"
        base = None
        try:
            x = torch.randn(tokens, k, device=device, dtype=torch.bfloat16, generator=gen)
            w = torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=gen) / k**0.5
        except Exception as e:
            res["rows"].append({"shape": shape, "kind": "bf16", "error": f"{type(e).__name__}: {e}"[:300]})
            x = w = None
        for kind in ("bf16", "fp8 tensorwise", "fp8 rowwise"):
            if x is None:
                break
            row = {"shape": shape, "M": tokens, "K": k, "N": n, "kind": kind, "flop": flop}
            if seconds_left() < 3:
                row["error"] = "skipped: the stage's time is spent"
            elif kind != "bf16" and not res["fp8_supported"]:
                row["error"] = SKIP
            else:
                try:
                    if kind == "bf16":
                        s, cast_s = time_call(_bf16_fn(x, w), device, iters), 0.0
                    else:
                        gemm, cast = _scaled_mm_fn(x, w, kind.split()[1])
                        s, cast_s = time_call(gemm, device, iters), time_call(cast, device, iters)
                except Exception as e:  # recorded: the other rows still run
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                else:
                    row.update(gemm_s=s, tflops=flop / s / 1e12, cast_s=cast_s,
                               tflops_incl_cast=flop / (s + cast_s) / 1e12, error=None)  # fmt: skip
                    if kind == "bf16":
                        base = s
                    row["speedup_over_bf16"] = base / s if base else None
                    row["speedup_incl_cast"] = base / (s + cast_s) if base else None
            row.setdefault("error", None)
            res["rows"].append(row)
            if out:  # after every row: a kill keeps what finished
                write_json(out, res)
        x = w = None  # free before the next shape
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if out:
        write_json(out, res)
    return res


def markdown(res: dict) -> str:
    lines = [f"FP8 GEMM on {res['device']}, M={res['tokens']}", "",
             "| shape | kind | TFLOP/s | incl. cast | x bf16 | cast (ms) |", "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in res["rows"]:
        if r.get("error"):
            lines.append(f"| {r['shape']} | {r['kind']} | {r['error'][:60]} | - | - | - |")
            continue
        sp = r.get("speedup_over_bf16")
        lines.append(f"| {r['shape']} | {r['kind']} | {r['tflops']:.1f} | {r['tflops_incl_cast']:.1f} | "
                     f"{'-' if sp is None else f'{sp:.2f}'} | {r['cast_s'] * 1e3:.3f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=32760, help="M: tokens per rank")
    p.add_argument("--shapes", default=SHAPES, help="in x out features, comma-separated (%(default)s)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res = run(args.tokens, shapes, args.iters, device, args.out)
    print(markdown(res))
    return 1 if any(r["kind"] == "bf16" and r.get("error") for r in res["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
