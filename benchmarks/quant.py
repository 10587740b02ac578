"""Quantized peers on the default model: memory per block, greedy agreement with full
precision, and inference step latency; prints one JSON line.

All blocks are one local span (what a chain of peers computes, without the network), loaded
in each setting and quantized as `swarm peer --quant` does:
- bytes_per_block: what the span's tensors hold (swarm.quant.weight_bytes / blocks);
- rss_mb_per_block: the resident memory a fresh process gains by loading and quantizing
  the span, over the same process before loading, per block (what a peer's machine sees);
- agreement: greedy decoding of PROMPTS (chat template, 32 new tokens each) against the
  unquantized float32 span: the fraction of positions with the same token, and the mean
  number of tokens before the first difference (one flip changes everything after it);
- step_ms: median time of one single-token step through all blocks with a KV cache, the
  settings taking turns step by step (so that a machine's changing load hits them alike).

Usage: python benchmarks/quant.py [--model smollm2-135m-instruct] [--new-tokens 32] [--threads 1] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from swarm.checkpoint import DEFAULT_MODEL, resolve_checkpoint
from swarm.loading import load_client_parts, load_span
from swarm.quant import bitsandbytes_installed, quantize_layers, weight_bytes

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for learning a new language.",
    "What is 17 times 23?",
]

CHILD = r"""
import gc, json, os, sys, torch
from swarm.checkpoint import resolve_checkpoint
from swarm.loading import load_span
from swarm.quant import quantize_layers
model, quant, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
checkpoint = resolve_checkpoint(model)
checkpoint.config, checkpoint.weight_files
torch.ones(64, 64).matmul(torch.ones(64, 64))
quantize_layers(torch.nn.Sequential(torch.nn.Linear(64, 64)), quant)  # the quantization library's imports
before = rss()
span = load_span(checkpoint, 0, checkpoint.config.num_hidden_layers, dtype=dtype)
quantize_layers(span.layers, quant)
sum(float(t.float().sum()) for t in list(span.parameters()) + list(span.buffers()))  # touch every page
gc.collect()
print(json.dumps({"rss_bytes": rss() - before}))
"""


def resident_bytes(model: str, quant: str, dtype: str) -> int:
    result = subprocess.run([sys.executable, "-c", CHILD, model, quant, dtype], capture_output=True, text=True,
                            check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["rss_bytes"]


@torch.inference_mode()
def greedy(span, parts, input_ids: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy tokens through the span's KV cache."""
    state = span.start_inference(1, input_ids.shape[1] + new_tokens)
    ids, tokens = input_ids, []
    for _ in range(new_tokens):
        hidden = span.inference_step(state, parts.embed(ids).to(span.dtype))
        ids = parts.logits(hidden[:, -1:].float()).argmax(-1)
        tokens.append(int(ids))
    return tokens


@torch.inference_mode()
def step_seconds(spans: dict, steps: int) -> dict[str, float]:
    """Median seconds of a single-token step per span, the spans taking turns."""
    states = {name: span.start_inference(1, steps + 1) for name, span in spans.items()}
    token = torch.randn(1, 1, next(iter(spans.values())).hidden_size, generator=torch.Generator().manual_seed(0))
    times = {name: [] for name in spans}
    for _ in range(steps + 1):
        for name, span in spans.items():
            started = time.perf_counter()
            span.inference_step(states[name], token.to(span.dtype))
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(seconds[1:]) for name, seconds in times.items()}  # first: warm-up


def agreement(outputs: list[list[int]], reference: list[list[int]]) -> tuple[float, float]:
    same = sum(a == b for out, ref in zip(outputs, reference) for a, b in zip(out, ref))
    total = sum(len(ref) for ref in reference)
    prefixes = []
    for out, ref in zip(outputs, reference):
        prefix = next((i for i, (a, b) in enumerate(zip(out, ref)) if a != b), len(ref))
        prefixes.append(prefix)
    return same / total, statistics.mean(prefixes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--steps", type=int, default=20, help="single-token steps timed per setting")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    checkpoint = resolve_checkpoint(args.model)
    num_blocks = checkpoint.config.num_hidden_layers
    tokenizer = AutoTokenizer.from_pretrained(checkpoint.folder)
    parts = load_client_parts(checkpoint).eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"] for p in PROMPTS]

    settings = [("none", "float32"), ("none", "bfloat16"), ("int8", "float32"), ("int8", "bfloat16")]
    if bitsandbytes_installed():
        settings += [("nf4", "float32"), ("nf4", "bfloat16")]
    results, reference, spans = {}, None, {}
    for quant, dtype in settings:
        name = f"{quant}/{dtype}"
        span = spans[name] = load_span(checkpoint, 0, num_blocks, dtype=getattr(torch, dtype))
        quantize_layers(span.layers, quant)
        outputs = [greedy(span, parts, ids, args.new_tokens) for ids in prompts]
        reference = reference or outputs  # the first setting is float32, unquantized
        same, prefix = agreement(outputs, reference)
        results[name] = {
            "bytes_per_block": round(weight_bytes(span.layers) / num_blocks),
            "rss_mb_per_block": round(resident_bytes(args.model, quant, dtype) / num_blocks / 2**20, 2),
            "greedy_agreement": round(same, 3),
            "tokens_before_first_difference": round(prefix, 1),
        }
    for name, seconds in step_seconds(spans, args.steps).items():
        results[name]["step_ms"] = round(1000 * seconds, 1)
    print(json.dumps({"benchmark": "quant", "model": checkpoint.name, "num_blocks": num_blocks,
                      "prompts": len(PROMPTS), "new_tokens": args.new_tokens, "threads": args.threads,
                      "reference": "none/float32", "settings": results}))


if __name__ == "__main__":
    main()
