"""RESULTS.md rendering (benchmarks/report.py): every figure a benchmark printed reaches the
file in a table, a failed benchmark is shown as failed, and Petals' figures sit beside ours."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("bench_report", Path(__file__).parents[2] / "benchmarks" / "report.py")
report = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = report
_spec.loader.exec_module(report)

RESULTS = {
    "date": "2026-11-24 04:00", "commit": "abc1234", "load": "3.1 / 2.9 (2 cores)", "note": "under load",
    "machine": {"cpu": "AMD EPYC", "cores": 2, "ram": "23.4 GiB", "gpu": "none", "software": "Python 3.12"},
    "runs": {
        "generate_b1": {"title": "Decode, batch 1", "command": "python benchmarks/generate.py --batch 1",
                        "seconds": 50.2, "load_at_start": 3.5, "ok": True,
                        "result": {"benchmark": "generate", "swarm_tok_s": 9.5, "local_tok_s": 25.0, "ratio": 0.38,
                                   "greedy_identical": True, "by_threads": {"1": 20.0, "2": 25.0}}},
        "finetune": {"title": "Training", "command": "python benchmarks/finetune.py", "seconds": 80, "ok": True,
                     "result": {"benchmark": "finetune", "train_step": {
                         "ptune": {"local_s": 1.25, "swarm_s": 2.5, "ratio": 0.5},
                         "lora": {"local_s": 1.5, "swarm_s": 3.0, "ratio": 0.5}}}},
        "wire_codecs": {"title": "Codecs", "command": "python benchmarks/wire_codecs.py", "seconds": 9, "ok": True,
                        "result": {"benchmark": "wire_codecs", "results": [
                            {"codec": "raw", "wire_bytes": 2327}, {"codec": "a|b", "wire_bytes": 646}],
                            "swarm": {"peers": 3, "codecs": {"raw": {"bytes_per_token_per_hop": 4794.7}}}}},
        "concurrent": {"title": "Many users", "command": "python benchmarks/concurrent_users.py --petals", "seconds": 600,
                       "ok": True, "result": {
                           "benchmark": "concurrent", "tokens_per_client": 32, "one_session_of_8_tok_s": 57.6,
                           "runs": [{"clients": 1, "finished": 1, "aggregate_tok_s": 12.2,
                                     "per_client_tok_s": {"min": 12.2, "median": 12.2, "max": 12.2}},
                                    {"clients": 8, "finished": 8, "aggregate_tok_s": 50.1,
                                     "per_client_tok_s": {"min": 6.1, "median": 6.3, "max": 6.5}}],
                           "petals": {"system": "petals-2.2.0.post1", "timeout_s": 300, "runs": [
                               {"clients": 1, "finished": 1, "aggregate_tok_s": 6.5,
                                "per_client_tok_s": {"min": 6.5, "median": 6.5, "max": 6.5}},
                               {"clients": 8, "finished": 6, "hung_after_s": 300}]},
                           "acceptance": {"aggregate_8_over_one_session_8": 0.87, "aggregate_8_over_best_petals": 7.71,
                                          "best_petals": {"clients": 1, "aggregate_tok_s": 6.5},
                                          "all_finished_at_16": None}}},
        "wan": {"title": "WAN", "command": "python benchmarks/wan.py", "seconds": 1.0, "ok": False,
                "error": "exit code 1", "stderr_tail": "Traceback ...\nRuntimeError: boom"},
    },
}
PETALS = {"date": "2026-11-24 05:00",
          "loopback": {"local_tok_s": 27.5, "swarm_tok_s": 10.49, "ratio": 0.381, "greedy_agreement": 1.0,
                       "train_step_s": {"local_ptune": 1.294, "ptune": 2.684, "deep_ptune": 2.672}},
          "wan_20ms": {"error": "run.sh exited 1: servers did not start"}}


def test_every_figure_lands_in_a_table_and_failures_show():
    md = report.render(RESULTS)
    for expected in ("| commit | abc1234 |", "AMD EPYC (2 cores)",
                     "| load average at start / end | 3.1 / 2.9 (2 cores) |",
                     "**Note:** under load",
                     "## Decode, batch 1", "(50.2 s, load average 3.5 at start)", "| swarm_tok_s | 9.5 |", "| greedy_identical | yes |",
                     "| by_threads.1 | 20 |",
                     "|  | local_s | swarm_s | ratio |", "| ptune | 1.25 | 2.5 | 0.5 |", "| lora | 1.5 | 3 | 0.5 |",
                     "| codec | wire_bytes |", "| a\\|b | 646 |", "| swarm.peers | 3 |",
                     "`swarm.codecs`", "| raw | 4795 |",
                     "## WAN", "**Failed:** exit code 1", "RuntimeError: boom",
                     "| decode tok/s, swarm (3 peers, loopback) / local, batch 1 | 0.38 |"):
        assert expected in md, expected
    assert "## Side by side with Petals" not in md  # no Petals section without the anchor's figures


def test_petals_side_by_side():
    md = report.render(RESULTS, PETALS)
    section = md.split("## Side by side with Petals 2.2")[1].split("\n## ")[0]
    assert "| decode tok/s, 3 peers, loopback, batch 1 | 9.5 | 10.49 |" in section
    assert "| ptune training step s (batch 4 x 64), loopback | 2.5 | 2.684 |" in section
    assert "| decode tok/s at 20 ms RTT (push off) | — | — |" in section  # our wan failed, Petals' too
    assert "Petals wan_20ms: run.sh exited 1: servers did not start" in section


def test_concurrency_both_systems_per_count_and_the_chart(tmp_path):
    md = report.render(RESULTS, images={"concurrent": "concurrent_users.png"})
    section = md.split("## Many users")[1].split("\n## ")[0]
    assert ("| clients | swarmlm aggregate tok/s | swarmlm median client tok/s | swarmlm finished | "
            "Petals aggregate tok/s | Petals median client tok/s | Petals finished |") in section
    assert "| 1 | 12.2 | 12.2 | 1 of 1 | 6.5 | 6.5 | 1 of 1 |" in section
    assert "| 8 | 50.1 | 6.3 | 8 of 8 | — | — | 6 of 8 |" in section  # a hung Petals count has no aggregate
    assert "| one session of 8 sequences | 57.6 |" in section
    assert "![Many users](concurrent_users.png)" in section
    assert "| petals.timeout_s | 300 |" in section  # and the raw figures below, as for every benchmark
    headline = md.split("## Headline")[1].split("\n## ")[0]
    assert "| 8 concurrent clients' aggregate tok/s / one session of 8 sequences (target 0.8) | 0.87 |" in headline
    assert "Petals 2.2's best aggregate at any count (target 2.5) | 7.71 |" in headline
    assert "all 16 concurrent clients finished" not in headline  # no 16-client count in this run
    assert "![" not in report.render(RESULTS)  # no chart written, none shown

    pytest.importorskip("matplotlib")
    path = tmp_path / "chart.png"
    assert report.plot_concurrency(RESULTS["runs"]["concurrent"]["result"], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
