"""Saving and loading what the client trained.

A folder written by `save_adapter` holds:

- ``swarmlm_tuning.json`` + ``swarmlm_tuning.safetensors``: the tuning setup and every
  trainable tensor under its client name, for an exact round trip into swarmlm;
- with LoRA, also PEFT's own files (``adapter_config.json`` + ``adapter_model.safetensors``),
  so ``peft.PeftModel.from_pretrained(local_transformers_model, DIR)`` gives the same model;
- with no tuning mode (or `train_lm_head`), ``client_parts.safetensors``: the trained embeddings, final norm and
  LM head under the checkpoint's own tensor names (loadable into a local model with
  ``load_state_dict(..., strict=False)``).

`load_adapter` reads a swarmlm folder, or a plain PEFT LoRA folder trained elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from swarm.models import ModelFamily
from swarm.tuning import LoRA

TUNING_JSON = "swarmlm_tuning.json"
TUNING_TENSORS = "swarmlm_tuning.safetensors"
CLIENT_PARTS = "client_parts.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def lora_peft_key(family: ModelFamily, name: str) -> str:
    """'3.self_attn.q_proj.lora_A' -> 'base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight'."""
    block, rest = name.split(".", 1)
    return f"base_model.model.{family.layers_prefix}.{block}.{rest}.weight"


def lora_name_from_peft(family: ModelFamily, key: str) -> str:
    prefix = f"base_model.model.{family.layers_prefix}."
    if not key.startswith(prefix) or not key.endswith(".weight"):
        raise ValueError(f"PEFT tensor {key!r} is not a LoRA weight of {family.layers_prefix}")
    return key[len(prefix):-len(".weight")]


def save_adapter(model, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    family, tuning = model.family, model.tuning
    if tuning is None or model.train_lm_head:
        keys = {v: k for k, v in family.client_keys().items()}
        state = {keys[n]: t.detach().contiguous() for n, t in model.client.state_dict().items() if n in keys}
        save_file(state, folder / CLIENT_PARTS)
    if tuning is None:
        (folder / TUNING_JSON).write_text(json.dumps({"modes": []}, indent=2))
        return folder
    settings = {"modes": tuning.modes, "pre_seq_len": tuning.prefix_length, "train_lm_head": model.train_lm_head}
    tensors = {n: p.detach().contiguous() for n, p in tuning.named_parameters()}
    for adapter in tuning.adapters:
        if isinstance(adapter.method, LoRA):
            settings["lora"] = adapter.method.settings() | {"seed": None}
            _save_peft_lora(family, adapter, model.name_or_path, folder)
    save_file(tensors, folder / TUNING_TENSORS)
    (folder / TUNING_JSON).write_text(json.dumps(settings, indent=2))
    return folder


def _save_peft_lora(family: ModelFamily, adapter, base_name: str, folder: Path) -> None:
    method: LoRA = adapter.method
    targets = sorted({t.rsplit(".", 1)[-1] for t in method.targets})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": method.rank, "lora_alpha": method.alpha, "lora_dropout": method.dropout,
        "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "use_rslora": False, "init_lora_weights": True, "modules_to_save": None,
    }
    weights = {lora_peft_key(family, n): t.detach().contiguous() for n, t in adapter.tensors().items()}
    save_file(weights, folder / PEFT_WEIGHTS)
    (folder / PEFT_CONFIG).write_text(json.dumps(config, indent=2))


def read_tuning_settings(folder: str | Path) -> dict:
    """The from_pretrained keyword arguments that rebuild the folder's tuning setup."""
    folder = Path(folder)
    if (folder / TUNING_JSON).exists():
        settings = json.loads((folder / TUNING_JSON).read_text())
        kwargs = {"tuning_mode": settings["modes"] or None, "pre_seq_len": settings.get("pre_seq_len") or 16,
                  "train_lm_head": bool(settings.get("train_lm_head"))}
        if "lora" in settings:
            lora = settings["lora"]
            kwargs.update(lora_rank=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                          lora_targets=lora["targets"])
        return kwargs
    if (folder / PEFT_CONFIG).exists():
        config = json.loads((folder / PEFT_CONFIG).read_text())
        if config.get("peft_type") != "LORA":
            raise ValueError(f"{folder}: PEFT adapter type {config.get('peft_type')!r} is not supported; "
                             "swarmlm loads PEFT LoRA adapters and its own folders")
        targets = config["target_modules"]
        return {"tuning_mode": "lora", "lora_rank": config["r"], "lora_alpha": config["lora_alpha"],
                "lora_dropout": config.get("lora_dropout", 0.0),
                "lora_targets": [targets] if isinstance(targets, str) else sorted(targets)}
    raise FileNotFoundError(f"{folder} holds no {TUNING_JSON} or {PEFT_CONFIG}: not an adapter folder")


def load_adapter(model, folder: str | Path) -> None:
    """Loads the folder's tensors into a model built with `read_tuning_settings(folder)`."""
    folder = Path(folder)
    if (folder / CLIENT_PARTS).exists():
        keys = model.family.client_keys()
        state = {keys[k]: t for k, t in load_file(folder / CLIENT_PARTS).items()}
        with torch.no_grad():
            model.client.load_state_dict(state, strict=False)
        if model.tuning is None:
            return
    if (folder / TUNING_TENSORS).exists():
        state = load_file(folder / TUNING_TENSORS)
        missing, unexpected = model.tuning.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{folder}: tensors do not match this model's tuning setup: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        return
    weights = load_file(folder / PEFT_WEIGHTS)
    adapter = model.tuning.adapters[0]
    params = adapter.tensors()
    loaded = {lora_name_from_peft(model.family, k): t for k, t in weights.items()}
    if set(loaded) != set(params):
        raise ValueError(f"{folder}: PEFT LoRA tensors do not match this model "
                         f"(missing {sorted(set(params) - set(loaded))[:5]}, "
                         f"unexpected {sorted(set(loaded) - set(params))[:5]})")
    with torch.no_grad():
        for name, tensor in loaded.items():
            params[name].copy_(tensor)
