"""Weight layouts of the Wan2.1 and Wan2.2 VAEs: the original checkpoints (`Wan2.1_VAE.pth`,
`Wan2.2_VAE.pth`) and diffusers (`AutoencoderKLWan`).

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

Wan2.2 nests its levels (the shortcuts have no weights):

    ours                      original                          diffusers
    encoder.down.I.blocks.J   encoder.downsamples.I.downsamples.J   encoder.down_blocks.I.{resnets.J | downsampler}
    decoder.up.I.blocks.J     decoder.upsamples.I.upsamples.J       decoder.up_blocks.I.{resnets.J | upsampler}

Sizes (including Wan2.2's patch size, decoder width, residual levels) are read off an original
state dict, so one loader serves both families.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vidtrain.models.vae.model import (
    WAN21_LATENTS_MEAN,
    WAN21_LATENTS_STD,
    WAN22_LATENTS_MEAN,
    WAN22_LATENTS_STD,
    VAEConfig,
    flavor_config,
)

if TYPE_CHECKING:
    from vidtrain.models.vae.model import CausalVideoVAE

LAYOUTS = ("native", "original", "diffusers")
_ORIG_OUTER = {"conv_in": "conv1", "down": "downsamples", "up": "upsamples", "mid": "middle"}
_ORIG_OUTER |= {"norm_out": "head.0", "conv_out": "head.2"}
_ORIG_LEAF = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6"}
_ORIG_LEAF |= {"spatial": "resample.1"}
_DIFF_LEAF = {"shortcut": "conv_shortcut", "spatial": "resample.1"}
_DIFF_MID = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}
_RESAMPLE_LEAVES = ("spatial", "time_conv")
# Latent statistics when a checkpoint carries none (original layouts): by z_dim, else identity.
_KNOWN_STATS = {16: (WAN21_LATENTS_MEAN, WAN21_LATENTS_STD), 48: (WAN22_LATENTS_MEAN, WAN22_LATENTS_STD)}


def _nested(parts: list[str]) -> bool:
    """A Wan2.2 level key: encoder.down.I.blocks.J... / decoder.up.I.blocks.J..."""
    return parts[1] in ("down", "up") and len(parts) > 4 and parts[3] == "blocks"


def to_original_key(key: str) -> str:
    """Our parameter name -> the original Wan2.1 checkpoint's."""
    parts = key.split(".")
    if parts[0] not in ("encoder", "decoder"):
        return ".".join([{"quant_conv": "conv1", "post_quant_conv": "conv2"}[parts[0]], *parts[1:]])
    outer = parts[1]
    if _nested(parts):
        parts[3] = _ORIG_OUTER[outer]
        parts[5] = _ORIG_LEAF.get(parts[5], parts[5])
    elif outer in ("down", "up", "mid"):
        parts[3] = _ORIG_LEAF.get(parts[3], parts[3])
    parts[1] = _ORIG_OUTER.get(outer, outer)
    return ".".join(parts)


def to_diffusers_key(key: str, num_res_blocks: int) -> str:
    """Our parameter name -> diffusers' `AutoencoderKLWan` name."""
    parts = key.split(".")
    if parts[0] not in ("encoder", "decoder") or parts[1] not in ("down", "up", "mid"):
        return key
    if _nested(parts):
        leaf = [_DIFF_LEAF.get(parts[5], parts[5]), *parts[6:]]
        block, sampler = ("down_blocks", "downsampler") if parts[1] == "down" else ("up_blocks", "upsampler")
        inner = [sampler] if parts[5] in _RESAMPLE_LEAVES else ["resnets", parts[4]]
        return ".".join([parts[0], block, parts[2], *inner, *leaf])
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
    raise ValueError(f"not a Wan2.1 VAE state dict nor a Wan2.2 one (first keys: {sorted(sd)[:5]})")


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


def _stats(z_dim: int, mean: list[float] | None, std: list[float] | None) -> dict[str, tuple[float, ...]]:
    """Latent statistics: given ones, else Wan2.1's (z_dim 16) or Wan2.2's (z_dim 48), else identity."""
    if (mean is None) != (std is None):
        raise ValueError(
            f"latents_mean and latents_std come together; got only {'std' if mean is None else 'mean'}"
        )
    if mean is None or std is None:
        mean, std = _KNOWN_STATS.get(z_dim, ((0.0,) * z_dim, (1.0,) * z_dim))
    return {"latents_mean": tuple(float(v) for v in mean), "latents_std": tuple(float(v) for v in std)}


def _flat_levels(sd: dict[str, torch.Tensor], base: int) -> tuple[list[int], list[bool], list[int]]:
    """Wan2.1: multipliers, temporal flags and res blocks per level of the flat `downsamples` list."""
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
    return mults, temporal, res_per_level


def _nested_levels(sd: dict[str, torch.Tensor], base: int) -> tuple[list[int], list[bool], list[int]]:
    """Wan2.2: the same, read off `encoder.downsamples.I.downsamples.J`."""
    pat = re.compile(r"encoder\.downsamples\.(\d+)\.downsamples\.(\d+)\.residual\.")
    blocks: dict[int, set[int]] = {}
    for k in sd:
        if m := pat.match(k):
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    mults, temporal, res_per_level = [], [], []
    for i in sorted(blocks):
        pre = f"encoder.downsamples.{i}.downsamples."
        res_per_level.append(len(blocks[i]))
        mults.append(sd[f"{pre}0.residual.2.weight"].shape[0] // base)
        if f"{pre}{len(blocks[i])}.resample.1.weight" in sd:
            temporal.append(f"{pre}{len(blocks[i])}.time_conv.weight" in sd)
    return mults, temporal, res_per_level


def config_from_original(sd: dict[str, torch.Tensor]) -> VAEConfig:
    """Read the sizes off an original-layout state dict (Wan2.1 or Wan2.2)."""
    conv_in = sd["encoder.conv1.weight"]
    base, c_in = conv_in.shape[0], conv_in.shape[1]
    patch = math.isqrt(c_in // 3)
    if 3 * patch * patch != c_in:
        raise ValueError(f"encoder.conv1 takes {c_in} channels: not 3 x a square patch")
    z_dim = sd["conv2.weight"].shape[0]
    residual = any(k.startswith("encoder.downsamples.0.downsamples.") for k in sd)
    mults, temporal, res_per_level = (_nested_levels if residual else _flat_levels)(sd, base)
    if len(set(res_per_level)) != 1:
        raise ValueError(f"uneven residual blocks per level in the checkpoint: {res_per_level}")
    decoder_dim = sd["decoder.head.0.gamma"].shape[0] // mults[0]  # the decoder's last width
    return VAEConfig(
        base_dim=base,
        z_dim=z_dim,
        dim_mult=tuple(mults),
        num_res_blocks=res_per_level[0],
        temporal_downsample=tuple(temporal),
        decoder_base_dim=None if decoder_dim == base else decoder_dim,
        residual=residual,
        patch_size=patch,
        **_stats(z_dim, None, None),
    )


def config_from_diffusers(cfg: dict) -> VAEConfig:
    """Sizes from an `AutoencoderKLWan` config.json (Wan2.1 or Wan2.2); options not built are refused."""
    patch = cfg.get("patch_size") or 1
    c_in, c_out = cfg.get("in_channels", 3), cfg.get("out_channels", 3)
    if c_in != 3 * patch * patch or c_out != 3 * patch * patch:
        desc = ", ".join(f"{k}={cfg.get(k, d)!r}" for k, d in (("is_residual", False), ("patch_size", None)))
        raise ValueError(
            f"unsupported AutoencoderKLWan options ({desc}, in_channels={c_in}, out_channels={c_out}): "
            f"RGB video with patch_size {patch} needs in_channels = out_channels = {3 * patch * patch}"
        )
    if cfg.get("attn_scales") not in (None, []):
        raise ValueError(
            f"unsupported AutoencoderKLWan options: attn_scales={cfg['attn_scales']!r} (only [])"
        )
    base, z_dim = cfg.get("base_dim", 96), cfg.get("z_dim", 16)
    decoder_dim = cfg.get("decoder_base_dim")
    return VAEConfig(
        base_dim=base,
        z_dim=z_dim,
        dim_mult=tuple(cfg.get("dim_mult", (1, 2, 4, 4))),
        num_res_blocks=cfg.get("num_res_blocks", 2),
        temporal_downsample=tuple(cfg.get("temperal_downsample", (False, True, True))),
        decoder_base_dim=None if decoder_dim in (None, base) else decoder_dim,
        residual=bool(cfg.get("is_residual", False)),
        patch_size=patch,
        **_stats(z_dim, cfg.get("latents_mean"), cfg.get("latents_std")),
    )


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
        try:
            cfg = config_from_diffusers(json.loads((path / "config.json").read_text()))
        except ValueError as e:
            raise ValueError(f"{path / 'config.json'}: {e}") from None
        sd = read_state_dict(_diffusers_weights(path))
    elif path.is_file():
        sd = read_state_dict(path)
        cfg = None
    else:
        raise ValueError(f"no VAE checkpoint at {path}")
    layout = detect_layout(sd)
    if flavor is not None:
        cfg = flavor_config(flavor)
    elif cfg is None and layout == "diffusers":
        raise ValueError(
            f"{path} holds diffusers-layout weights: load the diffusers folder with its config.json"
        )
    elif cfg is None:
        orig = sd if layout == "original" else {to_original_key(k): v for k, v in sd.items()}
        cfg = config_from_original(orig)
    model = cls(cfg)
    load_layout(model, sd, layout)
    return model
