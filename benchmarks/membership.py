"""Measure what a private swarm costs: signing and checking DHT records, and a gRPC call over
TLS with a member token against plaintext; prints one JSON line.

- "record": `Trust.sign` of a PeerRecord, `Trust.verify` cold (certificate and signature
  checked) and warm (the same value again, as a client's 2-s refresh reads it under every block
  key of a span), and a fetch's worth of records (30 blocks x 2 peers, all warm).
- "token": `MemberCheck.refusal` of a token seen before (the server's per-call hot path) and of
  a new one; `CallToken.token()` (the caller's, re-signed every 60 s).
- "call": median round trip of a unary Info call on loopback, in-process server, plaintext vs
  TLS + token (the channel and its connection opened first), and the same for a stream step.

Usage: python benchmarks/membership.py [--repeats N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import threading
import time

import grpc

from swarm.membership import Trust
from swarm.membership.grpc_auth import CallToken, MemberCheck, add_port, channel, server_interceptors
from swarm.membership.identity import SwarmIdentity
from swarm.registry import PeerRecord
from swarm.wire import swarm_pb2, swarm_pb2_grpc

RECORD = dict(model_id="smollm2-135m-instruct-1a2b3c4d", peer_id="12D3KooW" + "x" * 44, endpoint="127.0.0.1:31330",
              start=0, end=15, state="online", throughput=123.5, cache_tokens_free=4096, dtype="float32",
              version="0.1.0", fingerprint="f00d" * 16)


def micros(fn, repeats: int) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return round(1e6 * (time.perf_counter() - started) / repeats, 2)


class InfoAndEcho(swarm_pb2_grpc.BlockServiceServicer):
    async def Info(self, request, context):
        return swarm_pb2.PeerInfo()

    async def Inference(self, requests, context):
        async for _ in requests:
            yield swarm_pb2.InferenceResponse()


def call_times(loop: asyncio.AbstractEventLoop, trust: Trust | None, repeats: int) -> dict[str, float]:
    async def start():
        server = grpc.aio.server(interceptors=server_interceptors(trust))
        swarm_pb2_grpc.add_BlockServiceServicer_to_server(InfoAndEcho(), server)
        port = add_port(server, "127.0.0.1:0", trust)
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result()
    with channel(f"127.0.0.1:{port}", trust) as ch:
        stub = swarm_pb2_grpc.BlockServiceStub(ch)
        stub.Info(swarm_pb2.InfoRequest(), timeout=5)
        unary = []
        for _ in range(repeats):
            started = time.perf_counter()
            stub.Info(swarm_pb2.InfoRequest(), timeout=5)
            unary.append(time.perf_counter() - started)
        import queue

        requests: queue.SimpleQueue = queue.SimpleQueue()
        answers = stub.Inference(iter(requests.get, None))
        steps = []
        for i in range(repeats + 1):
            started = time.perf_counter()
            requests.put(swarm_pb2.InferenceRequest())
            next(answers)
            if i:  # the first opens the stream
                steps.append(time.perf_counter() - started)
        requests.put(None)
    asyncio.run_coroutine_threadsafe(server.stop(0), loop).result()
    return {"unary_ms": round(1e3 * statistics.median(unary), 3),
            "stream_step_ms": round(1e3 * statistics.median(steps), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        identity = SwarmIdentity.create(f"{folder}/swarm")
        alice, bob = Trust(identity.invite("alice")), Trust(identity.invite("bob"))
    value = PeerRecord(**RECORD).model_dump(mode="json")
    signed = alice.sign(value)

    def cold() -> None:
        fresh = Trust(bob.credential)
        assert fresh.verify(signed) == "alice"

    fetch = [alice.sign({**value, "peer_id": f"p{i}"}) for i in range(2)] * 30
    for record in fetch:
        bob.verify(record)
    check, token = MemberCheck(bob), CallToken(alice)
    seen = token.token()
    check.refusal(seen)
    result = {
        "benchmark": "membership",
        "record": {"sign_us": micros(lambda: alice.sign(value), args.repeats),
                   "verify_cold_us": micros(cold, max(20, args.repeats // 10)),
                   "verify_warm_us": micros(lambda: bob.verify(signed), args.repeats),
                   "fetch_30_blocks_x_2_peers_warm_us": micros(lambda: [bob.verify(r) for r in fetch], 50)},
        "token": {"server_check_seen_us": micros(lambda: check.refusal(seen), args.repeats),
                  "server_check_new_us": micros(lambda: MemberCheck(bob).refusal(seen), max(20, args.repeats // 10)),
                  "caller_token_us": micros(token.token, args.repeats)},
    }
    loop = asyncio.new_event_loop()  # one for both servers: grpc.aio binds its poller to the first loop
    threading.Thread(target=loop.run_forever, daemon=True).start()
    result["call"] = {"plaintext": call_times(loop, None, args.repeats),
                      "tls_and_token": call_times(loop, bob, args.repeats)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
