"""The HTTP side of `swarm api` (Starlette): /v1/models, /v1/chat/completions, /v1/completions.

A completion request is checked (schema), its model found (catalog), its prompt tokenized and
its Generation started in a thread. The answer waits for the first piece of text, so failures
to open the session (blocks uncovered, peers out of cache) come before any byte is sent and
get their own status, streaming or not. Then the whole text is collected, or its pieces go out
as SSE chunks (sse-starlette) as they come, ending with `data: [DONE]`.

An HTTP client that goes away cancels its generation: until the answer starts, a watcher waits
for http.disconnect; during a stream, sse-starlette stops the stream, whose `finally` cancels.
Generate stops after its current step, and its session on the peers closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass

from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .catalog import Catalog, ServedModel
from .errors import ApiError, bad_parameter, from_client_error
from .generation import Finished, Generation
from .responses import AnswerShape, ChatShape, TextShape
from .schema import ChatRequest, CompletionParameters, TextRequest, parse_body


@dataclass(frozen=True)
class ServerOptions:
    default_max_tokens: int = 256  # when a request names none (capped by the model's context)
    ping_seconds: float = 15.0  # SSE keep-alive comments on a stream that is waiting for a token


def create_app(catalog: Catalog, options: ServerOptions | None = None, extra_routes: list | None = None) -> Starlette:
    """`extra_routes` go after the API's own (`swarm api` adds the dashboard's at /)."""
    api = OpenAICompatibleApi(catalog, options or ServerOptions())
    routes = [
        Route("/v1/models", api.list_models, methods=["GET"]),
        Route("/v1/models/{name:path}", api.get_model, methods=["GET"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        *(extra_routes or []),
    ]
    handlers = {ApiError: _api_error, HTTPException: _http_error}
    return Starlette(routes=routes, exception_handlers=handlers)


async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    return error.response()


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    return ApiError(error.status_code, f"{request.method} {request.url.path}: {error.detail}").response()


class OpenAICompatibleApi:
    """The route handlers over one catalog."""

    def __init__(self, catalog: Catalog, options: ServerOptions):
        self.catalog, self.options = catalog, options

    def _model_object(self, served: ServedModel) -> dict:
        return {"id": served.id, "object": "model", "created": served.created, "owned_by": "swarmlm",
                "parent": served.base}

    async def list_models(self, request: Request) -> JSONResponse:
        covered = await asyncio.to_thread(self.catalog.covered)  # may ask the DHT
        return JSONResponse({"object": "list", "data": [self._model_object(s) for s in covered]})

    async def get_model(self, request: Request) -> JSONResponse:
        return JSONResponse(self._model_object(self.catalog.get(request.path_params["name"])))

    async def chat_completions(self, request: Request):
        params = parse_body(await request.body(), ChatRequest)
        served = self.catalog.get(params.model)
        return await self._answer(request, served, served.chat_prompt(params.chat()), params, ChatShape(served.id))

    async def completions(self, request: Request):
        params = parse_body(await request.body(), TextRequest)
        served = self.catalog.get(params.model)
        return await self._answer(request, served, served.text_prompt(params.prompt), params, TextShape(served.id))

    def _sampling(self, served: ServedModel, prompt_ids: list[int], params: CompletionParameters):
        room = served.context_length - len(prompt_ids)
        prompt_param = "messages" if isinstance(params, ChatRequest) else "prompt"
        if room < 1:
            raise bad_parameter(prompt_param, f"the prompt has {len(prompt_ids)} tokens; {served.id} "
                                f"takes at most {served.context_length - 1} and needs room for an answer")
        asked = params.completion_limit()
        if asked is not None and asked > room:
            name = "max_completion_tokens" if getattr(params, "max_completion_tokens", None) else "max_tokens"
            raise bad_parameter(name, f"{name} is {asked}, but the prompt has {len(prompt_ids)} tokens of "
                                f"{served.id}'s {served.context_length}: at most {room} more fit")
        return params.sampling(min(self.options.default_max_tokens, room))

    async def _answer(self, request: Request, served: ServedModel, prompt_ids: list[int],
                      params: CompletionParameters, shape: AnswerShape):
        generation = Generation(served.model, served.tokenizer, prompt_ids, self._sampling(served, prompt_ids, params))
        generation.start()
        watcher = asyncio.create_task(_cancel_on_disconnect(request, generation))
        try:
            event = await _next(generation)
            if params.stream:
                return EventSourceResponse(_chunks(event, generation, shape, params.include_usage),
                                           ping=self.options.ping_seconds)
            pieces = []
            while not isinstance(event, Finished):
                pieces.append(event)
                event = await _next(generation)
            return JSONResponse(shape.whole("".join(pieces), event))
        except BaseException:
            generation.cancel()
            raise
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher  # gone before the stream's own disconnect listener starts


async def _next(generation: Generation):
    try:
        return await generation.next()
    except Exception as e:  # noqa: BLE001 - every failure of generate gets an OpenAI-shaped answer
        raise from_client_error(e) from None


async def _cancel_on_disconnect(request: Request, generation: Generation) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    generation.cancel()


async def _chunks(first, generation: Generation, shape: AnswerShape, include_usage: bool):
    """The SSE data of a stream: an opening chunk, one chunk per piece of text, the closing
    chunk with finish_reason (then usage, if asked), [DONE]. A failure mid-stream is sent as an
    error object, as OpenAI's streams do, then [DONE]."""
    try:
        opening = shape.opening()
        if opening is not None:
            yield json.dumps(opening)
        event = first
        while not isinstance(event, Finished):
            yield json.dumps(shape.chunk(event))
            event = await _next(generation)
        yield json.dumps(shape.closing(event))
        if include_usage:
            yield json.dumps(shape.usage_chunk(event))
        yield "[DONE]"
    except ApiError as e:
        yield json.dumps(e.body())
        yield "[DONE]"
    finally:  # also when the client went away and the stream was cancelled
        generation.cancel()
