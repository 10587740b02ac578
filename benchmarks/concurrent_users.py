"""Many users at once: N client processes, each generating greedily through the same 3 peers
(blocks 0:10, 10:20, 20:30 of the default model, `--decode-threads 1` as on any shared CPU box).
Prints one JSON line.

    python benchmarks/concurrent_users.py [--clients 1,2,4,8,16] [--tokens 32] [--timeout 600] [--petals]

Named concurrent_users.py, not concurrent.py: a script's folder comes first on sys.path, so a
benchmarks/concurrent.py would shadow the standard library's `concurrent` package (asyncio
imports concurrent.futures) and break every run.

For each client count: aggregate tokens/s (all tokens / (last finish - first start), not the best
client's rate times N), per-client tokens/s (min / median / max), time to first token (median /
max) and how many clients finished in --timeout. In the same swarm, the ceiling batching aims at:
one session holding 8 sequences. Every client's tokens are checked against the 1-client run of
its prompt (greedy: they must not depend on who else is generating).

`--petals`: then Petals 2.2 at the same client counts, prompts (as token ids) and token count, in
the same run: the swarm the anchor's run.sh starts, driven by its concurrent_clients.py
(petals_anchor.py; Petals is built once in its own venv). Petals hangs some clients at 4 or more,
hence --petals-timeout per count (loading included), reported as "finished" k of "clients" n; a
count where not all finished has no aggregate (concurrent_clients.py reports none). `acceptance`
holds issue 17's ratios: aggregate at 8 clients / one 8-sequence session (target 0.8), aggregate
at 8 / Petals' best aggregate at any count (target 2.5), and whether all 16 clients finished.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import signal
import statistics
import sys
import tempfile
import time

PROMPTS = ["A quick brown fox", "The capital of France is", "def fibonacci(n):", "Once upon a time, in a land",
           "The best way to learn a language is", "Water boils at", "My favourite book is", "In 1969, the first"]


def _client(index: int, peers: list[str], tokens: int, barrier, results) -> None:
    import torch
    from transformers.generation.streamers import BaseStreamer

    from client import AutoDistributedModelForCausalLM
    from swarm.named_models import DEFAULT_MODEL

    class FirstToken(BaseStreamer):
        """Notes when generate hands over its first new token (the first `put` is the prompt)."""
        def __init__(self) -> None:
            self.puts, self.first = 0, None

        def put(self, value) -> None:
            self.puts += 1
            if self.puts == 2 and self.first is None:
                self.first = time.time()

        def end(self) -> None:
            pass

    torch.set_num_threads(1)  # N clients share the box with the peers
    model = AutoDistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, initial_peers=peers)
    ids = model.tokenizer(PROMPTS[index % len(PROMPTS)], return_tensors="pt")["input_ids"]
    model.generate(ids, max_new_tokens=2, do_sample=False)  # routes found, channels open
    barrier.wait()
    streamer, started, cpu = FirstToken(), time.time(), time.process_time()
    out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, streamer=streamer)
    finished = time.time()
    results.put({"client": index, "start": started, "end": finished, "first": streamer.first,
                 "cpu_s": time.process_time() - cpu, "ids": out[0, ids.shape[1]:].tolist()})
    model.swarm.shutdown()


def run_clients(count: int, peers: list[str], tokens: int, timeout: float) -> tuple[dict, dict[int, list]]:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(count), ctx.Queue()
    procs = [ctx.Process(target=_client, args=(i, peers, tokens, barrier, results)) for i in range(count)]
    for proc in procs:
        proc.start()
    got, deadline = [], time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        try:
            got.append(results.get(timeout=1.0))
        except queue.Empty:
            if not any(proc.is_alive() for proc in procs):
                break
    for proc in procs:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
    row = {"clients": count, "finished": len(got)}
    if got:
        row["client_cpu_ms_per_token"] = round(1e3 * statistics.median(r["cpu_s"] for r in got) / tokens, 1)
    if got:
        wall = max(r["end"] for r in got) - min(r["start"] for r in got)
        rates = [tokens / (r["end"] - r["start"]) for r in got]
        firsts = [r["first"] - r["start"] for r in got if r["first"] is not None]
        row.update(aggregate_tok_s=round(len(got) * tokens / wall, 2),
                   per_client_tok_s={"min": round(min(rates), 2), "median": round(statistics.median(rates), 2),
                                     "max": round(max(rates), 2)},
                   first_token_s={"median": round(statistics.median(firsts), 3), "max": round(max(firsts), 3)}
                   if firsts else None)
    return row, {r["client"]: r["ids"] for r in got}


def step_batches(endpoints: list[str]) -> list[dict[int, int]]:
    """Each peer's Info counter: forward passes run so far, by how many sessions' steps they held."""
    import grpc

    from swarm.wire import swarm_pb2, swarm_pb2_grpc

    counts = []
    for endpoint in endpoints:
        with grpc.insecure_channel(endpoint) as channel:
            info = swarm_pb2_grpc.BlockServiceStub(channel).Info(swarm_pb2.InfoRequest(), timeout=10)
        counts.append(dict(info.step_batches))
    return counts


def peer_cpu(procs) -> list[float]:
    """CPU seconds each peer process (and its children, e.g. its DHT process) used so far."""
    import os

    tick = os.sysconf("SC_CLK_TCK")
    seconds = []
    for proc in procs:
        fields = open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()
        seconds.append(sum(int(v) for v in fields[11:15]) / tick)  # utime, stime, cutime, cstime
    return seconds


def batches_between(before: list[dict[int, int]], after: list[dict[int, int]]) -> dict:
    """Passes each peer ran between two counts, by size; and the mean sessions per pass."""
    per_peer = [{size: n - old.get(size, 0) for size, n in sorted(new.items()) if n - old.get(size, 0)}
                for old, new in zip(before, after)]
    passes = sum(n for peer in per_peer for n in peer.values())
    steps = sum(size * n for peer in per_peer for size, n in peer.items())
    return {"per_peer": [{str(k): v for k, v in peer.items()} for peer in per_peer],
            "mean_sessions_per_pass": round(steps / passes, 2) if passes else None}


def one_session_of_8(peers: list[str], tokens: int) -> float:
    """Tokens/s of one session holding 8 left-padded sequences through the same peers."""
    from client import AutoDistributedModelForCausalLM
    from swarm.named_models import DEFAULT_MODEL

    model = AutoDistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, initial_peers=peers)
    tokenizer = model.tokenizer
    tokenizer.padding_side = "left"
    inputs = tokenizer(PROMPTS[:8], return_tensors="pt", padding=True)
    options = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id)
    model.generate(**inputs, max_new_tokens=2, **options)
    started = time.perf_counter()
    model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, **options)
    elapsed = time.perf_counter() - started
    model.swarm.shutdown()
    return round(8 * tokens / elapsed, 2)


def prompt_ids_file(folder: str) -> str:
    """PROMPTS as our tokenizer encodes them (as each client does), for concurrent_clients.py's --prompt-ids:
    client i gets prompt i mod 8 there too."""
    from transformers import AutoTokenizer

    from swarm.checkpoint import resolve_checkpoint
    from swarm.named_models import DEFAULT_MODEL

    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(DEFAULT_MODEL).folder)
    path = f"{folder}/prompt_ids.json"
    with open(path, "w") as f:
        json.dump({prompt: tokenizer(prompt)["input_ids"] for prompt in PROMPTS}, f)
    return path


def run_petals(counts: list[int], tokens: int, timeout: float, alone: dict[int, list]) -> dict:
    """Petals 2.2 at each count through one swarm (as run.sh's CLIENTS loop); rows shaped like ours."""
    import petals_anchor

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    petals_anchor.setup(log=log)
    rows = []
    with tempfile.TemporaryDirectory(prefix="swarmlm-concurrent-") as folder:
        ids_path = prompt_ids_file(folder)
        with petals_anchor.PetalsSwarm(log=log) as swarm:
            for count in counts:
                log(f"petals: {count} clients")
                line = swarm.concurrent_clients(count, tokens, ids_path, timeout)
                row = {"clients": count, "finished": line.get("finished", count)}
                if "aggregate_tok_s" in line:
                    low, median, high = line["per_client_tok_s"]
                    got = {int(i): ids for i, ids in line.get("ids", {}).items()}
                    row.update(aggregate_tok_s=line["aggregate_tok_s"], wall_s=line["wall_s"],
                               per_client_tok_s={"min": low, "median": median, "max": high},
                               tokens_as_swarmlm=sum(ids == alone.get(i % len(PROMPTS)) for i, ids in got.items()))
                elif "hung_after_s" in line:
                    row["hung_after_s"] = line["hung_after_s"]
                if "error" in line:
                    row["error"] = line["error"]
                rows.append(row)
    return {"system": "petals-2.2.0.post1", "timeout_s": timeout, "runs": rows}


def acceptance(rows: list[dict], session_8: float | None, petals: dict | None) -> dict:
    """Issue 17's ratios; None where this run lacks a figure (no 8-client count, no Petals side)."""
    by_count = {row["clients"]: row for row in rows}
    at_8 = by_count.get(8, {}).get("aggregate_tok_s")
    best = max((row for row in (petals or {}).get("runs", []) if row.get("aggregate_tok_s")),
               key=lambda row: row["aggregate_tok_s"], default=None)

    def ratio(a, b):
        return round(a / b, 3) if a and b else None

    at_16 = by_count.get(16)
    return {"aggregate_8_over_one_session_8": ratio(at_8, session_8), "target_over_session": 0.8,
            "aggregate_8_over_best_petals": ratio(at_8, best and best["aggregate_tok_s"]), "target_over_petals": 2.5,
            "best_petals": {"clients": best["clients"], "aggregate_tok_s": best["aggregate_tok_s"]} if best else None,
            "all_finished_at_16": at_16["finished"] == 16 if at_16 else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,2,4,8,16", help="client counts, comma-separated")
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens per client")
    parser.add_argument("--timeout", type=float, default=600, help="seconds each count may take")
    parser.add_argument("--peer-args", default="", help="extra `swarm peer` arguments, e.g. '--join-wait-ms 0'")
    parser.add_argument("--petals", action="store_true", help="Petals 2.2 too, same counts, prompts and tokens")
    parser.add_argument("--petals-timeout", type=float, default=300,
                        help="seconds each Petals count may take, loading included (some clients hang)")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    # A SIGTERM (run_all's time limit) must still stop the Petals servers, which sit in sessions of
    # their own and, unlike our peers, do not watch their parent: make it an exception.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("concurrent_users: terminated"))

    from client.apps.local_swarm import LocalSwarm
    from swarm.checkpoint import resolve_checkpoint
    from swarm.named_models import DEFAULT_MODEL

    resolve_checkpoint(DEFAULT_MODEL)
    rows, alone = [], {}
    with LocalSwarm(["0:10", "10:20", "20:30"], DEFAULT_MODEL, extra_peer_args=args.peer_args.split()) as swarm:
        for count in counts:
            before, cpu = step_batches(swarm.endpoints), peer_cpu(swarm.peer_procs)
            row, ids = run_clients(count, swarm.initial_peers, args.tokens, args.timeout)
            row["peer_batches"] = batches_between(before, step_batches(swarm.endpoints))
            row["peer_cpu_s"] = [round(b - a, 2) for a, b in zip(cpu, peer_cpu(swarm.peer_procs))]
            for client, tokens in ids.items():
                alone.setdefault(client % len(PROMPTS), tokens)  # the first run of each prompt is the reference
            row["tokens_as_alone"] = all(tokens == alone[client % len(PROMPTS)] for client, tokens in ids.items())
            rows.append(row)
        session_8 = one_session_of_8(swarm.initial_peers, args.tokens)
    result = {"benchmark": "concurrent", "peers": 3, "peer_args": args.peer_args, "tokens_per_client": args.tokens,
              "runs": rows, "one_session_of_8_tok_s": session_8}
    petals = None
    if args.petals:  # after our swarm is gone: the two systems never share the cores
        try:
            petals = run_petals(counts, args.tokens, args.petals_timeout, alone)
        except (OSError, RuntimeError) as e:  # no anchors here, setup or swarm start failed: keep our figures
            petals = {"error": str(e)[-1500:]}
        result["petals"] = petals
    print(json.dumps({**result, "acceptance": acceptance(rows, session_8, petals)}))


if __name__ == "__main__":
    main()
