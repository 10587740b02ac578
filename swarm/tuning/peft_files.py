"""PEFT's adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``), which
``peft.PeftModel.from_pretrained(local_transformers_model, DIR)`` loads. Methods PEFT knows
(LoRA, IA3, prefix tuning) write and read them through these helpers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .base import AdapterError, ExportTarget

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def write_peft(folder: Path, config: dict, weights: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: t.detach().contiguous() for k, t in weights.items()}, folder / PEFT_WEIGHTS)
    (folder / PEFT_CONFIG).write_text(json.dumps(config, indent=2))


def read_peft(folder: Path, peft_type: str) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """The folder's PEFT config and weights if it holds an adapter of `peft_type`, else None."""
    if not (folder / PEFT_CONFIG).exists():
        return None
    config = json.loads((folder / PEFT_CONFIG).read_text())
    if config.get("peft_type") != peft_type:
        return None
    return config, load_file(folder / PEFT_WEIGHTS)


def read_block_tensors(folder: Path, target: ExportTarget, peft_type: str, from_peft_config,
                       suffix: str = "") -> tuple[object, dict[str, torch.Tensor]] | None:
    """A folder of a per-block PEFT method back as (method, tensors by our block names), or None
    if it holds none of `peft_type`; `from_peft_config` builds the method from PEFT's config."""
    found = read_peft(folder, peft_type)
    if found is None:
        return None
    config, weights = found
    return from_peft_config(config), {block_name(target, k, suffix): t for k, t in weights.items()}


def block_key(target: ExportTarget, name: str, suffix: str = "") -> str:
    """'3.self_attn.q_proj.lora_A' -> 'base_model.model.model.layers.3.self_attn.q_proj.lora_A' + suffix."""
    return f"base_model.model.{target.layers_prefix}.{name}{suffix}"


def block_name(target: ExportTarget, key: str, suffix: str = "") -> str:
    """The inverse of `block_key`."""
    prefix = f"base_model.model.{target.layers_prefix}."
    if not key.startswith(prefix) or not key.endswith(suffix):
        raise AdapterError(f"PEFT tensor {key!r} is not a {suffix or 'block'} tensor of {target.layers_prefix}")
    return key[len(prefix):len(key) - len(suffix)]


def module_names(targets) -> list[str]:
    """PEFT's target_modules (a name, a list or a set) as a sorted list."""
    return [targets] if isinstance(targets, str) else sorted(targets or [])
