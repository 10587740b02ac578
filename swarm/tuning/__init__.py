"""Client-owned tuning parameters applied inside remote blocks: one mechanism (base.py), one
module per method. A new method subclasses AdapterMethod and is listed in METHODS."""

from __future__ import annotations

import json

from .base import (AdapterError, AdapterMethod, AdapterSet, AppliedAdapters, ExportTarget, adapters_applied,
                   check_adapters)
from .bottleneck import BottleneckAdapter
from .ia3 import IA3
from .lora import LoRA
from .prefix import PrefixTuning

METHODS: dict[str, type[AdapterMethod]] = {cls.name: cls for cls in (LoRA, IA3, PrefixTuning, BottleneckAdapter)}


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
    except (TypeError, ValueError, OverflowError) as e:
        if isinstance(e, AdapterError):
            raise
        raise AdapterError(f"bad {name} settings: {e}") from None


__all__ = ["METHODS", "AdapterError", "AdapterMethod", "AdapterSet", "AppliedAdapters", "BottleneckAdapter",
           "ExportTarget", "IA3", "LoRA", "PrefixTuning", "adapters_applied", "check_adapters",
           "method_from_json"]
