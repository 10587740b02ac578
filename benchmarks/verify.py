"""Verification (client/verify.py) against lying peers, on loopback. Prints one JSON line.

    python benchmarks/verify.py [--trials 5] [--tokens 50] [--false-alarm-steps 1000]

The swarm: blocks [0, 15) on two float32 peers; [15, 30) on a float32 and a bfloat16 peer, so
every check of [15, 30) compares a float32 answer with a bfloat16 one (or the reverse).

(a) False alarms: honest peers only, verify=1 (every step checked), greedy generations until
    `--false-alarm-steps` steps were checked. Reported: checks, disagreements, peers convicted
    (target 0 and 0), and the largest distance seen against each tolerance.
(b) Detection: a liar (peer/lying.py: noise of half each token's RMS; it announces ten times its
    speed, so routing picks it) joins [15, 30), lying on every call, on 10% of calls, or on every
    call after its first 20. For each, `--trials` clients (verify=0.2, seeds 0..) generate
    `--tokens` greedy tokens each. Reported: trials in which the liar was caught, the step it was
    caught at, and the generated tokens that differ from local transformers' (lies on steps
    that were not checked reach the tokens until the next check).
(c) Overhead: honest peers, the time per generated token (median decode step, `--tokens` tokens
    after a warm-up) and per LoRA training step (forward + backward, batch 2 x 32 tokens; the
    first steps are checked anyway, probation) at verify 0, 0.05 and 0.2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.procs

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria  # noqa: E402

from client import AutoDistributedModelForCausalLM, SwarmSettings  # noqa: E402
from client.verify import DTYPE_TOLERANCE, distance  # noqa: E402
from swarm.checkpoint import DEFAULT_MODEL, resolve_checkpoint  # noqa: E402
from tests.integration.conftest import SwarmProcs  # noqa: E402
from tests.procs import stop  # noqa: E402

PROMPT = "Write a short story about a fox who learns to fly."
LIARS = {"every call": "always", "10% of calls": "0.1", "after 20 calls": "after:20"}


class Clock(StoppingCriteria):
    """Times each generated token; notes the token count when the verifier first convicts."""

    def __init__(self, model, prompt_length: int):
        self.model, self.prompt_length = model, prompt_length
        self.times: list[float] = []
        self.caught_at: int | None = None

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        verifier = self.model.swarm.verifier
        if self.caught_at is None and verifier is not None and verifier.convicted:
            self.caught_at = input_ids.shape[1] - self.prompt_length
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    def median_ms(self) -> float:
        return 1e3 * statistics.median(b - a for a, b in zip(self.times, self.times[1:]))


def client(maddr: str, verify: float, seed: int = 0, **kwargs):
    model = AutoDistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, initial_peers=[maddr],
                                                            settings=SwarmSettings(verify=verify), **kwargs)
    if model.swarm.verifier is not None:
        model.swarm.verifier.rng.seed(seed)
    return model


def generate(model, tokens: int) -> tuple[torch.Tensor, Clock]:
    inputs = model.tokenizer(PROMPT, return_tensors="pt")
    clock = Clock(model, inputs["input_ids"].shape[1])
    out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                         stopping_criteria=[clock])
    return out[0, inputs["input_ids"].shape[1]:], clock


def false_alarms(maddr: str, steps: int, tokens: int) -> dict:
    model = client(maddr, verify=1.0)
    try:
        while model.swarm.verifier.checks < steps:
            generate(model, tokens)
        verifier = model.swarm.verifier
        return {"checked_steps": verifier.checks, "disagreements": verifier.mismatches,
                "convicted": len(verifier.convicted), "largest_distance": round(verifier.largest_agreed, 5),
                "tolerance_float32": DTYPE_TOLERANCE["float32"], "tolerance_bfloat16": DTYPE_TOLERANCE["bfloat16"]}
    finally:
        model.swarm.shutdown()


def detection(procs: SwarmProcs, maddr: str, trials: int, tokens: int, expected: torch.Tensor) -> dict:
    results = {}
    for name, spec in LIARS.items():
        liar = procs.start_peer("--blocks", "15:30", "--decode-threads", "1", "--lie", spec,
                                initial_peers=[maddr]).wait_ready()
        caught, steps, wrong = 0, [], []
        for seed in range(trials):
            model = client(maddr, verify=0.2, seed=seed)
            try:
                out, clock = generate(model, tokens)
                caught += bool(model.swarm.verifier.convicted)
                if clock.caught_at is not None:
                    steps.append(clock.caught_at)
                wrong.append(int((out != expected[:len(out)]).sum()))
            finally:
                model.swarm.shutdown()
        results[name] = {"caught": f"{caught}/{trials}", "caught_at_step": steps, "tokens_changed": wrong}
        stop(liar.proc)
    return results


def overhead(maddr: str, tokens: int, train_steps: int) -> dict:
    results = {}
    for verify in (0.0, 0.05, 0.2):
        model = client(maddr, verify=verify)
        try:
            generate(model, 4)  # warm-up: connections, probation checks of the chain
            _, clock = generate(model, tokens)
            decode_ms = clock.median_ms()
        finally:
            model.swarm.shutdown()
        torch.manual_seed(0)
        model = client(maddr, verify=verify, tuning_mode="lora")
        try:
            batch = model.tokenizer([PROMPT * 3] * 2, return_tensors="pt", max_length=32, truncation=True)
            times = []
            for _ in range(train_steps):
                started = time.perf_counter()
                model(**batch, labels=batch["input_ids"]).loss.backward()
                times.append(1e3 * (time.perf_counter() - started))
            checks = model.swarm.verifier.checks if model.swarm.verifier else 0
        finally:
            model.swarm.shutdown()
        results[str(verify)] = {"decode_step_ms": round(decode_ms, 1),
                                "train_step_ms": round(statistics.median(times), 1),
                                "train_first_step_ms": round(times[0], 1), "train_checks": checks}
    base = results["0.0"]
    for verify in ("0.05", "0.2"):
        results[verify]["decode_overhead"] = round(results[verify]["decode_step_ms"] / base["decode_step_ms"] - 1, 3)
        results[verify]["train_overhead"] = round(results[verify]["train_step_ms"] / base["train_step_ms"] - 1, 3)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--false-alarm-steps", type=int, default=1000)
    parser.add_argument("--train-steps", type=int, default=6)
    args = parser.parse_args()

    folder = resolve_checkpoint(DEFAULT_MODEL).folder
    local = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    expected = local.generate(**inputs, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                              do_sample=False)[0, inputs["input_ids"].shape[1]:]
    with tempfile.TemporaryDirectory() as logs:
        procs = SwarmProcs(Path(logs), initial_peers=[])
        try:
            maddr = procs.dht()
            peers = [procs.start_peer("--blocks", span, "--decode-threads", "1", *extra, initial_peers=[maddr])
                     for span, extra in [("0:15", []), ("0:15", []), ("15:30", []), ("15:30", ["--dtype", "bfloat16"])]]
            for peer in peers:
                peer.wait_ready()
            result = {"benchmark": "verify", "peers": "[0,15) fp32 x2, [15,30) fp32 + bf16",
                      "overhead": overhead(maddr, args.tokens, args.train_steps),
                      "false_alarms": false_alarms(maddr, args.false_alarm_steps, args.tokens),
                      "detection_at_verify_0.2": detection(procs, maddr, args.trials, args.tokens, expected)}
        finally:
            procs.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
