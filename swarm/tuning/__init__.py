"""Client-owned tuning parameters applied inside remote blocks."""

from __future__ import annotations

import json

from .base import AdapterError, AdapterMethod, AdapterSet, adapters_applied
from .lora import LoRA

METHODS: dict[str, type[AdapterMethod]] = {cls.name: cls for cls in (LoRA,)}


def method_from_json(name: str, settings_json: str) -> AdapterMethod:
    """Rebuilds a method from what travels on the wire; errors name what was wrong."""
    if name not in METHODS:
        raise AdapterError(f"unknown adapter method {name!r}; known: {', '.join(sorted(METHODS))}")
    try:
        settings = json.loads(settings_json or "{}")
    except json.JSONDecodeError as e:
        raise AdapterError(f"{name} settings are not valid JSON: {e}") from None
    if not isinstance(settings, dict):
        raise AdapterError(f"{name} settings must be a JSON object")
    try:
        return METHODS[name](**settings)
    except TypeError as e:
        raise AdapterError(f"bad {name} settings: {e}") from None


__all__ = ["METHODS", "AdapterError", "AdapterMethod", "AdapterSet", "LoRA", "adapters_applied", "method_from_json"]
