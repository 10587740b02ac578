"""What a fine-tuning run leaves in its output folder, written so that it can always resume.

- ``state.pt``: the step reached, the trainable parameters, the optimizer's moments, the RNG
  state, the data position and the loss history: everything the next step depends on.
- ``loss.csv`` / ``loss.png``: the loss history, as rows and as a curve.
- ``adapter/``: the trained parameters in the form ``from_pretrained(..., adapter=...)`` loads.

Every file is written to a temporary name and renamed into place (a rename is atomic on one
filesystem), so a run killed at any instant leaves the previous save whole.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
LOSS_CSV = "loss.csv"
LOSS_PNG = "loss.png"
ADAPTER_DIR = "adapter"
STATE_VERSION = 1


@dataclass
class TrainingState:
    """One save point. ``setup`` holds the settings that fix the parameters' shapes (model,
    mode, prompt length, LoRA shape): a run may only resume with the same ones."""

    setup: dict
    step: int = 0
    trainable: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict = field(default_factory=dict)
    rng: torch.Tensor | None = None
    data_position: int = 0
    data_digest: str = ""
    losses: list[float] = field(default_factory=list)


def write_atomically(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Calls ``write(file)`` on a temporary file next to ``path``, syncs it, renames it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_dir(path.parent)


def _sync_dir(folder: Path) -> None:
    # The rename itself is durable only once the directory entry is on disk.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_state(out: Path, state: TrainingState) -> None:
    payload = {"version": STATE_VERSION, **asdict(state)}
    write_atomically(out / STATE_FILE, lambda f: torch.save(payload, f))


def load_state(out: Path) -> TrainingState | None:
    """The last save in ``out``, or None for a fresh run."""
    path = out / STATE_FILE
    if not path.exists():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=True)
    version = payload.pop("version", None)
    if version != STATE_VERSION:
        raise ValueError(f"{path} has state version {version}, this swarmlm writes {STATE_VERSION}; "
                         "use a fresh --out")
    return TrainingState(**payload)


def setup_mismatch(saved: dict, current: dict) -> str | None:
    """A phrase naming the settings that differ between a saved run and this one, or None.
    Another mode makes the mode's own settings moot, so only the mode is named then."""
    keys = ["mode"] if saved.get("mode") != current.get("mode") else sorted(saved.keys() | current.keys())
    diffs = [f"{key} {saved.get(key)!r} there, {current.get(key)!r} now"
             for key in keys if saved.get(key) != current.get(key)]
    return ", ".join(diffs) or None


def write_loss_csv(out: Path, losses: list[float]) -> None:
    def write(f):
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["step", "loss"])
        writer.writerows((step, f"{loss:.6f}") for step, loss in enumerate(losses, start=1))
        f.write(text.getvalue().encode())

    write_atomically(out / LOSS_CSV, write)


def write_loss_plot(out: Path, losses: list[float], title: str) -> bool:
    """Writes loss.png; False (with a warning, once) where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed; must precede pyplot's import
        import matplotlib.pyplot as plt
    except ImportError:
        if not getattr(write_loss_plot, "warned", False):
            logger.warning("matplotlib is not installed: no %s (loss.csv has the numbers)", LOSS_PNG)
            write_loss_plot.warned = True
        return False
    steps = list(range(1, len(losses) + 1))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, color="tab:blue", alpha=0.35 if len(losses) >= 20 else 1.0, label="loss")
    if len(losses) >= 20:  # a moving average makes the trend readable through batch noise
        window = max(5, len(losses) // 20)
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1))
                  for i in range(len(losses))]
        ax.plot(steps, smooth, color="tab:blue", label=f"mean of {window} steps")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        write_atomically(out / LOSS_PNG, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)
    return True


def replace_dir(target: Path, fill: Callable[[Path], None]) -> None:
    """Calls ``fill(tmp_dir)`` on a fresh folder next to ``target``, then swaps it in for ``target``.

    Two renames (old aside, new in), so at every instant ``target`` is either the old folder
    whole, absent for a moment, or the new folder whole; never half-written."""
    tmp = target.with_name(f".{target.name}.tmp")
    old = target.with_name(f".{target.name}.old")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    _sync_dir(target.parent)
