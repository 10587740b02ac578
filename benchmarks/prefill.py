"""Prefill time of a long prompt (default 512 tokens): through 3 peers on loopback vs local
transformers. Prints one JSON line.

    python benchmarks/prefill.py [--tokens 512] [--runs 3]

"prefill" is what generate spends before the first new token: generate(max_new_tokens=1),
which through the swarm also opens the inference session (one round trip per peer).
"forward" is one stateless forward of the prompt (the path training takes), swarm vs local.
Each figure is the median of `--runs` after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from client.apps.local_swarm import LocalSwarm
from swarm.checkpoint import DEFAULT_MODEL, resolve_checkpoint


def median_seconds(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(model, ids: torch.Tensor, runs: int) -> dict[str, float]:
    with torch.no_grad():
        return {
            "prefill_s": median_seconds(lambda: model.generate(ids, max_new_tokens=1, do_sample=False), runs),
            "forward_s": median_seconds(lambda: model(input_ids=ids, logits_to_keep=1), runs),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    checkpoint = resolve_checkpoint(DEFAULT_MODEL)
    local = AutoModelForCausalLM.from_pretrained(checkpoint.folder, dtype=torch.float32).eval()
    torch.manual_seed(0)
    ids = torch.randint(100, local.config.vocab_size, (1, args.tokens))
    default_threads = torch.get_num_threads()
    with LocalSwarm(["0:10", "10:20", "20:30"]) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, initial_peers=swarm.initial_peers)
        # As in generate.py: local at its best thread count; the client on one thread, its
        # work (embeddings, head) is small and the peers need the cores.
        by_threads = {}
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            by_threads[threads] = measure(local, ids, args.runs)
        local_best = {key: min(m[key] for m in by_threads.values()) for key in ("prefill_s", "forward_s")}
        torch.set_num_threads(1)
        ours = measure(model, ids, args.runs)
        with torch.no_grad():
            first_local = local.generate(ids, max_new_tokens=1, do_sample=False)
            first_swarm = model.generate(ids, max_new_tokens=1, do_sample=False)
        model.swarm.shutdown()
    print(json.dumps({
        "benchmark": "prefill", "model": DEFAULT_MODEL, "peers": 3, "prompt_tokens": args.tokens, "runs": args.runs,
        "local_prefill_s": round(local_best["prefill_s"], 3), "swarm_prefill_s": round(ours["prefill_s"], 3),
        "prefill_ratio": round(local_best["prefill_s"] / ours["prefill_s"], 3),
        "local_forward_s": round(local_best["forward_s"], 3), "swarm_forward_s": round(ours["forward_s"], 3),
        "forward_ratio": round(local_best["forward_s"] / ours["forward_s"], 3),
        "first_token_identical": bool(torch.equal(first_local, first_swarm)),
    }))


if __name__ == "__main__":
    main()
