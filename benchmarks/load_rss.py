"""Peak memory of loading one span of blocks versus the whole model; prints one JSON line.

Each case runs in a fresh Python process (peak RSS only grows, so cases cannot share one):
- "imports":     torch, transformers, swarm and the family's modeling module imported, one small op
                 run, nothing loaded (the floor every case pays);
- "span":        swarm.loading.load_span(checkpoint, START, END), what a peer serving that span does;
- "whole_model": AutoModelForCausalLM.from_pretrained(folder), what running the model alone takes.
Peak RSS is ru_maxrss of the child itself; "net" figures subtract the imports floor.

Usage: python benchmarks/load_rss.py [--model smollm2-135m-instruct] [--span 0:10] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from swarm.checkpoint import DEFAULT_MODEL, resolve_checkpoint

CHILD = r"""
import importlib, json, resource, sys
import torch, transformers, swarm.loading
from swarm.checkpoint import resolve_checkpoint
case, model, start, end, dtype = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), getattr(torch, sys.argv[5])
checkpoint = resolve_checkpoint(model)
checkpoint.config  # config and tensor index are part of every case's floor
checkpoint.weight_files
# Both loaders need the family's modeling code and torch's start-up allocations: floor too.
model_type = checkpoint.config.model_type
importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
torch.ones(64, 64).matmul(torch.ones(64, 64)).sum()
if case == "span":
    loaded = swarm.loading.load_span(checkpoint, start, end, dtype=dtype)
elif case == "whole_model":
    loaded = transformers.AutoModelForCausalLM.from_pretrained(checkpoint.folder, dtype=dtype)
if case != "imports":
    # Touch every weight, as a first forward pass would: lazily mapped pages count once read.
    total = sum(float(t.float().sum()) for t in loaded.state_dict().values())
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_case(case: str, model: str, start: int, end: int, dtype: str) -> float:
    result = subprocess.run([sys.executable, "-c", CHILD, case, model, str(start), str(end), dtype],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--span", default="0:10", help="START:END, blocks [START, END)")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    start, end = (int(x) for x in args.span.split(":"))
    checkpoint = resolve_checkpoint(args.model)  # converts once here, not inside a measured child

    peaks = {case: run_case(case, args.model, start, end, args.dtype) for case in ("imports", "span", "whole_model")}
    floor = peaks["imports"]
    net = {case: peaks[case] - floor for case in ("span", "whole_model")}
    print(json.dumps({
        "benchmark": "load_rss",
        "model": checkpoint.name,
        "num_blocks": checkpoint.config.num_hidden_layers,
        "span": [start, end],
        "dtype": args.dtype,
        "imports_peak_rss_mb": round(floor, 1),
        "span_peak_rss_mb": round(peaks["span"], 1),
        "whole_model_peak_rss_mb": round(peaks["whole_model"], 1),
        "span_net_mb": round(net["span"], 1),
        "whole_model_net_mb": round(net["whole_model"], 1),
        "span_over_whole": round(peaks["span"] / peaks["whole_model"], 3),
        "span_over_whole_net": round(net["span"] / net["whole_model"], 3),
    }))


if __name__ == "__main__":
    main()
