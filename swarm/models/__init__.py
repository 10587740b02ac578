"""Model families, registered by the `model_type` of a Hugging Face config."""

from __future__ import annotations

from transformers import PretrainedConfig

from .base import ClientParts, ModelFamily, StoredTensor
from .bloom import BloomFamily
from .falcon import FalconFamily
from .gemma3 import Gemma3Family
from .llama import LlamaFamily
from .mixtral import MixtralFamily
from .phi3 import Phi3Family

FAMILIES: dict[str, type[ModelFamily]] = {
    model_type: family
    for family in (LlamaFamily, MixtralFamily, Gemma3Family, FalconFamily, BloomFamily, Phi3Family)
    for model_type in family.model_types
}


class UnsupportedModelError(ValueError):
    pass


def get_family(config: PretrainedConfig) -> ModelFamily:
    """The family that knows how to split and run this config's model."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; supported types: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type](config)


__all__ = ["FAMILIES", "ClientParts", "ModelFamily", "StoredTensor", "UnsupportedModelError", "get_family"]
