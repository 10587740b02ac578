"""`swarm api` as a real process over the real 3-peer swarm, driven by the real `openai` client:
answers equal local transformers' greedy ones (PEFT's for an adapter `swarm finetune` trained),
token by token when streamed, cut at stop strings, with the tokenizer's counts as usage; eight
requests at once each get theirs; bad requests get OpenAI's errors; a client that hangs up
mid-stream frees its session on the peers.

Few tokens per answer: every one is a step through three peer processes on a shared CPU.
"""

from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from client.apps.cli_finetune import main as finetune
from swarm.checkpoint import DEFAULT_MODEL, resolve_checkpoint
from tests.integration.peer_info import peer_infos, step_batches
from tests.procs import output, spawn, stop, unused_port, wait_for_line

pytestmark = pytest.mark.integration

ADAPTER = "tuned"
EOS_QUESTION = "What is the capital of France?"  # greedy: 'The capital of France is Paris.' and EOS, in 8 tokens
LONG_QUESTION = "What is a swarm?"  # greedy: 16 tokens without EOS
TUNED_PROMPT = "The capital of France is"
TRAINING = [{"prompt": TUNED_PROMPT, "completion": " Berlin, a city of bears."}] * 4


@pytest.fixture(scope="module")
def adapter(swarm, tmp_path_factory) -> Path:
    """A LoRA trained by `swarm finetune` (in this process: the command's own code, without
    another interpreter's start-up) a few steps, hard enough to change the answer."""
    folder = tmp_path_factory.mktemp("finetune")
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TRAINING))
    code = finetune(["--initial-peers", ",".join(swarm.initial_peers), "--data", str(data), "--out", str(folder),
                     "--mode", "lora", "--lora-rank", "4", "--steps", "3", "--lr", "0.01", "--batch-size", "2",
                     "--max-length", "24", "--save-every", "3"])
    assert code == 0
    return folder / "adapter"


@pytest.fixture(scope="module")
def api(swarm, adapter, tmp_path_factory):
    args = ["python", "-m", "client.apps.api.cli", "--initial-peers", ",".join(swarm.initial_peers),
            "--port", str(unused_port()), "--adapter", f"{ADAPTER}={adapter}"]
    proc = spawn(args, log_dir=tmp_path_factory.mktemp("api"))
    try:
        url = wait_for_line(proc, r"^swarm api: serving .* at (http://\S+)$", timeout=120).group(1)
        yield openai.OpenAI(base_url=url, api_key="anything", max_retries=0, timeout=120)
    finally:
        code = stop(proc)
        assert code == 0, f"exit {code}\n{output(proc)}"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_checkpoint(DEFAULT_MODEL).folder)


@pytest.fixture(scope="module")
def local():
    return AutoModelForCausalLM.from_pretrained(resolve_checkpoint(DEFAULT_MODEL).folder, dtype=torch.float32).eval()


def chat_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def greedy(model, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """The new tokens of local transformers' greedy answer."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


_answers: dict = {}


def reference(local, tokenizer, question: str, max_tokens: int) -> tuple[list[int], list[int]]:
    """Prompt ids and local greedy tokens for a chat question (computed once a module)."""
    if (question, max_tokens) not in _answers:
        ids = chat_ids(tokenizer, question)
        _answers[question, max_tokens] = ids, greedy(local, ids, max_tokens)
    return _answers[question, max_tokens]


def ask(api, question: str, **options):
    return api.chat.completions.create(model=DEFAULT_MODEL, messages=[{"role": "user", "content": question}],
                                       **{"temperature": 0, **options})


def test_models_lists_the_model_and_the_adapter(api):
    models = {m.id: m for m in api.models.list().data}
    assert set(models) == {DEFAULT_MODEL, ADAPTER}
    assert models[ADAPTER].model_extra["parent"] == DEFAULT_MODEL


@pytest.mark.compat
def test_chat_at_temperature_0_is_local_greedy_without_special_tokens(api, local, tokenizer):
    prompt, tokens = reference(local, tokenizer, EOS_QUESTION, 16)
    assert tokens[-1] == tokenizer.eos_token_id and len(tokens) < 16, "the question must end with EOS"
    answer = ask(api, EOS_QUESTION, max_completion_tokens=16)
    choice = answer.choices[0]
    assert choice.message.content == tokenizer.decode(tokens, skip_special_tokens=True)
    assert "<|im_end|>" not in choice.message.content and "<|im_start|>" not in choice.message.content
    assert choice.finish_reason == "stop"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt), len(tokens))
    assert answer.usage.total_tokens == len(prompt) + len(tokens)

    prompt, tokens = reference(local, tokenizer, LONG_QUESTION, 16)
    answer = ask(api, LONG_QUESTION, max_tokens=16)
    assert answer.choices[0].message.content == tokenizer.decode(tokens, skip_special_tokens=True)
    assert answer.choices[0].finish_reason == "length"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt), 16)


@pytest.mark.compat
def test_streaming_gives_the_same_text_chunk_by_chunk(api, local, tokenizer):
    _, tokens = reference(local, tokenizer, LONG_QUESTION, 16)
    chunks = list(ask(api, LONG_QUESTION, max_tokens=16, stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 5, pieces  # as the tokens come, not all at the end
    assert "".join(pieces) == tokenizer.decode(tokens, skip_special_tokens=True)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]


def test_raw_stream_ends_with_done_and_reports_usage(api, tokenizer):
    body = {"model": DEFAULT_MODEL, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    lines = [line for line in raw_stream(api, "/v1/completions", body) if line]
    assert all(line.startswith("data: ") for line in lines if not line.startswith(":")), lines
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    usage = json.loads(data[-2])["usage"]
    assert usage == {"prompt_tokens": len(tokenizer("Once upon a time")["input_ids"]), "completion_tokens": 4,
                     "total_tokens": len(tokenizer("Once upon a time")["input_ids"]) + 4}
    assert all(json.loads(d)["object"] == "text_completion" for d in data[:-1])


def tokens_until(tokenizer, tokens: list[int], stop: str) -> int:
    """How many tokens the model generated when the text first held `stop`."""
    return next(k for k in range(1, len(tokens) + 1) if stop in tokenizer.decode(tokens[:k], skip_special_tokens=True))


@pytest.mark.compat
def test_stop_cuts_before_the_first_stop_string(api, local, tokenizer):
    _, tokens = reference(local, tokenizer, LONG_QUESTION, 16)
    text = tokenizer.decode(tokens, skip_special_tokens=True)  # 'A swarm is a collective behavior of ...'
    first, later = "behavior", "organisms"
    assert 0 < text.index(first) < text.index(later)
    answer = ask(api, LONG_QUESTION, max_tokens=16, stop=[later, first])
    assert answer.choices[0].message.content == text[:text.index(first)]
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens == tokens_until(tokenizer, tokens, first)

    streamed = "".join(c.choices[0].delta.content or "" for c in ask(api, LONG_QUESTION, max_tokens=16, stream=True,
                                                                    stop="ive beh"))
    assert streamed == text[:text.index("ive beh")]


QUESTIONS = ["Say hi.", "Name a color.", "Count to five.", "What is 2+2?", "Write a haiku about the sea.",
             "Who wrote Hamlet?", "Give me a fruit.", "What is the capital of France?"]


def test_eight_concurrent_requests_each_get_their_own_answer(api, swarm, local, tokenizer):
    expected = [tokenizer.decode(reference(local, tokenizer, q, 8)[1], skip_special_tokens=True) for q in QUESTIONS]
    before = step_batches(swarm)
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        answers = list(pool.map(lambda q: ask(api, q, max_tokens=8).choices[0].message.content, QUESTIONS))
    assert answers == expected
    after = step_batches(swarm)
    shared = [sum(n for size, n in a.items() if size > 1) - sum(n for size, n in b.items() if size > 1)
              for a, b in zip(after, before)]
    assert all(s > 0 for s in shared), f"no peer ran steps of several requests together: {before} -> {after}"


@pytest.mark.compat
def test_adapter_answers_like_peft(api, adapter, local, tokenizer):
    lora = PeftModel.from_pretrained(local, adapter).eval()
    try:
        assert any(bool(p.abs().sum() > 0) for n, p in lora.named_parameters() if "lora_B" in n)
        prompt = tokenizer(TUNED_PROMPT)["input_ids"]
        tuned = tokenizer.decode(greedy(lora, prompt, 8), skip_special_tokens=True)
        with lora.disable_adapter():
            base = tokenizer.decode(greedy(lora, prompt, 8), skip_special_tokens=True)
    finally:
        lora.unload()  # the shared local model as it was
    assert tuned != base, "the trained LoRA must change the answer"
    served = api.completions.create(model=ADAPTER, prompt=TUNED_PROMPT, max_tokens=8, temperature=0)
    assert served.choices[0].text == tuned
    assert api.completions.create(model=DEFAULT_MODEL, prompt=TUNED_PROMPT, max_tokens=8,
                                  temperature=0).choices[0].text == base


def test_bad_requests_get_openai_errors(api):
    with pytest.raises(openai.BadRequestError) as bad:
        ask(api, "Hi", temperature=5)
    assert bad.value.status_code == 400 and bad.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as bad:
        api.chat.completions.create(model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hi"}], n=2)
    assert bad.value.param == "n"
    with pytest.raises(openai.NotFoundError) as unknown:
        api.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "Hi"}])
    assert unknown.value.code == "model_not_found"


def test_seed_makes_sampling_repeatable(api):
    def sample(seed):
        return api.completions.create(model=DEFAULT_MODEL, prompt="My favourite animal is", max_tokens=6,
                                      temperature=1.0, top_p=0.9, seed=seed).choices[0].text

    assert sample(3) == sample(3)


def raw_stream(api, path: str, body: dict, lines: int | None = None) -> list[str]:
    """The response's lines as they come over plain HTTP, all of them or the first `lines`
    (then the connection is dropped, as a client that goes away mid-stream does)."""
    connection = http.client.HTTPConnection(api.base_url.host, api.base_url.port, timeout=60)
    try:
        connection.request("POST", api.base_url.path.rstrip("/") + path.removeprefix("/v1"), json.dumps(body),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200, response.read()
        got = []
        while lines is None or len(got) < lines:
            line = response.readline()
            if not line:
                break
            got.append(line.decode().rstrip("\r\n"))
        return got
    finally:
        connection.close()


def active_sessions(swarm) -> list[int]:
    return [info.active_sessions for info in peer_infos(swarm)]


def test_client_gone_mid_stream_frees_its_session(api, swarm):
    body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 500, "stream": True}
    assert len(raw_stream(api, "/v1/chat/completions", body, lines=6)) == 6  # a few chunks, then hang up
    deadline = time.monotonic() + 20
    while any(active_sessions(swarm)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(active_sessions(swarm)), "the abandoned request's session is still open on the peers"
    assert ask(api, "Say hi.", max_tokens=2).choices[0].finish_reason == "length"  # and the server serves on
