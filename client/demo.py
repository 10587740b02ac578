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


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from swarm.checkpoint import DEFAULT_MODEL, resolve_checkpoint

    from client import AutoDistributedModelForCausalLM
    from client.local_swarm import LocalSwarm

    print(f"preparing {DEFAULT_MODEL} (the first run converts its GGUF once, ~20 s)...", flush=True)
    resolve_checkpoint(DEFAULT_MODEL)
    spans = ["0:10", "10:20", "20:30"]
    print(f"starting a DHT and {len(spans)} peers on 127.0.0.1 serving blocks {', '.join(spans)}...", flush=True)
    with LocalSwarm(spans, DEFAULT_MODEL) as swarm:
        for span, endpoint in zip(spans, swarm.endpoints):
            print(f"  peer {endpoint} serves blocks {span}")
        model = AutoDistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, initial_peers=swarm.initial_peers)
        tokenizer = model.tokenizer
        text = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                             add_generation_prompt=True)
        inputs = tokenizer(text, return_tensors="pt")
        print(f"\nuser: {QUESTION}\nassistant: ", end="", flush=True)
        start = time.perf_counter()
        output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
        elapsed = time.perf_counter() - start
        new = output[0, inputs["input_ids"].shape[1]:]
        print(tokenizer.decode(new, skip_special_tokens=True).strip())
        print(f"\n[{len(new)} tokens through 3 peers in {elapsed:.2f} s: {len(new) / elapsed:.1f} tokens/s]")
        model.swarm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
