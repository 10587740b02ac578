"""Decode and training through a peer behind real NAT (tests/netlab.py: network namespaces, a
home router that lets nothing in), reached directly (a forwarded port) or through a relay.

The middle span of three is served by a peer in `home1`; the other two and a `swarm dht --relay`
node are in `pub`, and so is the client (benchmarks/nat_client.py). Setups, one after the other:

- direct:  the home peer gets --port P and the router forwards P (what a user sets up);
- hole_punched: no forwarding; the client punches a direct TCP path (swarm/reach/punch.py),
  coordinated through the relay;
- relayed: no forwarding, punching off (SWARMLM_HOLE_PUNCH=0): gRPC goes through the relay.

Each setup runs in a lab of its own (the home peer is stopped and started again with the other
network, and no stale DHT record of the previous one can be picked). Per setup: tokens/s of a
64-token greedy generate after a warm-up, the median decode step, one LoRA training step
(forward + backward, 8 tokens) and the bytes that crossed the relay during the generate.
Prints one JSON line; without root, `ip netns` or iptables it prints why it skipped.

    sudo python benchmarks/nat.py [--tokens 64] [--model default|tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.netlab, tests.procs

from tests.netlab import NetLab, missing  # noqa: E402

SETUPS = ("direct", "hole_punched", "relayed")
PORT = 31337
START_SECONDS = 240.0
REACH_LINE = r"reachability: (.*)"


class StartupTimeout(Exception):
    pass


def _env() -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def run_setup(name: str, folder: str, splits: list[str], tokens: int, logs: Path) -> dict:
    from swarm.ready_line import PeerReady
    from tests.procs import output, wait_for_line

    with NetLab(homes=1) as lab:
        dht = lab.spawn("pub", [sys.executable, "-m", "swarm.cli", "dht", "--host", lab.public_ip, "--relay"],
                        env=_env(), log_dir=logs)
        relay = wait_for_line(dht, rf"^/ip4/{lab.public_ip.replace('.', '[.]')}/tcp/\d+/p2p/\w+$", 60).group(0)
        if name == "direct":
            lab.forward_port(1, PORT)

        def peer(where: str, blocks: str, *extra: str):
            return lab.spawn(where, [sys.executable, "-m", "swarm.cli", "peer", "--model", folder, "--blocks", blocks,
                                     "--host", "0.0.0.0", "--device", "cpu", "--threads", "1",
                                     "--initial-peers", relay, *extra], env=_env(), log_dir=logs)

        peers = [peer("pub", splits[0]), peer("home1", splits[1], *(["--port", str(PORT)] if name == "direct" else [])),
                 peer("pub", splits[2])]
        started = time.perf_counter()
        try:
            reach = wait_for_line(peers[1], REACH_LINE, START_SECONDS).group(1)
            for proc in peers:
                wait_for_line(proc, PeerReady.PATTERN.pattern, max(1.0, START_SECONDS - (time.perf_counter() - started)))
        except TimeoutError as e:
            raise StartupTimeout(str(e).splitlines()[0]) from e
        startup_s = time.perf_counter() - started
        env = {**_env(), "SWARMLM_HOLE_PUNCH": "0" if name == "relayed" else "1"}
        client = lab.spawn("pub", [sys.executable, str(ROOT / "benchmarks" / "nat_client.py"), "--model", folder,
                                   "--peer", relay, "--tokens", str(tokens)], env=env, log_dir=logs)
        try:
            result = json.loads(wait_for_line(client, r"^\{.*\}$", 600).group(0))
        except (TimeoutError, AssertionError) as e:
            raise RuntimeError(f"{name} client failed:\n{output(client)}") from e
    return {"home_peer_reachability": reach, "startup_s": round(startup_s, 1), **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--model", choices=["default", "tiny"], default="default",
                        help="default: swarm's default model (30 blocks, 0:10 pub, 10:20 home1, 20:30 pub); "
                        "tiny: a 4-block random llama, fast. default falls back to tiny if its peers start too slowly")
    args = parser.parse_args()

    why = missing()
    if why:
        print(json.dumps({"benchmark": "nat", "skipped": f"NAT lab cannot run here: {why}"}))
        return

    with tempfile.TemporaryDirectory(prefix="nat-bench-") as tmp:
        logs = Path(tmp) / "logs"
        logs.mkdir()

        def tiny() -> tuple[str, str, list[str]]:
            from tests.swarm.test_models import tiny_model
            folder = Path(tmp) / "tiny-llama"
            tiny_model("llama").save_pretrained(folder, safe_serialization=True)
            return "tiny-llama (tests.swarm.test_models)", str(folder), ["0:1", "1:3", "3:4"]

        if args.model == "default":
            from swarm.checkpoint import DEFAULT_MODEL, resolve_checkpoint
            model = (DEFAULT_MODEL, str(resolve_checkpoint(DEFAULT_MODEL).folder), ["0:10", "10:20", "20:30"])
        else:
            model = tiny()
        fallback = None
        results: dict[str, dict] = {}
        for name in SETUPS:
            try:
                results[name] = run_setup(name, model[1], model[2], args.tokens, logs)
            except StartupTimeout as e:
                if fallback is not None or args.model == "tiny":
                    raise
                fallback = f"{model[0]} peers did not start within {START_SECONDS:.0f} s ({e}); fell back to tiny"
                print(fallback, file=sys.stderr)
                model, results = tiny(), {}
                for again in SETUPS:
                    results[again] = run_setup(again, model[1], model[2], args.tokens, logs)
                break

    out = {"benchmark": "nat", "model": model[0], "blocks": model[2], "new_tokens": args.tokens,
           **results,
           "relay_cost_ms_per_step": round(results["relayed"]["step_ms_median"] - results["direct"]["step_ms_median"], 2),
           "punched_cost_ms_per_step": round(results["hole_punched"]["step_ms_median"]
                                             - results["direct"]["step_ms_median"], 2)}
    if fallback:
        out["fallback"] = fallback
    print(json.dumps(out))


if __name__ == "__main__":
    main()
