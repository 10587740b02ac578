"""Renders benchmark results (the JSON lines the scripts print, as collected by run_all.py)
as benchmarks/RESULTS.md: the machine, date and commit, a headline table, Petals 2.2 side by
side when its figures exist, then one section per benchmark.

Each benchmark's JSON is laid out without knowing the script: plain values go to a
"figure | value" table (nested keys joined with dots); a list of objects, or an object whose
values are all objects (one per mode, codec, peer...), becomes a table of its own. The
concurrency benchmark also gets both systems per client count in one table, and a chart
(`plot_concurrency`, written next to RESULTS.md by run_all.py).
"""

from __future__ import annotations

import json
from typing import Any

# (benchmark id, path in its JSON, label): the figures a reader looks for first.
HEADLINE = [
    ("generate_b1", "ratio", "decode tok/s, swarm (3 peers, loopback) / local, batch 1"),
    ("generate_b8", "ratio", "decode tok/s, swarm / local, batch 8"),
    ("pipeline_floor", "ratio", "floor for batch 1: the same 3-process split over bare pipes / local"),
    ("decode_trace", "step_ms", "decode step ms, traced (client + 3 peers + wire)"),
    ("decode_trace", "transit_ms", "of which on the wire and gRPC hops between processes, ms"),
    ("prefill", "prefill_ratio", "prefill of 512 tokens, local time / swarm time"),
    ("finetune", "train_step.none.ratio", "training step (batch 4 x 64), local time / swarm time, no tuning mode"),
    ("finetune", "train_step.ptune.ratio", "training step, local time / swarm time, ptune"),
    ("finetune", "train_step.lora.ratio", "training step, local time / swarm time, LoRA"),
    ("wan", "modes.push_off.of_limit", "decode at 20 ms RTT, share of the latency limit, push off"),
    ("wan", "modes.push_on.of_limit", "decode at 20 ms RTT, share of the latency limit, push on"),
    ("peer_rss", "max_net_rss_over_held", "peer RSS net of imports / (weights + cache), worst peer (target 1.3)"),
    ("slice70b", "codecs.bfloat16.ms_per_token_per_hop", "70B-width slice: ms per token per hop (bf16 wire)"),
    ("concurrent", "acceptance.aggregate_8_over_one_session_8",
     "8 concurrent clients' aggregate tok/s / one session of 8 sequences (target 0.8)"),
    ("concurrent", "acceptance.aggregate_8_over_best_petals",
     "8 concurrent clients' aggregate tok/s / Petals 2.2's best aggregate at any count (target 2.5)"),
    ("concurrent", "acceptance.all_finished_at_16", "all 16 concurrent clients finished"),
]
CONCURRENCY_PNG = "concurrent_users.png"


def lookup(obj: Any, path: str) -> Any:
    for key in path.split("."):
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        text = f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    elif isinstance(value, (list, dict)):
        text = json.dumps(value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _flatten(obj: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in obj.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _rows_table(rows: list[dict]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    return table(columns, [[row.get(c) for c in columns] for row in rows])


def _walk(obj: dict, prefix: str, scalars: list, tables: list) -> None:
    for key, value in obj.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            tables.append((path, [{"": name, **_flatten(inner)} for name, inner in value.items()]))
        elif isinstance(value, dict) and value:
            _walk(value, f"{path}.", scalars, tables)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            tables.append((path, [_flatten(v) for v in value]))
        else:
            scalars.append((path, value))


def render_result(result: dict) -> str:
    scalars, tables = [], []
    _walk({k: v for k, v in result.items() if k != "benchmark"}, "", scalars, tables)
    parts = [table(["figure", "value"], scalars)] if scalars else []
    parts += [f"`{title}`:\n\n{_rows_table(rows)}" for title, rows in tables]
    return "\n\n".join(parts)


def _petals_rows(ours: dict[str, dict], petals: dict) -> list[list[Any]]:
    loop, wan = petals.get("loopback") or {}, petals.get("wan_20ms") or {}
    gen, tune, ours_wan = ours.get("generate_b1") or {}, ours.get("finetune") or {}, ours.get("wan") or {}
    wan_ours = lookup(ours_wan, "modes.push_off.wan_tok_s")
    wan_push = lookup(ours_wan, "modes.push_on.wan_tok_s")
    return [
        ["decode tok/s, 3 peers, loopback, batch 1", gen.get("swarm_tok_s"), loop.get("swarm_tok_s")],
        ["local transformers tok/s, same run", gen.get("local_tok_s"), loop.get("local_tok_s")],
        ["swarm / local", gen.get("ratio"), loop.get("ratio")],
        ["greedy tokens vs local (ours: all identical; Petals: agreement)", gen.get("greedy_identical"),
         loop.get("greedy_agreement")],
        ["decode tok/s at 20 ms RTT (push off)", wan_ours, wan.get("swarm_tok_s")],
        ["decode tok/s at 20 ms RTT (push on)", wan_push, None],
        ["ptune training step s (batch 4 x 64), loopback", lookup(tune, "train_step.ptune.swarm_s"),
         lookup(loop, "train_step_s.ptune")],
        ["deep_ptune training step s, loopback", lookup(tune, "train_step.deep_ptune.swarm_s"),
         lookup(loop, "train_step_s.deep_ptune")],
        ["local ptune step s, same run", lookup(tune, "train_step.ptune.local_s"),
         lookup(loop, "train_step_s.local_ptune")],
        ["ptune training step s at 20 ms RTT", lookup(ours_wan, "train_step_s.ptune"),
         lookup(wan, "train_step_s.ptune")],
        ["swarmlm decode speed over Petals', loopback (target 2.25)",
         _quotient(gen.get("swarm_tok_s"), loop.get("swarm_tok_s")), None],
        ["swarmlm decode speed over Petals', 20 ms RTT, push on (target 2)", _quotient(wan_push, wan.get("swarm_tok_s")),
         None],
        ["swarmlm ptune step speed over Petals', loopback (target 2)",
         _quotient(lookup(loop, "train_step_s.ptune"), lookup(tune, "train_step.ptune.swarm_s")), None],
    ]


def _finished(row: dict | None) -> str | None:
    return f"{row['finished']} of {row['clients']}" if row and "finished" in row else None


def concurrency_table(result: dict) -> str:
    """Both systems per client count: aggregate tok/s, median client tok/s, clients finished."""
    ours = {row["clients"]: row for row in result.get("runs", [])}
    theirs = {row["clients"]: row for row in (result.get("petals") or {}).get("runs", [])}
    rows = [[n, lookup(ours.get(n), "aggregate_tok_s"), lookup(ours.get(n), "per_client_tok_s.median"),
             _finished(ours.get(n)), lookup(theirs.get(n), "aggregate_tok_s"),
             lookup(theirs.get(n), "per_client_tok_s.median"), _finished(theirs.get(n))]
            for n in sorted({*ours, *theirs})]
    rows.append(["one session of 8 sequences", result.get("one_session_of_8_tok_s"), None, None, None, None, None])
    return table(["clients", "swarmlm aggregate tok/s", "swarmlm median client tok/s", "swarmlm finished",
                  "Petals aggregate tok/s", "Petals median client tok/s", "Petals finished"], rows)


def plot_concurrency(result: dict, path) -> bool:
    """Aggregate tok/s against client count, both systems, and the one-8-sequence-session line.
    False (and nothing written) where matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display; must precede pyplot's import
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    series = {"swarmlm": result.get("runs") or [], "Petals 2.2": (result.get("petals") or {}).get("runs") or []}
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for (label, rows), color in zip(series.items(), ("C0", "C1")):
        done = [(row["clients"], row["aggregate_tok_s"]) for row in rows if row.get("aggregate_tok_s")]
        if done:
            ax.plot(*zip(*done), marker="o", color=color, label=label)
        for row in rows:  # a count where some clients never finished has no aggregate: say so where it would be
            if row.get("finished", 0) < row["clients"]:
                ax.annotate(f"{label}: {row.get('finished', 0)} of {row['clients']} finished", (row["clients"], 0),
                            color=color, fontsize=8, va="bottom", ha="right", xytext=(-2, 4),
                            textcoords="offset points")
                ax.plot([row["clients"]], [0], marker="x", color=color, clip_on=False)
    if result.get("one_session_of_8_tok_s"):
        ax.axhline(result["one_session_of_8_tok_s"], linestyle="--", color="gray", label="one session of 8 sequences")
    ax.set_xscale("log", base=2)
    counts = sorted({row["clients"] for rows in series.values() for row in rows})
    ax.set_xticks(counts, [str(n) for n in counts])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("concurrent client processes")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_title(f"{result.get('tokens_per_client', '?')} greedy tokens per client, 3 peers, one machine")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _quotient(a: Any, b: Any) -> float | None:
    return round(a / b, 2) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def render(results: dict, petals: dict | None = None, images: dict[str, str] | None = None) -> str:
    """`results`: what run_all.py stores (machine, date, commit, note, runs by id); `images`:
    a chart file (next to RESULTS.md) to show in a benchmark's section, by benchmark id."""
    machine = results.get("machine", {})
    runs: dict[str, dict] = results.get("runs", {})
    ok = {name: run["result"] for name, run in runs.items() if run.get("ok")}
    out = [
        "# Benchmark results",
        "",
        "Written by `benchmarks/run_all.py` (`make bench`; Petals side by side: `make bench-petals`). "
        "Each benchmark is its own script printing one JSON line; the raw lines are in `benchmarks/results.json`.",
        "",
        table(["", ""], [
            ["date (UTC)", results.get("date")], ["commit", results.get("commit")],
            ["CPU", f"{machine.get('cpu')} ({machine.get('cores')} cores)"], ["RAM", machine.get("ram")],
            ["GPU", machine.get("gpu")], ["Python / torch", machine.get("software")],
            ["load average at start / end", results.get("load")],
        ]),
    ]
    if results.get("note"):
        out += ["", f"**Note:** {results['note']}"]
    headline = [[label, lookup(ok.get(bench), path)] for bench, path, label in HEADLINE
                if lookup(ok.get(bench), path) is not None]
    if headline:
        out += ["", "## Headline", "", table(["figure", "value"], headline)]
    if petals:
        out += ["", "## Side by side with Petals 2.2", "",
                f"Petals 2.2.0.post1 (transformers 4.34) on the same machine and model (fp32, 3 servers x 10 blocks), "
                f"run {petals.get('date', '?')} by `/work/shared/anchors/petals/run.sh` (20 ms RTT: `DELAY_MS=10`), "
                "its client on one thread like ours (`CLIENT_THREADS=1`). "
                "Decode tok/s: 64 tokens over total time for both systems at loopback; at 20 ms RTT ours is "
                "`wan.py`'s decode steps (prefill excluded). Training: median step after warm-up.", "",
                table(["figure", "swarmlm", "Petals 2.2"], _petals_rows(ok, petals))]
        errors = [f"- Petals {k}: {v['error']}" for k, v in petals.items() if isinstance(v, dict) and "error" in v]
        out += ["", *errors] if errors else []
    for name, run in runs.items():
        load = f", load average {cell(run['load_at_start'])} at start" if "load_at_start" in run else ""
        out += ["", f"## {run.get('title', name)}", "",
                f"`{run.get('command')}` ({cell(run.get('seconds'))} s{load})", ""]
        if run.get("ok"):
            if name == "concurrent":
                out += [concurrency_table(run["result"]), ""]
            if name in (images or {}):
                out += [f"![{run.get('title', name)}]({images[name]})", ""]
            out.append(render_result(run["result"]))
        else:
            out.append(f"**Failed:** {cell(run.get('error'))}")
            if run.get("stderr_tail"):
                out += ["", "```", run["stderr_tail"].rstrip(), "```"]
    return "\n".join(out) + "\n"
