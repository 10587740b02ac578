"""Saving and loading what the client trained.

A folder written by `save_adapter` holds:

- ``swarmlm_tuning.json`` + ``swarmlm_tuning.safetensors``: the tuning setup (modes, each
  method's settings) and every trainable tensor under its client name, for an exact round
  trip into swarmlm (a prefix trained through its MLP keeps the MLP);
- each adapter method's files for other tools: PEFT's (``adapter_config.json`` +
  ``adapter_model.safetensors``) for LoRA, IA3 and prefix tuning, so
  ``peft.PeftModel.from_pretrained(local_transformers_model, DIR)`` gives the same model;
  the documented bottleneck files (swarm/tuning/bottleneck.py) for bottleneck adapters. With
  one adapter method they sit in DIR itself; with several, each in ``DIR/<method name>/``;
- when the client's own parts train (no tuning mode, ``embeddings``, or `train_lm_head`),
  ``client_parts.safetensors``: the embeddings, final norm and LM head under the checkpoint's
  own tensor names (loadable into a local model with ``load_state_dict(..., strict=False)``).

`load_adapter` reads a swarmlm folder, or a folder another tool wrote for one method (a PEFT
LoRA, IA3 or prefix-tuning adapter, or bottleneck files).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from swarm.tuning import METHODS, AdapterMethod, ExportTarget, method_from_json

from .tuning import CLIENT_MODES

TUNING_JSON = "swarmlm_tuning.json"
TUNING_TENSORS = "swarmlm_tuning.safetensors"
CLIENT_PARTS = "client_parts.safetensors"


def export_target(model) -> ExportTarget:
    return ExportTarget(layers_prefix=model.family.layers_prefix, base_model=model.name_or_path)


def save_adapter(model, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    family, tuning = model.family, model.tuning
    if tuning is None or model.train_lm_head or tuning.trains_embeddings:
        keys = {v: k for k, v in family.client_keys().items()}
        state = {keys[n]: t.detach().contiguous() for n, t in model.parts.state_dict().items() if n in keys}
        save_file(state, folder / CLIENT_PARTS)
    if tuning is None:
        (folder / TUNING_JSON).write_text(json.dumps({"modes": []}, indent=2))
        return folder
    settings = {"modes": tuning.modes, "pre_seq_len": tuning.prefix_length, "train_lm_head": model.train_lm_head,
                "methods": {m.name: _saved_settings(m) for m in tuning.methods}}
    target = export_target(model)
    for adapter in tuning.adapters:
        where = folder if len(tuning.adapters) == 1 else folder / adapter.method.name
        adapter.method.save_files(where, {n: t.detach() for n, t in adapter.tensors().items()}, target)
    save_file({n: p.detach().contiguous() for n, p in tuning.named_parameters()}, folder / TUNING_TENSORS)
    (folder / TUNING_JSON).write_text(json.dumps(settings, indent=2))
    return folder


def _saved_settings(method: AdapterMethod) -> dict:
    settings = method.settings()
    if "seed" in settings:
        settings["seed"] = None  # a training step's dropout seed; a loaded adapter starts in inference
    return settings


def read_tuning_settings(folder: str | Path, target: ExportTarget) -> dict:
    """The from_pretrained keyword arguments that rebuild the folder's tuning setup."""
    folder = Path(folder)
    if (folder / TUNING_JSON).exists():
        settings = json.loads((folder / TUNING_JSON).read_text())
        methods = dict(settings.get("methods", {}))
        if "lora" in settings:  # folders written before every method had its settings under "methods"
            methods["lora"] = settings["lora"]
        modes = [m if m in CLIENT_MODES else method_from_json(m, json.dumps(methods.get(m, {})))
                 for m in settings["modes"]]
        return {"tuning_mode": modes or None, "pre_seq_len": settings.get("pre_seq_len") or 16,
                "train_lm_head": bool(settings.get("train_lm_head"))}
    method, _ = _foreign_adapter(folder, target)
    return {"tuning_mode": [method]}


def _foreign_adapter(folder: Path, target: ExportTarget) -> tuple[AdapterMethod, dict[str, torch.Tensor]]:
    for method in METHODS.values():
        found = method.load_files(folder, target)
        if found is not None:
            return found
    config = folder / "adapter_config.json"
    if config.exists():
        peft_type = json.loads(config.read_text()).get("peft_type")
        raise ValueError(f"{folder}: PEFT adapter type {peft_type!r} is not supported; swarmlm loads PEFT "
                         f"{', '.join(m.peft_type for m in METHODS.values() if m.peft_type)} adapters and its own folders")
    raise FileNotFoundError(f"{folder} holds no {TUNING_JSON}, PEFT adapter or bottleneck adapter files: "
                            "not an adapter folder")


def load_adapter(model, folder: str | Path) -> None:
    """Loads the folder's tensors into a model built with `read_tuning_settings(folder, ...)`."""
    folder = Path(folder)
    if (folder / CLIENT_PARTS).exists():
        keys = model.family.client_keys()
        state = {keys[k]: t for k, t in load_file(folder / CLIENT_PARTS).items()}
        with torch.no_grad():
            model.parts.load_state_dict(state, strict=False)
        if model.tuning is None:
            return
    if (folder / TUNING_TENSORS).exists():
        state = load_file(folder / TUNING_TENSORS)
        missing, unexpected = model.tuning.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{folder}: tensors do not match this model's tuning setup: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        return
    _, tensors = _foreign_adapter(folder, export_target(model))
    model.tuning.adapters[0].load_tensors(tensors)
