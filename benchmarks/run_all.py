"""The benchmark suite: runs every benchmark script as its own process, one after another,
keeps the JSON line each prints in benchmarks/results.json and writes benchmarks/RESULTS.md.
A benchmark that fails or overruns its time limit is recorded as failed (with the end of its
stderr) and the others still run.

    python benchmarks/run_all.py                  # everything (make bench)
    python benchmarks/run_all.py --only wan,prefill --quick   # a subset, small sizes (a smoke run)
    python benchmarks/run_all.py --petals         # Petals 2.2 side by side (make bench-petals)
    python benchmarks/run_all.py --only concurrent --petals   # one benchmark with its Petals side
    python benchmarks/run_all.py --render         # rewrite RESULTS.md from the stored JSON

A run with --only replaces those benchmarks' entries and keeps the others. --petals runs the
Petals anchor (loopback and 20 ms RTT, petals_results.json), then the benchmarks that measure
Petals in the same run (their `petals` arguments); with --only, just those benchmarks. Timings depend on
what else the machine is doing: RESULTS.md records the load average before and after.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bounded import run_bounded
from report import CONCURRENCY_PNG, plot_concurrency, render

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS_JSON, RESULTS_MD, PETALS_JSON = HERE / "results.json", HERE / "RESULTS.md", HERE / "petals_results.json"


@dataclass
class Benchmark:
    id: str
    title: str
    script: str
    args: list[str] = field(default_factory=list)
    quick: list[str] = field(default_factory=list)  # smaller sizes, to check the suite runs end to end
    petals: list[str] = field(default_factory=list)  # added by --petals: Petals 2.2 measured in the same run
    timeout: float = 3600.0  # generous: on a shared 2-core box a benchmark can take 10x its quiet time


SUITE = [
    Benchmark("generate_b1", "Decode through 3 peers vs local, batch 1", "generate.py", ["--batch", "1"],
              ["--new-tokens", "8", "--runs", "1"]),
    Benchmark("generate_b8", "Decode through 3 peers vs local, batch 8", "generate.py", ["--batch", "8"],
              ["--new-tokens", "8", "--runs", "1"]),
    Benchmark("pipeline_floor", "Floor: the same 3-way split with bare pipes, nothing of swarmlm", "pipeline_floor.py",
              [], ["--new-tokens", "8", "--rounds", "1"]),
    Benchmark("decode_trace", "Where a decode step's time goes (3 peers, batch 1)", "decode_trace.py", [],
              ["--new-tokens", "8"]),
    Benchmark("prefill", "Prefill of a 512-token prompt", "prefill.py", [], ["--runs", "1", "--tokens", "128"]),
    Benchmark("finetune", "Training step per tuning mode", "finetune.py", [], ["--steps", "1"]),
    Benchmark("tuning_methods", "Tuning methods: parameters, bytes, step time, loss", "tuning_methods.py", [],
              ["--steps", "2"]),
    Benchmark("wire_codecs", "Wire codecs: bytes and agreement", "wire_codecs.py", [],
              ["--repeats", "20", "--prompts", "2", "--new-tokens", "8"]),
    Benchmark("quant", "Quantised peers", "quant.py", [], ["--new-tokens", "4"]),
    Benchmark("wan", "Simulated WAN (20 ms RTT)", "wan.py", [], ["--new-tokens", "8", "--runs", "1"]),
    Benchmark("resilience", "Resilience: peer failure mid-generation, decode under training load", "resilience.py",
              [], ["--new-tokens", "16", "--kill-after", "6", "--runs", "1"]),
    Benchmark("concurrent", "Many users at once: N client processes through 3 peers", "concurrent_users.py", [],
              ["--clients", "1,2", "--tokens", "8"], ["--petals"], timeout=5400.0),
    Benchmark("nat", "Behind NAT: direct (forwarded port) vs relayed (needs root; skips without)", "nat.py", [],
              ["--tokens", "8", "--model", "tiny"]),
    Benchmark("verify", "Verification: liars caught, false alarms, overhead", "verify.py", [],
              ["--trials", "1", "--tokens", "12", "--false-alarm-steps", "30", "--train-steps", "2"]),
    Benchmark("membership", "Private swarms: record and token checks, TLS cost", "membership.py"),
    Benchmark("load_rss", "Loading memory: span vs whole model", "load_rss.py"),
    Benchmark("peer_rss", "Peer resident memory", "peer_rss.py", [], ["--new-tokens", "8"]),
    Benchmark("slice70b", "70B-width slice (Llama-2-70B shapes, 2 peers x 2 blocks)", "slice70b.py", [],
              ["--new-tokens", "2", "--codecs", "bfloat16"]),
]


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())
    mem_kb = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines()
                   if line.startswith("MemTotal:")), 0)
    gpu = "none"
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True)
        gpu = "; ".join(query.stdout.split("\n")).strip("; ") or "none"
    torch_version = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                                   capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "ram": f"{mem_kb / 1024**2:.1f} GiB", "gpu": gpu,
            "software": f"Python {platform.python_version()} / torch {torch_version}"}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, cwd=ROOT)
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def run_one(bench: Benchmark, quick: bool, petals: bool = False) -> dict:
    args = bench.args + (bench.quick if quick else []) + (bench.petals if petals else [])
    command = " ".join(["python", f"benchmarks/{bench.script}", *args])
    record = {"title": bench.title, "command": command}
    if not (HERE / bench.script).exists():
        return {**record, "ok": False, "seconds": 0, "error": f"benchmarks/{bench.script} does not exist (yet)"}
    record["load_at_start"] = round(os.getloadavg()[0], 1)  # what else the machine was doing
    started = time.perf_counter()
    done = run_bounded([sys.executable, str(HERE / bench.script), *args], bench.timeout, cwd=str(ROOT))
    record["seconds"] = round(time.perf_counter() - started, 1)
    lines = [line for line in done.stdout.strip().splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        try:
            return {**record, "ok": True, "result": json.loads(lines[-1])}
        except json.JSONDecodeError as e:
            error = f"its last line is not JSON: {e}"
    elif done.returncode is None:
        error = f"stopped at the {bench.timeout:.0f} s limit"
    elif done.returncode != 0:
        error = f"exit code {done.returncode}"
    else:
        error = "it printed no JSON line"
    return {**record, "ok": False, "error": error, "stderr_tail": "\n".join(done.stderr.strip().splitlines()[-25:])}


def load_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def write_markdown(results: dict) -> None:
    images = {}
    concurrent = results.get("runs", {}).get("concurrent") or {}
    if concurrent.get("ok"):
        if plot_concurrency(concurrent["result"], HERE / CONCURRENCY_PNG):
            images["concurrent"] = CONCURRENCY_PNG
            print(f"wrote benchmarks/{CONCURRENCY_PNG}", file=sys.stderr)
        else:
            print(f"no benchmarks/{CONCURRENCY_PNG}: matplotlib is not installed (RESULTS.md's table has the "
                  "figures)", file=sys.stderr)
    RESULTS_MD.write_text(render(results, load_json(PETALS_JSON), images))
    print(f"wrote {RESULTS_MD.relative_to(ROOT)}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated ids: {', '.join(b.id for b in SUITE)}")
    parser.add_argument("--quick", action="store_true", help="small sizes: checks that everything runs")
    parser.add_argument("--note", help="a line shown at the top of RESULTS.md (e.g. 'measured under load')")
    parser.add_argument("--petals", action="store_true", help="run Petals 2.2 side by side, then re-render")
    parser.add_argument("--render", action="store_true", help="only rewrite RESULTS.md from stored JSON")
    args = parser.parse_args()

    results = load_json(RESULTS_JSON) or {"runs": {}}
    if args.petals and not args.only and not args.render:
        from petals_anchor import run_petals
        PETALS_JSON.write_text(json.dumps(run_petals(log=lambda m: print(m, file=sys.stderr)), indent=1) + "\n")
    if not args.render:
        chosen = SUITE
        if args.only:
            wanted = args.only.split(",")
            unknown = set(wanted) - {b.id for b in SUITE}
            if unknown:
                parser.error(f"unknown benchmark ids {sorted(unknown)}; known: {', '.join(b.id for b in SUITE)}")
            chosen = [b for b in SUITE if b.id in wanted]
        elif args.petals:
            chosen = [b for b in SUITE if b.petals]  # the other benchmarks keep their entries
        else:
            results["runs"] = {}
        load_before = os.getloadavg()[0]
        results.update(machine=machine(), commit=commit(), quick=args.quick,
                       date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"))
        for bench in chosen:
            print(f"running {bench.id}: benchmarks/{bench.script}", file=sys.stderr, flush=True)
            run = run_one(bench, args.quick, args.petals)
            print(f"  {'ok' if run['ok'] else 'FAILED: ' + run['error']} ({run['seconds']} s)", file=sys.stderr)
            results["runs"][bench.id] = run
            RESULTS_JSON.write_text(json.dumps(results, indent=1) + "\n")  # a crash later keeps what ran
        results["load"] = f"{load_before:.1f} / {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)"
        results["runs"] = {b.id: results["runs"][b.id] for b in SUITE if b.id in results["runs"]}
        results["note"] = "smoke run with --quick (small sizes): the figures only show the suite runs" \
            if args.quick else None
    if args.note is not None:
        results["note"] = args.note
    RESULTS_JSON.write_text(json.dumps(results, indent=1) + "\n")
    write_markdown(results)


if __name__ == "__main__":
    main()
