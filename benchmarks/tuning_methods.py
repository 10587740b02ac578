"""Every tuning method trained on the same small dataset through 3 peers on loopback (the
default model split [0,10) [10,20) [20,30)). Prints one JSON line.

    python benchmarks/tuning_methods.py [--steps 30] [--methods ia3,prefix,...]

Per method: trainable parameters, bytes the client sends per step (Forward + Backward
requests, all hops) and receives, seconds per step (median, forward + backward + Adam), and
the loss before training and after `--steps` Adam steps. The dataset is eight short
sentences, all in every step (batch 8, padded); the learning rates are the ones that train
each method well here (given in the output).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from client import AutoDistributedModelForCausalLM
from client.apps.local_swarm import LocalSwarm
from client.transport import PeerConnection
from swarm.checkpoint import DEFAULT_MODEL
from swarm.tuning import IA3, BottleneckAdapter, LoRA, PrefixTuning

DATASET = [
    "The swarm serves a model that no single machine can hold.",
    "Each peer holds a contiguous span of transformer blocks.",
    "The client keeps the embeddings and the language model head.",
    "Activations travel from peer to peer over gRPC.",
    "Gradients come back through the same chain in reverse.",
    "Only the client's small parameters are trained.",
    "Peers keep no training state between requests.",
    "A failed peer is replaced and the step goes on.",
]
PROMPT_TOKENS = 16

# name -> (tuning_mode for from_pretrained, learning rate)
METHODS = {
    "none": (None, 1e-3),
    "ptune": ("ptune", 1e-2),
    "deep_ptune": ("deep_ptune", 1e-2),
    "lora": (LoRA(rank=8, alpha=16), 1e-3),
    "ia3": (IA3(), 3e-2),
    "prefix": (PrefixTuning(num_virtual_tokens=PROMPT_TOKENS), 3e-2),
    "prefix_mlp": (PrefixTuning(num_virtual_tokens=PROMPT_TOKENS, projection=256), 1e-2),
    "bottleneck_pfeiffer": (BottleneckAdapter("pfeiffer", reduction_factor=16), 1e-3),
    "bottleneck_houlsby": (BottleneckAdapter("houlsby", reduction_factor=16), 1e-3),
    "emb+adpt": (["embeddings", BottleneckAdapter("pfeiffer", reduction_factor=16)], 1e-3),
    "lora+ptune": (["ptune", LoRA(rank=8, alpha=16)], 1e-3),
}


class WireCounter:
    """Bytes of the Forward/Backward messages the client sends and receives."""

    def __init__(self):
        self.sent = self.received = 0
        self._originals = {}

    def __enter__(self) -> "WireCounter":
        for name in ("forward", "backward"):
            original = self._originals[name] = getattr(PeerConnection, name)

            def counted(connection, request, timeout, original=original):
                response = original(connection, request, timeout)
                self.sent += request.ByteSize()
                self.received += response.ByteSize()
                return response

            setattr(PeerConnection, name, counted)
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._originals.items():
            setattr(PeerConnection, name, original)


def train(initial_peers: list[str], mode, lr: float, steps: int) -> dict:
    torch.manual_seed(0)
    model = AutoDistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, initial_peers=initial_peers,
                                                            tuning_mode=mode, pre_seq_len=PROMPT_TOKENS)
    tokenizer = model.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(DATASET, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    model.train()
    losses, times = [], []
    with WireCounter() as wire:
        for step in range(steps):
            start = time.perf_counter()
            loss = model(**batch, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
            losses.append(loss.item())
            if step == 0:
                sent, received = wire.sent, wire.received
    with torch.no_grad():
        model.eval()
        final = model(**batch, labels=labels).loss.item()
    model.swarm.shutdown()
    return {"trainable_params": sum(p.numel() for p in params), "bytes_sent_per_step": sent,
            "bytes_received_per_step": received, "s_per_step": round(statistics.median(times), 3),
            "lr": lr, "loss_start": round(losses[0], 4), f"loss_after_{steps}": round(final, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    torch.set_num_threads(1)  # the client's share of a small box that also runs three peers
    results = {}
    with LocalSwarm(["0:10", "10:20", "20:30"]) as swarm:
        for name in args.methods.split(","):
            mode, lr = METHODS[name]
            try:
                results[name] = train(swarm.initial_peers, mode, lr, args.steps)
            except Exception as e:  # one broken method is reported; the others still run
                results[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
    print(json.dumps({"benchmark": "tuning_methods", "model": DEFAULT_MODEL, "peers": 3, "batch": len(DATASET),
                      "steps": args.steps, "methods": results}))


if __name__ == "__main__":
    main()
