"""The distributed causal LM: a torch module shaped like transformers' models whose
transformer blocks live on peers.

The client holds the token embeddings, final norm and LM head. `forward` sends hidden
states through a chain of peers (stateless Forward, differentiable); `generate` is
transformers' own `GenerationMixin.generate`, with the KV cache kept on the peers by an
inference session that a `RemoteCache` stands in for.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging

import torch
from transformers import AutoTokenizer, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.generation import GenerationMode
from transformers.cache_utils import DynamicCache
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import CausalLMOutputWithPast

from swarm.checkpoint import resolve_checkpoint, config_fingerprint
from swarm.compat import cache_kwargs, pop_cache
from swarm.initial_peers import parse_initial_peers
from swarm.loading import load_client_parts
from swarm.membership import trust_from
from swarm.models import ClientParts, get_family
from swarm.registry import make_model_id
from swarm.tuning import ExportTarget, LoRA

from .autograd import remote_forward
from .remote_swarm import RemoteSwarm, SwarmSettings
from .export import load_adapter, read_tuning_settings, save_adapter
from .greedy_head import MASKING_PROCESSORS, EosHeldBack, ExactArgmax, GreedySteps
from .sequential import RemoteBody
from .session import InferenceSession
from .tuning import ClientTuning, default_ia3, resolve_modes

logger = logging.getLogger(__name__)

# Set by `_get_logits_processor` inside one `generate` call (per thread: the HTTP API generates
# in several at once) whose steps' logits feed nothing but masks and an argmax.
_GREEDY_STEPS: contextvars.ContextVar[GreedySteps | None] = contextvars.ContextVar("greedy_steps", default=None)


class RemoteCache(DynamicCache):
    """What generate sees as the KV cache: the length is the session's, and beam-search
    reorders become `hypo_ids` on the next step (the real cache lives on the peers)."""

    def __init__(self, session: InferenceSession):
        super().__init__()
        self.session = session
        self.pending_hypo_ids: torch.Tensor | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.session.position

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.pending_hypo_ids is not None:
            beam_idx = self.pending_hypo_ids[beam_idx]
        self.pending_hypo_ids = beam_idx

    def take_hypo_ids(self) -> torch.Tensor | None:
        hypo_ids, self.pending_hypo_ids = self.pending_hypo_ids, None
        return hypo_ids


class DistributedModelForCausalLM(PreTrainedModel, GenerationMixin):
    """Use :meth:`from_pretrained`; see the README for a tour."""

    config_class = PretrainedConfig
    base_model_prefix = "parts"  # the attribute holding the ClientParts
    main_input_name = "input_ids"
    _supports_cache_class = True
    # Attention runs on the peers; these only satisfy PreTrainedModel's init-time checks.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    # Greedy generate picks each token through an int8 copy of the LM head, then the float head
    # for the few tokens that may win: the same tokens, an eighth of the head's time (client/greedy_head.py).
    # False runs the float head in full at every step.
    screen_greedy_head = True

    def __init__(self, config: PretrainedConfig, parts: ClientParts, swarm: RemoteSwarm,
                 tuning: ClientTuning | None = None, train_lm_head: bool = False):
        super().__init__(config)
        self.parts = parts
        self.swarm = swarm
        self.model = RemoteBody(swarm)  # model.model.layers: the remote blocks as a module
        self.tuning = tuning
        self.tokenizer = None
        self._greedy_head: dict = {}  # the int8 copy of the LM head, built at the first greedy step
        # With a tuning method only its parameters train; without one, the client's own
        # embeddings, norm and head do (gradients reach them through the remote blocks).
        self.parts.requires_grad_(tuning is None)
        if tuning is not None and tuning.trains_embeddings:  # a tied LM head trains with them
            self.parts.embed_tokens.requires_grad_(True)
        self.train_lm_head = train_lm_head and tuning is not None
        if self.train_lm_head:  # asked for on top of a tuning method (tied heads train the embeddings too)
            self.parts.lm_head.requires_grad_(True)

    @classmethod
    def from_pretrained(cls, name_or_path: str, initial_peers: list[str] | str = (), *, dht=None,
                        settings: SwarmSettings | None = None, dtype: torch.dtype = torch.float32,
                        tuning_mode=None, pre_seq_len: int = 16,
                        lora_rank: int = 8, lora_alpha: float = 16.0, lora_dropout: float = 0.0,
                        lora_targets: list[str] | None = None, peft_config=None, adapter: str | None = None,
                        train_lm_head: bool = False, join: str | None = None) -> "DistributedModelForCausalLM":
        """The client half of `name_or_path` (a named model, HF folder or .gguf), joined to
        the swarm through `initial_peers` (multiaddrs printed by `swarm dht`).

        `tuning_mode`: None (the client's embeddings, norm and head train), or one or a list of:
        "ptune" (soft prompts of `pre_seq_len` tokens), "deep_ptune" (plus per-block prompts),
        "embeddings" (the client's token embeddings), "lora" (on `lora_targets` of every remote
        block), "ia3", "prefix", "bottleneck" (default settings), a method object with its own
        settings (`swarm.tuning.LoRA(rank=4)`, `IA3()`, `PrefixTuning(num_virtual_tokens=8,
        projection=256)`, `BottleneckAdapter("houlsby", reduction_factor=16)`), or a PEFT config
        (LoraConfig, IA3Config, PrefixTuningConfig); `peft_config` adds one the same way.
        `train_lm_head` trains the LM head too, on top of a tuning method. `adapter` loads a folder
        written by `save_adapter` (or a PEFT LoRA/IA3/prefix-tuning folder), settings included.

        `join`: a private swarm's member credential (the file or `swarmlm-member:` token from `swarm
        invite`), as `SwarmSettings(join=...)`; a bad one raises `swarm.membership.CredentialError`.

        A malformed multiaddr in `initial_peers` raises `swarm.initial_peers.InitialPeersError` (a
        ValueError) before anything loads; a DHT that cannot be reached, `DHTJoinError`."""
        # Checked first: a malformed multiaddr is an InitialPeersError before anything loads.
        initial_peers = parse_initial_peers([initial_peers] if isinstance(initial_peers, str) else initial_peers)
        if join is not None:
            settings = dataclasses.replace(settings or SwarmSettings(), join=join)
        trust_from(settings.join if settings else None, "join")  # a bad credential: one line, before loading
        checkpoint = resolve_checkpoint(name_or_path)
        config = checkpoint.config
        family = get_family(config)
        parts = load_client_parts(checkpoint, dtype=dtype)
        model_id = make_model_id(checkpoint.name, config_fingerprint(config))
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        tuning = None
        if adapter is not None:
            saved = read_tuning_settings(adapter, ExportTarget(family.layers_prefix, checkpoint.name))
            tuning_mode, peft_config = saved["tuning_mode"], None
            pre_seq_len = saved.get("pre_seq_len", pre_seq_len)
            train_lm_head = saved.get("train_lm_head", train_lm_head)
        lora = LoRA(rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, targets=lora_targets or family.default_lora_targets)
        modes = resolve_modes(tuning_mode, peft_config, lora, default_ia3(family))
        if modes:
            tuning = ClientTuning(family, modes, config.hidden_size, pre_seq_len, parts.embed_tokens)
        # Joined last: a bad tuning setup above is refused before a DHT node starts.
        swarm = RemoteSwarm(initial_peers, model_id, family.num_blocks, settings, dht=dht)
        model = cls(config, parts, swarm, tuning, train_lm_head)
        model.family, model.name_or_path = family, checkpoint.name
        if adapter is not None:
            load_adapter(model, adapter)
        model.eval()
        if (checkpoint.folder / "tokenizer.json").exists() or (checkpoint.folder / "tokenizer_config.json").exists():
            model.tokenizer = AutoTokenizer.from_pretrained(checkpoint.folder)
        return model

    # transformers' generate and resize helpers look these up.
    def get_input_embeddings(self):
        return self.parts.embed_tokens

    def get_output_embeddings(self):
        return self.parts.lm_head

    def save_adapter(self, folder) -> None:
        """Writes what the client trained (see client/export.py: PEFT's format for LoRA, IA3 and
        prefix tuning, a documented one for bottleneck adapters)."""
        save_adapter(self, folder)

    def inference_session(self, max_length: int) -> InferenceSession:
        """Opens KV caches on the peers for up to `max_length` tokens per sequence."""
        prefix = self.tuning.prefix_length if self.tuning is not None else 0
        payload = self.tuning.payload() if self.tuning is not None else None
        return InferenceSession(self.swarm, max_length + prefix, payload)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: RemoteCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        # generate names the cache `cache` from transformers 5.24 on, `past_key_values` before.
        cache = pop_cache(kwargs, cache)
        hidden = self.parts.embed(input_ids) if inputs_embeds is None else inputs_embeds
        tuning = self.tuning
        prefix = tuning.prefix_length if tuning is not None else 0
        if isinstance(cache, RemoteCache):
            session = cache.session
            new = hidden.shape[1]
            new_mask = attention_mask[:, -new:] if attention_mask is not None else None
            if prefix and session.position == 0:
                hidden, new_mask, _ = tuning.prepend_prompts(hidden, new_mask)
            if prefix:
                position_ids = None  # peers count positions from the mask, which includes the prompts
            if new_mask is not None and bool(new_mask.all()):
                new_mask = None  # no padding here: peers extend their mask with ones themselves
            hidden = session.step(hidden, new_mask, position_ids, cache.take_hypo_ids())
            if prefix and hidden.shape[1] > new:
                hidden = hidden[:, -new:]
        else:
            if prefix:
                hidden, attention_mask, _ = tuning.prepend_prompts(hidden, attention_mask)
                position_ids = None
            if attention_mask is not None and bool(attention_mask.all()):
                attention_mask = None
            payload = tuning.payload() if tuning is not None else None
            if payload is not None and self.training:
                for method, _ in payload.adapters:
                    method.seed = int(torch.randint(0, 2**31 - 1, ()))  # same dropout masks in Forward and Backward
            hidden = remote_forward(self.swarm, hidden, attention_mask, position_ids, payload)
            for method, _ in payload.adapters if payload is not None else ():
                method.seed = None  # requests already carry it; inference must not drop out
            if prefix:
                hidden = hidden[:, prefix:]
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self._logits(hidden)
        loss = None
        if labels is not None:
            loss = ForCausalLMLoss(logits.float(), labels, vocab_size=self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **cache_kwargs(cache))

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        steps = _GREEDY_STEPS.get()
        if steps is not None:
            screened = steps.logits(self.parts.lm_head, self.parts.norm(hidden))
            if screened is not None:
                return screened
        return self.parts.logits(hidden)

    def _get_logits_processor(self, *args, **kwargs):
        """transformers' processors, and `ExactArgmax` last when this generate only masks and
        takes each step's argmax (greedy, nothing returning the scores): then the head is
        screened, and the min-length processors mask in place (`EosHeldBack`). Should
        transformers stop calling this, every step runs the full head."""
        processors = super()._get_logits_processor(*args, **kwargs)
        config = kwargs["generation_config"] if "generation_config" in kwargs else args[0]
        if (self.screen_greedy_head and self.parts.logit_softcap is None and not config.output_scores
                and not config.output_logits and config.get_generation_mode() == GenerationMode.GREEDY_SEARCH
                and all(type(processor) in MASKING_PROCESSORS for processor in processors)):
            steps = GreedySteps(self._greedy_head)
            _GREEDY_STEPS.set(steps)
            processors[:] = [EosHeldBack.replacing(processor) for processor in processors]
            processors.append(ExactArgmax(steps))
        return processors

    def generate(self, *args, **kwargs):
        """transformers' generate, with the KV cache on the peers."""
        token = _GREEDY_STEPS.set(None)
        try:
            return self._generate(*args, **kwargs)
        finally:
            _GREEDY_STEPS.reset(token)

    def _generate(self, inputs: torch.Tensor | None = None, *args, session: InferenceSession | None = None,
                  **kwargs):
        if any(kwargs.get(name) is not None for name in ("cache", "past_key_values")) or kwargs.get("use_cache") is False:
            return super().generate(inputs, *args, **kwargs)
        if session is not None:
            return self._continue_session(session, inputs, *args, **kwargs)
        with self.inference_session(self._max_length_for(inputs, kwargs)) as active:
            output = super().generate(inputs, *args, **cache_kwargs(RemoteCache(active)), **kwargs)
        return output

    def _continue_session(self, session: InferenceSession, inputs: torch.Tensor | None, *args, **kwargs):
        """A turn of a multi-turn session: `inputs` are only the new tokens. The peers hold
        the history except the previous turn's last token, which generate chose but never
        fed; it goes first now. The mask covers the whole history, so transformers knows
        the inputs are only the new part and positions continue where they stopped."""
        inputs = kwargs.pop("input_ids", inputs)
        if inputs is None:
            raise ValueError("pass the new tokens of this turn as input_ids")
        pending = session.pending_tokens
        if pending is not None:
            inputs = torch.cat([pending.to(inputs.device), inputs], dim=1)
        prefix = self.tuning.prefix_length if self.tuning is not None and session.position else 0
        history = session.position - prefix
        new_mask = kwargs.pop("attention_mask", None)
        if new_mask is None:
            new_mask = torch.ones_like(inputs)
        elif pending is not None:
            new_mask = torch.cat([torch.ones_like(pending), new_mask.to(inputs.device)], dim=1)
        mask = torch.cat([new_mask.new_ones(inputs.shape[0], history), new_mask], dim=1)
        output = super().generate(inputs, *args, attention_mask=mask, **cache_kwargs(RemoteCache(session)), **kwargs)
        session.pending_tokens = output[:, -1:]
        return output[:, pending.shape[1]:] if pending is not None else output

    def _max_length_for(self, inputs: torch.Tensor | None, kwargs: dict) -> int:
        prompt = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        prompt_length = prompt.shape[1] if prompt is not None else 1
        config = kwargs.get("generation_config") or self.generation_config
        if kwargs.get("max_new_tokens") is not None:
            return prompt_length + kwargs["max_new_tokens"]
        if kwargs.get("max_length") is not None:
            return kwargs["max_length"]
        if config.max_new_tokens is not None:
            return prompt_length + config.max_new_tokens
        return max(config.max_length or 20, prompt_length + 1)


class AutoDistributedModelForCausalLM:
    """`AutoDistributedModelForCausalLM.from_pretrained(name, initial_peers=[...])`, like
    transformers' Auto classes: picks the family from the checkpoint's config."""

    @staticmethod
    def from_pretrained(name_or_path: str, initial_peers: list[str] | str = (), **kwargs):
        return DistributedModelForCausalLM.from_pretrained(name_or_path, initial_peers, **kwargs)
