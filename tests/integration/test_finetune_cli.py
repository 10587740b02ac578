"""`swarm finetune` as a real process against a real local swarm: trains, saves, resumes, stops on Ctrl-C.

One test walks a run's whole life, so the ~10 s each CLI start costs (imports, model, DHT) is paid
as few times as possible."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import torch

from client.apps.cli_finetune import main
from tests.procs import LocalSwarm, output, run, running, wait_for_line

pytestmark = pytest.mark.integration

EXAMPLES = [
    {"prompt": "What is 2 plus 2? ", "completion": "4"},
    {"prompt": "What is 3 plus 1? ", "completion": "4"},
    {"prompt": "Capital of France? ", "completion": "Paris"},
    {"text": "A swarm of peers serves the blocks."},
    {"text": "The client trains its own prompts."},
]


@pytest.fixture(scope="module")
def swarm() -> Iterator[LocalSwarm]:
    with LocalSwarm(["0:15", "15:30"]) as local:
        yield local


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    return path


def finetune_args(swarm: LocalSwarm, data: Path, out: Path, steps: int) -> list[str]:
    return ["-m", "swarm.cli", "finetune", "--initial-peers", ",".join(swarm.initial_peers), "--data", str(data),
            "--out", str(out), "--mode", "ptune", "--pre-seq-len", "4", "--steps", str(steps),
            "--save-every", "2", "--batch-size", "2", "--max-length", "16"]


def finetune(swarm: LocalSwarm, data: Path, out: Path, steps: int) -> subprocess.CompletedProcess:
    """`swarm finetune` run to its end (forked from the test zygote: tests/zygote.py)."""
    result = run(["python", *finetune_args(swarm, data, out, steps)], timeout=120, log_dir=out.parent)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-4000:]}"
    return result


def loss_rows(out: Path) -> list[dict]:
    with open(out / "loss.csv") as f:
        return list(csv.DictReader(f))


def test_trains_saves_resumes_and_stops_on_ctrl_c(swarm, data, tmp_path, capsys):
    out = tmp_path / "run"
    first = finetune(swarm, data, out, steps=4)
    assert "resuming" not in first.stdout
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")
    rows = loss_rows(out)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(float(r["loss"]) > 0 for r in rows)
    assert (out / "adapter" / "swarmlm_tuning.safetensors").exists()
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == 4 and state["data_position"] == 8 and len(state["losses"]) == 4
    assert state["trainable"]["tuning.prompts"].shape == (4, 576)
    assert not list(out.glob(".*")), "temporary files left behind"

    second = finetune(swarm, data, out, steps=6)
    assert "resuming from step 4" in second.stdout
    rows_after = loss_rows(out)
    assert [int(r["step"]) for r in rows_after] == [1, 2, 3, 4, 5, 6]
    assert rows_after[:4] == rows  # the history is kept, not retrained
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 6

    # A finished run says so and stops before joining the swarm (so in-process is enough).
    assert main(finetune_args(swarm, data, out, steps=6)[3:]) == 0
    assert "already finished: step 6" in capsys.readouterr().out

    # Ctrl-C mid-run: the step in flight completes, is saved, and the exit code says interrupted.
    with running(["python", *finetune_args(swarm, data, out, steps=1000)], log_dir=tmp_path) as proc:
        wait_for_line(proc, r"\b([7-9]|\d\d+)/1000 \[", timeout=60)  # tqdm: a resumed step done
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: the DHT helper processes get it too
        assert proc.wait(timeout=30) == 130, output(proc)
    wait_for_line(proc, r"resuming from step 6", timeout=1)
    saved = int(wait_for_line(proc, r"interrupted: saved at step (\d+)", timeout=1).group(1))
    assert saved >= 7
    assert torch.load(out / "state.pt", weights_only=True)["step"] == saved
    assert len(loss_rows(out)) == saved


def test_bad_data_is_refused_before_joining_the_swarm(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n{"prompt": "no completion"}\n')
    unused = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
    args = ["--initial-peers", unused, "--data", str(bad), "--out", str(tmp_path / "run")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "2 bad lines: line 2: not JSON" in err and "line 3: needs 'text' or 'prompt'+'completion'" in err
    assert not (tmp_path / "run").exists()
