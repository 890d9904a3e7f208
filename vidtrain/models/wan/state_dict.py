"""Weight layouts: original Wan (2.1, 2.2), diffusers' WanTransformer3DModel, and vidtrain's own.

Our parameter names are the original Wan names (Wan2.2-TI2V-5B uses Wan2.1's names and shapes,
with other sizes). Diffusers names map onto them by rules. Sizes can be read off the weights'
shapes (`config_from_state_dict`); a config.json that leaves a size out gets it from there.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from vidtrain.models.wan.config import WanConfig, flavor
from vidtrain.utils.io import atomic_dir
from vidtrain.utils.run_folder import latest_checkpoint

OURS_CONFIG = "vidtrain_model.json"
OURS_WEIGHTS = "model.safetensors"
WAN_HEAD_DIM = 128  # every released Wan DiT (1.3B, 14B, 5B): the number of heads is not in the shapes
WAN_MODEL_TYPES = ("t2v", "ti2v")  # original config.json model_type: Wan2.1/2.2 T2V, Wan2.2 TI2V

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
    unsupported = [
        f"{k}={d[k]!r}"
        for k, ok in (("image_dim", None), ("added_kv_proj_dim", None), ("pos_embed_seq_len", None))
        if d.get(k, ok) != ok
    ]
    if d.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        unsupported.append(f"qk_norm={d['qk_norm']!r}")
    if unsupported:
        raise ValueError(
            f"unsupported WanTransformer3DModel options ({', '.join(unsupported)}): only text-to-video "
            "Wan (no image embedder, qk_norm='rms_norm_across_heads') is built"
        )
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


def config_from_wan(d: dict, sd: dict[str, torch.Tensor] | None = None):
    """WanConfig of an original Wan config.json (Wan2.1 t2v, Wan2.2 t2v / ti2v). Sizes it leaves
    out (the original WanModel does not save text_dim and cross_attn_norm) come from the
    weights' shapes when `sd` (original names) is given, else from Wan's defaults."""
    if d.get("model_type", "t2v") not in WAN_MODEL_TYPES:
        raise ValueError(
            f"only Wan text-to-video (t2v) and Wan2.2 text-image-to-video (ti2v) checkpoints are supported, "
            f"got model_type={d['model_type']!r}"
        )
    sized = ("dim", "num_layers", "ffn_dim", "in_dim", "out_dim", "text_dim", "freq_dim", "cross_attn_norm")
    sizes = shape_sizes(sd) if sd is not None and set(sized) - set(d) else {}
    defaults = {"in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256}
    defaults |= {"patch_size": (1, 2, 2), "eps": 1e-6, "cross_attn_norm": True}

    def get(key: str, field: str):
        if key in d:
            return d[key]
        if field in sizes:
            return sizes[field]
        if field in defaults:
            return defaults[field]
        raise ValueError(f"the Wan config.json has no {key!r} (and no weights to read it from)")

    dim = get("dim", "dim")
    return WanConfig(
        dim=dim,
        num_heads=d["num_heads"] if "num_heads" in d else _heads_of(dim),
        num_layers=get("num_layers", "num_layers"),
        ffn_dim=get("ffn_dim", "ffn_dim"),
        in_channels=get("in_dim", "in_channels"),
        out_channels=get("out_dim", "out_channels"),
        text_dim=get("text_dim", "text_dim"),
        freq_dim=get("freq_dim", "freq_dim"),
        patch_size=tuple(get("patch_size", "patch_size")),
        eps=d.get("eps", 1e-6),
        cross_attn_norm=get("cross_attn_norm", "cross_attn_norm"),
    )


def shape_sizes(sd: dict[str, torch.Tensor]) -> dict:
    """The WanConfig fields the shapes of an original-names state dict fix: dim, in/out channels,
    patch size, layers, FFN, text and frequency dims, whether the cross-attention norm exists."""
    need = (
        "patch_embedding.weight",
        "head.head.weight",
        "text_embedding.0.weight",
        "time_embedding.0.weight",
    )
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"not a Wan DiT state dict (original names): no {', '.join(missing)}")
    patch = sd["patch_embedding.weight"]  # [D, C_in, pt, ph, pw]
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if layers != set(range(len(layers))):
        raise ValueError(f"the checkpoint's blocks are not numbered 0..N-1: {sorted(layers)}")
    sizes = {
        "dim": patch.shape[0],
        "in_channels": patch.shape[1],
        "out_channels": sd["head.head.weight"].shape[0] // math.prod(patch.shape[2:]),
        "patch_size": tuple(patch.shape[2:]),
        "num_layers": len(layers),
        "text_dim": sd["text_embedding.0.weight"].shape[1],
        "freq_dim": sd["time_embedding.0.weight"].shape[1],
    }
    if layers:
        sizes["ffn_dim"] = sd["blocks.0.ffn.0.weight"].shape[0]
        sizes["cross_attn_norm"] = "blocks.0.norm3.weight" in sd
    return sizes


def _heads_of(dim: int) -> int:
    if dim % WAN_HEAD_DIM:
        raise ValueError(
            f"the number of heads is not in the weights and dim {dim} is not a multiple of Wan's head dim "
            f"{WAN_HEAD_DIM}: give num_heads"
        )
    return dim // WAN_HEAD_DIM


def config_from_state_dict(sd: dict[str, torch.Tensor], num_heads: int | None = None) -> WanConfig:
    """WanConfig read off an original-names state dict's shapes. The heads are not in the shapes:
    `num_heads`, else dim / 128 (the head dim of every released Wan DiT); eps and RoPE are Wan's."""
    sizes = shape_sizes(sd)
    return WanConfig(num_heads=num_heads or _heads_of(sizes["dim"]), **sizes)


def check_flavor(config: WanConfig, sd: dict[str, torch.Tensor], name: str, source: str) -> None:
    """Refuse, in one line naming the fields, a checkpoint that is not the flavor `name`: its
    weights' sizes, and its configuration's other fields (heads, eps, RoPE), against the flavor's."""
    want, sizes = flavor(name), shape_sizes(sd)
    have = {k: sizes.get(k, getattr(config, k)) for k in want.to_dict()}
    diff = [
        f"{k} {have[k]} (checkpoint) vs {getattr(want, k)} (flavor)"
        for k in want.to_dict()
        if have[k] != getattr(want, k)
    ]
    if diff:
        raise ValueError(f"checkpoint {source} does not fit flavor {name!r}: {', '.join(diff)}")


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
    raise ValueError(f"{cfg_path} is neither an original Wan nor a diffusers WanTransformer3DModel config")


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


def load_pretrained(cls, path: str | Path, attn_backend: str = "auto", flavor_name: str | None = None):
    """See `CausalWanDiT.from_pretrained`."""
    folder = resolve_model_folder(path)
    layout, cfg = detect_layout(folder)
    if layout == "vidtrain":
        config = WanConfig.from_dict(cfg)
    elif layout == "diffusers":
        config = config_from_diffusers(cfg)
    sd = _read_weights(folder)
    if any(k.startswith("base_model.model.") for k in sd):
        raise ValueError(
            f"{folder} is a DMD training checkpoint (base + LoRA adapters under peft names): sample its "
            "teacher checkpoint with --lora RUN/lora, or fold the LoRA in with `vidtrain merge`"
        )
    if layout == "diffusers":
        sd = diffusers_to_wan(sd)
    if layout == "wan":
        config = config_from_wan(cfg, sd)
    if flavor_name is not None:
        check_flavor(config, sd, flavor_name, str(folder))
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
