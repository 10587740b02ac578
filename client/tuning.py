"""The client's own trainable parameters for blocks it does not hold.

- soft prompts (``ptune``): embeddings prepended to the input;
- deep prompts (``deep_ptune``): soft prompts plus, for every block, a prefix added to the
  hidden states of the prompt positions before that block;
- ``embeddings``: the client's own token embeddings (the lectures' "Emb" column);
- adapter methods (``lora``, ``ia3``, ``prefix``, ``bottleneck``; see swarm/tuning): per-block
  tensors the peers apply inside their layers.

Modes combine: ``["embeddings", "bottleneck"]`` is the lectures' Emb+Adpt, ``["ptune", LoRA(rank=4)]``
LoRA with a soft prompt. Everything here lives on the client; peers receive the tensors of
their span with each request, return their gradients and keep nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from swarm.models import ModelFamily
from swarm.tuning import IA3, METHODS, AdapterError, AdapterMethod, LoRA
from swarm.tuning import ia3 as ia3_defaults

CLIENT_MODES = ("ptune", "deep_ptune", "embeddings")
TUNING_MODES = CLIENT_MODES + tuple(METHODS)


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys may not contain dots


def _name(key: str) -> str:
    return key.replace("__", ".")


def method_from_peft_config(config) -> AdapterMethod:
    """A swarmlm method from a PEFT config object (LoraConfig, IA3Config, PrefixTuningConfig)."""
    peft_type = getattr(config.peft_type, "value", config.peft_type)
    for method in METHODS.values():
        if method.peft_type == peft_type:
            return method.from_peft_config(config.to_dict())
    known = ", ".join(m.peft_type for m in METHODS.values() if m.peft_type)
    raise ValueError(f"PEFT method {peft_type} has no swarmlm counterpart; swarmlm takes PEFT configs of: {known}")


def _meta_layer(family: ModelFamily, block: int) -> nn.Module:
    """Block `block` as the family builds it, without memory (for names and shapes)."""
    with torch.device("meta"):
        return family.build_layers(family.span_config(block, block + 1))[0]


def default_ia3(family: ModelFamily) -> IA3:
    """IA3 for the string "ia3": its own defaults (k, v and down projections) where the
    family's blocks have those layers; else the family's declared attention projections (its
    LoRA targets) plus the defaults' feed-forward layer where the blocks have it."""
    linears = [n for n, m in _meta_layer(family, 0).named_modules() if isinstance(m, nn.Linear)]

    def present(target: str) -> bool:
        return any(n == target or n.endswith("." + target) for n in linears)

    if all(present(t) for t in ia3_defaults.DEFAULT_TARGETS):
        return IA3()
    feedforward = [t for t in ia3_defaults.DEFAULT_FEEDFORWARD if present(t)]
    return IA3(targets=[*family.default_lora_targets, *feedforward], feedforward=feedforward)


def resolve_modes(tuning_mode, peft_config=None, lora: LoRA | None = None,
                  ia3: IA3 | None = None) -> list[str | AdapterMethod]:
    """`tuning_mode` as from_pretrained takes it (a name, a method object, a PEFT config, or a
    list of them) -> client mode names and method objects. `lora` and `ia3` stand for the
    strings "lora" and "ia3" (default: the methods' own defaults); `peft_config` replaces the
    method of its kind, or joins the list."""
    named = {"lora": lora, "ia3": ia3}
    if tuning_mode is None:
        items = []
    elif isinstance(tuning_mode, (list, tuple)):
        items = list(tuning_mode)
    else:
        items = [tuning_mode]
    if peft_config is not None:
        items.append(peft_config)
    resolved: list[str | AdapterMethod] = []
    for item in items:
        if isinstance(item, str) and item in CLIENT_MODES:
            resolved.append(item)
        elif isinstance(item, str) and item in METHODS:
            resolved.append(named.get(item) or METHODS[item]())
        elif isinstance(item, AdapterMethod):
            resolved.append(item)
        elif hasattr(item, "peft_type"):
            method = method_from_peft_config(item)
            resolved = [m for m in resolved if not (isinstance(m, AdapterMethod) and m.name == method.name)]
            resolved.append(method)
        else:
            raise ValueError(f"unknown tuning_mode {item!r}; choose from {', '.join(TUNING_MODES)}, a method object "
                             "(e.g. swarm.tuning.IA3()) or a PEFT config")
    names = [m if isinstance(m, str) else m.name for m in resolved]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"tuning_mode names {repeated} more than once; give each method once")
    return resolved


class ClientAdapter(nn.Module):
    """One adapter method's tensors for every block, owned by the client: the parameters
    themselves, or computed by the method's reparametrisation (`encoder`)."""

    def __init__(self, method: AdapterMethod, family: ModelFamily):
        super().__init__()
        self.method = method
        shapes = {}
        for block in range(family.num_blocks):
            shapes.update({f"{block}.{name}": shape for name, shape in method.tensor_shapes(_meta_layer(family, block)).items()})
        self.params = nn.ParameterDict()
        self.encoder = method.client_encoder(shapes)
        if self.encoder is None:
            for name, shape in shapes.items():
                self.params[_key(name)] = nn.Parameter(torch.empty(shape))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for key, param in self.params.items():
            self.method.init_tensor(_name(key), param.data)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Global names "{block}.{name}" -> tensor (a parameter, or computed from them)."""
        if self.encoder is not None:
            return self.encoder()
        return {_name(key): param for key, param in self.params.items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Sets the block tensors (e.g. read from another tool's files)."""
        if self.encoder is not None:
            raise AdapterError(f"{self.method.name} computes its tensors through a reparametrisation; "
                               "load its own saved parameters instead")
        params = self.tensors()
        if set(tensors) != set(params):
            raise AdapterError(f"{self.method.name} tensors do not match this model (missing "
                               f"{sorted(set(params) - set(tensors))[:5]}, unexpected {sorted(set(tensors) - set(params))[:5]})")
        with torch.no_grad():
            for name, tensor in tensors.items():
                if tuple(tensor.shape) != tuple(params[name].shape):
                    raise AdapterError(f"{self.method.name} tensor {name} has shape {tuple(tensor.shape)}, "
                                       f"expected {tuple(params[name].shape)}")
                params[name].copy_(tensor)


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


class ClientTuning(nn.Module):
    """The trainable parameters of one tuning setup: `modes` as `resolve_modes` returns them."""

    def __init__(self, family: ModelFamily, modes: list[str | AdapterMethod], hidden_size: int,
                 pre_seq_len: int = 16, embed_tokens: nn.Embedding | None = None):
        super().__init__()
        names = [m if isinstance(m, str) else m.name for m in modes]
        unknown = [n for n in names if n not in TUNING_MODES]
        if unknown:
            raise ValueError(f"unknown tuning_mode {unknown}; choose from {', '.join(TUNING_MODES)}")
        if ("ptune" in names or "deep_ptune" in names) and pre_seq_len < 1:
            raise ValueError(f"prompt tuning needs pre_seq_len >= 1, got {pre_seq_len}")
        self.modes = names
        self.trains_embeddings = "embeddings" in names
        self.prefix_length = pre_seq_len if ("ptune" in names or "deep_ptune" in names) else 0
        self.prompts = None
        self.deep_prompts = None
        self.adapters = nn.ModuleList()
        if self.prefix_length:
            init = torch.randn(self.prefix_length, hidden_size) * 0.02
            if embed_tokens is not None:  # start from real token embeddings: a better-conditioned start
                ids = torch.randint(0, embed_tokens.num_embeddings, (self.prefix_length,))
                init = embed_tokens.weight.detach()[ids].clone().float()
            self.prompts = nn.Parameter(init)
        if "deep_ptune" in names:
            self.deep_prompts = nn.Parameter(torch.zeros(family.num_blocks, 1, self.prefix_length, hidden_size))
        for mode in modes:
            if isinstance(mode, AdapterMethod):
                self.adapters.append(ClientAdapter(mode, family))

    @property
    def methods(self) -> list[AdapterMethod]:
        return [adapter.method for adapter in self.adapters]

    def adapter(self, name: str) -> ClientAdapter:
        for adapter in self.adapters:
            if adapter.method.name == name:
                return adapter
        raise KeyError(f"this model has no {name} adapter; it has {[a.method.name for a in self.adapters]}")

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
