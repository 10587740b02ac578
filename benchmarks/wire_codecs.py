"""Measure each wire codec: encode + decode time and bytes on the wire; prints one JSON line.

Times include building and parsing the protobuf message (serialize_tensor + SerializeToString,
FromString + deserialize_tensor), i.e. what one hop costs on each side, CPU only.
Usage: python benchmarks/wire_codecs.py [--repeats N] [--threads T]

--threads sets torch's intra-op threads (default 1). On a busy 2-core box, torch's parallel
kernels (ops over >= 32k elements) stall for whole scheduler slices (8-16 ms) when another
process holds a core; one thread gives stable numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from swarm.wire import CODECS, deserialize_tensor, serialize_tensor, swarm_pb2

SHAPES = [(1, 1, 576), (1, 512, 576), (1, 1, 8192)]


def _median_us(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e6


def measure(shape: tuple[int, ...], codec: str, repeats: int) -> dict:
    x = torch.randn(shape)
    wire = serialize_tensor(x, codec).SerializeToString()
    decoded = deserialize_tensor(swarm_pb2.Tensor.FromString(wire))
    return {
        "shape": list(shape),
        "codec": codec,
        "wire_bytes": len(wire),
        "encode_us": round(_median_us(lambda: serialize_tensor(x, codec).SerializeToString(), repeats), 1),
        "decode_us": round(_median_us(lambda: deserialize_tensor(swarm_pb2.Tensor.FromString(wire)), repeats), 1),
        "max_abs_err": float((decoded - x).abs().max()),
        "rel_err": float((decoded - x).norm() / x.norm()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = [measure(shape, codec, args.repeats) for shape in SHAPES for codec in CODECS]
    print(json.dumps({
        "benchmark": "wire_codecs",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "results": results,
    }))


if __name__ == "__main__":
    main()
