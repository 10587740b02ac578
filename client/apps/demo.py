"""`make demo`: a swarm of three peers on this machine answers a chat question.

Starts `swarm dht` and three `swarm peer` processes (blocks 0:10, 10:20, 20:30 of the
default model) on 127.0.0.1, asks the question through the swarm, prints the answer and the
speed, and stops every process it started, also on Ctrl-C.
"""

from __future__ import annotations

import logging
import sys
import time

QUESTION = "What is the capital of France? Answer in one sentence."
MAX_NEW_TOKENS = 64


def chat_inputs(tokenizer, question: str = QUESTION) -> dict:
    """The question as the model's chat template puts it, ready for `generate`."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt")


def answer(model, tokenizer, question: str = QUESTION) -> tuple[str, int]:
    """The demo's greedy answer to `question` and how many tokens it took: any causal LM
    with `generate` (ours through the swarm, or a local transformers model to compare)."""
    inputs = chat_inputs(tokenizer, question)
    output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    new = output[0, inputs["input_ids"].shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True).strip(), len(new)


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from swarm.checkpoint import DEFAULT_MODEL, resolve_checkpoint

    from client import AutoDistributedModelForCausalLM
    from .local_swarm import LocalSwarm

    print(f"preparing {DEFAULT_MODEL} (the first run converts its GGUF once, ~20 s)...", flush=True)
    resolve_checkpoint(DEFAULT_MODEL)
    spans = ["0:10", "10:20", "20:30"]
    print(f"starting a DHT and {len(spans)} peers on 127.0.0.1 serving blocks {', '.join(spans)}...", flush=True)
    with LocalSwarm(spans, DEFAULT_MODEL) as swarm:
        for span, endpoint in zip(spans, swarm.endpoints):
            print(f"  peer {endpoint} serves blocks {span}")
        model = AutoDistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, initial_peers=swarm.initial_peers)
        print(f"\nuser: {QUESTION}\nassistant: ", end="", flush=True)
        start = time.perf_counter()
        text, tokens = answer(model, model.tokenizer)
        elapsed = time.perf_counter() - start
        print(text)
        print(f"\n[{tokens} tokens through 3 peers in {elapsed:.2f} s: {tokens / elapsed:.1f} tokens/s]")
        model.swarm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
