"""The swarm's dashboard: a page of block coverage, peers, load and a chat box, over the DHT's
records. `routes(dht, api=...)` for an app to mount (swarm api); `DashboardServer` for
`swarm dht --dashboard`. Needs starlette (and uvicorn to serve): `pip install 'swarmlm[api]'`;
importing this package does not."""

from __future__ import annotations

from .server import DashboardServer, missing_dependencies


def routes(dht, api: bool = True, watch=None, trust=None):
    """See swarm.dashboard.pages.routes (imported here on use: it needs starlette)."""
    from .pages import routes as dashboard_routes

    return dashboard_routes(dht, api=api, watch=watch, trust=trust)
