"""Measure each wire codec: encode + decode time and bytes on the wire, alone and in a swarm;
prints one JSON line.

"results": one tensor message per shape and codec. Times include building and parsing the
protobuf message (serialize_tensor + SerializeToString, FromString + deserialize_tensor), i.e.
what one hop costs on each side, CPU only.

"swarm": 3 peers on loopback, each behind a counting proxy (delay_proxy.py at 0 ms), greedy
generation of --prompts prompts x --new-tokens tokens with each codec. Bytes per token per hop
are what crossed the proxies during each decode step (both directions, gRPC framing included),
divided by the hops; agreement is the share of generated positions where a codec's token
equals the raw (fp32) codec's, and how many prompts gave exactly the same tokens. Free-running
agreement is chaotic: one flipped near-tie changes every later position. So also
"next_token_agreement": with raw's generated tokens as the prefix (one forward pass per prompt and
codec), the share of positions where the codec's argmax equals raw's argmax on the same pass, i.e.
how often the codec alone flips a greedy token.

Usage: python benchmarks/wire_codecs.py [--repeats N] [--threads T] [--prompts 5] [--new-tokens 64] [--codecs raw,int8] [--no-swarm]

--threads sets torch's intra-op threads (default 1). On a busy 2-core box, torch's parallel
kernels (ops over >= 32k elements) stall for whole scheduler slices (8-16 ms) when another
process holds a core; one thread gives stable numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from transformers import StoppingCriteriaList

from swarm.wire import CODECS, deserialize_tensor, serialize_tensor, swarm_pb2

SHAPES = [(1, 1, 576), (1, 512, 576), (1, 1, 8192)]
SPANS = ["0:10", "10:20", "20:30"]
PROMPTS = [
    "Write a short story about a fox who learns to fly.",
    "Explain why the sky is blue to a ten-year-old.",
    "List three uses of a paperclip.",
    "What is the capital of France, and what is it known for?",
    "Translate 'good morning, how are you?' into Spanish.",
    "Give me a recipe for pancakes.",
    "Describe the water cycle in two sentences.",
]


def _median_us(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e6


def measure(shape: tuple[int, ...], codec: str, repeats: int) -> dict:
    x = torch.randn(shape)
    wire = serialize_tensor(x, codec).SerializeToString()
    decoded = deserialize_tensor(swarm_pb2.Tensor.FromString(wire))
    return {
        "shape": list(shape),
        "codec": codec,
        "wire_bytes": len(wire),
        "encode_us": round(_median_us(lambda: serialize_tensor(x, codec).SerializeToString(), repeats), 1),
        "decode_us": round(_median_us(lambda: deserialize_tensor(swarm_pb2.Tensor.FromString(wire)), repeats), 1),
        "max_abs_err": float((decoded - x).abs().max()),
        "rel_err": float((decoded - x).norm() / x.norm()),
    }


def measure_swarm(prompts: int, new_tokens: int, codecs: list[str]) -> dict:
    # Imported here: the message-level part above runs without the client or any process.
    from client import AutoDistributedModelForCausalLM, SwarmSettings
    from swarm.checkpoint import DEFAULT_MODEL

    from proxied_swarm import ProxiedSwarm
    from step_clock import StepClock

    tokens, per_codec, argmax = {}, {}, {}
    with ProxiedSwarm(SPANS, delay_ms=0) as swarm:
        for codec in ["raw"] + [c for c in codecs if c != "raw"]:
            model = AutoDistributedModelForCausalLM.from_pretrained(
                DEFAULT_MODEL, initial_peers=swarm.initial_peers, settings=SwarmSettings(codec=codec))
            step_bytes, outs = [], []
            for prompt in PROMPTS[:prompts]:
                ids = model.tokenizer(prompt, return_tensors="pt").input_ids
                clock = StepClock(probe=swarm.proxy.total_bytes)
                out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                     stopping_criteria=StoppingCriteriaList([clock]))
                step_bytes += clock.step_probes()
                outs.append(out[0, ids.shape[1]:])
            tokens[codec] = outs
            per_codec[codec] = {"bytes_per_token_per_hop": round(statistics.median(step_bytes) / len(SPANS), 1)}
            same = [(a == b).float().mean().item() for a, b in zip(outs, tokens["raw"])]
            per_codec[codec]["greedy_agreement_vs_raw"] = round(statistics.mean(same), 4)
            per_codec[codec]["prompts_identical"] = f"{sum(s == 1.0 for s in same)}/{len(same)}"
            argmax[codec] = _teacher_forced_argmax(model, PROMPTS[:prompts], tokens["raw"])
            per_codec[codec]["next_token_agreement"] = round(float((argmax[codec] == argmax["raw"]).float().mean()), 4)
            model.swarm.shutdown()
    return {"model": DEFAULT_MODEL, "peers": len(SPANS), "prompts": prompts, "new_tokens": new_tokens,
            "codecs": per_codec}


def _teacher_forced_argmax(model, prompts: list[str], raw_tokens: list[torch.Tensor]) -> torch.Tensor:
    """Greedy next token at each generated position, given raw's tokens before it."""
    picks = []
    with torch.no_grad():
        for prompt, generated in zip(prompts, raw_tokens):
            ids = model.tokenizer(prompt, return_tensors="pt").input_ids
            logits = model(torch.cat([ids, generated[None]], dim=1)).logits[0, ids.shape[1] - 1 : -1]
            picks.append(logits.argmax(-1))
    return torch.cat(picks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--prompts", type=int, default=5, help=f"prompts generated per codec (at most {len(PROMPTS)})")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--no-swarm", action="store_true", help="only the message-level figures")
    parser.add_argument("--codecs", default=",".join(CODECS), help="comma-separated codecs for the swarm part")
    args = parser.parse_args()
    if not 1 <= args.prompts <= len(PROMPTS):
        parser.error(f"--prompts must be in 1..{len(PROMPTS)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = [measure(shape, codec, args.repeats) for shape in SHAPES for codec in CODECS]
    print(json.dumps({
        "benchmark": "wire_codecs",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "results": results,
        **({} if args.no_swarm else {"swarm": measure_swarm(args.prompts, args.new_tokens, args.codecs.split(","))}),
    }))


if __name__ == "__main__":
    main()
