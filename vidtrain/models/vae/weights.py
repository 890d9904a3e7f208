"""Weight layouts of the Wan2.1 VAE: the original checkpoint (`Wan2.1_VAE.pth`) and diffusers.

Our module names follow the original's flat lists (encoder.down.N = encoder.downsamples.N, decoder.up.N
= decoder.upsamples.N) with readable leaf names, so each layout is a per-key rename:

    ours                      original                   diffusers
    encoder.conv_in           encoder.conv1              encoder.conv_in
    encoder.down.N.norm1      encoder.downsamples.N.residual.0   encoder.down_blocks.N.norm1
    ...conv1 / norm2 / conv2  residual.2 / .3 / .6       conv1 / norm2 / conv2
    ...shortcut / spatial     shortcut / resample.1      conv_shortcut / resample.1
    X.mid.0 / .1 / .2         X.middle.0 / .1 / .2       X.mid_block.resnets.0 / attentions.0 / resnets.1
    decoder.up.N              decoder.upsamples.N        decoder.up_blocks.N//(R+2).{resnets.N%(R+2) | upsamplers.0}
    X.norm_out / X.conv_out   X.head.0 / X.head.2        X.norm_out / X.conv_out
    quant_conv / post_quant_conv   conv1 / conv2         quant_conv / post_quant_conv
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vidtrain.models.vae.model import VAE_FLAVORS, VAEConfig

if TYPE_CHECKING:
    from vidtrain.models.vae.model import CausalVideoVAE

LAYOUTS = ("native", "original", "diffusers")
_ORIG_OUTER = {"conv_in": "conv1", "down": "downsamples", "up": "upsamples", "mid": "middle"}
_ORIG_OUTER |= {"norm_out": "head.0", "conv_out": "head.2"}
_ORIG_LEAF = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6"}
_ORIG_LEAF |= {"spatial": "resample.1"}
_DIFF_LEAF = {"shortcut": "conv_shortcut", "spatial": "resample.1"}
_DIFF_MID = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}


def to_original_key(key: str) -> str:
    """Our parameter name -> the original Wan2.1 checkpoint's."""
    parts = key.split(".")
    if parts[0] not in ("encoder", "decoder"):
        return ".".join([{"quant_conv": "conv1", "post_quant_conv": "conv2"}[parts[0]], *parts[1:]])
    outer = parts[1]
    if outer in ("down", "up", "mid"):
        parts[3] = _ORIG_LEAF.get(parts[3], parts[3])
    parts[1] = _ORIG_OUTER.get(outer, outer)
    return ".".join(parts)


def to_diffusers_key(key: str, num_res_blocks: int) -> str:
    """Our parameter name -> diffusers' `AutoencoderKLWan` name."""
    parts = key.split(".")
    if parts[0] not in ("encoder", "decoder") or parts[1] not in ("down", "up", "mid"):
        return key
    leaf = [_DIFF_LEAF.get(parts[3], parts[3]), *parts[4:]]
    if parts[1] == "mid":
        return ".".join([parts[0], "mid_block", _DIFF_MID[parts[2]], *leaf])
    if parts[1] == "down":
        return ".".join(["encoder", "down_blocks", parts[2], *leaf])
    level, pos = divmod(int(parts[2]), num_res_blocks + 2)  # R+1 res blocks, then an upsampler
    inner = f"resnets.{pos}" if pos <= num_res_blocks else "upsamplers.0"
    return ".".join(["decoder", "up_blocks", str(level), inner, *leaf])


def _key_fn(layout: str, cfg: VAEConfig) -> Callable[[str], str]:
    if layout == "original":
        return to_original_key
    if layout == "diffusers":
        return lambda k: to_diffusers_key(k, cfg.num_res_blocks)
    if layout == "native":
        return lambda k: k
    raise ValueError(f"unknown weight layout {layout!r}; known: {', '.join(LAYOUTS)}")


def detect_layout(sd: dict[str, torch.Tensor]) -> str:
    if "encoder.conv1.weight" in sd:
        return "original"
    if any(k.startswith("encoder.down_blocks.") for k in sd):
        return "diffusers"
    if any(k.startswith("encoder.down.") for k in sd):
        return "native"
    raise ValueError(f"not a Wan2.1 VAE state dict (first keys: {sorted(sd)[:5]})")


def export_state_dict(model: CausalVideoVAE, layout: str) -> dict[str, torch.Tensor]:
    """Our weights under another layout's names (e.g. to write an original-layout checkpoint)."""
    fn = _key_fn(layout, model.config)
    return {fn(k): v for k, v in model.state_dict().items()}


def _listing(title: str, keys: list[str], limit: int = 20) -> str:
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{title} ({len(keys)}): {', '.join(keys[:limit])}{more}"


def load_layout(model: CausalVideoVAE, sd: dict[str, torch.Tensor], layout: str) -> None:
    """Copy a foreign state dict into `model`; ValueError listing missing/unexpected/mismatched keys."""
    fn = _key_fn(layout, model.config)
    ours = model.state_dict()
    theirs_to_ours = {fn(k): k for k in ours}
    missing = [t for t in theirs_to_ours if t not in sd]
    unexpected = [k for k in sd if k not in theirs_to_ours]
    mismatched = [
        f"{t} {tuple(sd[t].shape)} vs ours {tuple(ours[o].shape)}"
        for t, o in theirs_to_ours.items()
        if t in sd and sd[t].shape != ours[o].shape
    ]
    problems = [_listing(n, ks) for n, ks in (("missing", missing), ("unexpected", unexpected)) if ks]
    problems += [_listing("shape mismatches", mismatched)] if mismatched else []
    if problems:
        raise ValueError(f"{layout}-layout VAE weights do not fit the model: " + "; ".join(problems))
    model.load_state_dict({o: sd[t] for t, o in theirs_to_ours.items()}, strict=True)


def config_from_original(sd: dict[str, torch.Tensor]) -> VAEConfig:
    """Read the sizes off an original-layout state dict."""
    base = sd["encoder.conv1.weight"].shape[0]
    z_dim = sd["conv2.weight"].shape[0]
    ids = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.downsamples\.(\d+)\.", k))})
    mults, temporal, res_per_level, count = [], [], [], 0
    for i in ids:
        if f"encoder.downsamples.{i}.resample.1.weight" in sd:
            temporal.append(f"encoder.downsamples.{i}.time_conv.weight" in sd)
            res_per_level.append(count)
            count = 0
        else:
            if count == 0:
                mults.append(sd[f"encoder.downsamples.{i}.residual.2.weight"].shape[0] // base)
            count += 1
    res_per_level.append(count)
    if len(set(res_per_level)) != 1:
        raise ValueError(f"uneven residual blocks per level in the checkpoint: {res_per_level}")
    return _with_stats(VAEConfig(base, z_dim, tuple(mults), res_per_level[0], tuple(temporal)), None, None)


def _with_stats(cfg: VAEConfig, mean: list[float] | None, std: list[float] | None) -> VAEConfig:
    """Latent statistics: given ones, else Wan2.1's for z_dim 16, else identity."""
    if mean is None or std is None:
        if cfg.z_dim == len(VAE_FLAVORS["wan2.1"].latents_mean):
            return cfg
        mean, std = [0.0] * cfg.z_dim, [1.0] * cfg.z_dim
    return replace(cfg, latents_mean=tuple(mean), latents_std=tuple(std))


def config_from_diffusers(cfg: dict) -> VAEConfig:
    """Sizes from an `AutoencoderKLWan` config.json; Wan2.2-only options are refused."""
    unsupported = {
        "is_residual": False,
        "patch_size": None,
        "attn_scales": [],
        "in_channels": 3,
        "out_channels": 3,
    }
    bad = [f"{k}={cfg[k]!r}" for k, ok in unsupported.items() if k in cfg and cfg[k] != ok]
    if cfg.get("decoder_base_dim") not in (None, cfg.get("base_dim", 96)):
        bad.append(f"decoder_base_dim={cfg['decoder_base_dim']}")
    if bad:
        raise ValueError(f"unsupported AutoencoderKLWan options (only the Wan2.1 VAE is built): {bad}")
    out = VAEConfig(
        base_dim=cfg.get("base_dim", 96),
        z_dim=cfg.get("z_dim", 16),
        dim_mult=tuple(cfg.get("dim_mult", (1, 2, 4, 4))),
        num_res_blocks=cfg.get("num_res_blocks", 2),
        temporal_downsample=tuple(cfg.get("temperal_downsample", (False, True, True))),
    )
    return _with_stats(out, cfg.get("latents_mean"), cfg.get("latents_std"))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(sd).__name__})")
    return sd.get("state_dict", sd)


def _diffusers_weights(folder: Path) -> Path:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise ValueError(f"{folder} has config.json but no diffusion_pytorch_model.safetensors/.bin")


def load_pretrained(cls: type[CausalVideoVAE], path: Path, flavor: str | None = None) -> CausalVideoVAE:
    """See `CausalVideoVAE.from_pretrained`."""
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is a folder without config.json (expected a diffusers save_pretrained)")
        cfg = config_from_diffusers(json.loads((path / "config.json").read_text()))
        sd = read_state_dict(_diffusers_weights(path))
    elif path.is_file():
        sd = read_state_dict(path)
        cfg = None
    else:
        raise ValueError(f"no VAE checkpoint at {path}")
    layout = detect_layout(sd)
    if flavor is not None:
        cfg = VAE_FLAVORS[flavor] if flavor in VAE_FLAVORS else cls.from_flavor(flavor).config
    elif cfg is None:
        orig = sd if layout == "original" else {to_original_key(k): v for k, v in sd.items()}
        cfg = config_from_original(orig)
    model = cls(cfg)
    load_layout(model, sd, layout)
    return model
