"""`swarm dht --dashboard PORT`: the dashboard (without chat) served by uvicorn on a thread
of the DHT node's process."""

from __future__ import annotations

import logging
import threading
import time
from importlib.util import find_spec

logger = logging.getLogger(__name__)

START_TIMEOUT = 15.0  # s
MISSING = "the dashboard needs starlette and uvicorn: pip install 'swarmlm[api]'"


def missing_dependencies() -> str | None:
    """A one-line message if starlette or uvicorn is not installed, else None."""
    return MISSING if find_spec("starlette") is None or find_spec("uvicorn") is None else None


class DashboardServer:
    """`DashboardServer(dht, host, port)` listens (port 0: any free one; see `.url`) until `stop()`.
    In a private swarm `trust` (a member's, swarm.membership.Trust) says whose records count."""

    def __init__(self, dht, host: str, port: int, trust=None) -> None:
        import uvicorn
        from starlette.applications import Starlette

        from .pages import routes
        from .watch import SwarmWatch

        self.watch = SwarmWatch(dht, trust=trust).start()
        app = Starlette(routes=routes(dht, api=False, watch=self.watch))
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                     access_log=False, lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, daemon=True, name="dashboard-http")
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise OSError(f"the dashboard cannot listen on {host}:{port} (is the port in use?)")
            time.sleep(0.02)
        bound = self._server.servers[0].sockets[0].getsockname()
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{bound[1]}/"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)
        self.watch.stop()
