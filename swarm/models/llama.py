"""Llama-style decoders: Llama, Mistral, Qwen 2 and Qwen 3.

All four use pre-norm decoder layers with RMSNorm, rotary positions computed once per
forward and grouped-query attention; they differ only in details the library's own layer
classes and config already carry (Qwen's q/k norms and biases, Mistral's sliding window,
Qwen's per-layer attention types), so the base recipe serves them unchanged.
"""

from .base import ModelFamily


class LlamaFamily(ModelFamily):
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    class_prefixes = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
    # Mistral's forward slides every layer's window; Qwen's configs say per layer (layer_types).
    sliding_window_model_types = ("mistral",)
