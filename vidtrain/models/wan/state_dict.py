"""Weight layouts: original Wan2.1, diffusers' WanTransformer3DModel, and vidtrain's own.

Our parameter names are the original Wan2.1 names. Diffusers names map onto them by rules.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from vidtrain.models.wan.config import WanConfig
from vidtrain.utils.io import atomic_dir
from vidtrain.utils.run_folder import latest_checkpoint

OURS_CONFIG = "vidtrain_model.json"
OURS_WEIGHTS = "model.safetensors"

# diffusers regex -> original Wan name (applied in order, first match wins)
_DIFFUSERS_TO_WAN = [
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
    (r"^blocks\.(\d+)\.attn1\.to_([qkv])\.", r"blocks.\1.self_attn.\2."),
    (r"^blocks\.(\d+)\.attn1\.norm_([qk])\.", r"blocks.\1.self_attn.norm_\2."),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
    (r"^blocks\.(\d+)\.attn2\.to_([qkv])\.", r"blocks.\1.cross_attn.\2."),
    (r"^blocks\.(\d+)\.attn2\.norm_([qk])\.", r"blocks.\1.cross_attn.norm_\2."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),  # diffusers' cross-attn norm is Wan's norm3
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
]


def diffusers_to_wan(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, val in sd.items():
        new = key
        for pat, rep in _DIFFUSERS_TO_WAN:
            if re.search(pat, key):
                new = re.sub(pat, rep, key)
                break
        out[new] = val
    return out


def config_from_diffusers(d: dict):

    return WanConfig(
        dim=d["num_attention_heads"] * d["attention_head_dim"],
        num_heads=d["num_attention_heads"],
        num_layers=d["num_layers"],
        ffn_dim=d["ffn_dim"],
        in_channels=d["in_channels"],
        out_channels=d.get("out_channels") or d["in_channels"],
        text_dim=d["text_dim"],
        freq_dim=d["freq_dim"],
        patch_size=tuple(d.get("patch_size", (1, 2, 2))),
        eps=d.get("eps", 1e-6),
        cross_attn_norm=d.get("cross_attn_norm", True),
    )


def config_from_wan(d: dict):

    if d.get("model_type", "t2v") != "t2v":
        raise ValueError(
            f"only Wan2.1 text-to-video checkpoints are supported, got model_type={d['model_type']!r}"
        )
    return WanConfig(
        dim=d["dim"],
        num_heads=d["num_heads"],
        num_layers=d["num_layers"],
        ffn_dim=d["ffn_dim"],
        in_channels=d.get("in_dim", 16),
        out_channels=d.get("out_dim", 16),
        text_dim=d.get("text_dim", 4096),
        freq_dim=d.get("freq_dim", 256),
        patch_size=tuple(d.get("patch_size", (1, 2, 2))),
        eps=d.get("eps", 1e-6),
        cross_attn_norm=d.get("cross_attn_norm", True),
    )


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        files = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        sd = {}
        for f in files:
            sd.update(load_file(str(folder / f)))
        return sd
    files = sorted(folder.glob("*.safetensors"))
    if files:
        sd = {}
        for f in files:
            sd.update(load_file(str(f)))
        return sd
    pts = sorted(folder.glob("*.pth")) + sorted(folder.glob("*.pt")) + sorted(folder.glob("*.bin"))
    if pts:
        return torch.load(pts[0], map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no weights (*.safetensors, *.pth, *.bin) in {folder}")


def detect_layout(folder: Path) -> tuple[str, dict]:
    """('vidtrain'|'diffusers'|'wan', config dict) for a checkpoint folder."""
    if (folder / OURS_CONFIG).exists():
        return "vidtrain", json.loads((folder / OURS_CONFIG).read_text())
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{folder} has neither {OURS_CONFIG} nor config.json: not a model checkpoint")
    cfg = json.loads(cfg_path.read_text())
    if "num_attention_heads" in cfg:
        return "diffusers", cfg
    if "num_heads" in cfg and "dim" in cfg:
        return "wan", cfg
    raise ValueError(f"{cfg_path} is neither a Wan2.1 nor a diffusers WanTransformer3DModel config")


def check_and_load(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with one message listing missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(sd))
        if sd[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [f"checkpoint {source} does not fit the model"]
        for name, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                more = f" ... (+{len(items) - 10} more)" if len(items) > 10 else ""
                parts.append(f"{name} ({len(items)}): {', '.join(items[:10])}{more}")
        raise ValueError("; ".join(parts))
    model.load_state_dict(sd, strict=True)


def resolve_model_folder(path: str | Path) -> Path:
    """A model folder from: a model folder, a checkpoint step folder (has model/), or a run
    folder (its newest intact checkpoint)."""
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"checkpoint not found: {folder}")
    if (folder / "checkpoints").is_dir():
        step = latest_checkpoint(folder)
        if step is None:
            raise FileNotFoundError(f"run folder {folder} has no complete checkpoint yet")
        folder = step
    if (folder / "model" / OURS_CONFIG).exists():
        folder = folder / "model"
    return folder


def load_pretrained(cls, path: str | Path, attn_backend: str = "auto"):

    folder = resolve_model_folder(path)
    layout, cfg = detect_layout(folder)
    if layout == "vidtrain":
        config = WanConfig.from_dict(cfg)
    elif layout == "diffusers":
        config = config_from_diffusers(cfg)
    else:
        config = config_from_wan(cfg)
    sd = _read_weights(folder)
    if any(k.startswith("base_model.model.") for k in sd):
        raise ValueError(
            f"{folder} is a DMD training checkpoint (base + LoRA adapters under peft names): sample its "
            "teacher checkpoint with --lora RUN/lora, or fold the LoRA in with `vidtrain merge`"
        )
    if layout == "diffusers":
        sd = diffusers_to_wan(sd)
    model = cls(config, attn_backend)
    check_and_load(model, {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, str(folder))
    return model


def save_model_state(config, state: dict[str, torch.Tensor], folder: str | Path) -> Path:
    """Write our own format (config json + safetensors) into `folder` (the caller makes it atomic)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / OURS_CONFIG).write_text(json.dumps(config.to_dict(), indent=2))
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / OURS_WEIGHTS))
    return folder


def save_vidtrain(model, folder: str | Path) -> Path:
    """Write a model in our format atomically: temp folder, then rename."""

    with atomic_dir(folder) as tmp:
        save_model_state(model.cfg, model.state_dict(), tmp)
    return Path(folder)


def load_model_state(model: torch.nn.Module, folder: str | Path) -> None:
    """Load weights saved by `save_model_state` into an existing (possibly converted) model."""
    folder = Path(folder)
    check_and_load(model, _read_weights(folder), str(folder))
