"""One completion: the client's own `generate` in a worker thread, its text handed to the
event loop piece by piece.

The client is synchronous, so each request runs `model.generate` in a thread of its own, with
an inference session of its own that `generate` opens and closes (on completion, on error, and
when the request is cancelled). Concurrent requests are concurrent sessions; the peers batch
their decode steps.

Each new token is seen by a StoppingCriteria, not a streamer: transformers calls the criteria
right after it picks a token and before the next step, while a streamer gets the token after
the stop decision, so a stop string seen there would cost one more token (and step) than
OpenAI's API counts. The criteria decodes the text so far (special tokens skipped: no EOS or
chat-template markers reach the answer), cuts it at the first stop string, holds back an end
that may still become one, and stops generate when a stop string appears or the request is
cancelled (the HTTP client went away).

Sampling draws from a generator of the request's own, seeded by `seed`: torch's global one is
shared by concurrent requests, which would make a seed mean nothing. It runs as a logits
processor that leaves only the drawn token, so `generate` itself stays greedy.
"""

from __future__ import annotations

import asyncio
import random
import threading
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, StoppingCriteria
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from .schema import Sampling


@dataclass(frozen=True)
class Finished:
    """The last event of a completion."""

    reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens reached)
    prompt_tokens: int
    completion_tokens: int


class CompletionText:
    """The completion's text as its tokens arrive, released only as far as it is final."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.released = 0  # characters handed out so far
        self.stopped = False  # a stop string was reached
        self._text = ""

    def add(self, token_id: int) -> str:
        """Takes the next token; returns the text that became final with it."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # part of a multi-byte character: wait for the rest
            return ""
        self._text = text
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            return self._release(cut)
        return self._release(len(text) - self._possible_stop_start(text))

    def flush(self) -> str:
        """The held-back rest, once no more tokens come."""
        return "" if self.stopped else self._release(len(self._text))

    def _release(self, end: int) -> str:
        new = self._text[self.released:end]
        self.released = max(self.released, end)
        return new

    def _first_stop(self, text: str) -> int | None:
        longest = max((len(s) for s in self.stop), default=0)
        start = max(0, self.released - longest)  # a stop ending in released text was seen before
        found = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _possible_stop_start(self, text: str) -> int:
        """How many characters at the end of `text` begin some stop string."""
        held = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(text)), held, -1):
                if stop.startswith(text[-size:]):
                    held = size
                    break
        return held


class SeededSampling(LogitsProcessor):
    """Temperature and top-p sampling with a generator of the request's own (see the module doc)."""

    def __init__(self, temperature: float, top_p: float, seed: int | None):
        self.warpers = [TemperatureLogitsWarper(temperature)] + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
        self.generator = torch.Generator().manual_seed(random.getrandbits(63) if seed is None else seed)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        drawn = torch.multinomial(torch.softmax(scores.float(), dim=-1), 1, generator=self.generator)
        return torch.full_like(scores, float("-inf")).scatter_(1, drawn, 0.0)


class TokenWatch(StoppingCriteria):
    """Sees each token as generate picks it (see the module doc); says stop on a stop string
    or a cancel."""

    def __init__(self, text: CompletionText, emit, cancelled: threading.Event):
        self.text, self.emit, self.cancelled = text, emit, cancelled

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new = self.text.add(int(input_ids[0, -1]))
        if new:
            self.emit(new)
        done = self.text.stopped or self.cancelled.is_set()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class Generation:
    """A completion of `prompt_ids` by `model`, generated in a thread once started.

    `await next()` gives its text piece by piece (non-empty strings), then a Finished; a
    failure of generate is raised there instead. `cancel()` stops generate after its current
    step, which closes the session on the peers.
    """

    def __init__(self, model, tokenizer, prompt_ids: list[int], sampling: Sampling):
        self.model, self.prompt_ids, self.sampling = model, prompt_ids, sampling
        self.text = CompletionText(tokenizer, sampling.stop)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.cancelled = threading.Event()
        self._events: asyncio.Queue = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        threading.Thread(target=self._run, daemon=True, name="generate").start()

    def cancel(self) -> None:
        self.cancelled.set()

    async def next(self) -> str | Finished:
        event = await self._events.get()
        if isinstance(event, BaseException):
            raise event
        return event

    def _emit(self, event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (the server stopped): nobody is listening
            self.cancel()

    def _run(self) -> None:
        sampling = self.sampling
        options = {}
        if sampling.temperature > 0:
            options["logits_processor"] = [SeededSampling(sampling.temperature, sampling.top_p, sampling.seed)]
        input_ids = torch.tensor([self.prompt_ids])
        try:
            self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                max_new_tokens=sampling.max_tokens, do_sample=False,
                                stopping_criteria=[TokenWatch(self.text, self._emit, self.cancelled)],
                                eos_token_id=self.eos_ids, pad_token_id=self.pad_id, **options)
        except BaseException as e:  # noqa: BLE001 - handed to the request, which answers with it
            self._emit(e)
            return
        rest = self.text.flush()
        if rest:
            self._emit(rest)
        self._emit(Finished(self._reason(), len(self.prompt_ids), len(self.text.ids)))

    def _reason(self) -> str:
        ids = self.text.ids
        if self.text.stopped or (ids and ids[-1] in self.eos_ids) or len(ids) < self.sampling.max_tokens:
            return "stop"
        return "length"


def _eos_ids(model, tokenizer) -> list[int]:
    """Every token that ends a completion: the generation config's and the tokenizer's EOS."""
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [] if configured is None else [configured]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids = [*ids, tokenizer.eos_token_id]
    if not ids:
        raise ValueError("the model has no EOS token: a completion could not end before max_tokens")
    return ids
