"""The lecture's Petals fine-tuning snippet, unchanged but for the import, the model name
and the peers: the client's own embeddings and head train through the remote blocks.

    python examples/petals_snippet.py MULTIADDR      # MULTIADDR as printed by `swarm dht`
    python examples/petals_snippet.py                # starts a local 3-peer swarm first
"""

import sys

import torch

from client import AutoDistributedModelForCausalLM


def run(PEERS: list[str]) -> str:
    model = AutoDistributedModelForCausalLM.from_pretrained("smollm2-135m-instruct", initial_peers=PEERS)
    tokenizer = model.tokenizer
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)  # only embeddings / adapters
    the_fox_is_innocent = tokenizer("A quick brown fox did not jump over the lazy dog", return_tensors="pt")["input_ids"]
    for i in range(100):
        loss = model(input_ids=the_fox_is_innocent, labels=the_fox_is_innocent).loss
        print(f"loss[{i}] = {loss.item():.3f}")
        opt.zero_grad()
        loss.backward()
        opt.step()
    inputs = tokenizer("A quick brown fox", return_tensors="pt")["input_ids"]
    outputs = model.generate(inputs, max_new_tokens=7)
    print("generated:", tokenizer.decode(outputs[0]))  # generated: A quick brown fox did not jump over the lazy dog
    model.swarm.shutdown()
    return tokenizer.decode(outputs[0])


if __name__ == "__main__":
    if len(sys.argv) > 1:
        run(sys.argv[1:])
    else:
        from client.apps.local_swarm import LocalSwarm

        with LocalSwarm(["0:10", "10:20", "20:30"]) as swarm:
            run(swarm.initial_peers)
