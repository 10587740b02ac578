"""A client process for tests/integration/test_nat.py, run inside a lab namespace: generates
greedily from the tiny model through the swarm (optionally pausing after --pause-after tokens
until --go exists, so the test can kill a relay mid-generation), then, with --grads, takes
one LoRA gradient. Prints one JSON line: {"tokens": [...], "relayed_bytes": N, "punched_bytes": N,
"paths": ["punched" | "relayed", ...]} (how each connection to a NAT'd peer went); grads go to --grads.

    python -m tests.integration.nat_client --peer MADDR --model DIR --tokens N [--pause-after K --go FILE] [--grads FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peer", action="append", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--pause-after", type=int, default=0)
    parser.add_argument("--go")
    parser.add_argument("--grads")
    args = parser.parse_args()

    import torch
    from transformers.generation.streamers import BaseStreamer

    from client import AutoDistributedModelForCausalLM
    from swarm.reach import tunnels
    from tests.integration.nat_reference import LORA, prompt, seeded_lora

    torch.set_num_threads(1)

    class PauseAfter(BaseStreamer):
        def __init__(self) -> None:
            self.seen = -1  # the first put() is the prompt

        def put(self, value) -> None:
            self.seen += 1
            if args.pause_after and self.seen == args.pause_after:
                print("PAUSED", flush=True)
                while not os.path.exists(args.go):
                    time.sleep(0.02)

        def end(self) -> None:
            pass

    model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=args.peer, **LORA)
    ids = prompt()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=args.tokens,
                         min_new_tokens=args.tokens, pad_token_id=0, streamer=PauseAfter())
    result = {"tokens": out[0].tolist()}
    if args.grads:
        adapter = seeded_lora(model.tuning.adapters[0].tensors())
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.save({"loss": loss.detach(), "grads": {k: v.grad for k, v in adapter.items()}}, args.grads)
    used = tunnels._tunnels
    result.update(relayed_bytes=used.relayed_bytes(), punched_bytes=used.punched_bytes(), paths=used.paths())
    print(json.dumps(result), flush=True)
    model.swarm.shutdown()


if __name__ == "__main__":
    main()
