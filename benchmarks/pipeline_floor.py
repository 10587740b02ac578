"""The floor under a 3-peer decode on this machine: the same split (blocks 0:10, 10:20,
20:30, each in its own process) with nothing of swarmlm in between, against the whole model
in one process. Prints one JSON line.

    python benchmarks/pipeline_floor.py [--new-tokens 64] [--rounds 5]

Each stage process holds its blocks and a KV cache and runs `BlockSpan.inference_step`; the
stages are chained by OS pipes (the 2.3 KB hidden state of one token, as raw bytes: no gRPC,
no protobuf, no event loop, no DHT). The driver embeds, applies the final norm and LM head
and picks the greedy token, as a client does. "local" is the same greedy loop over
transformers' model with its own cache, in one process. Both loops are bare (no
`generate`), so the ratio is what splitting the model across processes costs by itself:
every figure swarmlm reaches through `benchmarks/generate.py` is at or under it.

Rounds alternate local and pipeline (this machine's speed drifts within minutes); the ratio
is the median of the rounds' ratios. `stage_ms` is each stage's median time per step inside
its process; `span_ms_alone` the same blocks' step run back to back in one process.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time

import torch

SPANS = [(0, 10), (10, 20), (20, 30)]
PROMPT = "Write a short story about a fox who learns to fly."


def _stage(start: int, end: int, inbox, outbox, report) -> None:
    """One stage: b"" starts a new cache, b"stop" ends the stage; anything else is hidden states."""
    torch.set_num_threads(1)
    from swarm.checkpoint import DEFAULT_MODEL, resolve_checkpoint
    from swarm.loading import load_span

    span = load_span(resolve_checkpoint(DEFAULT_MODEL), start, end)
    report.send("ready")
    state, times = None, []
    with torch.inference_mode():
        while True:
            data = inbox.recv_bytes()
            if data == b"stop":  # passed on, so every stage stops
                report.send(times)
                outbox.send_bytes(b"stop")
                return
            if data == b"":
                state = span.start_inference(1, 512)
                outbox.send_bytes(b"")
                continue
            hidden = torch.frombuffer(bytearray(data), dtype=torch.float32).view(1, -1, span.hidden_size)
            began = time.perf_counter()
            out = span.inference_step(state, hidden)
            if hidden.shape[1] == 1:
                times.append(time.perf_counter() - began)
            outbox.send_bytes(out.contiguous().numpy().tobytes())


def _greedy(step, embed, logits, input_ids: torch.Tensor, new_tokens: int) -> tuple[list[int], float]:
    """`new_tokens` greedy tokens; seconds per token over the decode steps (prefill excluded)."""
    hidden = step(embed(input_ids))
    tokens = [int(logits(hidden[:, -1:]).argmax(-1))]
    began = time.perf_counter()
    for _ in range(new_tokens - 1):
        hidden = step(embed(torch.tensor([[tokens[-1]]])))
        tokens.append(int(logits(hidden).argmax(-1)))
    return tokens, (time.perf_counter() - began) / (new_tokens - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.cache_utils import DynamicCache

    from swarm.checkpoint import DEFAULT_MODEL, resolve_checkpoint
    from swarm.loading import load_client_parts, load_span

    checkpoint = resolve_checkpoint(DEFAULT_MODEL)
    local = AutoModelForCausalLM.from_pretrained(checkpoint.folder, dtype=torch.float32).eval()
    parts = load_client_parts(checkpoint)
    input_ids = AutoTokenizer.from_pretrained(checkpoint.folder)(PROMPT, return_tensors="pt")["input_ids"]

    with torch.inference_mode():  # before the stages start: nothing else runs on the machine
        span = load_span(checkpoint, *SPANS[0])
        state = span.start_inference(1, 512)
        span.inference_step(state, parts.embed(input_ids))
        alone = []
        for _ in range(args.new_tokens):
            began = time.perf_counter()
            span.inference_step(state, torch.randn(1, 1, span.hidden_size))
            alone.append(time.perf_counter() - began)
        del span, state

    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe(duplex=False) for _ in range(len(SPANS) + 1)]  # (reader, writer): into stage i
    reports = [ctx.Pipe() for _ in SPANS]
    stages = [ctx.Process(target=_stage, args=(start, end, pipes[i][0], pipes[i + 1][1], reports[i][1]), daemon=True)
              for i, (start, end) in enumerate(SPANS)]
    for stage in stages:
        stage.start()
    for ours, _ in reports:
        ours.recv()
    first, last = pipes[0][1], pipes[-1][0]

    def through_stages(hidden: torch.Tensor) -> torch.Tensor:
        first.send_bytes(hidden.contiguous().numpy().tobytes())
        data = last.recv_bytes()
        return torch.frombuffer(bytearray(data), dtype=torch.float32).view(1, -1, hidden.shape[-1])

    def pipeline_run() -> tuple[list[int], float]:
        first.send_bytes(b"")
        last.recv_bytes()
        return _greedy(through_stages, parts.embed, parts.logits, input_ids, args.new_tokens)

    def local_run() -> tuple[list[int], float]:
        cache = DynamicCache(config=local.config)
        position = [0]

        def step(embeds: torch.Tensor) -> torch.Tensor:
            positions = torch.arange(position[0], position[0] + embeds.shape[1]).unsqueeze(0)
            position[0] += embeds.shape[1]
            out = local.model(inputs_embeds=embeds, cache=cache, use_cache=True, position_ids=positions)
            return out.last_hidden_state

        return _greedy(step, local.model.embed_tokens, local.lm_head, input_ids, args.new_tokens)

    with torch.inference_mode():
        pipeline_run(), local_run()  # warm-up
        local_s, pipeline_s, same = [], [], True
        for _ in range(args.rounds):
            local_tokens, seconds = local_run()
            local_s.append(seconds)
            pipeline_tokens, seconds = pipeline_run()
            pipeline_s.append(seconds)
            same = same and local_tokens == pipeline_tokens
        first.send_bytes(b"stop")
        stage_ms = [round(1e3 * statistics.median(ours.recv()), 2) for ours, _ in reports]
    for stage in stages:
        stage.join(5)
    ratios = [a / b for a, b in zip(local_s, pipeline_s)]
    print(json.dumps({
        "benchmark": "pipeline_floor", "model": DEFAULT_MODEL, "stages": len(SPANS), "new_tokens": args.new_tokens,
        "local_ms_per_token": round(1e3 * statistics.median(local_s), 2),
        "pipeline_ms_per_token": round(1e3 * statistics.median(pipeline_s), 2),
        "ratio": round(statistics.median(ratios), 3), "ratios": [round(r, 3) for r in ratios],
        "stage_ms": stage_ms, "span_ms_alone": round(1e3 * statistics.median(alone), 2),
        "greedy_identical": same,
    }))


if __name__ == "__main__":
    main()
