"""The swarm as the dashboard sees it, read from the DHT every few seconds on a thread of its
own: every model of the index (swarm.registry.fetch_models), its block records, and their
history. Pages read the latest snapshot; however many are open, the DHT sees one reader.

A model whose last peer left drops out of the index when its records expire; it is kept on
show, all gaps, for GONE_MODEL_SECONDS, so that a swarm that died says so.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from swarm.membership.trust import Trust
from swarm.registry import ModelRecord, fetch_models, fetch_span_records

from .coverage import model_view
from .history import HISTORY_SECONDS, ModelHistory

logger = logging.getLogger(__name__)

SAMPLE_PERIOD = 2.0  # s
GONE_MODEL_SECONDS = 600.0
# The index is untrusted: junk could name thousands of models or blocks, each one read every period.
MAX_MODELS = 16
MAX_BLOCKS = 1024


class SwarmWatch:
    """`SwarmWatch(dht).start()`; `snapshot()` from any thread; `stop()` at the end."""

    def __init__(self, dht, period: float = SAMPLE_PERIOD, history_seconds: float = HISTORY_SECONDS,
                 trust: Trust | None = None) -> None:
        self.dht, self.period, self.history_seconds = dht, period, history_seconds
        self.trust = trust  # a private swarm's member: only its members' records count
        self._models: dict[str, tuple[ModelRecord, float]] = {}  # model_id -> (record, when last in the index)
        self._histories: dict[str, ModelHistory] = {}
        self._snapshot: dict[str, Any] = {"time": None, "models": [], "error": None}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> SwarmWatch:
        self._thread = threading.Thread(target=self._run, daemon=True, name="dashboard-watch")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.period + 10)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self._snapshot

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.sample()
            except Exception as e:  # the DHT is best effort: show the last snapshot and say why
                logger.warning("reading the swarm from the DHT failed: %s", e)
                with self._lock:
                    self._snapshot = {**self._snapshot, "error": f"reading the DHT failed: {e}"}
            self._stop.wait(max(0.0, self.period - (time.monotonic() - started)))

    def sample(self, now: float | None = None) -> dict[str, Any]:
        """Reads the swarm once (one DHT call for the index, one per model) and returns the snapshot."""
        now = time.time() if now is None else now
        for model in fetch_models(self.dht, trust=self.trust):
            if model.num_blocks <= MAX_BLOCKS:
                self._models[model.model_id] = (model, now)
        recent = [(i, seen) for i, seen in self._models.items() if now - seen[1] < GONE_MODEL_SECONDS]
        self._models = dict(sorted(recent, key=lambda item: -item[1][1])[:MAX_MODELS])  # the freshest
        views = []
        for model_id, (model, _) in sorted(self._models.items()):
            records = fetch_span_records(self.dht, model_id, model.num_blocks, trust=self.trust)
            history = self._histories.setdefault(model_id, ModelHistory(self.period, self.history_seconds))
            history.add(model.num_blocks, records, now)
            views.append({**model_view(model, records), "history": history.view()})
        self._histories = {i: h for i, h in self._histories.items() if i in self._models}
        snapshot = {"time": round(now, 3), "period": self.period, "models": views, "error": None}
        with self._lock:
            self._snapshot = snapshot
        return snapshot
