"""client/apps/api without a swarm: request checking, stop strings and held-back text, and the
HTTP app over a scripted model (errors in OpenAI's shape with their statuses, SSE chunks).
tests/integration/test_api.py runs the real thing."""

from __future__ import annotations

import json
from types import SimpleNamespace

import grpc
import pytest
import torch
from starlette.testclient import TestClient

from client.apps.api.app import ServerOptions, create_app
from client.apps.api.catalog import Catalog, ServedModel
from client.apps.api.errors import ApiError, from_client_error
from client.apps.api.generation import CompletionText
from client.apps.api.schema import ChatRequest, TextRequest, parse_body
from client.routing import MissingBlocksError
from client.transport import PeerCallError

EOS = 1


class ByteTokenizer:
    """One token per UTF-8 byte (id = byte + 2), EOS 1: a character may take several tokens."""

    eos_token_id, pad_token_id = EOS, None
    chat_template = "<role>content..."

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [b + 2 for b in text.encode()]}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        text = bytes(i - 2 for i in ids if i >= 2).decode(errors="replace")
        return text if skip_special_tokens or EOS not in ids else text + "</s>"

    def apply_chat_template(self, messages, tokenize: bool, add_generation_prompt: bool) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def tokens(text: str) -> list[int]:
    return ByteTokenizer()(text)["input_ids"]


class ScriptedModel:
    """Answers any prompt with `script`, called as generate calls its stopping criteria: after
    each token. Or fails with `error` as a session would."""

    def __init__(self, script: list[int], error: Exception | None = None, missing: list[int] = ()):
        self.script, self.error = script, error
        self.tokenizer = ByteTokenizer()
        self.generation_config = SimpleNamespace(eos_token_id=EOS)
        self.config = SimpleNamespace(max_position_embeddings=64)
        self.swarm = SimpleNamespace(records=lambda: {}, routes=SimpleNamespace(missing_blocks=lambda _: list(missing)))

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, stopping_criteria, eos_token_id,
                 pad_token_id, logits_processor=()):
        if self.error is not None:
            raise self.error
        for token in self.script[:max_new_tokens]:
            input_ids = torch.cat([input_ids, torch.tensor([[token]])], dim=1)
            if any(bool(c(input_ids, None).all()) for c in stopping_criteria) or token in eos_token_id:
                break
        return input_ids


def client(*served: ServedModel) -> TestClient:
    return TestClient(create_app(Catalog(list(served)), ServerOptions(default_max_tokens=10)))


def chat(text: str = "hi", **options) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": text}], **options}


@pytest.mark.parametrize("body, param", [
    (chat(temperature=2.5), "temperature"),
    (chat(temperature="0.5"), "temperature"),
    (chat(max_tokens=0), "max_tokens"),
    (chat(max_completion_tokens=True), "max_completion_tokens"),
    (chat(top_p=0), "top_p"),
    (chat(stop=["a", 3]), "stop"),
    (chat(stop=["a", "b", "c", "d", "e"]), "stop"),
    (chat(n=2), "n"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
])
def test_a_bad_chat_request_names_its_parameter(body, param):
    with pytest.raises(ApiError) as error:
        parse_body(json.dumps(body).encode(), ChatRequest)
    assert (error.value.status, error.value.param) == (400, param)
    assert param in error.value.message


def test_a_good_request_becomes_its_sampling():
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    request = parse_body(json.dumps({"model": "m", "messages": [{"role": "developer", "content": parts}],
                                     "max_tokens": 5, "max_completion_tokens": 7, "stop": "x", "seed": 3}).encode(),
                         ChatRequest)
    assert request.chat() == [{"role": "system", "content": "ab"}]
    sampling = request.sampling(default_max_tokens=100)
    assert (sampling.max_tokens, sampling.stop, sampling.seed, sampling.temperature) == (7, ("x",), 3, 1.0)
    assert parse_body(b'{"model": "m", "prompt": ["p"]}', TextRequest).sampling(9).max_tokens == 9
    with pytest.raises(ApiError, match="not JSON"):
        parse_body(b"{", TextRequest)


def feed(text: CompletionText, pieces: list[str]) -> list[str]:
    return [text.add(t) for piece in pieces for t in tokens(piece)]


def test_text_is_cut_at_the_first_stop_string_and_held_back_while_it_may_be_one():
    text = CompletionText(ByteTokenizer(), stop=("STOP", "xy"))
    released = feed(text, ["ab", "ST", "O"])
    assert "".join(released) == "ab"  # "STO" may still become STOP
    assert "".join(feed(text, ["x"])) == "STO" and not text.stopped  # "STOx" cannot; "x" may become "xy"
    assert "".join(feed(text, ["y", "more"])) == "" and text.stopped
    assert text.flush() == ""

    unstopped = CompletionText(ByteTokenizer(), stop=("STOP",))
    assert "".join(feed(unstopped, ["aST"])) + unstopped.flush() == "aST"


def test_a_character_split_over_tokens_comes_out_whole():
    text = CompletionText(ByteTokenizer())
    released = feed(text, ["é"])
    assert released == ["", "é"]


def test_client_errors_map_to_openai_statuses():
    missing = from_client_error(MissingBlocksError("m", [3, 4, 5, 9], 10))
    assert missing.status == 503 and "3-5, 9" in missing.message and missing.code == "blocks_uncovered"
    full = from_client_error(PeerCallError("1.2.3.4:5", "no room", grpc.StatusCode.RESOURCE_EXHAUSTED))
    assert full.status == 429
    assert from_client_error(PeerCallError("1.2.3.4:5", "gone", grpc.StatusCode.UNAVAILABLE)).status == 503
    assert from_client_error(PeerCallError("1.2.3.4:5", "too long", grpc.StatusCode.INVALID_ARGUMENT)).status == 400


def test_completions_over_a_scripted_model():
    api = client(ServedModel("m", ScriptedModel(tokens("Hello world") + [EOS])))
    whole = api.post("/v1/chat/completions", json=chat(temperature=0)).json()
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "Hello worl"}  # 10: the default
    assert whole["choices"][0]["finish_reason"] == "length"
    assert whole["usage"] == {"prompt_tokens": len(tokens("<user>hi<assistant>")), "completion_tokens": 10,
                              "total_tokens": len(tokens("<user>hi<assistant>")) + 10}
    text = api.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 20, "stop": "wor"}).json()
    assert (text["choices"][0]["text"], text["choices"][0]["finish_reason"]) == ("Hello ", "stop")
    assert text["usage"]["completion_tokens"] == len("Hello wor")
    ended = api.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 20}).json()
    assert (ended["choices"][0]["text"], ended["choices"][0]["finish_reason"]) == ("Hello world", "stop")


def test_a_stream_sends_chunks_then_done():
    api = client(ServedModel("m", ScriptedModel(tokens("Hi!") + [EOS])))
    with api.stream("POST", "/v1/chat/completions", json=chat(stream=True, stream_options={"include_usage": True})) as r:
        data = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "Hi!"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("stream", [False, True])
def test_failures_get_their_status_before_any_chunk(stream):
    uncovered = ServedModel("m", ScriptedModel([], error=MissingBlocksError("m", [7], 10)))
    full = ServedModel("full", ScriptedModel([], error=PeerCallError("a:1", "cache", grpc.StatusCode.RESOURCE_EXHAUSTED)))
    api = client(uncovered, full)
    answer = api.post("/v1/chat/completions", json=chat(stream=stream))
    assert answer.status_code == 503 and "blocks 7" in answer.json()["error"]["message"]
    assert api.post("/v1/chat/completions", json={**chat(stream=stream), "model": "full"}).status_code == 429


def test_unknown_models_routes_and_oversized_requests():
    api = client(ServedModel("m", ScriptedModel([])), ServedModel("gap", ScriptedModel([], missing=[2])))
    assert [m["id"] for m in api.get("/v1/models").json()["data"]] == ["m"]  # "gap" has uncovered blocks
    unknown = api.post("/v1/chat/completions", json={**chat(), "model": "other"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert api.get("/v1/nothing").status_code == 404 and "error" in api.get("/v1/nothing").json()
    too_long = api.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 64})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "max_tokens"
