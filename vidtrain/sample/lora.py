"""Loading a DMD LoRA (peft folder) onto the base model it was trained from.

The DMD stage calls `save_base_identity(base_model, adapter_dir)` next to peft's
`save_pretrained`; `load_lora` refuses an adapter whose recorded base differs from the model
it is asked to patch (other config, or other weights: a fingerprint of every base tensor).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

IDENTITY_FILE = "vidtrain_base.json"


def _base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Base weights under their plain names, whether or not peft has wrapped the model."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    out = {}
    for name, t in model.state_dict().items():
        if "lora_" in name:
            continue
        out[name.replace(".base_layer", "")] = t
    return out


def base_identity(model: torch.nn.Module) -> dict:
    """{"config": the Wan config, "fingerprint": sha256 over every tensor's name, shape, and
    first 4096 values (fp32)} — cheap even for 14B, and different for any other base."""
    h = hashlib.sha256()
    for name, t in sorted(_base_state(model).items()):
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    cfg = model.get_base_model().cfg if hasattr(model, "get_base_model") else model.cfg
    return {"config": cfg.to_dict(), "fingerprint": h.hexdigest()}


def save_base_identity(model: torch.nn.Module, adapter_dir: str | Path) -> Path:
    path = Path(adapter_dir) / IDENTITY_FILE
    path.write_text(json.dumps(base_identity(model), indent=2) + "\n")
    return path


def load_lora(model: torch.nn.Module, adapter_dir: str | Path, merge: bool = True) -> torch.nn.Module:
    """Apply a peft LoRA folder to `model` (PeftModel.from_pretrained); merged by default.

    ValueError if the folder is not a peft adapter, has no recorded base identity, or was
    trained on another base.
    """
    from peft import PeftModel

    folder = Path(adapter_dir)
    if not (folder / "adapter_config.json").is_file():
        raise ValueError(f"{folder} is not a peft LoRA folder (no adapter_config.json)")
    ident_path = folder / IDENTITY_FILE
    if not ident_path.is_file():
        raise ValueError(f"{folder} has no {IDENTITY_FILE}: cannot check which base it belongs to")
    recorded = json.loads(ident_path.read_text())
    mine = base_identity(model)
    if recorded.get("config") != mine["config"]:
        raise ValueError(f"LoRA {folder} was trained on a base with another config: {recorded.get('config')}")
    if recorded.get("fingerprint") != mine["fingerprint"]:
        raise ValueError(f"LoRA {folder} was trained on another base checkpoint (weight fingerprint differs)")
    peft_model = PeftModel.from_pretrained(model, str(folder))
    return peft_model.merge_and_unload() if merge else peft_model
