"""OpenAI's JSON shapes of an answer, whole or as stream chunks, for chat completions
(`chat.completion`, deltas of a message) and text completions (`text_completion`)."""

from __future__ import annotations

import time
import uuid

from .generation import Finished


def usage(finished: Finished) -> dict:
    return {"prompt_tokens": finished.prompt_tokens, "completion_tokens": finished.completion_tokens,
            "total_tokens": finished.prompt_tokens + finished.completion_tokens}


class AnswerShape:
    """The fields every answer and chunk of one request shares; subclasses say where text goes."""

    object_name = ""
    chunk_name = ""
    id_prefix = ""

    def __init__(self, model: str):
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.model = model
        self.created = int(time.time())

    def _envelope(self, name: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": name, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def whole(self, text: str, finished: Finished) -> dict:
        choice = {"index": 0, **self.content(text, whole=True), "logprobs": None, "finish_reason": finished.reason}
        return self._envelope(self.object_name, [choice], usage=usage(finished))

    def chunk(self, text: str, finish_reason: str | None = None) -> dict:
        choice = {"index": 0, **self.content(text, whole=False), "logprobs": None, "finish_reason": finish_reason}
        return self._envelope(self.chunk_name, [choice], usage=None)

    def opening(self) -> dict | None:
        """A chunk to send before any text, if the shape has one."""
        return None

    def closing(self, finished: Finished) -> dict:
        return self.chunk("", finished.reason)

    def usage_chunk(self, finished: Finished) -> dict:
        """The last chunk when `stream_options.include_usage` asks for it: no choices, the usage."""
        return self._envelope(self.chunk_name, [], usage=usage(finished))

    def content(self, text: str, whole: bool) -> dict:
        raise NotImplementedError


class ChatShape(AnswerShape):
    object_name, chunk_name, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def content(self, text: str, whole: bool) -> dict:
        if whole:
            return {"message": {"role": "assistant", "content": text}}
        return {"delta": {"content": text} if text else {}}

    def opening(self) -> dict:
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return self._envelope(self.chunk_name, [choice], usage=None)


class TextShape(AnswerShape):
    object_name, chunk_name, id_prefix = "text_completion", "text_completion", "cmpl"

    def content(self, text: str, whole: bool) -> dict:
        return {"text": text}
