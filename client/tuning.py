"""The client's own trainable parameters for blocks it does not hold.

- soft prompts (``ptune``): embeddings prepended to the input;
- deep prompts (``deep_ptune``): soft prompts plus, for every block, a prefix added to the
  hidden states of the prompt positions before that block;
- adapters such as LoRA: per-block tensors the peers apply inside their layers.

Everything here lives on the client; peers receive the tensors of their span with each
request, return their gradients and keep nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from swarm.models import ModelFamily
from swarm.tuning import AdapterMethod, LoRA
from swarm.wire import serialize_tensor, swarm_pb2

TUNING_MODES = ("ptune", "deep_ptune", "lora")


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys may not contain dots


def _name(key: str) -> str:
    return key.replace("__", ".")


class ClientAdapter(nn.Module):
    """One adapter method's tensors for every block, owned by the client."""

    def __init__(self, method: AdapterMethod, family: ModelFamily):
        super().__init__()
        self.method = method
        self.params = nn.ParameterDict()
        for block in range(family.num_blocks):
            with torch.device("meta"):
                layer = family.build_layers(family.span_config(block, block + 1))[0]
            for name, shape in method.tensor_shapes(layer).items():
                self.params[_key(f"{block}.{name}")] = nn.Parameter(torch.empty(shape))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # PEFT's LoRA init: A like a linear layer, B zero, so training starts from the base model.
        for key, param in self.params.items():
            if key.endswith("lora_A"):
                nn.init.kaiming_uniform_(param, a=math.sqrt(5))
            else:
                nn.init.zeros_(param)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Global names "{block}.{name}" -> parameter."""
        return {_name(key): param for key, param in self.params.items()}


@dataclass
class TuningPayload:
    """The client tensors that travel with requests, flattened in a fixed order so an
    autograd Function can take them as inputs and return their gradients."""

    deep_prompts: torch.Tensor | None = None  # (num_blocks, 1, prefix, hidden)
    adapters: list[tuple[AdapterMethod, dict[str, torch.Tensor]]] = field(default_factory=list)

    def flat(self) -> list[torch.Tensor]:
        tensors = [self.deep_prompts] if self.deep_prompts is not None else []
        return tensors + [t for _, named in self.adapters for t in named.values()]

    def with_tensors(self, flat: list[torch.Tensor]) -> "TuningPayload":
        flat = list(flat)
        deep = flat.pop(0) if self.deep_prompts is not None else None
        adapters = [(method, {name: flat.pop(0) for name in named}) for method, named in self.adapters]
        return TuningPayload(deep, adapters)

    def __bool__(self) -> bool:
        return self.deep_prompts is not None or bool(self.adapters)

    def span_messages(self, start: int, end: int) -> tuple[swarm_pb2.Tensor | None, list[swarm_pb2.AdapterTensors]]:
        """What a request for blocks [start, end) carries."""
        deep = None
        if self.deep_prompts is not None:
            deep = serialize_tensor(self.deep_prompts[start:end].detach().contiguous())
        messages = []
        for method, named in self.adapters:
            msg = swarm_pb2.AdapterTensors(method=method.name, config_json=method.to_json())
            for name, tensor in named.items():
                if start <= int(name.split(".", 1)[0]) < end:
                    msg.tensors[name].CopyFrom(serialize_tensor(tensor.detach().contiguous()))
            messages.append(msg)
        return deep, messages


class ClientTuning(nn.Module):
    """The trainable parameters of one tuning setup (modes may be combined)."""

    def __init__(self, family: ModelFamily, modes: list[str], hidden_size: int, pre_seq_len: int = 16,
                 lora: LoRA | None = None, embed_tokens: nn.Embedding | None = None):
        super().__init__()
        unknown = [m for m in modes if m not in TUNING_MODES]
        if unknown:
            raise ValueError(f"unknown tuning_mode {unknown}; choose from {', '.join(TUNING_MODES)}")
        if ("ptune" in modes or "deep_ptune" in modes) and pre_seq_len < 1:
            raise ValueError(f"prompt tuning needs pre_seq_len >= 1, got {pre_seq_len}")
        self.modes = list(modes)
        self.prefix_length = pre_seq_len if ("ptune" in modes or "deep_ptune" in modes) else 0
        self.prompts = None
        self.deep_prompts = None
        self.adapters = nn.ModuleList()
        if self.prefix_length:
            init = torch.randn(self.prefix_length, hidden_size) * 0.02
            if embed_tokens is not None:  # start from real token embeddings: a better-conditioned start
                ids = torch.randint(0, embed_tokens.num_embeddings, (self.prefix_length,))
                init = embed_tokens.weight.detach()[ids].clone().float()
            self.prompts = nn.Parameter(init)
        if "deep_ptune" in modes:
            self.deep_prompts = nn.Parameter(torch.zeros(family.num_blocks, 1, self.prefix_length, hidden_size))
        if "lora" in modes:
            self.adapters.append(ClientAdapter(lora or LoRA(), family))

    def prepend_prompts(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                        labels: torch.Tensor | None = None):
        """Soft prompts in front of the input; the mask and labels grow to match."""
        if not self.prefix_length:
            return embeds, attention_mask, labels
        batch = embeds.shape[0]
        prompts = self.prompts.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        embeds = torch.cat([prompts, embeds], dim=1)
        if attention_mask is not None:
            ones = attention_mask.new_ones(batch, self.prefix_length)
            attention_mask = torch.cat([ones, attention_mask], dim=1)
        if labels is not None:
            ignore = labels.new_full((batch, self.prefix_length), -100)
            labels = torch.cat([ignore, labels], dim=1)
        return embeds, attention_mask, labels

    def payload(self) -> TuningPayload:
        return TuningPayload(
            deep_prompts=self.deep_prompts,
            adapters=[(adapter.method, adapter.tensors()) for adapter in self.adapters],
        )
