"""Phi-3: a Llama-style decoder with fused projections (``self_attn.qkv_proj``,
``mlp.gate_up_proj``) and, in some checkpoints, a sliding window on every layer. The
library's own layer splits the fused projections, so only the LoRA targets and the mask
differ from the base recipe."""

from .base import ModelFamily


class Phi3Family(ModelFamily):
    model_types = ("phi3",)
    class_prefixes = {"phi3": "Phi3"}
    sliding_window_model_types = ("phi3",)
    default_lora_targets = ("self_attn.qkv_proj",)
