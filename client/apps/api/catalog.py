"""The models `swarm api` serves, by the name a request gives in `model`.

Each `--model` is joined to the swarm once. Each `--adapter NAME=DIR` is its base model again
with the adapter loaded (the client's own small copy of embeddings and head, and the adapter's
tensors, which travel with every request to the peers), on the first model's DHT node: one
node for the whole server. An adapter's base is the served model its folder names
(`base_model_name_or_path`), else the first `--model`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import bad_parameter, unknown_model

logger = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """A name a request can give, and the client model that answers it."""

    id: str
    model: object  # client.DistributedModelForCausalLM
    base: str | None = None  # for an adapter: the id of the model it tunes
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 2**31)

    def missing_blocks(self) -> list[int]:
        """The model's blocks no usable peer serves now (the DHT is asked when records are old)."""
        swarm = self.model.swarm
        return swarm.routes.missing_blocks(swarm.records())

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """The messages through the model's chat template, ready for the assistant's answer."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise bad_parameter("messages", f"{self.id} has no chat template; use /v1/completions with a prompt")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - a template may refuse a conversation (e.g. roles out of order)
            raise bad_parameter("messages", f"the chat template of {self.id} refused these messages: {e}") from None
        # The template writes the special tokens it wants (BOS included) itself.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text_prompt(self, prompt: str) -> list[int]:
        ids = self.tokenizer(prompt)["input_ids"]
        if not ids:
            raise bad_parameter("prompt", "the prompt is empty")
        return ids


class Catalog:
    """The served models in the order /v1/models lists them."""

    def __init__(self, served: list[ServedModel]):
        self.served = {s.id: s for s in served}

    def add(self, served: ServedModel) -> None:
        self.served[served.id] = served

    def get(self, name: str) -> ServedModel:
        if name not in self.served:
            raise unknown_model(name, list(self.served))
        return self.served[name]

    def covered(self) -> list[ServedModel]:
        """The served models whose blocks are all served by some peer now."""
        return [s for s in self.served.values() if not s.missing_blocks()]

    @property
    def dht(self):
        """The server's one DHT node: the first model's, which the others share (None: no model)."""
        first = next(iter(self.served.values()), None)
        return first.model.swarm.dht if first is not None else None

    def close(self) -> None:
        """Leaves the swarm (shuts that DHT node down)."""
        first = next(iter(self.served.values()), None)
        if first is not None:
            first.model.swarm.shutdown()


def adapter_base(folder: Path, models: list[str]) -> str:
    """The served model an adapter folder was trained on, else the first one."""
    config = folder / "adapter_config.json"
    if config.exists():
        named = json.loads(config.read_text()).get("base_model_name_or_path")
        if named in models:
            return named
    return models[0]


def load_catalog(initial_peers: list[str], models: list[str], adapters: dict[str, str], settings) -> Catalog:
    """Joins the swarm and loads every model and adapter; raises what from_pretrained raises."""
    from client import AutoDistributedModelForCausalLM

    catalog, dht = Catalog([]), None
    try:
        for name in models:
            model = AutoDistributedModelForCausalLM.from_pretrained(name, initial_peers=initial_peers, dht=dht,
                                                                    settings=settings)
            dht = dht or model.swarm.dht
            catalog.add(ServedModel(name, model))
            if model.tokenizer is None:
                raise ValueError(f"{name} has no tokenizer: `swarm api` needs one to read prompts and write answers")
        for name, folder in adapters.items():
            base = adapter_base(Path(folder), models)
            model = AutoDistributedModelForCausalLM.from_pretrained(base, initial_peers=initial_peers, dht=dht,
                                                                    settings=settings, adapter=folder)
            catalog.add(ServedModel(name, model, base=base))
            logger.info("adapter %s: %s over %s", name, folder, base)
    except BaseException:
        catalog.close()  # the DHT node the first model started
        raise
    return catalog
