"""Resilience on loopback: 4 peers serving [0, 10), [10, 20) twice and [20, 30). Prints one JSON line.

    python benchmarks/resilience.py [--new-tokens 32] [--kill-after 12] [--train-batch 4] [--train-seq 64]

(a) Recovery: a greedy generation runs undisturbed once, then again while the peer serving
    [10, 20) for the session is killed (kill -9) after `--kill-after` new tokens. Reported:
    the median decode step, the step that recovered (failure noticed, the other replica
    found, the session's steps replayed there, the token computed) and its extra latency;
    and whether the tokens equal the undisturbed run's.
(b) Training load: decode step latency with no other client, then while another client
    process runs training steps (prompt tuning: Forward + Backward through every peer) in a
    loop on the same peers (the 3 left after (a)). Reported: both medians, their ratio
    (target <= 2), the p90 under training against its median (target <= 1.5: a peer runs a
    training call block by block and lets waiting decode steps run between two blocks, so a
    step waits for one block of training, not a whole call), and how long the training
    client's Forward/Backward calls took.

A decode step is the time between two tokens of transformers' generate (client embedding,
the chain of peers, LM head).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import torch
from transformers import StoppingCriteria

from client import AutoDistributedModelForCausalLM, SwarmSettings
from client.apps.local_swarm import LocalSwarm
from swarm.checkpoint import DEFAULT_MODEL, resolve_checkpoint

PROMPT = "Write a short story about a fox who learns to fly."
SPANS = ["0:10", "10:20", "10:20", "20:30"]


class StepClock(StoppingCriteria):
    """Notes the time at each generated token; runs `action` once after `after` new tokens."""

    def __init__(self, prompt_length: int, after: int | None = None, action=None):
        self.prompt_length, self.after, self.action = prompt_length, after, action
        self.times: list[float] = []
        self.acted_at: int | None = None  # index in `steps` of the step that ran after the action

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        if self.action is not None and self.acted_at is None and input_ids.shape[1] - self.prompt_length >= self.after:
            self.action()
            self.times[-1] = time.perf_counter()  # the action's own time is not the next step's
            self.acted_at = len(self.times) - 1
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    @property
    def steps(self) -> list[float]:
        """Decode step latencies in s (the prefill, before the first token, is not one)."""
        return [b - a for a, b in zip(self.times, self.times[1:])]


def generate(model, inputs, new_tokens: int, clock: StepClock) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          stopping_criteria=[clock])


def recovery(swarm: LocalSwarm, model, inputs, new_tokens: int, kill_after: int) -> dict:
    prompt_length = inputs["input_ids"].shape[1]
    calm = StepClock(prompt_length)
    undisturbed = generate(model, inputs, new_tokens, calm)
    killed: list[str] = []

    with model.inference_session(max_length=prompt_length + new_tokens) as session:
        def kill_the_replica_in_use() -> None:
            endpoint = next(e for e in session.endpoints if swarm.spans[swarm.endpoints.index(e)] == "10:20")
            os.killpg(swarm.peer_procs[swarm.endpoints.index(endpoint)].pid, signal.SIGKILL)
            killed.append(endpoint)

        clock = StepClock(prompt_length, after=kill_after, action=kill_the_replica_in_use)
        disturbed = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                   stopping_criteria=[clock], session=session)
        replaced = killed and killed[0] not in session.endpoints
    steps = clock.steps
    recovered = steps[clock.acted_at]
    others = [s for i, s in enumerate(steps) if i != clock.acted_at]
    return {
        "killed_after_tokens": kill_after, "replaced": bool(replaced),
        "step_ms_median": round(1e3 * statistics.median(others), 1),
        "recovered_step_ms": round(1e3 * recovered, 1),
        "extra_latency_ms": round(1e3 * (recovered - statistics.median(others)), 1),
        "undisturbed_step_ms_median": round(1e3 * statistics.median(calm.steps), 1),
        "tokens_equal_undisturbed": bool(torch.equal(undisturbed, disturbed)),
    }


def decode_steps(model, inputs, new_tokens: int, runs: int) -> list[float]:
    steps = []
    for _ in range(runs):
        clock = StepClock(inputs["input_ids"].shape[1])
        generate(model, inputs, new_tokens, clock)
        steps += clock.steps
    return steps


def under_training_load(swarm: LocalSwarm, model, inputs, new_tokens: int, runs: int, args) -> dict:
    idle = decode_steps(model, inputs, new_tokens, runs)
    worker = subprocess.Popen(
        [sys.executable, __file__, "--train-worker", swarm.initial_peers[0], "--train-batch", str(args.train_batch),
         "--train-seq", str(args.train_seq)], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(2):  # warmed up and training
            if not worker.stdout.readline():
                raise RuntimeError("the training client exited before training")
        loaded = decode_steps(model, inputs, new_tokens, runs)
    finally:
        worker.send_signal(signal.SIGTERM)
        report = worker.communicate(timeout=60)[0].strip().splitlines()
    train_steps = [json.loads(line) for line in report if line.startswith("{")]

    def p90(values: list[float]) -> float:
        return statistics.quantiles(values, n=10)[-1]

    def ms(seconds: float) -> float:
        return round(1e3 * seconds, 1)
    return {
        "train_batch": args.train_batch, "train_seq": args.train_seq,
        "step_ms_idle": ms(statistics.median(idle)), "step_ms_training": ms(statistics.median(loaded)),
        "ratio": round(statistics.median(loaded) / statistics.median(idle), 2),
        # A step that lands while a peer runs a training call waits for the block running then
        # (the call lets it in between two blocks): the tail shows that wait.
        "step_ms_idle_p90": ms(p90(idle)), "step_ms_training_p90": ms(p90(loaded)),
        "p90_over_median_training": round(p90(loaded) / statistics.median(loaded), 2),
        "ratio_p90": round(p90(loaded) / p90(idle), 2),
        "ratio_mean": round(statistics.mean(loaded) / statistics.mean(idle), 2),
        "train_steps_during": len(train_steps),
        "train_forward_ms_median": statistics.median(s["forward_ms"] for s in train_steps) if train_steps else None,
        "train_backward_ms_median": statistics.median(s["backward_ms"] for s in train_steps) if train_steps else None,
    }


def train_worker(args) -> None:
    """Another client: prompt-tuning steps in a loop until SIGTERM; one JSON line per step."""
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    torch.set_num_threads(1)
    model = AutoDistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, initial_peers=[args.train_worker],
                                                            tuning_mode="ptune", pre_seq_len=8)
    ids = torch.randint(0, model.config.vocab_size, (args.train_batch, args.train_seq),
                        generator=torch.Generator().manual_seed(0))
    while not stop:
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        forwarded = time.perf_counter()
        loss.backward()
        print(json.dumps({"forward_ms": round(1e3 * (forwarded - started), 1),
                          "backward_ms": round(1e3 * (time.perf_counter() - forwarded), 1)}), flush=True)
    model.swarm.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--kill-after", type=int, default=12)
    parser.add_argument("--runs", type=int, default=2, help="generations per measurement in (b)")
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--train-seq", type=int, default=64)
    parser.add_argument("--train-worker", metavar="INITIAL_PEER", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_worker:
        return train_worker(args)

    resolve_checkpoint(DEFAULT_MODEL)
    torch.set_num_threads(1)  # the client only embeds and applies the LM head; the peers need the cores
    with LocalSwarm(SPANS) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, initial_peers=swarm.initial_peers,
                                                                settings=SwarmSettings(request_timeout=10.0))
        inputs = model.tokenizer(PROMPT, return_tensors="pt")
        generate(model, inputs, 4, StepClock(inputs["input_ids"].shape[1]))  # warm-up
        result = {"benchmark": "resilience", "model": DEFAULT_MODEL, "spans": SPANS,
                  "new_tokens": args.new_tokens, "push": model.swarm.settings.push}
        result["recovery"] = recovery(swarm, model, inputs, args.new_tokens, args.kill_after)
        result["training_load"] = under_training_load(swarm, model, inputs, args.new_tokens, args.runs, args)
        model.swarm.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
