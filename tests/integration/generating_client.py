"""One client process for tests/integration/test_concurrent_clients.py: joins the swarm, warms
up, prints READY, waits for the --go file to appear, generates greedily and prints the new
token ids as one JSON line.

    python -m tests.integration.generating_client --peer MADDR --prompt TEXT --tokens N --go FILE [--adapter DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peer", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--go", required=True)
    parser.add_argument("--adapter")
    args = parser.parse_args()

    import torch

    from client import AutoDistributedModelForCausalLM
    from swarm.named_models import DEFAULT_MODEL

    torch.set_num_threads(1)  # eight of us share two cores with three peers
    model = AutoDistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, initial_peers=[args.peer],
                                                            adapter=args.adapter)
    inputs = model.tokenizer(args.prompt, return_tensors="pt")
    model.generate(**inputs, max_new_tokens=1, do_sample=False)  # routes found, channels open
    print("READY", flush=True)
    while not os.path.exists(args.go):
        time.sleep(0.01)
    out = model.generate(**inputs, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
    print(json.dumps(out[0, inputs["input_ids"].shape[1]:].tolist()), flush=True)
    model.swarm.shutdown()


if __name__ == "__main__":
    main()
