"""The dashboard's HTTP routes (Starlette): the page, its script, and /swarm.json."""

from __future__ import annotations

from importlib.resources import files

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from .watch import SwarmWatch

NO_API = ("The chat box needs the swarm's HTTP API: this page is served by `swarm dht --dashboard`, which has "
          "none. Open the dashboard of `swarm api` to chat.")


def routes(dht, api: bool = True, watch: SwarmWatch | None = None, trust=None) -> list[BaseRoute]:
    """The dashboard as Starlette routes, for an app to serve at its root:

    - `GET /`: the page (swarm/dashboard/static/index.html), `GET /dashboard.js`: its script;
    - `GET /swarm.json`: every model of the swarm with its blocks, peers, coverage, gaps and
      history (the latest snapshot of `watch`), plus `"chat": {"enabled": api, "reason": ...}`.

    `dht` is a running `hivemind.DHT` (a client-mode one will do); unless `watch` is given, a
    `SwarmWatch(dht)` is started here, on a daemon thread that reads the DHT every 2 s for
    the life of the process (pass your own to stop it on shutdown); in a private swarm, with
    the member's `trust` (swarm.membership.Trust), so that it shows the members' peers.

    `api=True`: the app also serves the OpenAI-compatible `POST /v1/chat/completions` (with
    `"stream": true`: SSE `data: {...}` chunks carrying `choices[0].delta.content`, ending
    with `data: [DONE]`) and `GET /v1/models` on the same origin; the page's chat box talks
    to them. `api=False` (`swarm dht --dashboard`): the chat box is disabled, saying why.

    Add these after the app's own routes (`Starlette(routes=[*api_routes, *routes(dht)])`,
    or `app.router.routes.extend(routes(dht))` with FastAPI): they claim only these three paths.
    """
    watch = watch if watch is not None else SwarmWatch(dht, trust=trust).start()
    static = files(__package__) / "static"
    page, script = (static / "index.html").read_text(), (static / "dashboard.js").read_text()
    chat = {"enabled": api, "reason": None if api else NO_API}

    async def index(_: Request) -> Response:
        return HTMLResponse(page)

    async def dashboard_js(_: Request) -> Response:
        return Response(script, media_type="text/javascript")

    async def swarm_json(_: Request) -> Response:
        return JSONResponse({**watch.snapshot(), "chat": chat}, headers={"Cache-Control": "no-store"})

    return [Route("/", index, methods=["GET"]), Route("/dashboard.js", dashboard_js, methods=["GET"]),
            Route("/swarm.json", swarm_json, methods=["GET"])]
