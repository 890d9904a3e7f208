"""Where each sampler setting comes from: resolved once, by `SamplerConfig.from_run`.

For every `SamplerConfig` field, the first of:
  1. `overrides`: what the caller set explicitly (the CLI's flags; a key present is set, even to
     None: `--window-frames none`);
  2. the LoRA record (`vidtrain_base.json` of a DMD LoRA): its few-step `denoising_steps`,
     `timestep_shift` and `frames_per_chunk`;
  3. the run: the recipe that trained the checkpoint (its step folder's recipe.yaml, else its run
     folder's; or a `Recipe` in memory, DMD's own): `model.frames_per_chunk`, `window_frames`,
     `sink_frames`, `shot_sink`, `text_padding`, `text_len` (a run folder's recipe.yaml written
     before `model.text_padding` existed trained "masked"), and for a dmd run its
     `method.dmd.denoising_steps` and `timestep_shift`; and the KV cache format: an NVFP4 model (the checkpoint's quant.json, a
     qat recipe, `quant.enabled`; for a DMD recipe its teacher's quant.json) trained with NVFP4
     history K/V (`quant.kv_fake_quant`) samples with the "nvfp4" cache, an FP8 one (the record's
     or the recipe's `quant.format: fp8`) with the "fp8" cache; with the "nvfp4" cache, the
     recipe's block-scale rule (`quant.kv_scale_rule`: amax | mse) as `kv_scale_rule` (quant.json
     records no KV settings: a bare model folder samples with the default, amax);
  4. `defaults` (the caller's own fallbacks: DMD's rollouts keep fp32 K/V on a high-precision
     base), then the rule for a model without a record (a shot sink when windowed), then the
     dataclass's default.
A shot sink exists only inside a window: without one `shot_sink` resolves to False.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from vidtrain.config import SAMPLE_SINK_FRAMES, SAMPLE_WINDOW_FRAMES, Recipe, load_recipe
from vidtrain.lora.files import read_base_info
from vidtrain.models.wan.state_dict import resolve_model_folder
from vidtrain.quant.qat import QUANT_RECORD, read_quant_record
from vidtrain.utils.io import read_yaml

# the recipe's `model` section keys that are SamplerConfig fields of the same name
RECIPE_KEYS = ("frames_per_chunk", "window_frames", "sink_frames", "shot_sink", "text_padding", "text_len")
# LoRA vidtrain_base.json key (written by the dmd method) -> SamplerConfig field
LORA_KEYS = {
    "denoising_steps": "timesteps",
    "timestep_shift": "shift",
    "frames_per_chunk": "frames_per_chunk",
    "text_padding": "text_padding",
    "text_len": "text_len",
}
DEFAULT = "SamplerConfig default"


class Setting(NamedTuple):
    value: Any
    source: str


def recipe_for(checkpoint: str | Path) -> Path | None:
    """The recipe.yaml of the training that wrote `checkpoint`: its step folder's, else its run
    folder's; None for a bare model folder."""
    folder = resolve_model_folder(checkpoint)
    step = folder.parent if folder.name == "model" else folder
    cands = [step / "recipe.yaml"]
    if step.parent.name == "checkpoints":
        cands.append(step.parent.parent / "recipe.yaml")
    return next((c for c in cands if c.is_file()), None)


def recipe_settings(recipe: Recipe, where: str) -> dict[str, Setting]:
    """What a recipe decides of the sampler (the KV format apart: `run_settings`)."""
    out = {k: Setting(getattr(recipe.model, k), where) for k in RECIPE_KEYS}
    if recipe.method.name == "dmd":  # a DMD run samples with its few-step schedule
        d = recipe.method.dmd
        out["timesteps"] = Setting(tuple(float(t) for t in d.denoising_steps), f"{where} (method.dmd)")
        out["shift"] = Setting(d.timestep_shift, f"{where} (method.dmd)")
    return out


def _kv_setting(recipe: Recipe | None, where: str, record: Path | None) -> dict[str, Setting]:
    """The "nvfp4" (or "fp8") cache for a model trained as NVFP4 (FP8) on such history K/V."""
    if recipe is not None and not recipe.quant.kv_fake_quant:
        return {}  # trained on high-precision K/V: sample with them too
    if record is not None:
        fmt = read_quant_record(record.parent)["format"]
        out = {"kv_cache": Setting(fmt, f"quant record {record} (the model trained on {fmt.upper()} K/V)")}
    elif recipe is not None and recipe.quantized:
        fmt = recipe.quant.format
        out = {"kv_cache": Setting(fmt, f"{where} (an {fmt.upper()} run: quant.kv_fake_quant)")}
    else:
        return {}
    if recipe is not None and recipe.quant.kv_format and recipe.quant.kv_format != fmt:
        fmt = recipe.quant.kv_format  # the history was trained as another cache format (kv2)
        out["kv_cache"] = Setting(fmt, f"{where} (quant.kv_format: the history trained as {fmt})")
    if fmt == "nvfp4" and recipe is not None:  # the block scales the history was trained on
        out["kv_scale_rule"] = Setting(recipe.quant.kv_scale_rule, f"{where} (quant.kv_scale_rule)")
    return out


def _record(folder: str | Path | None) -> Path | None:
    if folder is None:
        return None
    path = resolve_model_folder(folder) / QUANT_RECORD
    return path if path.is_file() else None


def run_settings(run: str | Path | Recipe | None) -> dict[str, Setting]:
    """What the run that trained a checkpoint decided (see the module docstring)."""
    if run is None:
        return {}
    if isinstance(run, Recipe):
        base = (run.method.dmd.teacher or run.model.checkpoint) if run.method.name == "dmd" else None
        return {
            **recipe_settings(run, "the run's recipe"),
            **_kv_setting(run, "the run's recipe", _record(base)),
        }
    path = recipe_for(run)
    recipe = None if path is None else load_recipe(path)
    where = f"recipe {path}"
    out = {} if recipe is None else recipe_settings(recipe, where)
    if path is not None and _before_text_padding(path):
        out["text_padding"] = Setting(
            "masked", f"{where} (written before model.text_padding: trained masked)"
        )
    return {**out, **_kv_setting(recipe, where, _record(run))}


# the `model` keys a trainer wrote into a run's recipe.yaml before model.text_padding existed
_MODEL_KEYS_BEFORE_TEXT_PADDING = frozenset(
    ("flavor", "checkpoint", "in_channels", "text_dim", "frames_per_chunk", "attn_backend",
     "activation_checkpointing", "window_frames", "sink_frames", "shot_sink")
)  # fmt: skip


def _before_text_padding(path: Path) -> bool:
    """A run's recipe.yaml as a trainer writes it (every model key) but without
    `model.text_padding`: written by a vidtrain that masked the caption pads."""
    model = (read_yaml(path, "recipe") or {}).get("model")
    return (
        isinstance(model, dict)
        and model.keys() >= _MODEL_KEYS_BEFORE_TEXT_PADDING
        and "text_padding" not in model
    )


def lora_settings(lora: str | Path | None) -> dict[str, Setting]:
    """What a DMD LoRA's record decided (its few-step schedule, chunking and text padding)."""
    if not lora:
        return {}
    info, out = read_base_info(lora), {}
    for key, name in LORA_KEYS.items():
        if info.get(key) is not None:
            value = tuple(float(t) for t in info[key]) if name == "timesteps" else info[key]
            value = float(value) if name == "shift" else value
            out[name] = Setting(value, f"LoRA {lora}")
    return out


def resolve(
    cls: type,
    run: str | Path | Recipe | None,
    lora: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
    bounded: bool = False,
) -> dict[str, Setting]:
    """Every field of the dataclass `cls` (SamplerConfig) with its value and its source.
    `bounded` (the CLIs): no window unless a flag says so, so a run that trained without one
    samples with config.SAMPLE_WINDOW_FRAMES + SAMPLE_SINK_FRAMES (constant memory), stated."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for what, given in (("overrides", overrides), ("defaults", defaults)):
        unknown = sorted(set(given or {}) - set(fields))
        if unknown:
            raise ValueError(
                f"unknown sampler setting(s) in {what}: {', '.join(unknown)}; known: {', '.join(fields)}"
            )
    chosen = {k: Setting(v, "flag") for k, v in (overrides or {}).items()}
    for layer in (lora_settings(lora), run_settings(run)):
        chosen = {**layer, **chosen}
    for name, value in (defaults or {}).items():
        chosen.setdefault(name, Setting(value, "caller default"))
    if bounded:
        _bound(chosen, fields)
    window = chosen.get("window_frames", Setting(fields["window_frames"].default, DEFAULT)).value
    chosen.setdefault("shot_sink", Setting(window is not None, "no record: on when windowed"))
    for name, f in fields.items():
        chosen.setdefault(name, Setting(f.default, DEFAULT))
    if chosen["shot_sink"].value and window is None:  # a shot sink exists only inside a window
        chosen["shot_sink"] = Setting(False, f"{chosen['shot_sink'].source} (no window)")
    return {name: chosen[name] for name in fields}


BOUNDED = "constant-memory default (no window recorded; --window-frames none: all history)"


def _bound(chosen: dict[str, Setting], fields: dict) -> None:
    """A window (and a global sink) where nothing but a default or an unwindowed run decided."""
    window = chosen.get("window_frames")
    if (window is not None and (window.source == "flag" or window.value is not None)) or (
        window is None and fields["window_frames"].default is not None
    ):
        return
    chosen["window_frames"] = Setting(SAMPLE_WINDOW_FRAMES, BOUNDED)
    sink = chosen.get("sink_frames")
    if sink is None or (sink.source != "flag" and not sink.value):
        chosen["sink_frames"] = Setting(SAMPLE_SINK_FRAMES, BOUNDED)
    shot = chosen.get("shot_sink")
    if shot is None or (shot.source != "flag" and not shot.value):
        chosen["shot_sink"] = Setting(True, BOUNDED)


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe(settings: Mapping[str, Setting], log: Callable[[str], None]) -> None:
    """One line per source: `name=value, ... from SOURCE`."""
    by_source: dict[str, list[str]] = {}
    for name, s in settings.items():
        by_source.setdefault(s.source, []).append(f"{name}={_show(s.value)}")
    for source, items in by_source.items():
        log(f"[vidtrain] sampler settings: {', '.join(items)} from {source}")
