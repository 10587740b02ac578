"""Training step time (batch 4, seq 64): through 3 peers on loopback vs the same step run
locally by transformers (peft for LoRA), for each tuning mode. Prints one JSON line.

    python benchmarks/finetune.py [--steps 5] [--batch 4] [--seq 64] [--modes none,ptune,deep_ptune,lora]

A step is forward + backward + Adam update; the median of `--steps` after one warm-up.
"ratio" is local time / swarm time (the swarm's speed as a share of local's). The modes are
the client's tuning modes (client/tuning.py TUNING_MODES) plus "none" (the client's own
embeddings and norm train); a mode that fails is reported with its error.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss

from client import AutoDistributedModelForCausalLM
from client.apps.local_swarm import LocalSwarm
from swarm.checkpoint import DEFAULT_MODEL, resolve_checkpoint

PREFIX = 16


def timed_steps(step, steps: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def local_step(folder, mode: str, ids: torch.Tensor):
    """The same training step, run locally: returns a closure doing one step."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    hidden = model.config.hidden_size
    if mode == "lora":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        params = [p for p in model.parameters() if p.requires_grad]
    elif mode == "none":
        params = [model.model.embed_tokens.weight, model.model.norm.weight]
        model.model.layers.requires_grad_(False)
    else:
        model.requires_grad_(False)
        prompts = torch.nn.Parameter(torch.randn(PREFIX, hidden) * 0.02)
        params = [prompts]
        if mode == "deep_ptune":
            deep = torch.nn.Parameter(torch.zeros(len(model.model.layers), PREFIX, hidden))
            params.append(deep)
            for i, layer in enumerate(model.model.layers):
                def add(module, args, kwargs, i=i):
                    h = args[0]
                    return (torch.cat([h[:, :PREFIX] + deep[i], h[:, PREFIX:]], dim=1),) + tuple(args[1:]), kwargs
                layer.register_forward_pre_hook(add, with_kwargs=True)
    optimizer = torch.optim.Adam(params, lr=1e-4)

    def step():
        if mode in ("ptune", "deep_ptune"):
            embeds = model.model.embed_tokens(ids)
            embeds = torch.cat([params[0].expand(ids.shape[0], -1, -1), embeds], dim=1)
            logits = model(inputs_embeds=embeds).logits[:, PREFIX:].contiguous()
            loss = ForCausalLMLoss(logits, ids, vocab_size=model.config.vocab_size)
        else:
            loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def swarm_step(initial_peers, mode: str, ids: torch.Tensor):
    model = AutoDistributedModelForCausalLM.from_pretrained(
        DEFAULT_MODEL, initial_peers=initial_peers, tuning_mode=None if mode == "none" else mode, pre_seq_len=PREFIX)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--modes", default="none,ptune,deep_ptune,lora")
    args = parser.parse_args()

    folder = resolve_checkpoint(DEFAULT_MODEL).folder
    torch.manual_seed(0)
    ids = torch.randint(100, 20000, (args.batch, args.seq))
    results = {}
    with LocalSwarm(["0:10", "10:20", "20:30"]) as swarm:
        for mode in args.modes.split(","):
            try:
                local_s = timed_steps(local_step(folder, mode, ids), args.steps)
                step, model = swarm_step(swarm.initial_peers, mode, ids)
                swarm_s = timed_steps(step, args.steps)
                model.swarm.shutdown()
            except Exception as e:  # one broken mode is reported; the others still run
                results[mode] = {"error": f"{type(e).__name__}: {e}"[:300]}
                continue
            results[mode] = {"local_s": round(local_s, 3), "swarm_s": round(swarm_s, 3),
                             "ratio": round(local_s / swarm_s, 3)}
    print(json.dumps({"benchmark": "finetune", "model": DEFAULT_MODEL, "peers": 3, "batch": args.batch,
                      "seq": args.seq, "steps": args.steps, "train_step": results}))


if __name__ == "__main__":
    main()
