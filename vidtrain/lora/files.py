"""Standalone DMD LoRA: export (peft format + base identity), load on a base, merge into it.

A LoRA folder holds:
  adapter_config.json          peft LoraConfig (r, lora_alpha, target_modules)
  adapter_model.safetensors    the `dmd` adapter's weights under peft's key names
  vidtrain_base.json           the base it was trained on: model config, a sha256 of the
                               base weights and its NVFP4 / FP8 fake-quant linears
                               (`nvfp4_linears`, `fp8_linears`),
                               plus the few-step schedule it was distilled for
Loading on any other base is an error (`load_lora`), not a silently wrong video.

`vidtrain merge --base CKPT --lora DIR --out DIR` folds the LoRA into the base (`main`). On a
high-precision base the merged model equals base + LoRA (to float rounding). On a quantized
(QAT, NVFP4 or FP8 fake-quant) base it cannot be exact: peft's LoRA path runs in high precision
beside the quantized linear, and folding it into the weights puts it under the quantization. That
merge is refused unless `--requantize` asks for it: the merged weights keep the base's record
(`quant.json`), so the merged model samples as NVFP4 (FP8) of (W + dW), and the deviation from
base + LoRA on a probe input is measured and written beside it (`merge.json`). The exact path
for a QAT base is `vidtrain sample ... --lora DIR` (no merge).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from torch import nn

from vidtrain.lora import roles as lora
from vidtrain.models.wan import CausalWanDiT
from vidtrain.models.wan.state_dict import resolve_model_folder, save_model_state
from vidtrain.quant.fp8 import is_fp8_linear
from vidtrain.quant.qat import (
    QUANT_RECORD,
    NVFP4Linear,
    apply_quant_record,
    read_quant_record,
    write_quant_record,
)
from vidtrain.tokens import MaskRule
from vidtrain.utils.io import atomic_dir

BASE_FILE = "vidtrain_base.json"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "vidtrain-lora/1"


def _plain_name(n: str) -> str:
    return n.removeprefix(lora._PEFT_PREFIX).replace(".base_layer.", ".").removesuffix(".base_layer")


def nvfp4_linears(model: nn.Module) -> list[str]:
    """Plain CausalWanDiT names of the NVFP4 fake-quant linears of a plain or peft-wrapped model."""
    return sorted(_plain_name(n) for n, m in model.named_modules() if isinstance(m, NVFP4Linear))


def fp8_linears(model: nn.Module) -> list[str]:
    """Plain names of the FP8 training linears (ours or torchao's Float8Linear) of a model."""
    return sorted(_plain_name(n) for n, m in model.named_modules() if is_fp8_linear(m))


# the base's quantized linears, per format, as the LoRA record keeps them (key, lister)
QUANT_LINEARS = {"NVFP4": ("nvfp4_linears", nvfp4_linears), "FP8": ("fp8_linears", fp8_linears)}


def quantized_linears(model: nn.Module) -> dict[str, list[str]]:
    """{format: plain names} of the model's fake-quant linears (formats with none left out)."""
    return {fmt: names for fmt, (_, of) in QUANT_LINEARS.items() if (names := of(model))}


def adapter_state(model: nn.Module, adapter: str, weights: dict[str, torch.Tensor] | None = None) -> dict:
    """peft's saved key names (adapter name dropped); `weights` overrides values (e.g. the EMA)."""
    out = {}
    for n, p in lora.adapter_params(model, adapter).items():
        v = weights[n] if weights is not None else p
        out[n.replace(f".{adapter}.", ".")] = v.detach().to(p.dtype).cpu().contiguous()
    if not out:
        raise ValueError(f"model has no adapter {adapter!r}")
    return out


def export_lora(
    model: nn.Module,
    folder: str | Path,
    *,
    adapter: str = lora.GENERATOR,
    weights: dict[str, torch.Tensor] | None = None,
    teacher: str | None = None,
    extra: dict | None = None,
) -> Path:
    """Write the adapter of a peft-wrapped CausalWanDiT to `folder` (atomically)."""
    from safetensors.torch import save_file

    cfg = copy.deepcopy(model.peft_config[adapter])
    cfg.base_model_name_or_path = teacher
    base = {
        "format": FORMAT,
        "adapter": adapter,
        "model_config": model.get_base_model().cfg.to_dict(),
        "base_sha256": lora.base_fingerprint(model),
        "nvfp4_linears": nvfp4_linears(model),
        "fp8_linears": fp8_linears(model),
        "teacher": teacher,
        **(extra or {}),
    }
    with atomic_dir(folder) as tmp:
        cfg.save_pretrained(str(tmp))
        save_file(adapter_state(model, adapter, weights), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / BASE_FILE).write_text(json.dumps(base, indent=2) + "\n")
    return Path(folder)


def read_base_info(folder: str | Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"LoRA folder not found: {folder}")
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE, BASE_FILE) if not (folder / f).exists()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a vidtrain LoRA: missing {', '.join(missing)}")
    return json.loads((folder / BASE_FILE).read_text())


def check_base(model: nn.Module, folder: str | Path) -> dict:
    """Raise a clear ValueError unless `model` is the base the LoRA in `folder` was trained on."""
    info = read_base_info(folder)
    mine = model.cfg.to_dict()
    theirs = info["model_config"]
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if diff:
        fields = ", ".join(f"{k}: LoRA {theirs.get(k)} vs model {mine.get(k)}" for k in diff)
        raise ValueError(f"LoRA {folder} was trained on a different model config ({fields})")
    digest = lora.base_fingerprint(model)
    if digest != info["base_sha256"]:
        raise ValueError(
            f"LoRA {folder} was trained on base weights sha256 {info['base_sha256'][:12]}… "
            f"(teacher {info.get('teacher')}), this model's weights are {digest[:12]}…: wrong base checkpoint"
        )
    for fmt, (key, of) in QUANT_LINEARS.items():
        theirs_q = info.get(key) or []
        if theirs_q and of(model) != sorted(theirs_q):
            raise ValueError(
                f"LoRA {folder} was distilled on an {fmt} fake-quant base ({len(theirs_q)} {fmt} linears), "
                f"this model has {len(of(model))}, not exactly those: load the QAT checkpoint "
                f"(its model/{_quant_record()}) as the base"
            )
    return info


def _quant_record() -> str:

    return QUANT_RECORD


def load_lora(model: nn.Module, folder: str | Path, adapter: str = lora.GENERATOR):
    """The plain base `model` with the LoRA of `folder` applied (a PeftModel, frozen, eval mode)."""
    from peft import PeftModel

    check_base(model, folder)
    peft_model = PeftModel.from_pretrained(model, str(folder), adapter_name=adapter, is_trainable=False)
    return peft_model.eval()


def merge_lora(model: nn.Module, folder: str | Path, *, requantize: bool = False) -> nn.Module:
    """Fold the LoRA of `folder` into `model`'s weights; returns the plain model. A quantized
    (NVFP4 / FP8 fake-quant) `model` needs `requantize=True`: its quantized linears stay so and
    quantize the merged weights (not equal to base + LoRA, see the module docstring)."""
    if quantized_linears(model) and not requantize:
        raise ValueError(_QUANT_MERGE)
    return load_lora(model, folder).merge_and_unload()


MERGE_RECORD = "merge.json"
_QUANT_MERGE = (
    "refusing to merge a LoRA into a quantized (NVFP4 / FP8 fake-quant) base without --requantize: the "
    "LoRA's path runs in high precision beside the quantized linears, folding it into the weights "
    "quantizes it, so the merged model would not sample exactly as base + LoRA. Exact: sample "
    "the base with `vidtrain sample ... --lora LORA`; or pass --requantize to merge anyway (the "
    "merged weights keep the base's quantization record; the deviation is measured into merge.json)"
)


def _probe(model: nn.Module) -> torch.Tensor:
    """The model's output on a fixed small random input (one chunk of 4x4 latents)."""
    cfg = model.cfg if hasattr(model, "cfg") else model.get_base_model().cfg
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_channels, 3, 4, 4, generator=g)
    ctx = torch.randn(1, 8, cfg.text_dim, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([500.0]), ctx, rule=MaskRule("causal", 3)).float()


def _check_pairing(base: str, lora_dir: str, info: dict, base_quantized: bool) -> None:
    """A LoRA distilled on an NVFP4 / FP8 (QAT) base goes with that base, not a high-precision one."""
    for fmt, (key, _) in QUANT_LINEARS.items():
        theirs = info.get(key) or []
        if theirs and not base_quantized:
            raise ValueError(
                f"LoRA {lora_dir} was distilled on an {fmt} fake-quant (QAT) base ({len(theirs)} {fmt} "
                f"linears, teacher {info.get('teacher')}); --base {base} is a high-precision checkpoint "
                "(no quant.json): pass the QAT checkpoint it was distilled on, with --requantize"
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="vidtrain merge",
        description="Fold a DMD LoRA into its base model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--base", required=True, help="base checkpoint folder (the DMD teacher)")
    p.add_argument("--lora", required=True, help="LoRA folder (RUN/lora from a dmd run)")
    p.add_argument("--out", required=True, help="output folder, vidtrain format (written atomically)")
    p.add_argument(
        "--requantize", action="store_true",
        help="a quantized (QAT) base: merge anyway; the merged weights keep its NVFP4 / FP8 record "
        "(not equal to base + LoRA: the deviation is measured and written to OUT/merge.json)",
    )  # fmt: skip
    args = p.parse_args(argv)

    info = read_base_info(args.lora)
    folder = resolve_model_folder(args.base)
    base_quantized = (folder / _quant_record()).exists()
    _check_pairing(args.base, args.lora, info, base_quantized)
    if base_quantized and not args.requantize:
        raise ValueError(f"{args.base}: {_QUANT_MERGE}")
    model = CausalWanDiT.from_pretrained(args.base)
    apply_quant_record(model, folder)
    peft_model = load_lora(model, args.lora)
    want = _probe(peft_model)
    merged = peft_model.merge_and_unload()
    got = _probe(merged)
    deviation = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    record = {
        "base": str(args.base),
        "lora": str(args.lora),
        "requantized": base_quantized,
        "probe_max_rel_deviation": deviation,  # merged vs base + LoRA, one chunk of random latents
    }
    with atomic_dir(args.out) as tmp:  # weights, NVFP4 record and merge record land together
        save_model_state(merged.cfg, merged.state_dict(), tmp)
        write_quant_record(merged, tmp)
        (tmp / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    how = f"{read_quant_record(folder)['format'].upper()} record kept, " if base_quantized else ""
    print(
        f"[vidtrain] merged {args.lora} into {args.base} -> {args.out} "
        f"({how}max relative deviation from base + LoRA on a probe: {deviation:.2e})"
    )
    return 0
