"""A slice of a 70B model at full width: the wire and compute shape of serving Llama-2-70B,
on a machine that cannot hold 70B. Prints one JSON line.

    python benchmarks/slice70b.py [--new-tokens 4] [--codecs raw,bfloat16]

Four random-initialised Llama blocks with Llama-2-70B's shapes (hidden 8192, 64 heads / 8 KV
heads, intermediate 28672, vocab 32000), written as a Hugging Face folder in bf16 safetensors
under a temp dir (removed at the end, ~7.9 GB). Two peers serve two blocks each in bf16
(~3.4 GB of weights per peer), each behind a counting proxy; the client holds 70B-sized
embeddings and LM head (float32). Greedy decoding of a few tokens per codec gives:
- ms per token, and per hop (per token / hops), next to the compute per hop the peers
  measured at start-up (their announced throughput);
- bytes per token per hop on the wire (both directions, gRPC framing included).
Needs ~10 GB of free memory; refuses to start with less.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, StoppingCriteriaList

from client import AutoDistributedModelForCausalLM, SwarmSettings

from proxied_swarm import ProxiedSwarm
from step_clock import StepClock

LLAMA2_70B = dict(hidden_size=8192, num_attention_heads=64, num_key_value_heads=8, intermediate_size=28672,
                  vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                  tie_word_embeddings=False, hidden_act="silu")
BLOCKS, SPANS = 4, ["0:2", "2:4"]
NEEDED_FREE_GB = 10
PROMPT_TOKENS = 8
GB = 1024**3


def write_random_checkpoint(folder: Path) -> int:
    """A Llama-2-70B-shaped folder with BLOCKS blocks of random bf16 weights; returns its bytes.
    One safetensors file per block, written one at a time, so at most a block is in memory."""
    config = LlamaConfig(num_hidden_layers=BLOCKS, dtype="bfloat16", **LLAMA2_70B)
    config.save_pretrained(folder)
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in LlamaForCausalLM(config).state_dict().items()}
    groups: dict[str, list[str]] = {}
    for name in shapes:
        parts = name.split(".")
        groups.setdefault(f"block{int(parts[2]):02d}" if parts[1] == "layers" else "client", []).append(name)
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for group, names in groups.items():
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:  # Llama's own init: normal(0, 0.02)
                tensors[name] = torch.empty(shapes[name], dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)
        file = f"{group}.safetensors"
        save_file(tensors, folder / file, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({name: file for name in names})
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def decode(model, swarm: ProxiedSwarm, new_tokens: int) -> dict:
    ids = torch.randint(100, LLAMA2_70B["vocab_size"], (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))
    clock = StepClock(probe=swarm.proxy.total_bytes)
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       stopping_criteria=StoppingCriteriaList([clock]))
    hops = len(SPANS)
    seconds = statistics.median(clock.step_seconds())
    return {"first_token_s": round(clock.times[0] - start, 3), "ms_per_token": round(seconds * 1000, 1),
            "ms_per_token_per_hop": round(seconds * 1000 / hops, 1),
            "bytes_per_token_per_hop": round(statistics.median(clock.step_probes()) / hops, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=4, help="tokens generated per codec (>= 2)")
    parser.add_argument("--codecs", default="raw,bfloat16")
    args = parser.parse_args()
    free = psutil.virtual_memory().available / GB
    if free < NEEDED_FREE_GB:
        sys.exit(f"slice70b needs ~{NEEDED_FREE_GB} GB of free memory (2 peers x 3.4 GB + a 2 GB client); "
                 f"{free:.1f} GB are free. Run it on a quieter or larger machine.")
    # A SIGTERM (e.g. run_all's timeout) must still remove the 8 GB folder: make it an exception.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("slice70b: terminated"))
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="swarmlm-slice70b-"))
    try:
        started = time.perf_counter()
        checkpoint_bytes = write_random_checkpoint(folder)
        write_s = time.perf_counter() - started
        started = time.perf_counter()
        with ProxiedSwarm(SPANS, delay_ms=0, model=str(folder), extra_peer_args=["--dtype", "bfloat16",
                          # 70B-width steps read 1.7 GB of weights: memory-bound GEMVs that do gain from
                          # every core (decode steps on one thread took 331 ms per hop against 203 ms).
                          "--decode-threads", str(os.cpu_count() or 1)],
                          start_timeout=900) as swarm:
            peers_start_s = time.perf_counter() - started
            by_codec = {}
            for codec in args.codecs.split(","):
                model = AutoDistributedModelForCausalLM.from_pretrained(
                    str(folder), initial_peers=swarm.initial_peers, settings=SwarmSettings(codec=codec))
                by_codec[codec] = decode(model, swarm, args.new_tokens)
                throughputs = [r.throughput for records in model.swarm.records().values() for r in records]
                model.swarm.shutdown()
                del model
        compute_ms = 1000 / statistics.median(throughputs) if throughputs else None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps({
        "benchmark": "slice70b", "shape": "Llama-2-70B", **{k: LLAMA2_70B[k] for k in (
            "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size")},
        "blocks": BLOCKS, "peers": len(SPANS), "blocks_per_peer": BLOCKS // len(SPANS), "peer_dtype": "bfloat16",
        "checkpoint_gb": round(checkpoint_bytes / GB, 2), "write_s": round(write_s, 1),
        "peers_start_s": round(peers_start_s, 1), "prompt_tokens": PROMPT_TOKENS, "new_tokens": args.new_tokens,
        "peer_compute_ms_per_token": round(compute_ms, 1) if compute_ms else None,
        "codecs": by_codec,
    }))


if __name__ == "__main__":
    main()
